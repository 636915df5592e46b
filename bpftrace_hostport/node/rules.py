"""Read a node's hostPort DNAT mappings from its nat rules.

Four producers write them, and each spells a mapping differently:

* the CNI portmap plugin, iptables backend: ``PREROUTING/OUTPUT -> CNI-HOSTPORT-DNAT``, which jumps
  (``-m multiport --dports``, with the comment ``dnat name: "<net>" id: "<container id>"``) to a
  per-container ``CNI-DN-<hash>`` chain holding ``-p tcp --dport 8000 -j DNAT --to-destination
  10.x.y.z:80`` (``-d HOSTIP/32`` when a hostIP is set). The same chain also holds ``-j
  CNI-HOSTPORT-SETMARK`` rules (hairpin / localhost marks); CNI-HOSTPORT-SETMARK and CNI-HOSTPORT-MASQ
  themselves only MARK and MASQUERADE. None of those are mappings.
* the CNI portmap plugin, nftables backend (plugins >= 1.6): tables ``ip cni_hostport`` and
  ``ip6 cni_hostport``, rules like ``tcp dport 8000 dnat to 10.x.y.z:80 comment "<container id>"``
  in chain ``hostports`` (hostIP rules: ``ip daddr HOSTIP ...``, in ``hostip_hostports`` up to v1.8).
* CRI-O's own hostport manager: ``KUBE-HOSTPORTS`` jumps (``-p tcp --dport 8000``) to
  ``KUBE-HP-<hash>`` chains whose DNAT has no ``--dport``; both carry the comment
  ``"<sandbox name> hostport 8000"``. With nftables, table ``crio-hostports`` holds verdict-less maps
  ``hostports`` (proto . port : podIP . podPort) and ``hostipports`` (hostIP . proto . port : ...).
* Docker: ``-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80``.

``nft -j list ruleset`` also lists the tables iptables-nft manages, but its DNAT targets show up
as opaque ``xt`` expressions without addresses, so those are read with iptables-nft instead
and ignored here. What is read on a live node, and how cheaply, is node/read.py's business.
"""
from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from bpftrace_hostport import proto as protomod
from bpftrace_hostport.errors import UserError
from bpftrace_hostport.model import HostPortRule

__all__ = ["parse_iptables_save", "parse_nft_json", "parse_nft_items", "read_node_rules", "rules_of"]


# portmap: `dnat name: "net" id: "<container id>"` (trimmed to 256 chars, so the closing quote may go)
_PORTMAP_ID = re.compile(r'\bid: "([^"]+)"?')
# CRI-O (and kubelet's old dockershim hostport code): `<sandbox name> hostport 8000`
_CRIO_HOSTPORT = re.compile(r"\bhostport ([0-9]+)\s*$")
_COUNTERS = re.compile(r"^\[([0-9]+):([0-9]+)\]\s+")


def _port(value) -> Optional[int]:
    """A port number 1-65535 (an int, or ASCII digits), else None: 0, 99999, "²", True, "80-90"."""
    if isinstance(value, str):
        value = int(value) if value.isascii() and value.isdigit() and len(value) <= 5 else None
    return value if type(value) is int and 1 <= value <= 65535 else None


def _counter(value) -> Optional[int]:
    """A packet or byte counter (a u64: an int, or ASCII digits), else None."""
    if isinstance(value, str):
        value = int(value) if value.isascii() and value.isdigit() and len(value) <= 20 else None
    return value if type(value) is int and 0 <= value < 2 ** 64 else None


# --------------------------------------------------------------------------- iptables-save


@dataclass
class IptRule:
    """One `-A CHAIN ...` line of iptables-save: its options in order, with `!` and values."""
    chain: str
    args: List[Tuple[bool, str, List[str]]]      # (negated, option, values)
    packets: Optional[int] = None
    bytes: Optional[int] = None
    text: str = ""                               # the line without its counters

    def option(self, *names: str) -> Optional[Tuple[bool, List[str]]]:
        """(negated, values) of the first of these options, as written."""
        for neg, opt, values in self.args:
            if opt in names:
                return neg, values
        return None

    def value(self, *names: str) -> Optional[str]:
        """The first of these options' value, None when it is absent or negated."""
        got = self.option(*names)
        return got[1][0] if got and not got[0] and got[1] else None

    def get(self, *names: str, negated: bool = False) -> Optional[str]:
        for neg, opt, values in self.args:
            if opt in names and neg == negated and values:
                return values[0]
        return None

    def has_negated(self, *names: str) -> bool:
        return any(neg and opt in names for neg, opt, _ in self.args)

    @property
    def target(self) -> Optional[str]:
        return self.get("-j", "--jump") or self.get("-g", "--goto")

    @property
    def proto(self) -> Optional[str]:
        if self.has_negated("-p", "--protocol"):
            return None
        p = self.get("-p", "--protocol")
        return protomod.k8s(p) if p else None

    @property
    def comment(self) -> Optional[str]:
        return self.get("--comment")


