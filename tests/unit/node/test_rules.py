"""rules.py: hostPort mappings out of iptables-save / nft -j (fixtures: tests/fixtures/rules/README.md)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bpftrace_hostport.node import rules
from bpftrace_hostport.errors import UserError
from bpftrace_hostport.model import HostPortRule
from bpftrace_hostport.node.rules import parse_iptables_save, parse_nft_json, read_node_rules

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "rules"

ID_A = "9bb860b4a6e4acf959daf85d815086f49d8cfdfacce4f29f84f04e480fa3d7da"  # sha256("pod-a")
ID_B = "274a81a3a76ae1289a4a97cfa266d1b25cbd3c8b7108070a314078898900671c"  # sha256("pod-b")
ID_C = "4bd4e6131c7d251239a0bc10825954baf004d0a33f170f290c560f7c55fc737f"  # sha256("pod-c")
ID_D = "ee82ab61647019eec438c9921a948201ffa9003530cf019f0a7518f4d21c4a63"  # sha256("pod-d")
DN_A = "CNI-DN-a96e14b5f70d2340446f3"
DN_B = "CNI-DN-4e04db555a440e0f3b610"
DN_C = "CNI-DN-0987a9be2d9a99af73ca2"


def text(name: str) -> str:
    return (FIX / name).read_text()


def R(proto, host_port, target_ip, target_port, **kw) -> HostPortRule:
    return HostPortRule(proto, host_port, target_ip, target_port, **kw)


# --------------------------------------------------------------------------- portmap, iptables


def test_portmap_nft_backend_with_counters():
    got = parse_iptables_save(text("portmap_nft_counters.txt"), 4, "iptables-nft")
    assert got == [
        R("TCP", 8443, "10.77.0.3", 443, host_ip="192.0.2.10", chain=DN_B, container_id=ID_B,
          packets=1, bytes=60, source="iptables-nft", family=4),
        R("TCP", 8000, "10.77.0.2", 80, chain=DN_A, container_id=ID_A,
          packets=2, bytes=120, source="iptables-nft", family=4),
        R("UDP", 5353, "10.77.0.2", 53, chain=DN_A, container_id=ID_A,
          packets=0, bytes=0, source="iptables-nft", family=4),
    ]


def test_portmap_without_counters_gives_none_counters():
    got = parse_iptables_save(text("portmap_nft_nocounters.txt"))
    assert [(r.host_port, r.packets, r.bytes, r.source) for r in got] == [
        (8443, None, None, "iptables"), (8000, None, None, "iptables"), (5353, None, None, "iptables")]
    # Same mappings as the -c capture, counters aside.
    with_c = parse_iptables_save(text("portmap_nft_counters.txt"))
    strip = lambda rs: [(r.proto, r.host_port, r.target_ip, r.target_port, r.host_ip, r.chain,
                         r.container_id) for r in rs]
    assert strip(got) == strip(with_c)


def test_portmap_ipv6():
    got = parse_iptables_save(text("portmap_nft_v6_counters.txt"), 6, "iptables-nft")
    assert got == [
        R("TCP", 8444, "fd00:77::3", 443, host_ip="2001:db8::10", chain=DN_B, container_id=ID_B,
          packets=0, bytes=0, source="iptables-nft", family=6),
        R("TCP", 8000, "fd00:77::2", 80, chain=DN_A, container_id=ID_A,
          packets=1, bytes=80, source="iptables-nft", family=6),
        R("UDP", 5353, "fd00:77::2", 53, chain=DN_A, container_id=ID_A,
          packets=0, bytes=0, source="iptables-nft", family=6),
    ]


def test_portmap_legacy_backend():
    got = parse_iptables_save(text("portmap_legacy_counters.txt"), 4, "iptables-legacy")
    assert got == [R("TCP", 8080, "10.77.0.4", 8080, chain=DN_C, container_id=ID_C,
                     packets=1, bytes=60, source="iptables-legacy", family=4)]
    got6 = parse_iptables_save(text("portmap_legacy_v6_nocounters.txt"), 6, "iptables-legacy")
    assert got6 == [R("TCP", 8080, "fd00:77::4", 8080, chain=DN_C, container_id=ID_C,
                      source="iptables-legacy", family=6)]


def test_nft_save_with_legacy_warning_has_no_mappings():
    t = text("portmap_legacy_seen_by_nft.txt")
    assert "# Warning: iptables-legacy tables present" in t
    assert parse_iptables_save(t) == []


def test_setmark_masq_and_bridge_masquerade_are_not_mappings():
    got = parse_iptables_save(text("portmap_nft_counters.txt"))
    assert all(r.chain.startswith("CNI-DN-") for r in got)
    assert len(got) == 3  # the capture has 6 SETMARK jumps, MARK, MASQUERADE and ipMasq chains
    only_marks = "\n".join([
        "*nat",
        ":CNI-HOSTPORT-SETMARK - [0:0]",
        ":CNI-HOSTPORT-MASQ - [0:0]",
        "[5:300] -A CNI-DN-x -s 10.77.0.0/24 -p tcp -m tcp --dport 8000 -j CNI-HOSTPORT-SETMARK",
        "[5:300] -A CNI-DN-x -s 127.0.0.1/32 -p tcp -m tcp --dport 8000 -j CNI-HOSTPORT-SETMARK",
        '[5:300] -A CNI-HOSTPORT-SETMARK -m comment --comment "CNI portfwd masquerade mark" '
        "-j MARK --set-xmark 0x2000/0x2000",
        "[5:300] -A CNI-HOSTPORT-MASQ -m mark --mark 0x2000/0x2000 -j MASQUERADE",
        "COMMIT",
    ])
    assert parse_iptables_save(only_marks) == []


def test_kube_proxy_dnat_is_not_a_hostport():
    t = "\n".join([
        "*nat",
        '-A KUBE-SEP-ABC -p tcp -m comment --comment "default/web:http" -m tcp '
        "-j DNAT --to-destination 10.244.1.5:8080",
        '-A KUBE-NODEPORTS -p tcp -m comment --comment "default/web:http" -m tcp --dport 30080 -j KUBE-EXT-X',
        "COMMIT",
    ])
    assert parse_iptables_save(t) == []


# --------------------------------------------------------------------------- CRI-O, Docker


CRIO_CHAIN_8000 = "KUBE-HP-FHFS3GOWQ3755ZD2"


def test_crio_hostport_chains():
    got = parse_iptables_save(text("crio_nft_counters.txt"), 4, "iptables-nft")
    assert got == [
        R("TCP", 8000, "10.88.0.2", 80, chain=CRIO_CHAIN_8000, packets=1, bytes=60, source="crio", family=4),
        R("UDP", 5353, "10.88.0.2", 53, chain="KUBE-HP-MEIHEDDUIY5NRFKU", packets=0, bytes=0,
          source="crio", family=4),
        R("TCP", 8443, "10.88.0.2", 443, host_ip="192.0.2.10", chain="KUBE-HP-YXALTHF2KWW7ZUDG",
          packets=0, bytes=0, source="crio", family=4),
    ]
    got6 = parse_iptables_save(text("crio_v6_nocounters.txt"), 6)
    assert got6 == [R("TCP", 8000, "fd00:88::2", 80, chain=CRIO_CHAIN_8000, source="crio", family=6)]


def test_crio_port_from_comment_when_jump_rule_is_missing():
    t = "\n".join([
        "*nat",
        '-A KUBE-HP-X -p tcp -m comment --comment "web-0_shop hostport 8000" -m tcp '
        "-j DNAT --to-destination 10.1.1.2:80",
        "COMMIT",
    ])
    assert parse_iptables_save(t) == [R("TCP", 8000, "10.1.1.2", 80, chain="KUBE-HP-X", source="crio")]


def test_docker_chain_only_from_nat_table():
    got = parse_iptables_save(text("docker_nft_counters.txt"), 4, "iptables-nft")
    assert "*filter" in text("docker_nft_counters.txt")  # its DOCKER chain has ACCEPT rules on --dport
    z = dict(chain="DOCKER", packets=0, bytes=0, source="docker", family=4)
    assert got == [
        R("TCP", 8080, "172.17.0.2", 80, **z),
        R("TCP", 8081, "172.17.0.2", 80, host_ip="127.0.0.1", **z),
        R("UDP", 5353, "172.17.0.2", 53, **z),
        R("TCP", 9090, "172.18.0.2", 9090, **z),
    ]
    got6 = parse_iptables_save(text("docker_v6_nocounters.txt"), 6)
    assert got6 == [R("TCP", 8080, "fd00:d0c::2", 80, chain="DOCKER", source="docker", family=6)]


# --------------------------------------------------------------------------- odd inputs


def test_rules_without_table_header_and_other_spellings():
    # `iptables -t nat -S -v` style: no *nat line, counters as -c P B; a quoted comment with a
    # bare apostrophe; a DNAT without a port keeps the host port; SCTP.
    t = "\n".join([
        "-P PREROUTING ACCEPT",
        "-N DOCKER",
        "-A DOCKER ! -i docker0 -p sctp -m sctp --dport 9000 -c 7 420 -j DNAT --to-destination 172.17.0.9",
        '-A CNI-HOSTPORT-DNAT -p udp -m comment --comment "dnat name: \\"o\'net\\" id: \\"abc\\"" '
        "-m multiport --dports 53 -j CNI-DN-y",
        "-A CNI-DN-y -d 192.0.2.0/24 -p udp -m udp --dport 53 -j DNAT --to-destination 10.0.0.9:5353",
    ])
    assert parse_iptables_save(t, 4, "iptables-nft") == [
        R("SCTP", 9000, "172.17.0.9", 9000, chain="DOCKER", packets=7, bytes=420, source="docker"),
        R("UDP", 53, "10.0.0.9", 5353, host_ip="192.0.2.0/24", chain="CNI-DN-y", container_id="abc",
          source="iptables-nft"),
    ]


@pytest.mark.parametrize("garbage", [
    "",
    "hello world\n",
    "Chain PREROUTING (policy ACCEPT)\ntarget prot opt source destination\n",  # iptables -L, not -save
    '{"nftables": []}',
])
def test_not_iptables_save_is_a_user_error(garbage):
    with pytest.raises(UserError) as err:
        parse_iptables_save(garbage)
    assert "iptables-save" in str(err.value)


# --------------------------------------------------------------------------- nftables


def test_portmap_nftables_backend():
    got = parse_nft_json(text("portmap_nftables.json"))
    n = dict(chain="cni_hostport/hostports", source="nftables")
    assert got == [
        R("TCP", 8000, "10.77.0.2", 80, container_id=ID_A, family=4, **n),
        R("UDP", 5353, "10.77.0.2", 53, container_id=ID_A, family=4, **n),
        R("TCP", 8443, "10.77.0.3", 443, host_ip="192.0.2.10", container_id=ID_B, family=4, **n),
        R("TCP", 8000, "fd00:77::2", 80, container_id=ID_A, family=6, **n),
        R("UDP", 5353, "fd00:77::2", 53, container_id=ID_A, family=6, **n),
        R("TCP", 8444, "fd00:77::3", 443, host_ip="2001:db8::10", container_id=ID_B, family=6, **n),
    ]  # the masquerading chain's rules are not mappings


def test_portmap_nftables_v18_hostip_chain():
    got = parse_nft_json(text("portmap_nftables_v1.8.json"))
    assert got == [
        R("UDP", 7000, "10.77.0.5", 7001, chain="cni_hostport/hostports", container_id=ID_D,
          source="nftables", family=4),
        R("SCTP", 9000, "10.77.0.5", 9000, chain="cni_hostport/hostports", container_id=ID_D,
          source="nftables", family=4),
        R("TCP", 9443, "10.77.0.5", 443, host_ip="192.0.2.10", chain="cni_hostport/hostip_hostports",
          container_id=ID_D, source="nftables", family=4),
    ]


def test_crio_nftables_maps():
    got = parse_nft_json(text("crio_nftables.json"))
    c = dict(source="crio", chain="crio-hostports/hostports")
    assert got == [
        R("TCP", 8084, "10.88.0.2", 84, host_ip="192.0.2.10", source="crio",
          chain="crio-hostports/hostipports", family=4),
        R("TCP", 8080, "10.88.0.2", 80, family=4, **c),
        R("UDP", 8081, "10.88.0.2", 81, family=4, **c),
        R("SCTP", 8083, "10.88.0.2", 83, family=4, **c),
        R("TCP", 8080, "fd00:88::2", 80, family=6, **c),
    ]


def test_iptables_nft_tables_in_nft_json_are_ignored():
    # Real capture: portmap via iptables-nft, seen by nft. DNATs are opaque xt targets there.
    assert parse_nft_json(text("portmap_iptables_nft_ruleset.json")) == []


def test_nft_counters_inet_family_and_port_sets():
    doc = {"nftables": [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "inet", "name": "cni_hostport", "handle": 1}},
        {"rule": {"family": "inet", "table": "cni_hostport", "chain": "hostports", "handle": 2,
                  "comment": "cid1", "expr": [
                      {"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "daddr"}},
                                 "right": "2001:db8:0:0::10"}},
                      {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
                      {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}},
                                 "right": {"set": [80, 81]}}},
                      {"counter": {"packets": 3, "bytes": 180}},
                      {"dnat": {"family": "ip6", "addr": "fd00::5", "port": 8080}}]}},
        {"rule": {"family": "ip", "table": "nat", "chain": "PREROUTING", "handle": 3, "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 1}},
            {"dnat": {"addr": "10.0.0.1", "port": 2}}]}},
    ]}
    h = dict(host_ip="2001:db8::10", chain="cni_hostport/hostports", container_id="cid1",
             packets=3, bytes=180, source="nftables", family=6)
    assert parse_nft_json(json.dumps(doc)) == [
        R("TCP", 80, "fd00::5", 8080, **h), R("TCP", 81, "fd00::5", 8080, **h)]


@pytest.mark.parametrize("garbage", ["", "not json", "[1, 2]", '{"table": {}}', "*nat\nCOMMIT\n"])
def test_nft_garbage_is_a_user_error(garbage):
    with pytest.raises(UserError) as err:
        parse_nft_json(garbage)
    assert "nft -j list ruleset" in str(err.value)


# --------------------------------------------------------------------------- read_node_rules (faked tools)


def s_lines(save_text: str):
    """chain -> what `iptables -t nat -v -S CHAIN` prints, made from an iptables-save -c text."""
    out = {}
    for ln in save_text.splitlines():
        ln = ln.strip()
        if ln.startswith(":"):
            name, policy = ln[1:].split()[:2]
            out.setdefault(name, [f"-P {name} {policy} -c 0 0" if policy != "-" else f"-N {name}"])
        elif ln.startswith("[") and "] -A " in ln:
            counters, body = ln[1:].split("] ", 1)
            p, b = counters.split(":")
            out[body.split()[1]].append(f"{body} -c {p} {b}")
        elif ln.startswith("-A "):
            out[ln.split()[1]].append(ln)
    return out


class FakeTools:
    """Stands in for node/read.py's _spawn: `iptables-nft -t nat -v -S CHAIN` answered chain by
    chain from iptables-save fixtures, legacy saves and `nft -j list table` from canned text."""

    def __init__(self, nft_v4=None, nft_v6=None, legacy=None, nft_tables=()):
        self.chains = {("iptables-nft", 4): s_lines(nft_v4) if nft_v4 else {},
                       ("ip6tables-nft", 6): s_lines(nft_v6) if nft_v6 else {}}
        self.legacy = legacy or {}
        self.nft_tables = dict(nft_tables)
        self.calls = []

    def __call__(self, argvs):
        out = []
        for argv in argvs:
            self.calls.append(list(argv))
            tool = argv[0]
            if tool in ("iptables-nft", "ip6tables-nft"):
                chains = self.chains[(tool, 6 if tool.startswith("ip6") else 4)]
                c = argv[-1]
                if argv[2] != "nat" or (c not in chains and c not in ("PREROUTING", "OUTPUT", "POSTROUTING",
                                                                       "INPUT", "FORWARD")):
                    out.append((1, "", f"iptables v1.8.9 (nf_tables): chain `{c}' in table `nat' is incompatible"))
                else:
                    out.append((0, "\n".join(chains.get(c, [f"-P {c} ACCEPT -c 0 0"])) + "\n", ""))
            elif tool.endswith("-legacy-save"):
                got = self.legacy.get(tool)
                out.append((1, "", "boom") if isinstance(got, int) else (0, got or "", ""))
            elif tool == "nft":
                out.append((0, self.nft_tables[(argv[-2], argv[-1])], ""))
            else:
                raise AssertionError(argv)
        return out


@pytest.fixture
def fake_tools(monkeypatch):
    from bpftrace_hostport.node import read as read_mod
    box = {}

    def install(tools, legacy_tables=(), missing=(), nft_list=()):
        monkeypatch.setattr(read_mod, "_spawn", tools)
        monkeypatch.setattr(read_mod.shutil, "which", lambda name: None if name in missing else f"/usr/sbin/{name}")
        monkeypatch.setattr(read_mod, "_proc_net", lambda name: " ".join(legacy_tables) if name == "ip_tables_names"
                            else "")
        monkeypatch.setattr(read_mod, "nft_tables", lambda: list(nft_list))
        read_mod.CACHE.entries.clear()
        box["tools"] = tools
        return tools
    yield install
    read_mod.CACHE.entries.clear()


def test_read_node_rules_walks_the_hostport_chains_and_dedups_backends(fake_tools):
    nocounters = text("portmap_nft_nocounters.txt")
    one_table = {"nftables": [i for i in json.loads(text("portmap_nftables.json"))["nftables"]
                              if (i.get("table") or i.get("chain") or i.get("rule") or {}).get("family") == "ip"
                              or "table" in i and i["table"]["family"] == "ip"]}
    tools = fake_tools(FakeTools(nft_v4=nocounters, legacy={"iptables-legacy-save": text("portmap_nft_counters.txt")},
                                 nft_tables={("ip", "cni_hostport"): json.dumps(one_table)}),
                       legacy_tables=("nat",), missing=("ip6tables-nft",),
                       nft_list=[("ip", "nat", 9), ("ip", "cni_hostport", 6)])
    found, notes = read_node_rules()
    v4 = [r for r in found if r.source.startswith("iptables")]
    # The same pods seen without counters through one backend and with them through the other.
    assert sorted((r.host_port, r.packets, r.source) for r in v4) == [
        (5353, 0, "iptables-legacy"), (8000, 2, "iptables-legacy"), (8443, 1, "iptables-legacy")]
    assert len([r for r in found if r.source == "nftables"]) == 3
    assert notes == ["ip6tables-nft not found; skipped the IPv6 nat table of iptables-nft."]
    # One process per chain, the seeds first, then the per-pod chains they jump to; never a
    # whole-table save of iptables-nft, never kube-proxy's per-Service chains.
    listed = [c[-1] for c in tools.calls if c[0] == "iptables-nft"]
    assert listed[:3] == ["PREROUTING", "OUTPUT", "POSTROUTING"] and DN_A in listed and DN_B in listed
    assert len(listed) == len(set(listed))
    # The legacy nat table exists: saved once, with -t (it cannot be created by that).
    assert [c for c in tools.calls if c[0] == "iptables-legacy-save"] == [["iptables-legacy-save", "-c", "-t", "nat"]]
    # iptables-nft's own table is not listed with nft.
    assert [c for c in tools.calls if c[0] == "nft"] == [["nft", "-j", "list", "table", "ip", "cni_hostport"]]


def test_a_legacy_table_that_does_not_exist_is_never_asked_for(fake_tools):
    tools = fake_tools(FakeTools(nft_v4=text("portmap_nft_counters.txt")), legacy_tables=("filter",))
    found, notes = read_node_rules()
    assert notes == [] and len(found) == 3
    assert not any(c[0].endswith("legacy-save") for c in tools.calls)


def test_kube_proxy_service_chains_are_never_read(fake_tools):
    kp = ("*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-X - [0:0]\n:KUBE-SEP-Y - [0:0]\n"
          ":KUBE-NODEPORTS - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n"
          "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"
          "-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 443 -j KUBE-SVC-X\n"
          "-A KUBE-SVC-X -j KUBE-SEP-Y\n"
          "-A KUBE-SEP-Y -p tcp -m tcp -j DNAT --to-destination 192.0.2.1:6443\n"
          "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n"
          "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\nCOMMIT\n")
    tools = fake_tools(FakeTools(nft_v4=kp))
    found, notes = read_node_rules()
    listed = {c[-1] for c in tools.calls if c[0] == "iptables-nft"}
    assert found == [] and notes == []
    assert "KUBE-SERVICES" not in listed and "KUBE-SVC-X" not in listed and "KUBE-SEP-Y" not in listed
    assert {"KUBE-MARK-MASQ", "KUBE-NODEPORTS"} <= listed


def test_a_failing_tool_is_one_note(fake_tools):
    tools = FakeTools(nft_v4=text("portmap_nft_counters.txt"), legacy={"iptables-legacy-save": 1})
    fake_tools(tools, legacy_tables=("nat",))
    found, notes = read_node_rules()
    assert len(found) == 3
    assert notes == ["iptables-legacy-save failed (boom); skipped the nat table of iptables-legacy."]


def test_dedup_prefers_counters_then_more_packets():
    base = R("TCP", 8000, "10.0.0.2", 80, chain="CNI-DN-x", container_id="c")
    nft0 = HostPortRule(**{**base.__dict__, "packets": 0, "bytes": 0, "source": "iptables-nft"})
    legacy5 = HostPortRule(**{**base.__dict__, "packets": 5, "bytes": 300, "source": "iptables-legacy"})
    other = R("TCP", 8000, "10.0.0.3", 80, chain="CNI-DN-y", container_id="d")  # a different mapping
    assert rules._dedup([base, nft0, other, legacy5]) == [legacy5, other]
    assert rules._dedup([legacy5, nft0]) == [legacy5]


def test_read_node_rules_unknown_netns_is_a_user_error():
    with pytest.raises(UserError) as err:
        read_node_rules("rulesfx-does-not-exist-12345")
    assert "ip netns list" in str(err.value)


# --------------------------------------------------------------------------- kernel: real plugins


CNI = "/usr/lib/cni"


def _needs_lab():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, iptables)")
    for tool in ("ip", "iptables-nft-save", "nft"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    for plugin in ("bridge", "host-local", "portmap"):
        if not os.access(os.path.join(CNI, plugin), os.X_OK):
            pytest.skip(f"CNI plugin {plugin} not in {CNI}")


def _plugin(node, conf, env):
    r = subprocess.run(["ip", "netns", "exec", node, os.path.join(CNI, conf["type"])],
                       input=json.dumps(conf), text=True, capture_output=True, env=env, timeout=20)
    assert r.returncode == 0, f"{conf['type']} {env['CNI_COMMAND']}: {r.stdout} {r.stderr}"
    return json.loads(r.stdout) if r.stdout.strip() else None


@pytest.mark.kernel
def test_read_node_rules_finds_real_portmap_mapping():
    _needs_lab()
    tag = f"rulesfx-t{os.getpid()}"
    node, pod = f"{tag}-node", f"{tag}-pod"
    cid = "f" * 63 + "1"
    tmp = tempfile.mkdtemp(prefix="rulesfx-")
    created, added = [], []
    env = dict(PATH="/usr/sbin:/usr/bin:/sbin:/bin", CNI_CONTAINERID=cid, CNI_IFNAME="eth0",
               CNI_NETNS=f"/var/run/netns/{pod}", CNI_PATH=CNI)
    bridge = {"cniVersion": "0.4.0", "name": "rulesfxt", "type": "bridge", "bridge": "cni0",
              "isGateway": True, "ipMasq": True,
              "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.78.0.0/24"}]],
                       "dataDir": os.path.join(tmp, "ipam")}}
    portmap = {"cniVersion": "0.4.0", "name": "rulesfxt", "type": "portmap", "snat": True,
               "capabilities": {"portMappings": True},
               "runtimeConfig": {"portMappings": [{"hostPort": 8000, "containerPort": 80, "protocol": "tcp"}]}}
    try:
        for ns in (node, pod):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            created.append(ns)
        prev = _plugin(node, bridge, dict(env, CNI_COMMAND="ADD"))
        portmap["prevResult"] = prev
        added.append(bridge)
        _plugin(node, portmap, dict(env, CNI_COMMAND="ADD"))
        added.append(portmap)
        pod_ip = prev["ips"][0]["address"].split("/")[0]
        gw = prev["ips"][0]["gateway"]
        # One connect from the node to its own address: OUTPUT -> CNI-HOSTPORT-DNAT -> DNAT (+1 packet).
        code = (f"import socket; s=socket.socket(); s.settimeout(0.5)\n"
                f"try: s.connect(({gw!r}, 8000))\nexcept OSError: pass")
        subprocess.run(["ip", "netns", "exec", node, sys.executable, "-c", code], timeout=10)
        # And portmap's nftables shape next to it, as a node mid-migration might have.
        subprocess.run(["ip", "netns", "exec", node, "nft", "-f", str(FIX / "portmap_nftables.nft")],
                       check=True)

        found, notes = read_node_rules(node)

        mine = [r for r in found if r.source == "iptables-nft"]
        assert mine == [R("TCP", 8000, pod_ip, 80, chain=mine[0].chain, container_id=cid,
                          packets=1, bytes=60, source="iptables-nft", family=4)]
        assert mine[0].chain.startswith("CNI-DN-")
        assert len([r for r in found if r.source == "nftables"]) == 6
        assert all("legacy" not in n for n in notes), notes
        # Reading must not have created legacy tables in the namespace.
        names = subprocess.run(["ip", "netns", "exec", node, "cat", "/proc/net/ip_tables_names"],
                               capture_output=True, text=True).stdout
        assert names.strip() == ""
    finally:
        for conf in reversed(added):
            try:
                _plugin(node, conf, dict(env, CNI_COMMAND="DEL"))
            except Exception:
                pass  # the namespaces go below anyway
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns])
        shutil.rmtree(tmp, ignore_errors=True)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert tag not in listed


@pytest.mark.kernel
def test_read_node_rules_same_rules_in_both_backends_kept_once():
    _needs_lab()
    if shutil.which("iptables-legacy-restore") is None or shutil.which("iptables-nft-restore") is None:
        pytest.skip("iptables-legacy-restore / iptables-nft-restore not installed")
    node = f"rulesfx-t{os.getpid()}-both"
    saved = text("portmap_nft_counters.txt")
    try:
        subprocess.run(["ip", "netns", "add", node], check=True)
        # Both copies are read with counters; the nft copy's are zero (restored without -c).
        subprocess.run(["ip", "netns", "exec", node, "iptables-nft-restore"], input=saved, text=True,
                       check=True)
        subprocess.run(["ip", "netns", "exec", node, "iptables-legacy-restore", "-c"], input=saved,
                       text=True, check=True)
        found, notes = read_node_rules(node)
    finally:
        subprocess.run(["ip", "netns", "del", node])
    assert notes == []
    assert sorted((r.host_port, r.packets, r.source) for r in found) == [
        (5353, 0, "iptables-nft"), (8000, 2, "iptables-legacy"), (8443, 1, "iptables-legacy")]
    assert node not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_callers_within_a_moment_share_one_read(fake_tools):
    """A trace's start asks for the rules three times (pod source, watch list, recording): one read."""
    tools = fake_tools(FakeTools(nft_v4=text("portmap_nft_counters.txt")))
    first = read_node_rules()
    assert read_node_rules() == first and read_node_rules(max_age=2.0) == first
    assert sum(1 for c in tools.calls if c[-1] == "PREROUTING" and c[0] == "iptables-nft") == 1
    read_node_rules(max_age=0)                       # check and the agent always read afresh
    assert sum(1 for c in tools.calls if c[-1] == "PREROUTING" and c[0] == "iptables-nft") == 2


