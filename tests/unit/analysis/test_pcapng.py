"""pcapng export: parse the bytes back with dpkt, and read the file with Debian's tshark and
capinfos (strict time order).

tshark tests skip when tshark is missing, except with CI=true, where they fail: CI must
prove that Wireshark really reads the file (Debian package: tshark).
"""
import io
import os
import re
import shutil
import struct
import subprocess

import dpkt
import dpkt.crc32c
import pytest

from bpftrace_hostport.analysis import pcapng as P
from bpftrace_hostport.analysis.pcapng import iso_to_ns, write_pcapng

TS = "2026-11-29T07:45:22.123456Z"
TS_S = 1795938322            # TS's whole seconds, Unix time
BASE = dict(ts=TS, proto="tcp", family=4, client_ip="192.0.2.10", client_port=40000,
            node_ip="10.0.0.2", host_port=8000, pod_ip="10.1.0.5", pod_port=80,
            hook="prerouting", answered=True, latency_us=123.4, midstream=False,
            masqueraded=False, snat_ip=None, packets=2, bytes=120, pod_namespace="shop",
            pod_name="web-0", port_name="http", drop_reason=None)

def at(seconds):
    """TS plus whole seconds: flows far enough apart that each one's frames come together."""
    return TS.replace("22.", f"{22 + seconds:02d}.")


V6_UDP = dict(BASE, ts=at(1), proto="udp", family=6, client_ip="2001:db8::10", node_ip="fd00::2",
              host_port=5353, pod_ip="fd00:1::5", pod_port=53, hook="output", latency_us=50.5,
              pod_name="dns-1")
MASQ = dict(BASE, ts=at(2), masqueraded=True, snat_ip="10.1.0.1", pod_name="masq-2")
UNANSWERED = dict(BASE, ts=at(3), answered=False, latency_us=None, drop_reason="no_route",
                  pod_name="lost-3")
SCTP = dict(BASE, ts=at(4), proto="sctp", host_port=9000, pod_port=9000, pod_name="sctp-4")
FLOWS = [BASE, V6_UDP, MASQ, UNANSWERED]
REFUSED = dict(BASE, ts=at(5), answered=False, latency_us=None, outcome="refused", refusal="reset",
               refused_by="pod", refusal_us=40.0, icmp_type=None, icmp_code=None, pod_name="down-5")
PORT_UNREACH = dict(V6_UDP, ts=at(6), answered=False, latency_us=None, outcome="refused",
                    refusal="port-unreachable", refused_by="pod", refusal_us=60.0, icmp_type=1,
                    icmp_code=4, pod_name="dns-6")
HOST_UNREACH = dict(BASE, ts=at(7), proto="udp", host_port=5353, pod_port=53, answered=False,
                    latency_us=None, outcome="refused", refusal="host-unreachable", refused_by="node",
                    refusal_us=3000000.0, icmp_type=3, icmp_code=1, pod_name="gone-7")
MISS = dict(type="miss", ts=at(8), proto="tcp", family=4, client_ip="192.0.2.20", node_ip="10.0.0.2",
            host_port=9000, hook="prerouting", count=3, pod_namespace="lab", pod_name="hostnet-web")


def export(flows):
    buf = io.BytesIO()
    n = write_pcapng(flows, buf)
    return n, buf.getvalue()


def blocks(data):
    """(type, dpkt block) for each block, parsed with dpkt's own pcapng classes."""
    kls = {0x0A0D0D0A: dpkt.pcapng.SectionHeaderBlockLE, 1: dpkt.pcapng.InterfaceDescriptionBlockLE,
           6: dpkt.pcapng.EnhancedPacketBlockLE}
    off = 0
    while off < len(data):
        btype, blen = struct.unpack_from("<II", data, off)
        assert blen % 4 == 0
        yield btype, kls[btype](data[off:off + blen])
        off += blen


