"""What the figures say is wrong, or only unusual: one finding per sentence, from the roll-up's
mappings and what is known of the node's pods and hostPort rules.

The same function serves the live view (the node's pods as they are now), the summary at exit,
and the incident review (the pods and rules snapshots the recording carries, as they were), so
a review on another machine, later, says what the live trace said.

Each Finding has a severity: "error" (traffic is lost or refused), "warning" (some of it), or
"expected" (unusual but right: a hostNetwork pod's port gets no DNAT), the `check` code that
confirms it on the node, when there is one, and a brief form: the same finding in one line of
the live view (which mapping, what happened: refused, unanswered, drops by reason, misses with
their owner), where the full sentence would take three.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, List, Optional

from bpftrace_hostport.addr import endpoint
from bpftrace_hostport.records import outcome as oc

SEVERITIES = ("error", "warning", "expected")


@dataclass(frozen=True)
class Finding:
    severity: str
    text: str
    code: Optional[str] = None          # the `check` finding that confirms it, if any
    mapping: Optional[str] = None       # "8000/tcp" or "8000/tcp -> 10.1.2.3:80"
    brief: Optional[str] = None         # the finding in one line (the live view)

    @property
    def problem(self) -> bool:
        return self.severity != "expected"


def _plural(n: int, one: str, many: Optional[str] = None) -> str:
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def _get(p: Any, name: str, default=None):
    return p.get(name, default) if isinstance(p, dict) else getattr(p, name, default)


def _ports(p: Any) -> list:
    return list(_get(p, "ports", ()) or ())


def _label(p: Any) -> str:
    ns, name = _get(p, "namespace"), _get(p, "name")
    return f"{ns}/{name}" if ns else str(name)


def _running(p: Any) -> bool:
    return _get(p, "phase") in (None, "Running", "Pending")


def _declaring(pods, proto: str, host_port: int) -> List[Any]:
    out = []
    for p in pods or []:
        if not _running(p):
            continue
        for cp in _ports(p):
            if _get(cp, "host_port") == host_port and str(_get(cp, "protocol")).lower() == proto:
                out.append(p)
                break
    return out


def _pod_text(m: dict) -> str:
    if not m.get("pod_name"):
        return ""
    ns = m.get("pod_namespace")
    return f" (pod {ns + '/' if ns else ''}{m['pod_name']})"


def diagnose(mappings: Iterable[dict], pods: Optional[Iterable] = None,
             rules: Optional[Iterable] = None, lost_events: int = 0) -> List[Finding]:
    """Findings for the mappings of a summary record (or a report), problems first.

    `pods` (PodInfo-like objects or snapshot dicts: namespace, name, ips, host_network, phase,
    ports) tells a declared hostPort without a rule and a dead pod's IP for sure; without it
    the mappings' own pod names are used. `rules` (HostPortRule-like: proto, host_port,
    target_ip, target_port) tells two rules on one hostPort."""
    if callable(pods):
        pods = pods()
    pods = list(pods) if pods is not None else None
    rules = list(rules) if rules is not None else None
    mappings = list(mappings)
    live = None if pods is None else {ip for p in pods if not _get(p, "host_network") and _running(p)
                                      for ip in (_get(p, "ips") or ())}
    named = any(m.get("pod_name") for m in mappings if m.get("pod_ip") is not None)
    out: List[Finding] = []
    for m in mappings:
        proto, port = m["proto"], m["host_port"]
        hp = f"{port}/{proto}"
        misses = m.get("misses")
        if m.get("pod_ip") is None:
            if not misses:
                continue
            what = f"hostPort {hp}: {_plural(int(misses), 'connection')} got no DNAT"
            declared = [p for p in _declaring(pods, proto, port) if not _get(p, "host_network")]
            if m.get("pod_name"):
                ns, port_name = m.get("pod_namespace"), m.get("port_name")
                out.append(Finding("expected", f"{what}: hostNetwork pod {ns + '/' if ns else ''}"
                                   f"{m['pod_name']}{' (' + port_name + ')' if port_name else ''} owns the "
                                   "port, so its own socket on the node serves it (expected; `check` "
                                   "confirms that it listens).", "hostnetwork-hostport", hp,
                                   f"{hp}: {_plural(int(misses), 'connection')} not DNATed, served by "
                                   f"hostNetwork pod {ns + '/' if ns else ''}{m['pod_name']}"))
            elif declared:
                who = ", ".join(_label(p) for p in declared)
                out.append(Finding("error", f"{what}, although pod {who} declares this hostPort: its DNAT "
                                   "rule is missing.", "hostport-no-rule", hp,
                                   f"{hp}: {_plural(int(misses), 'connection')} not DNATed, though pod "
                                   f"{who} declares it"))
            else:
                out.append(Finding("warning", f"{what} and no pod is known to own the port: a pod whose "
                                   "DNAT rule is missing, or a process on the node that is no pod.",
                                   "hostport-no-rule", hp,
                                   f"{hp}: {_plural(int(misses), 'connection')} not DNATed, no pod known "
                                   "to own the port"))
            continue
        target = endpoint(m["pod_ip"], m.get("pod_port"))
        where = f"{hp} -> {target}"
        flows = int(m.get("flows") or 0)
        answered = int(m.get("answered") or 0)
        refused = int(m.get("refused") or 0)
        unanswered = int(m.get("unanswered") or 0)
        dead = (m["pod_ip"] not in live) if live is not None else (named and not m.get("pod_name"))
        if flows and dead:
            told = "none answered" if not answered else f"{answered:,} answered"
            out.append(Finding("error", f"hostPort {where}: {_plural(flows, 'flow')} ({told}) went to an "
                               "IP no live pod has: a stale conntrack entry to a dead pod, or a leaked "
                               "rule.", "stale-conntrack", where,
                               f"{where}: {_plural(flows, 'flow')} to an IP no pod has, {told}"))
        elif refused:
            kinds = m.get("refusals") or {}
            by = m.get("refused_by") or {}
            main = max(kinds, key=kinds.get) if kinds else None
            sender = max(by, key=by.get) if by else None
            why = oc.why_refused(main, sender)
            if main == "host-unreachable":     # nobody has the pod's address any more
                code = "stale-conntrack" if proto in ("udp", "sctp") else "leaked-hostport-rule"
            elif sender == "node":              # a REJECT on the node
                code = "forward-drop"
            else:                               # the pod itself: nothing listens there
                code = "pod-not-listening"
            detail = ", ".join(f"{oc.refusal_words(k)} {n:,}" for k, n in sorted(kinds.items()))
            out.append(Finding("error" if refused * 2 >= flows - unanswered else "warning",
                               f"hostPort {where}{_pod_text(m)}: {_plural(refused, 'flow')} of "
                               f"{flows:,} refused ({detail}{', sent by the ' + sender if sender else ''}): "
                               f"{why}.", code, where,
                               f"{where}: {refused:,} of {flows:,} refused ("
                               + (", ".join(f"{k} {n:,}" for k, n in sorted(kinds.items())) if len(kinds) > 1
                                  else (main or "refused"))
                               + (f", by the {sender}" if sender else "") + ")"))
        if unanswered and not dead:
            drops = sum(int(v) for v in (m.get("drops") or {}).values())
            cause = (" and packets were dropped after DNAT" if drops else
                     ": nothing came back, not even a refusal (a firewall dropping silently, a pod "
                     "that does not reply, or a route that goes nowhere)")
            out.append(Finding("error" if not answered else "warning",
                               f"hostPort {where}{_pod_text(m)}: {_plural(unanswered, 'flow')} of {flows:,} "
                               f"got no answer within the timeout{cause}.",
                               "forward-drop" if drops else None, where,
                               f"{where}: {unanswered:,} of {flows:,} unanswered"
                               + (" (packets dropped)" if drops else "")))
        drops = m.get("drops") or {}
        if drops:
            n = sum(int(v) for v in drops.values())
            reasons = ", ".join(f"{r} {int(v):,}" for r, v in sorted(drops.items()))
            out.append(Finding("error", f"hostPort {where}: {_plural(n, 'packet')} dropped after DNAT "
                               f"({reasons}): a firewall or a missing route loses translated traffic.",
                               "forward-drop", where,
                               f"{where}: {_plural(n, 'packet')} dropped ({reasons})"))
    if rules:
        claims = {}
        for r in rules:
            key = (str(_get(r, "proto")).lower(), _get(r, "host_port"), _get(r, "host_ip"))
            claims.setdefault(key, []).append(r)
        for (proto, port, host_ip), rs in sorted(claims.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            targets = list(dict.fromkeys(endpoint(_get(r, "target_ip"), _get(r, "target_port")) for r in rs
                                         if _get(r, "family", 4) == 4))
            if len(targets) > 1:
                out.append(Finding("error", f"hostPort {port}/{proto} has {len(targets)} DNAT rules "
                                   f"({', '.join(targets)}): new connections go to the first one only.",
                                   "hostport-conflict", f"{port}/{proto}",
                                   f"{port}/{proto}: {len(targets)} DNAT rules, only the first gets "
                                   "new connections"))
    if lost_events:
        out.append(Finding("warning", f"{_plural(int(lost_events), 'flow')} could not be tracked (the "
                           "kernel's flow table was full): counts of flows include them, outcomes and "
                           "latency do not; trace with a bigger --flow-table.", None, None,
                           f"{_plural(int(lost_events), 'flow')} not tracked: the flow table is full "
                           "(--flow-table)"))
    order = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(out, key=lambda f: order.get(f.severity, 9))
