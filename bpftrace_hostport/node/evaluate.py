"""The packet evaluator: what a filter chain does to one packet of hostPort traffic.

Used for the forward path (node/checks/forward.py): a DNATed packet on its way to a pod, or a
pod's reply, is walked through the iptables FORWARD chain (iptables-save / `iptables -S` text,
either backend) or through an nftables forward-hook chain (`nft -j` JSON), following jumps and
gotos, until a rule decides it or the chain's policy does.

A match can be certain (True / False) or unknown (None: a match this evaluator cannot judge,
e.g. `-m set`, `meta mark`). A rule that may match and accepts counts as accepting, one that may
match and drops is skipped: only a drop that is certain is ever reported, so a finding never
rests on a guess.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from bpftrace_hostport import proto as protomod
from bpftrace_hostport.node.rules import IptRule, parse_rule_line

__all__ = ["Packet", "Verdict", "ipt_chains", "ipt_verdict", "NftChain", "NftRule", "nft_chains",
           "nft_verdict", "nft_rule_text"]

_MAX_DEPTH = 16


@dataclass(frozen=True)
class Packet:
    """What the evaluator knows of a packet: None is "not known"."""
    proto: str                                  # "TCP" | "UDP" | "SCTP"
    src: Optional[str] = None
    dst: Optional[str] = None
    iif: Optional[str] = None
    oif: Optional[str] = None
    sport: Optional[int] = None
    dport: Optional[int] = None
    states: Tuple[str, ...] = ()                # iptables ctstate names: NEW, ESTABLISHED, DNAT, ...
    orig_dport: Optional[int] = None            # the port the client called (ct original proto-dst)
    family: int = 4
    dst_local: Optional[bool] = None            # the destination is a local address (addrtype LOCAL, fib)
    mark: Optional[int] = None                  # the packet's mark (`-m mark --mark`)


@dataclass(frozen=True)
class Verdict:
    verdict: str                                # "accept" | "drop" | "reject"
    by_policy: bool                             # the chain's policy decided, no rule did
    rule: Optional[str] = None                  # iptables: the rule's text; nft: its text form
    chain: Optional[str] = None                 # where the deciding rule is
    handle: Optional[int] = None                # nft: the deciding rule's handle
    policy: Optional[str] = None                # the base chain's policy


# --------------------------------------------------------------------------- iptables


def _in_net(ip: Optional[str], value: str) -> Optional[bool]:
    if ip is None:
        return None
    try:
        addr = ipaddress.ip_address(ip)
        return any(addr in ipaddress.ip_network(v, strict=False) for v in value.split(","))
    except ValueError:
        return None


def _iface_match(name: Optional[str], value: str) -> Optional[bool]:
    if name is None:
        return None
    return name.startswith(value[:-1]) if value.endswith("+") else name == value


def _port_in(port: Optional[int], value: str) -> Optional[bool]:
    if port is None:
        return None
    for part in value.split(","):
        lo, _, hi = part.partition(":")
        if lo.isdigit() and (hi.isdigit() or not hi):
            if int(lo) <= port <= int(hi or lo):
                return True
        else:
            return None
    return False


def _ipt_match(rule: IptRule, pkt: Packet) -> Optional[bool]:
    """True / False when the rule surely matches or not, None when it depends on what we do not know."""
    result: Optional[bool] = True
    for neg, opt, values in rule.args:
        if opt in ("-j", "--jump", "-g", "--goto"):
            break
        v = values[0] if values else ""
        m: Optional[bool]
        if opt in ("-m", "--match", "--comment"):
            continue
        if opt in ("-p", "--protocol"):
            m = True if v.lower() in ("all", "0") else protomod.k8s(v) == pkt.proto
        elif opt in ("-d", "--destination"):
            m = _in_net(pkt.dst, v)
        elif opt in ("-s", "--source"):
            m = _in_net(pkt.src, v)
        elif opt in ("-o", "--out-interface"):
            m = _iface_match(pkt.oif, v)
        elif opt in ("-i", "--in-interface"):
            m = _iface_match(pkt.iif, v)
        elif opt in ("--dport", "--destination-port", "--dports", "--destination-ports"):
            m = _port_in(pkt.dport, v)
        elif opt in ("--sport", "--source-port", "--sports", "--source-ports"):
            m = _port_in(pkt.sport, v)
        elif opt in ("--ctstate", "--state"):
            m = bool(set(v.split(",")) & set(pkt.states))
        elif opt == "--mark" and pkt.mark is not None:
            value, _, mask = v.partition("/")
            try:
                m = (pkt.mark & int(mask or "0xffffffff", 0)) == int(value, 0)
            except ValueError:
                m = None
        elif opt == "--dst-type" and v in ("LOCAL", "UNICAST"):
            m = pkt.dst_local if v == "LOCAL" else (None if pkt.dst_local is None else not pkt.dst_local)
        else:
            m = None
        if m is not None and neg:
            m = not m
        if m is False:
            return False
        if m is None:
            result = None
    return result


def ipt_chains(lines: Sequence[str]) -> Dict[str, List[IptRule]]:
    """The `-A CHAIN ...` lines of one table, parsed and grouped by chain, in order."""
    chains: Dict[str, List[IptRule]] = {}
    for line in lines:
        r = parse_rule_line(line)
        if r is not None:
            chains.setdefault(r.chain, []).append(r)
    return chains


def _ipt_walk(chains: Dict[str, List[IptRule]], chain: str, pkt: Packet,
              depth: int = 0) -> Tuple[Optional[str], Optional[IptRule]]:
    """("accept" | "drop" | "reject" | "return" | None, the rule)."""
    if depth > _MAX_DEPTH:
        return None, None
    for rule in chains.get(chain, []):
        m = _ipt_match(rule, pkt)
        if m is False:
            continue
        t = rule.target
        if t == "ACCEPT":
            return "accept", rule
        if t in ("DROP", "REJECT"):
            if m:
                return t.lower(), rule
            continue
        if t == "RETURN":
            if m:
                return "return", rule
            continue
        if t in chains:
            verdict, why = _ipt_walk(chains, t, pkt, depth + 1)
            if verdict == "accept" or (verdict in ("drop", "reject") and m):
                return verdict, why
            if verdict is None and m and rule.option("-g", "--goto"):
                return "return", None      # a goto's chain ends like the calling chain would
    return None, None


def ipt_nat(chains: Dict[str, List[IptRule]], start: str, pkt: Packet,
            targets: Tuple[str, ...] = ("DNAT", "REDIRECT")) -> Optional[IptRule]:
    """The DNAT rule (or one of `targets`: MASQUERADE, SNAT) of a nat table that the packet may
    meet first from chain `start` (None: it leaves the table untranslated). A translation whose
    match is not certain counts (it may take it); a RETURN or ACCEPT counts only when certain,
    and an ACCEPT anywhere ends the table, a RETURN only its chain."""
    kind, rule = _ipt_nat(chains, start, pkt, targets, 0)
    return rule if kind == "nat" else None


def _ipt_nat(chains, chain, pkt, targets, depth) -> Tuple[str, Optional[IptRule]]:
    if depth > _MAX_DEPTH:
        return "end", None
    for rule in chains.get(chain, []):
        m = _ipt_match(rule, pkt)
        if m is False:
            continue
        t = rule.target
        if t in targets:
            return "nat", rule
        if t == "ACCEPT" and m:
            return "accept", None
        if t == "RETURN" and m:
            return "end", None
        if t in chains:
            kind, got = _ipt_nat(chains, t, pkt, targets, depth + 1)
            if kind in ("nat", "accept"):
                return kind, got
            if m and rule.option("-g", "--goto"):
                return "end", None
    return "end", None


def ipt_verdict(chains: Dict[str, List[IptRule]], policies: Dict[str, str], pkt: Packet,
                start: str = "FORWARD") -> Verdict:
    verdict, rule = _ipt_walk(chains, start, pkt)
    policy = policies.get(start, "ACCEPT")
    if verdict in (None, "return"):
        return Verdict("drop" if policy == "DROP" else "accept", True, f"-P {start} {policy}", start,
                       policy=policy)
    return Verdict(verdict, False, rule.text if rule else None,
                   rule.chain if rule else None, policy=policy)


# --------------------------------------------------------------------------- nftables


@dataclass
class NftRule:
    handle: Optional[int]
    expr: List[Any]
    comment: Optional[str] = None


@dataclass
class NftChain:
    family: str
    table: str
    name: str
    hook: Optional[str] = None
    type: Optional[str] = None
    prio: Optional[Any] = None
    policy: str = "accept"
    rules: List[NftRule] = field(default_factory=list)

    @property
    def key(self) -> Tuple[str, str, str]:
        return (self.family, self.table, self.name)


def nft_chains(items: Sequence[Any]) -> Dict[Tuple[str, str, str], NftChain]:
    """Chains with their rules from the items of `nft -j list ...` output ({"nftables": [...]}'s list)."""
    chains: Dict[Tuple[str, str, str], NftChain] = {}
    for item in items:
        if not isinstance(item, dict):
            continue
        c = item.get("chain")
        if isinstance(c, dict):
            key = (str(c.get("family")), str(c.get("table")), str(c.get("name")))
            ch = chains.setdefault(key, NftChain(*key))
            ch.hook, ch.type, ch.prio = c.get("hook"), c.get("type"), c.get("prio")
            ch.policy = str(c.get("policy", "accept"))
        r = item.get("rule")
        if isinstance(r, dict):
            key = (str(r.get("family")), str(r.get("table")), str(r.get("chain")))
            ch = chains.setdefault(key, NftChain(*key))
            h = r.get("handle")
            ch.rules.append(NftRule(h if isinstance(h, int) else None,
                                    r.get("expr") if isinstance(r.get("expr"), list) else [],
                                    r.get("comment") if isinstance(r.get("comment"), str) else None))
    return chains


_L4 = {"tcp", "udp", "sctp", "th"}


def _values(right: Any) -> Optional[List[Any]]:
    """A match's right side as a list of plain values / prefixes / ranges, None when not understood."""
    if isinstance(right, (str, int)):
        return [right]
    if isinstance(right, list):                 # ct state {established, related} in nft >= 1.0
        return right
    if isinstance(right, dict):
        if isinstance(right.get("set"), list):
            return right["set"]
        if "prefix" in right or "range" in right:
            return [right]
    return None


def _addr_in(ip: Optional[str], vals: List[Any]) -> Optional[bool]:
    if ip is None:
        return None
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    for v in vals:
        try:
            if isinstance(v, str) and addr == ipaddress.ip_address(v):
                return True
            if isinstance(v, dict) and isinstance(v.get("prefix"), dict):
                p = v["prefix"]
                if addr in ipaddress.ip_network(f"{p.get('addr')}/{p.get('len')}", strict=False):
                    return True
            elif isinstance(v, dict) and isinstance(v.get("range"), list) and len(v["range"]) == 2:
                lo, hi = (ipaddress.ip_address(x) for x in v["range"])
                if lo <= addr <= hi:
                    return True
        except (ValueError, TypeError):
            return None
    return False


def _num_in(n: Optional[int], vals: List[Any]) -> Optional[bool]:
    if n is None:
        return None
    for v in vals:
        if isinstance(v, int) and v == n:
            return True
        if isinstance(v, dict) and isinstance(v.get("range"), list) and len(v["range"]) == 2 \
                and all(isinstance(x, int) for x in v["range"]):
            if v["range"][0] <= n <= v["range"][1]:
                return True
        elif not isinstance(v, int):
            return None
    return False


def _ct_states(pkt: Packet) -> set:
    return {s.lower() for s in pkt.states if s in ("NEW", "ESTABLISHED", "RELATED", "INVALID", "UNTRACKED")}


def _ct_status(pkt: Packet) -> set:
    return {s.lower() for s in pkt.states if s in ("DNAT", "SNAT")}


def _nft_match(m: dict, pkt: Packet) -> Optional[bool]:
    op = m.get("op", "==")
    left, right = m.get("left"), m.get("right")
    if op not in ("==", "!=", "in"):
        return None
    vals = _values(right)
    if not isinstance(left, dict) or vals is None:
        return None
    got: Optional[bool] = None
    if "payload" in left and isinstance(left["payload"], dict):
        pl = left["payload"]
        p, f = pl.get("protocol"), pl.get("field")
        if p in ("ip", "ip6") and f in ("saddr", "daddr"):
            if (p == "ip6") != (pkt.family == 6):
                got = False
            else:
                got = _addr_in(pkt.src if f == "saddr" else pkt.dst, vals)
        elif p in _L4 and f in ("sport", "dport"):
            if p != "th" and protomod.k8s(p) != pkt.proto:
                got = False
            else:
                got = _num_in(pkt.sport if f == "sport" else pkt.dport, vals)
        elif (p, f) in (("ip", "protocol"), ("ip6", "nexthdr")):
            got = any(protomod.k8s(v) == pkt.proto for v in vals if isinstance(v, (str, int)))
    elif "meta" in left and isinstance(left["meta"], dict):
        key = left["meta"].get("key")
        if key in ("iifname", "oifname"):
            name = pkt.iif if key == "iifname" else pkt.oif
            if name is None:
                return None
            got = any(isinstance(v, str) and (name.startswith(v[:-1]) if v.endswith("*") else name == v)
                      for v in vals)
        elif key == "l4proto":
            got = any(protomod.k8s(v) == pkt.proto for v in vals if isinstance(v, (str, int)))
        elif key == "nfproto":
            got = any(v == ("ipv6" if pkt.family == 6 else "ipv4") for v in vals)
    elif "fib" in left and isinstance(left["fib"], dict):
        fib = left["fib"]
        if fib.get("result") == "type" and "daddr" in (fib.get("flags") or []):
            flat = [v for v in vals if isinstance(v, str)]
            if flat == ["local"] and pkt.dst_local is not None:
                got = pkt.dst_local
    elif "ct" in left and isinstance(left["ct"], dict):
        key, direction = left["ct"].get("key"), left["ct"].get("dir")
        flat = [v for v in vals if isinstance(v, str)]
        if len(flat) != len(vals):
            return None
        if key == "state":
            got = bool(set(flat) & _ct_states(pkt))
        elif key == "status":
            got = bool(set(flat) & _ct_status(pkt))
        elif key == "proto-dst" and direction == "original":
            got = _num_in(pkt.orig_dport, vals)
    if got is None:
        return None
    return (not got) if op == "!=" else got


_VERDICTS = ("accept", "drop", "reject", "return", "continue")


def _nft_rule(rule: NftRule, pkt: Packet) -> Tuple[Optional[bool], Optional[str], Optional[str]]:
    """(matches: True/False/None, verdict, jump/goto target) of one rule."""
    result: Optional[bool] = True
    for expr in rule.expr:
        if not isinstance(expr, dict):
            continue
        if "match" in expr and isinstance(expr["match"], dict):
            m = _nft_match(expr["match"], pkt)
            if m is False:
                return False, None, None
            if m is None:
                result = None
            continue
        for v in _VERDICTS:
            if v in expr:
                return result, v, None
        for v in ("jump", "goto"):
            if isinstance(expr.get(v), dict):
                return result, v, str(expr[v].get("target"))
        if "limit" in expr or "quota" in expr:
            result = None if result else result     # matches only within its rate: not certain
        # other statements (counter, log, meta ... set, mangle) do not decide anything
    return result, None, None


def _nft_walk(chains: Dict[Tuple[str, str, str], NftChain], key: Tuple[str, str, str], pkt: Packet,
              depth: int = 0) -> Tuple[Optional[str], Optional[NftChain], Optional[NftRule]]:
    if depth > _MAX_DEPTH or key not in chains:
        return None, None, None
    chain = chains[key]
    for rule in chain.rules:
        m, verdict, target = _nft_rule(rule, pkt)
        if m is False or verdict is None:
            continue
        if verdict == "accept":
            return "accept", chain, rule
        if verdict in ("drop", "reject"):
            if m:
                return verdict, chain, rule
            continue
        if verdict == "return":
            if m:
                return "return", chain, rule
            continue
        if verdict in ("jump", "goto") and target:
            sub, c, r = _nft_walk(chains, (key[0], key[1], target), pkt, depth + 1)
            if sub == "accept" or (sub in ("drop", "reject") and m):
                return sub, c, r
            if verdict == "goto" and m:
                return "return", None, None
    return None, None, None


def nft_nat(chains: Dict[Tuple[str, str, str], NftChain], key: Tuple[str, str, str], pkt: Packet,
            depth: int = 0, actions: Tuple[str, ...] = ("dnat", "redirect")) -> Optional[Tuple[NftChain, NftRule]]:
    """The dnat rule (or one of `actions`: masquerade, snat) the packet may meet first from chain
    `key` of a nat table (None: none)."""
    if depth > _MAX_DEPTH or key not in chains:
        return None
    chain = chains[key]
    for rule in chain.rules:
        m, verdict, target = _nft_rule(rule, pkt)
        if m is False:
            continue
        if any(isinstance(e, dict) and any(a in e for a in actions) for e in rule.expr):
            return chain, rule
        if verdict in ("accept", "return", "drop"):
            if m:
                return None
            continue
        if verdict in ("jump", "goto") and target:
            got = nft_nat(chains, (key[0], key[1], target), pkt, depth + 1, actions)
            if got is not None:
                return got
            if verdict == "goto" and m:
                return None
    return None


def nft_verdict(chains: Dict[Tuple[str, str, str], NftChain], base: NftChain, pkt: Packet) -> Verdict:
    """The verdict of one base chain. An accept there ends only that chain: other base chains on the
    same hook still see the packet (the caller evaluates each)."""
    verdict, chain, rule = _nft_walk(chains, base.key, pkt)
    if verdict in (None, "return"):
        return Verdict("drop" if base.policy == "drop" else "accept", True, f"policy {base.policy}",
                       base.name, policy=base.policy)
    return Verdict(verdict, False, nft_rule_text(rule) if rule else None, chain.name if chain else None,
                   rule.handle if rule else None, policy=base.policy)


# --------------------------------------------------------------------------- nft text


def _val_text(v: Any) -> str:
    if isinstance(v, dict):
        if "set" in v and isinstance(v["set"], list):
            return "{ " + ", ".join(_val_text(x) for x in v["set"]) + " }"
        if isinstance(v.get("prefix"), dict):
            return f"{v['prefix'].get('addr')}/{v['prefix'].get('len')}"
        if isinstance(v.get("range"), list):
            return "-".join(_val_text(x) for x in v["range"])
        return "?"
    if isinstance(v, list):
        return "{ " + ", ".join(_val_text(x) for x in v) + " }"
    if isinstance(v, str) and not v.replace(".", "").replace(":", "").replace("/", "").isalnum():
        return f'"{v}"'
    return str(v)


def _left_text(left: Any) -> str:
    if isinstance(left, dict):
        if isinstance(left.get("payload"), dict):
            return f"{left['payload'].get('protocol')} {left['payload'].get('field')}"
        if isinstance(left.get("meta"), dict):
            return str(left["meta"].get("key"))
        if isinstance(left.get("ct"), dict):
            ct = left["ct"]
            return "ct " + (f"{ct.get('dir')} " if ct.get("dir") else "") + str(ct.get("key"))
        if isinstance(left.get("fib"), dict):
            return f"fib {' . '.join(left['fib'].get('flags') or [])} {left['fib'].get('result')}"
    return "?"


def nft_rule_text(rule: NftRule) -> str:
    """A rule in nft's own syntax, for the common expressions (what `nft list` would print)."""
    parts: List[str] = []
    for expr in rule.expr:
        if not isinstance(expr, dict):
            continue
        if isinstance(expr.get("match"), dict):
            m = expr["match"]
            op = m.get("op", "==")
            parts.append(f"{_left_text(m.get('left'))} {'' if op in ('==', 'in') else op + ' '}"
                         f"{_val_text(m.get('right'))}")
        elif "accept" in expr or "drop" in expr or "return" in expr or "continue" in expr:
            parts.append(next(k for k in ("accept", "drop", "return", "continue") if k in expr))
        elif "reject" in expr:
            rj = expr["reject"] if isinstance(expr["reject"], dict) else {}
            if rj.get("type") == "icmpx" and rj.get("expr"):
                parts.append(f"reject with icmpx {rj['expr']}")
            elif rj.get("expr"):
                parts.append(f"reject with {rj.get('type', 'icmp')} {rj['expr']}")
            else:
                parts.append("reject")
        elif isinstance(expr.get("jump"), dict) or isinstance(expr.get("goto"), dict):
            k = "jump" if "jump" in expr else "goto"
            parts.append(f"{k} {expr[k].get('target')}")
        elif "counter" in expr:
            parts.append("counter")
        elif "log" in expr:
            parts.append("log")
        elif isinstance(expr.get("dnat"), dict):
            d = expr["dnat"]
            parts.append(f"dnat to {d.get('addr')}" + (f":{d['port']}" if d.get("port") else ""))
        elif "masquerade" in expr:
            parts.append("masquerade")
        else:
            parts.append(next(iter(expr), "?"))
    return " ".join(p for p in parts if p)