def packets(data):
    """[(iface name, ts ns, raw IP bytes, comment)] from an exported file."""
    names, out = [], []
    for btype, b in blocks(data):
        if btype == 1:
            assert b.linktype == P.LINKTYPE_RAW
            opts = {o.code: o.data for o in b.opts}
            assert opts[9] == b"\x09"                     # if_tsresol: nanoseconds
            names.append(opts[2].decode())
        elif btype == 6:
            comment = next(o.text for o in b.opts if o.code == 1)
            out.append((names[b.iface_id], (b.ts_high << 32) | b.ts_low, b.pkt_data, comment))
    return out


def ones_sum(data):
    """Independent, plain ones'-complement sum (no tricks): a valid packet sums to 0xffff."""
    data += b"\0" * (len(data) % 2)
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def check_checksums(raw):
    """Verify each checksum two ways: the ones'-complement property, and dpkt's recompute."""
    ip = dpkt.ip6.IP6(raw) if raw[0] >> 4 == 6 else dpkt.ip.IP(raw)
    l4 = bytes(ip.data)
    if isinstance(ip, dpkt.ip.IP):
        assert ones_sum(raw[:20]) == 0xFFFF
        pseudo = ip.src + ip.dst + struct.pack("!BBH", 0, ip.p, len(l4))
    else:
        pseudo = ip.src + ip.dst + struct.pack("!IxxxB", len(l4), ip.nxt)
    if isinstance(ip.data, dpkt.sctp.SCTP):
        zeroed = l4[:8] + b"\0\0\0\0" + l4[12:]
        assert ip.data.sum == dpkt.crc32c.cksum(zeroed)
        return ip
    assert ones_sum(pseudo + l4) == 0xFFFF
    sums = (getattr(ip, "sum", None), ip.data.sum)
    if isinstance(ip, dpkt.ip.IP):
        ip.sum = 0
    ip.data.sum = 0
    again = dpkt.ip6.IP6(bytes(ip)) if raw[0] >> 4 == 6 else dpkt.ip.IP(bytes(ip))
    assert (getattr(again, "sum", None), again.data.sum) == sums
    return again


# --------------------------------------------------------------------------------------------
# dpkt: structure and fields
# --------------------------------------------------------------------------------------------

def test_section_header_and_interfaces():
    _, data = export(FLOWS)
    shb = next(blocks(data))[1]
    assert shb.bom == 0x1A2B3C4D
    assert [o.data for o in shb.opts if o.code == 4] == [b"bpftrace-hostport"]
    names = [dict((o.code, o.data) for o in b.opts)[2] for t, b in blocks(data) if t == 1]
    assert names == [b"prerouting", b"prerouting-dnat", b"output", b"output-dnat"]


def test_ipv4_tcp_syn_synack():
    n, data = export([BASE])
    assert n == 3
    (i1, t1, p1, c1), (i2, t2, p2, c2), (i3, t3, p3, c3) = packets(data)
    ts = TS_S * 10**9 + 123456000
    assert (i1, i2, i3) == ("prerouting", "prerouting-dnat", "prerouting-dnat")
    assert (t1, t2, t3) == (ts, ts, ts + 123400)
    a, b, r = (check_checksums(p) for p in (p1, p2, p3))
    assert (dpkt.utils.inet_to_str(a.src), dpkt.utils.inet_to_str(a.dst)) == ("192.0.2.10", "10.0.0.2")
    assert (a.data.sport, a.data.dport, a.data.flags) == (40000, 8000, dpkt.tcp.TH_SYN)
    assert (dpkt.utils.inet_to_str(b.dst), b.data.dport, b.data.seq) == ("10.1.0.5", 80, a.data.seq)
    assert (dpkt.utils.inet_to_str(r.src), dpkt.utils.inet_to_str(r.dst)) == ("10.1.0.5", "192.0.2.10")
    assert (r.data.sport, r.data.dport) == (80, 40000)
    assert r.data.flags == dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK and r.data.ack == a.data.seq + 1
    assert c1 == ("pod=shop/web-0 port=http mapping=tcp 8000->10.1.0.5:80 hook=prerouting outcome=answered "
                  "latency_us=123.4 answered=yes masq=no packets=2 bytes=120 flow=1 step=original")
    assert c2.endswith("step=dnat") and c3.endswith("step=reply")


