"""PodIndex lookups, the conntrack backend's record builder, the netfilter link's bpf_attr."""
import ctypes
import struct
from datetime import datetime, timezone

import pytest

from bpftrace_hostport.ebpf import bpfsys
from bpftrace_hostport.collect import conntrack as ctbackend
from bpftrace_hostport.ebpf import nflink
from bpftrace_hostport.model import ContainerPort, PodInfo
from bpftrace_hostport.pods.index import PodIndex

WEB = PodInfo("shop", "web-1", ips=("10.0.1.2", "fd00:1::2"), phase="Running",
              ports=(ContainerPort("nginx", 80, "TCP", "http", 8000),))
OLD = PodInfo("shop", "web-0", ips=("10.0.1.2",), phase="Succeeded", ports=())
HN = PodInfo("mon", "exporter", ips=("10.0.0.1",), host_network=True,
             ports=(ContainerPort("e", 9100, "TCP", "metrics", 9100),))


def test_index_names_pod_and_port():
    idx = PodIndex([OLD, WEB, HN])
    assert idx.names("tcp", "10.0.1.2", 80) == ("shop", "web-1", "http")
    assert idx.names("tcp", "fd00:1::2", 80) == ("shop", "web-1", "http")
    assert idx.names("udp", "10.0.1.2", 53)[1] == "web-1"     # the running pod wins a recycled IP
    assert idx.names("tcp", "10.9.9.9", 80) is None


def test_index_never_pins_host_network_by_ip():
    idx = PodIndex([HN])
    assert idx.names("tcp", "10.0.0.1", 9100) is None
    assert idx.host_network_owner("tcp", 9100).name == "exporter"
    assert idx.host_ports() == {("tcp", 9100)}


def test_conntrack_record_masquerade_and_hook():
    ts = datetime(2026, 1, 1, tzinfo=timezone.utc)
    r = ctbackend.flow_from_conntrack(("127.0.0.1", "127.0.0.1", 6, 5000, 8000),
                                      ("10.0.1.2", "10.0.1.1", 6, 80, 5000), 0x20 | 0x10 | 0x2,
                                      {"127.0.0.1", "10.0.0.1"}, ts, True,
                                      names=PodIndex([WEB]).names)
    assert r["hook"] == "output" and r["masqueraded"] and r["snat_ip"] == "10.0.1.1"
    assert r["pod_name"] == "web-1" and r["latency_us"] is None and r["answered"]
    r = ctbackend.flow_from_conntrack(("10.0.0.10", "10.0.0.1", 17, 5000, 5353),
                                      ("10.0.1.2", "10.0.0.10", 17, 53, 5000), 0x20, {"10.0.0.1"}, ts, False)
    assert r["hook"] == "prerouting" and not r["masqueraded"] and r["proto"] == "udp"


def test_link_create_packs_bpf_attr(monkeypatch):
    seen = {}

    def fake_syscall(nr, cmd, attr, size):
        seen.update(nr=nr, cmd=cmd, raw=bytes(attr)[:32], size=size)
        return 42

    monkeypatch.setattr(bpfsys._libc, "syscall", fake_syscall)
    monkeypatch.setattr(bpfsys.platform, "machine", lambda: "x86_64")
    link = nflink.link_create(7, nflink.NFPROTO_IPV6, nflink.NF_INET_LOCAL_OUT, -99)
    assert link.fd == 42 and seen["nr"] == 321 and seen["cmd"] == nflink.BPF_LINK_CREATE
    assert struct.unpack("<IIIIIIiI", seen["raw"]) == (7, 0, 45, 0, 10, 3, -99, 0)
    assert link.describe() == "ipv6 LOCAL_OUT priority -99"
    link.fd = -1


def test_link_create_error(monkeypatch):
    monkeypatch.setattr(bpfsys._libc, "syscall", lambda *a: -1)
    monkeypatch.setattr(ctypes, "get_errno", lambda: 22)
    with pytest.raises(nflink.LinkError) as e:
        nflink.link_create(7, 2, 0, -99)
    assert e.value.errno == 22


def test_missing_capabilities(tmp_path):
    from bpftrace_hostport.collect.netfilter.preflight import missing_capabilities
    f = tmp_path / "status"
    f.write_text("Name:\tx\nCapEff:\t000001ffffffffff\n")
    assert missing_capabilities(str(f)) == []
    f.write_text("CapEff:\t0000000000001000\n")            # CAP_NET_ADMIN only
    assert missing_capabilities(str(f)) == ["CAP_BPF", "CAP_PERFMON"]
    f.write_text("CapEff:\t0000000000200000\n")            # CAP_SYS_ADMIN only
    assert missing_capabilities(str(f)) == ["CAP_NET_ADMIN"]