def tokenize(line: str) -> List[Tuple[str, bool]]:
    """Split like iptables-save quotes: "..." with backslash escapes; a bare ' is a plain character.

    Returns (token, was_quoted); a quoted token is always an option's value, never an option.
    """
    tokens: List[Tuple[str, bool]] = []
    i, n = 0, len(line)
    while i < n:
        if line[i].isspace():
            i += 1
            continue
        buf: List[str] = []
        quoted = False
        while i < n and not line[i].isspace():
            if line[i] == '"':
                quoted = True
                i += 1
                while i < n and line[i] != '"':
                    if line[i] == "\\" and i + 1 < n:
                        i += 1
                    buf.append(line[i])
                    i += 1
                i += 1  # closing quote (or end of line when it is missing)
            else:
                buf.append(line[i])
                i += 1
        tokens.append(("".join(buf), quoted))
    return tokens


def parse_rule_line(line: str) -> Optional[IptRule]:
    """`[p:b] -A CHAIN args...` (also `-I`, and `iptables -S -v`'s `-c P B`) -> IptRule."""
    packets = bytes_ = None
    m = _COUNTERS.match(line)
    if m:
        packets, bytes_ = _counter(m.group(1)), _counter(m.group(2))
        line = line[m.end():]
    tokens = tokenize(line)
    if len(tokens) < 2 or tokens[0][0] not in ("-A", "-I"):
        return None
    chain = tokens[1][0]
    rest = tokens[2:]
    if tokens[0][0] == "-I" and rest and rest[0][0].isdigit() and not rest[0][1]:
        rest = rest[1:]  # -I CHAIN RULENUM
    args: List[Tuple[bool, str, List[str]]] = []
    negate = False
    i = 0
    while i < len(rest):
        tok, quoted = rest[i]
        i += 1
        if tok == "!" and not quoted:
            negate = True
            continue
        if quoted or not tok.startswith("-"):
            # A stray value (should not happen in iptables-save output): attach it to the last option.
            if args:
                args[-1][2].append(tok)
            continue
        values: List[str] = []
        if tok.startswith("--") and "=" in tok:
            tok, value = tok.split("=", 1)
            values.append(value)
        while i < len(rest) and (rest[i][1] or (not rest[i][0].startswith("-") and rest[i][0] != "!")):
            values.append(rest[i][0])
            i += 1
        if tok == "-c" and len(values) >= 2 and values[0].isdigit() and values[1].isdigit():
            packets, bytes_ = _counter(values[0]), _counter(values[1])
            negate = False
            continue
        args.append((negate, tok, values))
        negate = False
    return IptRule(chain=chain, args=args, packets=packets, bytes=bytes_, text=without_counters(line.strip()))


def without_counters(text: str) -> str:
    """`iptables -v -S` puts `-c PACKETS BYTES` into the rule; a rule to show or delete is written without."""
    parts = text.split(" ")
    for i in range(len(parts) - 2):
        if parts[i] == "-c" and parts[i + 1].isdigit() and parts[i + 2].isdigit():
            return " ".join(parts[:i] + parts[i + 3:])
    return text


def _split_target(dest: str) -> Optional[Tuple[str, Optional[int]]]:
    """`10.0.0.2:80`, `[fd00::5]:80`, `10.0.0.2`, `fd00::5` -> (address, port or None).

    Ranges (`a-b`, `p1-p2`) are not hostPort mappings any runtime writes: None.
    """
    port: Optional[str] = None
    if dest.startswith("["):
        end = dest.find("]")
        if end < 0:
            return None
        addr, rest = dest[1:end], dest[end + 1:]
        if rest:
            if not rest.startswith(":"):
                return None
            port = rest[1:]
    elif dest.count(":") == 1:
        addr, port = dest.split(":")
    else:
        addr = dest
    try:
        addr = str(ipaddress.ip_address(addr))
    except ValueError:
        return None
    if port is None or port == "":
        return addr, None
    return (addr, _port(port)) if _port(port) else None