def test_ipv6_udp_masq_unanswered_sctp_midstream():
    midstream = dict(BASE, ts=at(5), midstream=True)
    n, data = export([V6_UDP, MASQ, UNANSWERED, SCTP, midstream])
    assert n == 3 + 3 + 2 + 3 + 3
    pk = packets(data)
    parsed = [check_checksums(p[2]) for p in pk]
    u = parsed[2]
    assert isinstance(u, dpkt.ip6.IP6) and isinstance(u.data, dpkt.udp.UDP)
    assert (dpkt.utils.inet_to_str(u.src), u.data.sport, dpkt.utils.inet_to_str(u.dst),
            u.data.dport, u.data.ulen) == ("fd00:1::5", 53, "2001:db8::10", 40000, 8)
    assert "mapping=udp 5353->[fd00:1::5]:53" in pk[0][3] and pk[0][0] == "output"
    assert dpkt.utils.inet_to_str(parsed[4].src) == "10.1.0.1"          # masq: SNAT source
    assert dpkt.utils.inet_to_str(parsed[5].dst) == "10.1.0.1"          # reply goes back to it
    assert "masq=yes snat=10.1.0.1" in pk[4][3]
    assert [p[3].split()[-1] for p in pk[6:8]] == ["step=original", "step=dnat"]  # no reply
    assert "answered=no" in pk[6][3] and "drop=no_route" in pk[6][3]
    assert [c.data.chunks[0].type for c in parsed[8:11]] == [dpkt.sctp.INIT] * 2 + [dpkt.sctp.INIT_ACK]
    assert parsed[10].data.vtag == struct.unpack("!I", bytes(parsed[8].data.chunks[0].data)[:4])[0]
    assert {parsed[i].data.flags for i in (11, 12, 13)} == {dpkt.tcp.TH_ACK}   # not a SYN


def test_streams_one_flow_at_a_time():
    out, sizes = io.BytesIO(), []

    def flows():
        for i in range(5):
            sizes.append(out.tell())
            yield dict(BASE, ts=at(i), client_port=1000 + i)
    assert write_pcapng(flows(), out) == 15
    assert sizes == sorted(sizes) and len(set(sizes)) == 5     # written before the next flow


def test_refusals_are_frames_from_their_sender_with_valid_checksums():
    n, data = export([REFUSED, PORT_UNREACH, HOST_UNREACH])
    assert n == 9
    pk = packets(data)
    rst = check_checksums(pk[2][2])
    assert rst.data.flags == dpkt.tcp.TH_RST | dpkt.tcp.TH_ACK and dpkt.utils.inet_to_str(rst.src) == "10.1.0.5"
    assert pk[2][1] - pk[1][1] == 40000                             # at the time to the refusal
    assert "outcome=refused refusal=reset refused_by=pod refusal_us=40.0" in pk[2][3]
    v6 = dpkt.ip6.IP6(pk[5][2])
    assert v6.nxt == 58 and (v6.data.type, v6.data.code) == (1, 4)
    assert dpkt.utils.inet_to_str(v6.src) == "fd00:1::5" and dpkt.utils.inet_to_str(v6.dst) == "2001:db8::10"
    pseudo = v6.src + v6.dst + struct.pack("!IxxxB", len(bytes(v6.data)), 58)
    assert ones_sum(pseudo + bytes(v6.data)) == 0xFFFF
    v4 = dpkt.ip.IP(pk[8][2])
    assert v4.p == 1 and (v4.data.type, v4.data.code) == (3, 1)
    assert dpkt.utils.inet_to_str(v4.src) == "10.0.0.2"             # the node said it
    assert ones_sum(bytes(v4.data)) == 0xFFFF and ones_sum(pk[8][2][:20]) == 0xFFFF
    assert "refused_by=node icmp=3/1" in pk[8][3]