def test_real_portmap_1_9_1_nftables_output_reads_as_the_shape_typed_from_its_source():
    """portmap_nftables_1.9.1.json is what the 1.9.1 plugins (Debian unstable) really wrote; the
    hand-typed portmap_nftables.json followed portmap_nftables.go: the same six mappings."""
    real = parse_nft_json(text("portmap_nftables_1.9.1.json"))
    typed = parse_nft_json(text("portmap_nftables.json"))
    key = lambda r: (r.family, r.proto, r.host_ip or "", r.host_port, r.target_ip, r.target_port, r.chain, r.container_id)  # noqa: E731
    assert sorted(map(key, real)) == sorted(map(key, typed))
    assert len(real) == 6 and all(r.packets is None and r.source == "nftables" for r in real)   # 1.9.1 counts nothing
    b = next(r for r in real if r.host_port == 8443)
    assert (b.host_ip, b.chain, b.container_id) == ("192.0.2.10", "cni_hostport/hostports", ID_B)


def test_legacy_tables_are_cut_to_the_walked_chains_with_counters(fake_tools):
    from bpftrace_hostport.node.read import read_netfilter
    legacy = text("portmap_legacy_counters.txt")
    tools = fake_tools(FakeTools(legacy={"iptables-legacy-save": legacy}), legacy_tables=("nat",))
    nf = read_netfilter(None, ("nat",))
    (src, fam, cut), = [x for x in nf.nat if x[0] == "iptables-legacy"]
    assert fam == 4 and "-A CNI-HOSTPORT-DNAT" in cut and DN_C in cut
    dnat = next(ln for ln in cut.splitlines() if "-j DNAT" in ln)
    assert dnat.endswith(tuple(f"-c {p} {b}" for p, b in [ln[1:ln.index("]")].split(":")
                                                          for ln in legacy.splitlines() if "-j DNAT" in ln]))
    # `rules` reads the nat side only: no filter table is listed
    assert all(c[2] == "nat" for c in tools.calls if c[0] == "iptables-nft")