def _host_ip(value: Optional[str]) -> Optional[str]:
    """`192.0.2.10/32` -> `192.0.2.10`; a wider prefix stays a network; junk -> None."""
    if not value:
        return None
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        return None
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return str(net)


def _single_port(value: Optional[str]) -> Optional[int]:
    return _port(value)  # None: absent, a range (8000:8010), a name or out of range


def _family_of(addr: str, default: int) -> int:
    try:
        return ipaddress.ip_address(addr).version
    except ValueError:
        return default


def _kind_of_chain(chain: str) -> Optional[str]:
    if chain.startswith("CNI-DN-") or chain == "CNI-HOSTPORT-DNAT":
        return "portmap"
    if chain.startswith("KUBE-HP-") or chain == "KUBE-HOSTPORTS":
        return "crio"
    if chain == "DOCKER":
        return "docker"
    return None


def parse_iptables_save(text: str, family: int = 4, source: str = "iptables") -> List[HostPortRule]:
    """hostPort mappings in `iptables-save` / `ip6tables-save` output (with or without `-c`).

    Only the nat table counts (a whole save's filter table has a DOCKER chain of its own); a text
    without any `*table` line is taken as nat rules (e.g. `iptables -t nat -S`). `family` is what the
    text is expected to hold; each mapping's own DNAT address decides when they disagree.
    `source` labels portmap's mappings; CRI-O's and Docker's are labelled "crio" and "docker".
    """
    stripped = [ln.strip() for ln in text.splitlines()]
    bodies = [_COUNTERS.sub("", ln, count=1) for ln in stripped]
    has_tables = any(ln.startswith("*") for ln in stripped)
    if "*nat" not in stripped and not any(b.startswith(("-A ", "-I ")) for b in bodies):
        raise UserError(
            "This text is not iptables-save output (it has no *nat table and no -A rules); "
            "capture it with `iptables-save -c -t nat` (or ip6tables-save for IPv6).")
    rule_lines: List[str] = []
    table: Optional[str] = None
    for ln, body in zip(stripped, bodies):
        if not ln or ln.startswith("#"):
            continue
        if ln.startswith("*"):
            table = ln[1:].strip()
        elif ln == "COMMIT":
            table = None
        elif body.startswith(("-A ", "-I ")) and (table == "nat" or not has_tables):
            # Only the hostPort producers' chains hold mappings (and their parents' matches):
            # anything else (kube-proxy's thousands of Service rules) is never tokenized.
            parts = body.split(None, 2)
            if len(parts) > 1 and _kind_of_chain(parts[1]) is not None:
                rule_lines.append(ln)

    rules = [r for r in (parse_rule_line(ln) for ln in rule_lines) if r is not None]
    parents: Dict[str, List[IptRule]] = {}
    for r in rules:
        if r.target:
            parents.setdefault(r.target, []).append(r)

    out: List[HostPortRule] = []
    for r in rules:
        if r.target != "DNAT":
            continue
        kind = _kind_of_chain(r.chain)
        if kind is None:
            continue  # kube-proxy services, NodePorts, anything else DNATing: not a hostPort
        dest = r.get("--to-destination")
        target = _split_target(dest) if dest else None
        if target is None:
            continue
        ups = parents.get(r.chain, [])
        proto = r.proto or next((p.proto for p in ups if p.proto), None)
        if proto is None:
            continue
        host_port = _single_port(r.get("--dport", "--destination-port"))
        if host_port is None and not r.has_negated("--dport", "--destination-port"):
            # CRI-O: the port is matched by the KUBE-HOSTPORTS jump, and repeated in the comment.
            up_ports = {_single_port(p.get("--dport", "--destination-port"))
                        for p in ups if p.proto in (None, proto)}
            up_ports.discard(None)
            if len(up_ports) == 1:
                host_port = up_ports.pop()
            elif r.comment and _CRIO_HOSTPORT.search(r.comment):
                host_port = _port(_CRIO_HOSTPORT.search(r.comment).group(1))
        if host_port is None:
            continue
        host_ip = _host_ip(r.get("-d", "--destination"))
        if host_ip is None:
            up_ips = {_host_ip(p.get("-d", "--destination")) for p in ups}
            up_ips.discard(None)
            if len(up_ips) == 1:
                host_ip = up_ips.pop()
        container_id = None
        if kind == "portmap":
            for c in [r.comment] + [p.comment for p in ups]:
                m = _PORTMAP_ID.search(c or "")
                if m:
                    container_id = m.group(1)
                    break
        addr, port = target
        out.append(HostPortRule(
            proto=proto,
            host_port=host_port,
            target_ip=addr,
            target_port=port if port is not None else host_port,
            host_ip=host_ip,
            chain=r.chain,
            container_id=container_id,
            packets=r.packets,
            bytes=r.bytes,
            source={"crio": "crio", "docker": "docker"}.get(kind, source),
            family=_family_of(addr, family),
        ))
    return out