def test_frames_are_in_time_order_and_misses_are_frames():
    # two flows a microsecond apart: the first one's reply comes after the second's first packet
    late = dict(BASE, latency_us=5000.0)
    soon = dict(BASE, ts=TS.replace(".123456", ".123457"), client_port=40001, latency_us=10.0)
    miss = dict(MISS, ts=TS.replace(".123456", ".124000"))
    buf = io.BytesIO()
    assert write_pcapng([late, soon], buf, [miss]) == 7
    pk = packets(buf.getvalue())
    times = [t for _, t, _, _ in pk]
    assert times == sorted(times)
    steps = [(c.split("flow=")[-1] if "flow=" in c else c.split("miss=")[-1]) for _, _, _, c in pk]
    assert steps == ["1 step=original", "1 step=dnat", "2 step=original", "2 step=dnat", "2 step=reply",
                     "1 step=miss", "1 step=reply"]
    m = check_checksums(pk[5][2])
    assert (dpkt.utils.inet_to_str(m.dst), m.data.dport, m.data.flags) == ("10.0.0.2", 9000, dpkt.tcp.TH_SYN)
    assert pk[5][0] == "prerouting"
    assert pk[5][3].startswith("miss: 3 connections to 10.0.0.2:9000/tcp not DNATed (hostNetwork pod "
                               "lab/hostnet-web owns the port)")


def test_capinfos_reads_strict_time_order(tmp_path):
    capinfos = shutil.which("capinfos")
    if capinfos is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true and capinfos is missing (apt-get install tshark)")
        pytest.skip("capinfos is not installed")
    flows = [dict(BASE, ts=TS.replace(".123456", f".{123456 + i * 7:06d}"), client_port=40000 + i,
                  latency_us=float(500 - i * 9)) for i in range(50)]
    path = tmp_path / "f.pcapng"
    with open(path, "wb") as fh:
        write_pcapng(flows, fh, [dict(MISS, ts=TS.replace(".123456", ".123600"))])
    out = subprocess.run([capinfos, "-o", "-c", str(path)], capture_output=True, text=True, check=True).stdout
    assert "Strict time order:   True" in out, out
    assert re.search(r"Number of packets: +151\b", out), out


def test_timestamps():
    assert iso_to_ns(TS) == TS_S * 10**9 + 123456000
    assert iso_to_ns("2026-11-29T07:45:22Z") == TS_S * 10**9
    assert iso_to_ns("2026-11-29T07:45:22.123456789Z") == TS_S * 10**9 + 123456789
    assert iso_to_ns("2026-11-29T09:45:22.5+02:00") == TS_S * 10**9 + 500000000
    with pytest.raises(ValueError):
        iso_to_ns("yesterday")
    with pytest.raises(ValueError):
        export([dict(BASE, proto="icmp")])


def test_crc32c_matches_dpkt():
    data = bytes(range(64))
    assert struct.pack("<I", P.crc32c(data)) == struct.pack("!I", dpkt.crc32c.cksum(data))


# --------------------------------------------------------------------------------------------
# tshark (Debian package tshark, Wireshark 4.0)
# --------------------------------------------------------------------------------------------

FIELDS = ("frame.interface_name", "ip.src", "ipv6.src", "tcp.srcport", "udp.srcport",
          "ip.dst", "ipv6.dst", "frame.comment")
CHECKS = ("-o", "ip.check_checksum:TRUE", "-o", "tcp.check_checksum:TRUE",
          "-o", "udp.check_checksum:TRUE", "-o", "sctp.checksum:CRC-32C")


@pytest.fixture
def tshark():
    exe = shutil.which("tshark")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true and tshark is missing (apt-get install tshark)")
        pytest.skip("tshark is not installed")
    return lambda *args: subprocess.run([exe, *args], check=True, capture_output=True,
                                        text=True, timeout=120).stdout


@pytest.fixture
def capture(tmp_path):
    path = tmp_path / "flows.pcapng"
    with open(path, "wb") as fh:
        write_pcapng(FLOWS + [SCTP, REFUSED, PORT_UNREACH, HOST_UNREACH], fh, [MISS])
    return path


