"""What came back for a flow: its outcome, and for a refused flow what refused it and who sent it.

The kernel decides (bpf/hostport.bpf.c judge_reply) from the first packet back: an answer
(a TCP SYN-ACK, UDP or SCTP data from the pod), or a refusal (a TCP reset or SCTP ABORT in
reply to the first packet, or an ICMP/ICMPv6 error about the flow). User space adds the flows
with nothing back: "unanswered" once --timeout passed, "pending" when tracing ended first.

The codes are the ones bpf/events.h defines (REFUSAL_*, BY_*; a test keeps them equal) and the
ones FlowBatch and the recording store; records carry the names.
"""
from __future__ import annotations

from typing import Optional

#: FlowBatch's `outcome` column and the recording's: the index is the code.
OUTCOMES = ("unanswered", "answered", "refused", "pending")
UNANSWERED, ANSWERED, REFUSED, PENDING = range(4)

#: events.h REFUSAL_*: the index is the code (0: not refused).
REFUSALS = (None, "reset", "abort", "port-unreachable", "host-unreachable", "net-unreachable",
            "protocol-unreachable", "admin-prohibited", "time-exceeded", "parameter-problem",
            "unreachable")
#: Refusals that are ICMP errors (their type and code are kept), by code.
ICMP_REFUSALS = frozenset(range(3, len(REFUSALS)))

#: events.h BY_*: the index is the code (0: not refused).
REFUSED_BY = (None, "pod", "node", "network")

_ICMP_WORDS = {
    "port-unreachable": "ICMP port unreachable", "host-unreachable": "ICMP host unreachable",
    "net-unreachable": "ICMP network unreachable",
    "protocol-unreachable": "ICMP protocol unreachable",
    "admin-prohibited": "ICMP administratively prohibited",
    "time-exceeded": "ICMP time exceeded", "parameter-problem": "ICMP parameter problem",
    "unreachable": "ICMP destination unreachable",
}


def code_of(table, name: Optional[str]) -> int:
    """The code of a name in one of the tables above (None -> 0)."""
    return table.index(name) if name is not None else 0


def refusal_words(refusal: Optional[str], by: Optional[str] = None) -> str:
    """ "a reset from the pod", "ICMP port unreachable from the node": for text and notes."""
    if refusal in ("reset", "abort"):
        what = "a TCP reset" if refusal == "reset" else "an SCTP ABORT"
    else:
        what = _ICMP_WORDS.get(refusal or "", refusal or "a refusal")
    src = {"pod": " from the pod", "node": " from the node itself",
           "network": " from the network"}.get(by or "", "")
    return what + src


def why_refused(refusal: Optional[str], by: Optional[str]) -> str:
    """What a refusal usually means, in one clause, for a finding or a note."""
    if refusal in ("reset", "port-unreachable", "abort") and by == "pod":
        return "nothing listens on the containerPort (the server is down or listens elsewhere)"
    if refusal in ("reset", "admin-prohibited", "port-unreachable") and by == "node":
        return "a REJECT rule on the node refuses it"
    if refusal == "host-unreachable":
        return ("no host answers for the pod's address (the pod is gone, or its address is on "
                "no interface)")
    if refusal == "net-unreachable":
        return "the node has no route to the pod's address"
    if refusal == "admin-prohibited":
        return "a firewall on the way refuses it"
    return "the pod's side refused it"