# --------------------------------------------------------------------------- nft -j


_NFT_FAMILY = {"ip": 4, "ip6": 6}
_PORTMAP_TABLE = "cni_hostport"
_CRIO_TABLE = "crio-hostports"


def _proto_name(value) -> Optional[str]:
    return protomod.k8s(value)


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _nft_family(value, addr: str) -> int:
    return _NFT_FAMILY.get(value if isinstance(value, str) else "", _family_of(addr, 4))


def _nft_ports(right) -> List[int]:
    if _port(right) and not isinstance(right, str):
        return [right]
    if isinstance(right, dict) and isinstance(right.get("set"), list):
        return [p for p in right["set"] if _port(p) and not isinstance(p, str)]
    return []  # ranges, named sets, maps: no single hostPort


def _nft_addr(right) -> Optional[str]:
    if isinstance(right, str):
        return _host_ip(right)
    if isinstance(right, dict) and isinstance(right.get("prefix"), dict):
        p = right["prefix"]
        return _host_ip(f"{p.get('addr')}/{p.get('len')}")
    return None


def _portmap_nft_rule(rule: dict) -> List[HostPortRule]:
    proto: Optional[str] = None
    ports: List[int] = []
    host_ip: Optional[str] = None
    packets = bytes_ = None
    dnat: Optional[dict] = None
    exprs = rule.get("expr")
    for expr in exprs if isinstance(exprs, list) else []:
        if not isinstance(expr, dict):
            continue
        if "match" in expr:
            m = _dict(expr["match"])
            if m.get("op", "==") not in ("==", "in"):
                continue
            left, right = m.get("left"), m.get("right")
            if not isinstance(left, dict):
                continue
            if "payload" in left:
                pl = _dict(left["payload"])
                p, f = pl.get("protocol"), pl.get("field")
                if f == "dport" and (p == "th" or _proto_name(p)):
                    ports = _nft_ports(right)
                    if p != "th":
                        proto = _proto_name(p)
                elif f == "daddr" and p in ("ip", "ip6"):
                    host_ip = _nft_addr(right)
                elif (p, f) in (("ip", "protocol"), ("ip6", "nexthdr")):
                    proto = _proto_name(right) or proto
            elif _dict(left.get("meta")).get("key") == "l4proto":
                proto = _proto_name(right) or proto
        elif "counter" in expr and isinstance(expr["counter"], dict):
            packets = _counter(expr["counter"].get("packets"))
            bytes_ = _counter(expr["counter"].get("bytes"))
        elif "dnat" in expr and isinstance(expr["dnat"], dict):
            dnat = expr["dnat"]
    if dnat is None or proto is None or not ports:
        return []
    addr = dnat.get("addr")
    if not isinstance(addr, str):
        return []
    try:
        addr = str(ipaddress.ip_address(addr))
    except ValueError:
        return []
    port = dnat.get("port")
    if port is not None and (isinstance(port, str) or not _port(port)):
        return []  # a port range or nonsense: not a hostPort mapping
    fam = _nft_family(rule.get("family"), addr)
    comment = rule.get("comment")
    return [HostPortRule(
        proto=proto, host_port=hp, target_ip=addr, target_port=port if port is not None else hp,
        host_ip=host_ip, chain=f"{rule.get('table')}/{rule.get('chain')}",
        container_id=comment if isinstance(comment, str) and comment else None, packets=packets, bytes=bytes_,
        source="nftables", family=fam) for hp in ports]