def test_tshark_shows_tuples_and_comments(tshark, capture):
    args = [a for f in FIELDS for a in ("-e", f)]
    rows = [line.split("\t") for line in tshark("-r", str(capture), "-T", "fields", *args).splitlines()]
    got = [(r[0], r[1] or r[2], r[3] or r[4], r[5] or r[6], r[7].split()[0], r[7].split()[-1])
           for r in rows]
    assert got[:11] == [
        ("prerouting", "192.0.2.10", "40000", "10.0.0.2", "pod=shop/web-0", "step=original"),
        ("prerouting-dnat", "192.0.2.10", "40000", "10.1.0.5", "pod=shop/web-0", "step=dnat"),
        ("prerouting-dnat", "10.1.0.5", "80", "192.0.2.10", "pod=shop/web-0", "step=reply"),
        ("output", "2001:db8::10", "40000", "fd00::2", "pod=shop/dns-1", "step=original"),
        ("output-dnat", "2001:db8::10", "40000", "fd00:1::5", "pod=shop/dns-1", "step=dnat"),
        ("output-dnat", "fd00:1::5", "53", "2001:db8::10", "pod=shop/dns-1", "step=reply"),
        ("prerouting", "192.0.2.10", "40000", "10.0.0.2", "pod=shop/masq-2", "step=original"),
        ("prerouting-dnat", "10.1.0.1", "40000", "10.1.0.5", "pod=shop/masq-2", "step=dnat"),
        ("prerouting-dnat", "10.1.0.5", "80", "10.1.0.1", "pod=shop/masq-2", "step=reply"),
        ("prerouting", "192.0.2.10", "40000", "10.0.0.2", "pod=shop/lost-3", "step=original"),
        ("prerouting-dnat", "192.0.2.10", "40000", "10.1.0.5", "pod=shop/lost-3", "step=dnat"),
    ]
    assert len(rows) == 24 and rows[11][0] == "prerouting"        # + SCTP INIT, INIT, INIT-ACK
    # the host unreachable comes 3 s after its flow, after the miss: frames go in time order
    assert [r[7].split()[-1] for r in rows[14:]] == ["step=original", "step=dnat", "step=reply"] * 2 + [
        "step=original", "step=dnat", "step=miss", "step=reply"]
    epoch = tshark("-r", str(capture), "-T", "fields", "-e", "frame.time_epoch").split()
    assert epoch[:3] == ["1795938322.123456000", "1795938322.123456000", "1795938322.123579400"]


def test_tshark_finds_no_bad_checksum(tshark, capture, tmp_path):
    # status values in tshark 4.0: 0 Bad, 1 Good, 2 Unverified (so "== 2" would not find bad ones)
    bad = ("ip.checksum.status==0 || tcp.checksum.status==0 || udp.checksum.status==0 || "
           "sctp.checksum.status==0 || icmp.checksum.status==0 || icmpv6.checksum.status==0")
    assert tshark("-r", str(capture), *CHECKS, "-Y", bad) == ""
    fields = ("ip.checksum.status", "tcp.checksum.status", "udp.checksum.status", "sctp.checksum.status",
              "icmp.checksum.status", "icmpv6.checksum.status")
    out = tshark("-r", str(capture), *CHECKS, "-T", "fields", *[a for f in fields for a in ("-e", f)])
    assert set(out.replace(",", " ").split()) == {"1"}              # every checksum verified Good (inner ones too)
    # control: a corrupted TCP checksum is caught by the same filter
    data = bytearray(capture.read_bytes())
    first = next(b for t, b in blocks(bytes(data)) if t == 6).pkt_data
    at = bytes(data).index(first) + 20 + 16                        # IPv4 header + TCP sum offset
    data[at] ^= 0xFF
    broken = tmp_path / "broken.pcapng"
    broken.write_bytes(bytes(data))
    assert len(tshark("-r", str(broken), *CHECKS, "-Y", bad).splitlines()) == 1
