"""The node's tools' text, parsed: iptables-save lines and tables (or `iptables -S`),
`conntrack -L -o extended`, sysctl values (nft JSON chains: node/evaluate.py). Pure functions over captured text (tested on
fixtures recorded from real tools: tests/fixtures/check, tests/fixtures/rules).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

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

    @property
    def dnat(self) -> bool:
        """The entry was translated: its reply comes from somewhere else than the client called."""
        return (self.reply_src, self.reply_sport) != (self.orig_dst, self.orig_dport)


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
    # portmap's externalSetMarkChain: chains other than CNI-HOSTPORT-SETMARK that the CNI-DN-*
    # chains jump to for their hairpin / localhost marks (KUBE-MARK-MASQ)
    external_mark_chains: Tuple[str, ...] = ()
    marks_set: Tuple[Tuple[str, str], ...] = ()   # (chain, mark) of every MARK rule, e.g. ("KUBE-MARK-MASQ", "0x4000")
    lines: Tuple[str, ...] = ()            # the table's `-A` lines, for node/evaluate.py's nat walk


@dataclass(frozen=True)
class FilterTable:
    """A filter table as `iptables-save -t filter` prints it."""
    source: str                     # "iptables-nft" | "iptables-legacy"
    family: int
    policies: Dict[str, str] = field(default_factory=dict)   # built-in chain -> ACCEPT | DROP
    rules: Tuple[str, ...] = ()                               # the `-A CHAIN ...` lines


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
    external: List[str] = []
    marks_set: List[Tuple[str, str]] = []
    marks = masq = post = False
    for r in rules:
        if r.chain.startswith("CNI-DN-") and r.target and r.target not in (
                "DNAT", "RETURN", "ACCEPT", "CNI-HOSTPORT-SETMARK") and r.target not in external:
            external.append(r.target)
        if r.target == "MARK":
            mark = _mark_value(r)
            if mark:
                marks_set.append((r.chain, mark))
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
                      setmark_marks=marks, masq_rule=masq, postrouting_to_masq=post,
                      external_mark_chains=tuple(external), marks_set=tuple(marks_set),
                      lines=tuple(lines))


def _mark_value(r) -> Optional[str]:
    """The bits a MARK rule sets: `--or-mark 0x4000`, `--set-xmark 0x4000/0x4000`, `--set-mark 0x4000`."""
    for opt in ("--or-mark", "--set-xmark", "--set-mark"):
        v = r.value(opt)
        if v:
            return v.split("/")[0].lower()
    return None


def filter_table(text: str, source: str = "iptables-nft", family: int = 4) -> FilterTable:
    """The filter table of an iptables-save text (or `iptables -S` output)."""
    _, policies, lines = _table_lines(text, "filter")
    return FilterTable(source=source, family=family, policies=policies, rules=tuple(lines))


def status_names(bits: int) -> Tuple[str, ...]:
    return tuple(name for bit, name in _IPS_BITS.items() if bits & bit)


def entry_from_netlink(m) -> Optional[CtEntry]:
    """A ctnetlink message (pyroute2's nfct_msg) as a CtEntry; None when it lacks a tuple."""
    def tup(t):
        ip = t.get_attr("CTA_TUPLE_IP") if t is not None else None
        pr = t.get_attr("CTA_TUPLE_PROTO") if t is not None else None
        if ip is None or pr is None:
            return None
        v6 = ip.get_attr("CTA_IP_V6_SRC") is not None
        src = ip.get_attr("CTA_IP_V6_SRC") if v6 else ip.get_attr("CTA_IP_V4_SRC")
        dst = ip.get_attr("CTA_IP_V6_DST") if v6 else ip.get_attr("CTA_IP_V4_DST")
        return (src, dst, pr.get_attr("CTA_PROTO_NUM"), pr.get_attr("CTA_PROTO_SRC_PORT") or 0,
                pr.get_attr("CTA_PROTO_DST_PORT") or 0, 6 if v6 else 4)

    status = m.get_attr("CTA_STATUS") or 0
    o, r = tup(m.get_attr("CTA_TUPLE_ORIG")), tup(m.get_attr("CTA_TUPLE_REPLY"))
    if not o or not r or not o[0] or not r[0]:
        return None
    proto = _proto(o[2])
    if proto is None:
        return None
    state = None
    pi = m.get_attr("CTA_PROTOINFO")
    tcp = pi.get_attr("CTA_PROTOINFO_TCP") if pi is not None else None
    if tcp is not None:
        state = TCP_STATES.get(tcp.get_attr("CTA_PROTOINFO_TCP_STATE"))
    names = status_names(status)
    if not status & 0x2:
        names = names + ("UNREPLIED",)
    return CtEntry(proto=proto, orig_src=o[0], orig_dst=o[1], orig_sport=o[3], orig_dport=o[4],
                   reply_src=r[0], reply_dst=r[1], reply_sport=r[3], reply_dport=r[4],
                   family=o[5], status=names, timeout=m.get_attr("CTA_TIMEOUT"), state=state)


def parse_conntrack_text(text: str) -> List[CtEntry]:
    """Entries from `conntrack -L -o extended` (or plain `conntrack -L`) output, DNATed or not
    (the text has no NAT flag: CtEntry.dnat tells them apart by their reply tuple).
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
        out.append(entry)
    return out


def parse_conntrack_stats(text: str) -> Dict[str, int]:
    """`conntrack -S` (one `cpu=N found=0 invalid=0 ...` line per CPU), summed over CPUs."""
    out: Dict[str, int] = {}
    for line in text.splitlines():
        for tok in line.split():
            k, _, v = tok.partition("=")
            if k != "cpu" and v.isascii() and v.isdigit():
                out[k] = out.get(k, 0) + int(v)
    return out


def parse_sysctl_text(text: str) -> Dict[str, str]:
    """`sysctl -a` style lines (`key = value`) -> dict."""
    out: Dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out