def _crio_nft_map(m: dict) -> List[HostPortRule]:
    """CRI-O's maps: [addr .] proto . port : podIP . podPort, one element per mapping."""
    types = m.get("type")
    if not isinstance(types, list):
        return []
    with_ip = len(types) == 3 and str(types[0]).endswith("_addr")
    if types[-2:] != ["inet_proto", "inet_service"] or len(types) not in (2, 3):
        return []
    out: List[HostPortRule] = []
    elems = m.get("elem")
    for item in elems if isinstance(elems, list) else []:
        if not (isinstance(item, list) and len(item) == 2):
            continue
        key, value = item
        packets = bytes_ = None
        if isinstance(key, dict) and "elem" in key:
            e = _dict(key["elem"])
            if isinstance(e.get("counter"), dict):
                packets, bytes_ = _counter(e["counter"].get("packets")), _counter(e["counter"].get("bytes"))
            key = e.get("val")
        k = key.get("concat") if isinstance(key, dict) else None
        v = value.get("concat") if isinstance(value, dict) else None
        if not (isinstance(k, list) and isinstance(v, list) and len(v) == 2):
            continue
        host_ip = None
        if with_ip:
            if len(k) != 3:
                continue
            host_ip, k = _host_ip(str(k[0])), k[1:]
        if len(k) != 2 or isinstance(k[1], str) or not _port(k[1]) or isinstance(v[1], str) or not _port(v[1]):
            continue
        proto = _proto_name(k[0])
        try:
            addr = str(ipaddress.ip_address(v[0] if isinstance(v[0], str) else ""))
        except ValueError:
            continue
        if proto is None:
            continue
        out.append(HostPortRule(
            proto=proto, host_port=k[1], target_ip=addr, target_port=v[1], host_ip=host_ip,
            chain=f"{m.get('table')}/{m.get('name')}", container_id=None,
            packets=packets, bytes=bytes_, source="crio",
            family=_nft_family(m.get("family"), addr)))
    return out


def parse_nft_json(text: str) -> List[HostPortRule]:
    """hostPort mappings in `nft -j list ruleset`: portmap's cni_hostport tables and CRI-O's maps.

    Every other table is ignored, including the ones iptables-nft manages (read those with
    iptables-nft-save: nft shows their DNAT targets only as opaque xt expressions).
    """
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise UserError(
            "This text is not valid JSON from nftables; capture it with `nft -j list ruleset`.") from None
    items = doc.get("nftables") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise UserError(
            "This JSON has no \"nftables\" list, so it is not `nft -j list ruleset` output; "
            "capture it with `nft -j list ruleset`.")
    return parse_nft_items(items)


# --------------------------------------------------------------------------- the live node


def parse_nft_items(items) -> List[HostPortRule]:
    """hostPort mappings in the items of `nft -j list ...` (see parse_nft_json)."""
    out: List[HostPortRule] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("rule"), dict) and item["rule"].get("table") == _PORTMAP_TABLE:
            out.extend(_portmap_nft_rule(item["rule"]))
        elif isinstance(item.get("map"), dict) and item["map"].get("table") == _CRIO_TABLE:
            out.extend(_crio_nft_map(item["map"]))
    return out


def _dedup(rules: Iterable[HostPortRule]) -> List[HostPortRule]:
    """One rule per identical mapping (e.g. the same portmap chains in iptables-nft and legacy).

    The copy with counters wins over one without; between two with counters, the one with more
    packets (the backend whose rule the traffic actually hits); otherwise the first seen.
    """
    kept: Dict[tuple, int] = {}
    out: List[HostPortRule] = []
    for r in rules:
        key = (r.family, r.proto, r.host_ip, r.host_port, r.target_ip, r.target_port,
               r.chain, r.container_id)
        if key not in kept:
            kept[key] = len(out)
            out.append(r)
        elif r.packets is not None and (out[kept[key]].packets is None
                                        or r.packets > out[kept[key]].packets):
            out[kept[key]] = r
    return out


def rules_of(nf) -> List[HostPortRule]:
    """The hostPort mappings of one read (node/read.py's Netfilter): every backend, both families."""
    found: List[HostPortRule] = []
    for source, family, text in nf.nat:
        if "-A " in text:
            found.extend(parse_iptables_save(text, family, source))
    found.extend(parse_nft_items(nf.nft_items))
    return _dedup(found)


def read_node_rules(netns: Optional[str] = None, max_age: float = 2.0) -> Tuple[List[HostPortRule], List[str]]:
    """Every hostPort mapping on this node (or inside network namespace `netns`), plus notes.

    Reads the nat chains that concern hostPorts of iptables-nft and iptables-legacy (the legacy
    tables only when they exist), both families, and the native nftables tables (node/read.py);
    a tool that is missing or fails is skipped and named in the notes, one sentence each. The
    same mapping seen through two backends is kept once (the copy with counters). A read of the
    same namespace less than `max_age` seconds old is reused (a trace's start asks several times).
    """
    from bpftrace_hostport.node.read import CACHE
    nf = CACHE.get(netns, ("nat",), max_age)
    return rules_of(nf), list(nf.notes)
