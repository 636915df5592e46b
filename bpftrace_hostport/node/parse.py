"""The node's tools' text, parsed: iptables-save lines and tables, nft JSON forward chains,
`conntrack -L -o extended`, sysctl values. Pure functions over captured text (tested on
fixtures recorded from real tools: tests/fixtures/check, tests/fixtures/rules).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from bpftrace_hostport import proto as protomod
from bpftrace_hostport.node.rules import parse_rule_line


# ctnetlink status bits (include/uapi/linux/netfilter/nf_conntrack_common.h)
_IPS_BITS = {0x1: "EXPECTED", 0x2: "SEEN_REPLY", 0x4: "ASSURED", 0x8: "CONFIRMED", 0x10: "SRC_NAT",
             0x20: "DST_NAT", 0x200: "DYING"}
IPS_DST_NAT = 0x20




TCP_STATES = {0: "NONE", 1: "SYN_SENT", 2: "SYN_RECV", 3: "ESTABLISHED", 4: "FIN_WAIT", 5: "CLOSE_WAIT",
               6: "LAST_ACK", 7: "TIME_WAIT", 8: "CLOSE", 9: "SYN_SENT2"}


@dataclass(frozen=True)
class CtEntry:
    """One DNATed conntrack entry: the client's tuple and the pod's answer tuple."""
    proto: str                      # "TCP" | "UDP" | "SCTP"
    orig_src: str
    orig_dst: str                   # the address the client called (a node IP, 127.0.0.1, ...)
    orig_sport: int
    orig_dport: int                 # the hostPort
    reply_src: str                  # the pod the entry is DNATed to
    reply_dst: str                  # the client, or the masquerade address
    reply_sport: int                # the containerPort
    reply_dport: int
    family: int = 4
    status: Tuple[str, ...] = ()    # "ASSURED", "SEEN_REPLY", "DST_NAT", ...; "UNREPLIED" from text
    timeout: Optional[int] = None   # seconds left
    state: Optional[str] = None     # TCP state name


@dataclass(frozen=True)
class NatSummary:
    """The hostPort plumbing of one nat table (one tool, one family), beyond the DNAT rules."""
    source: str                     # "iptables-nft" | "iptables-legacy"
    family: int
    chains: Tuple[str, ...] = ()
    # Jumps from CNI-HOSTPORT-DNAT and KUBE-HOSTPORTS, in evaluation order: (target, proto, ports)
    # with ports None when the jump does not filter on ports.
    dnat_jumps: Tuple[Tuple[str, Optional[str], Optional[Tuple[int, ...]]], ...] = ()
    hooked_from: Tuple[str, ...] = ()      # built-in chains that jump to CNI-HOSTPORT-DNAT
    setmark_sources: Tuple[str, ...] = ()  # -s of the jumps to CNI-HOSTPORT-SETMARK
    setmark_marks: bool = False            # CNI-HOSTPORT-SETMARK sets a mark
    masq_rule: bool = False                # CNI-HOSTPORT-MASQ masquerades
    postrouting_to_masq: bool = False      # POSTROUTING jumps to CNI-HOSTPORT-MASQ


@dataclass(frozen=True)
class FilterTable:
    """A filter table as `iptables-save -t filter` prints it."""
    source: str                     # "iptables-nft" | "iptables-legacy"
    family: int
    policies: Dict[str, str] = field(default_factory=dict)   # built-in chain -> ACCEPT | DROP
    rules: Tuple[str, ...] = ()                               # the `-A CHAIN ...` lines


@dataclass(frozen=True)
class NftForwardChain:
    """A native nftables base chain on the forward hook (iptables-nft's FORWARD excluded)."""
    family: str                     # "ip" | "ip6" | "inet" | ...
    table: str
    chain: str
    policy: str                     # "accept" | "drop"
    verdicts: Tuple[str, ...] = ()  # "accept", "drop", "jump NAME", ... of its rules


def _table_lines(text: str, table: str) -> Tuple[List[str], Dict[str, str], List[str]]:
    """(chain names, built-in policies, rule lines) of `table` in an iptables-save text.

    A text without any `*table` line (e.g. `iptables -S`) is taken as that table.
    """
    lines = [ln.strip() for ln in text.splitlines()]
    has_tables = any(ln.startswith("*") for ln in lines)
    current = None if has_tables else table
    chains: List[str] = []
    policies: Dict[str, str] = {}
    rules: List[str] = []
    for ln in lines:
        if not ln or ln.startswith("#"):
            continue
        if ln.startswith("*"):
            current = ln[1:].strip()
            continue
        if ln == "COMMIT":
            current = None if has_tables else table
            continue
        if current != table:
            continue
        if ln.startswith(":"):
            parts = ln[1:].split()
            if parts:
                chains.append(parts[0])
                if len(parts) > 1 and parts[1] != "-":
                    policies[parts[0]] = parts[1]
        elif ln.startswith("-P "):                       # `iptables -S` spelling of a policy
            parts = ln.split()
            if len(parts) >= 3:
                chains.append(parts[1])
                policies[parts[1]] = parts[2]
        elif ln.startswith("-N "):
            parts = ln.split()
            if len(parts) >= 2:
                chains.append(parts[1])
        else:
            body = ln[ln.index("]") + 1:].strip() if ln.startswith("[") and "]" in ln else ln
            if body.startswith(("-A ", "-I ")):
                rules.append(ln)
    return chains, policies, rules


def _proto(value: Optional[str]) -> Optional[str]:
    return protomod.k8s(value)


def _ports(value: Optional[str]) -> Optional[Tuple[int, ...]]:
    if value is None:
        return None
    out: List[int] = []
    for part in value.split(","):
        if ":" in part:
            lo, _, hi = part.partition(":")
            if lo.isdigit() and hi.isdigit() and int(hi) - int(lo) <= 65535:
                out.extend(range(int(lo), int(hi) + 1))
        elif part.isdigit():
            out.append(int(part))
    return tuple(out)


def nat_summary(text: str, source: str = "iptables-nft", family: int = 4) -> NatSummary:
    """The hostPort plumbing found in an iptables-save text's nat table (see NatSummary)."""
    chains, _, lines = _table_lines(text, "nat")
    rules = [r for r in (parse_rule_line(ln) for ln in lines) if r is not None]
    jumps = []
    hooked = []
    setmark_sources = []
    marks = masq = post = False
    for r in rules:
        t = r.target
        if r.chain in ("CNI-HOSTPORT-DNAT", "KUBE-HOSTPORTS") and t and t not in ("RETURN", "ACCEPT"):
            got = r.option("--dports", "--destination-ports", "--dport", "--destination-port")
            ports = _ports(got[1][0]) if got and not got[0] and got[1] else None
            p = r.option("-p", "--protocol")
            jumps.append((t, _proto(p[1][0]) if p and not p[0] and p[1] else None, ports))
        if t == "CNI-HOSTPORT-DNAT" and r.chain in ("PREROUTING", "OUTPUT"):
            hooked.append(r.chain)
        if t == "CNI-HOSTPORT-SETMARK":
            src = r.value("-s", "--source")
            if src and src not in setmark_sources:
                setmark_sources.append(src)
        if r.chain == "CNI-HOSTPORT-SETMARK" and t == "MARK":
            marks = True
        if r.chain == "CNI-HOSTPORT-MASQ" and t in ("MASQUERADE", "SNAT"):
            masq = True
        if r.chain == "POSTROUTING" and t == "CNI-HOSTPORT-MASQ":
            post = True
    return NatSummary(source=source, family=family, chains=tuple(chains), dnat_jumps=tuple(jumps),
                      hooked_from=tuple(dict.fromkeys(hooked)), setmark_sources=tuple(setmark_sources),
                      setmark_marks=marks, masq_rule=masq, postrouting_to_masq=post)


def filter_table(text: str, source: str = "iptables-nft", family: int = 4) -> FilterTable:
    """The filter table of an iptables-save text (or `iptables -S` output)."""
    _, policies, lines = _table_lines(text, "filter")
    return FilterTable(source=source, family=family, policies=policies, rules=tuple(lines))


def nft_forward_chains(doc: Any) -> List[NftForwardChain]:
    """Native forward-hook base chains in `nft -j list ruleset` (a parsed dict or its text)."""
    import json
    if isinstance(doc, str):
        try:
            doc = json.loads(doc)
        except ValueError:
            return []
    items = doc.get("nftables") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        return []
    chains: Dict[Tuple[str, str, str], dict] = {}
    verdicts: Dict[Tuple[str, str, str], List[str]] = {}
    for item in items:
        if not isinstance(item, dict):
            continue
        c = item.get("chain")
        if isinstance(c, dict) and c.get("hook") == "forward" and c.get("type", "filter") == "filter":
            if c.get("family") in ("ip", "ip6") and c.get("table") == "filter" and c.get("name") == "FORWARD":
                continue   # iptables-nft's own chain: read with iptables-nft-save
            chains[(c.get("family"), c.get("table"), c.get("name"))] = c
        r = item.get("rule")
        if isinstance(r, dict):
            key = (r.get("family"), r.get("table"), r.get("chain"))
            for expr in r.get("expr") or []:
                if not isinstance(expr, dict):
                    continue
                for verdict in ("accept", "drop", "reject", "return", "continue"):
                    if verdict in expr:
                        verdicts.setdefault(key, []).append(verdict)
                for verdict in ("jump", "goto"):
                    if isinstance(expr.get(verdict), dict):
                        verdicts.setdefault(key, []).append(f"{verdict} {expr[verdict].get('target')}")
    return [NftForwardChain(family=str(k[0]), table=str(k[1]), chain=str(k[2]),
                            policy=str(c.get("policy", "accept")), verdicts=tuple(verdicts.get(k, ())))
            for k, c in chains.items()]


def status_names(bits: int) -> Tuple[str, ...]:
    return tuple(name for bit, name in _IPS_BITS.items() if bits & bit)


def parse_conntrack_text(text: str) -> List[CtEntry]:
    """DNATed entries from `conntrack -L -o extended` (or plain `conntrack -L`) output.

    The text has no NAT flag, so an entry counts as DNATed when its reply source differs from
    the original destination.
    """
    out: List[CtEntry] = []
    for line in text.splitlines():
        toks = line.split()
        if len(toks) < 4 or "=" not in line:
            continue
        if toks[0] in ("ipv4", "ipv6"):   # the family: the addresses tell it below
            toks = toks[2:]
        proto = _proto(toks[0])
        if proto is None:
            continue
        # ASCII digits only: str.isdigit() also takes "²", which int() refuses; u32 seconds at most
        timeout = (int(toks[2]) if len(toks) > 2 and toks[2].isascii() and toks[2].isdigit()
                   and len(toks[2]) <= 9 else None)
        state = None
        tuples: List[Dict[str, str]] = [{}]
        flags: List[str] = []
        for t in toks[3:]:
            if t.startswith("[") and t.endswith("]"):
                flags.append(t[1:-1])
            elif "=" in t:
                k, _, v = t.partition("=")
                if k in ("src", "dst", "sport", "dport"):
                    if k in tuples[-1]:
                        tuples.append({})
                    tuples[-1][k] = v
            elif t.isupper() and state is None and not tuples[0]:
                state = t
        if len(tuples) < 2:
            continue
        o, r = tuples[0], tuples[1]

        def port(v: str) -> int:          # ValueError for "²", "1_0", -1, 70000, 5000 digits
            if not (v.isascii() and v.isdigit() and len(v) <= 5 and int(v) <= 65535):
                raise ValueError(v)
            return int(v)

        try:
            addrs = [ipaddress.ip_address(t[k]) for t in (o, r) for k in ("src", "dst")]
            entry = CtEntry(proto=proto, orig_src=str(addrs[0]), orig_dst=str(addrs[1]),
                            orig_sport=port(o["sport"]), orig_dport=port(o["dport"]),
                            reply_src=str(addrs[2]), reply_dst=str(addrs[3]),
                            reply_sport=port(r["sport"]), reply_dport=port(r["dport"]),
                            family=addrs[0].version, status=tuple(flags), timeout=timeout, state=state)
        except (KeyError, ValueError):
            continue                      # not a whole entry (a cut or damaged line): skipped
        if entry.reply_src != entry.orig_dst:
            out.append(entry)
    return out


def parse_sysctl_text(text: str) -> Dict[str, str]:
    """`sysctl -a` style lines (`key = value`) -> dict."""
    out: Dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out
