"""decode.py turns raw map records into batches; ctypes classes laid out as bcc builds them stand in for bcc's."""
import ctypes as C
import ipaddress
import socket
from datetime import datetime, timezone
from types import SimpleNamespace

from bpftrace_hostport.collect.enrich import Enricher
from bpftrace_hostport.collect.netfilter import decode as ev


class FixedClock(ev.Clock):
    def __init__(self):
        self.offset_ns = 1_700_000_000 * 10**9


def a16(ip):
    b = ipaddress.ip_address(ip).packed
    return list(b + bytes(16 - len(b)))


def key(client="10.0.0.10", cport=41234, node="10.0.0.1", hport=8000, fam=4, proto=6):
    return SimpleNamespace(family=fam, proto=proto, client_port=socket.htons(cport),
                           host_port=socket.htons(hport), client_addr=a16(client), node_addr=a16(node))


def val(pod="10.0.1.2", pport=80, first=1_000_000, reply=1_250_000, flags=1, snat="0.0.0.0", reason=0,
        outcome=None, refusal=0, refused_by=0, icmp=(0, 0)):
    if outcome is None:                      # events.h OUTCOME_*: an answered flow unless told
        outcome = ev.OUTCOME_ANSWERED if flags & ev.FLOW_ANSWERED else ev.OUTCOME_NONE
    return SimpleNamespace(ct=1, first_ns=first, reply_ns=reply, last_ns=reply, packets_orig=1, bytes_orig=60,
                           packets_reply=1, bytes_reply=60, drops=0, pod_addr=a16(pod), snat_addr=a16(snat),
                           pod_port=socket.htons(pport), snat_port=0, drop_reason=reason, hook=0, flags=flags,
                           outcome=outcome, refusal=refusal, mapping_id=0, refused_by=refused_by,
                           icmp_type=icmp[0], icmp_code=icmp[1])


class Key(C.Structure):      # flow_key as bcc builds it from bpf/events.h
    _fields_ = [("family", C.c_ubyte), ("proto", C.c_ubyte), ("client_port", C.c_ushort),
                ("host_port", C.c_ushort), ("_pad", C.c_ushort),
                ("client_addr", C.c_ubyte * 16), ("node_addr", C.c_ubyte * 16)]


class Val(C.Structure):      # flow_val
    _fields_ = [(n, C.c_ulonglong) for n in ("ct", "first_ns", "reply_ns", "last_ns", "packets_orig",
                                             "bytes_orig", "packets_reply", "bytes_reply", "drops")] + [
               ("pod_addr", C.c_ubyte * 16), ("snat_addr", C.c_ubyte * 16), ("pod_port", C.c_ushort),
               ("snat_port", C.c_ushort), ("drop_reason", C.c_uint), ("hook", C.c_ubyte),
               ("flags", C.c_ubyte), ("outcome", C.c_ubyte), ("refusal", C.c_ubyte),
               ("mapping_id", C.c_uint), ("refused_by", C.c_ubyte), ("icmp_type", C.c_ubyte),
               ("icmp_code", C.c_ubyte), ("_pad", C.c_ubyte * 5)]


def fill(ctype, ns):
    obj = ctype()
    for name, *_ in ctype._fields_:
        if name.startswith("_"):
            continue
        v = getattr(ns, name)
        if isinstance(v, list):
            getattr(obj, name)[:] = v
        else:
            setattr(obj, name, v)
    return obj


class Names:
    def __init__(self, fn):
        self.names = fn

    def host_network_owner(self, proto, port):
        return None


def record(k, v, drop_names=None, names=None):
    """The JSON record of a raw flow_event (flow_key, then flow_val), decoded as a batch of one."""
    dec = ev.FlowDecoder(Key, Val, C.sizeof(Key), FixedClock(), drop_names or {})
    raw = bytes(fill(Key, k)) + bytes(fill(Val, v))
    batch = dec.decode([raw, raw])            # a batch of two equal records: both decode alike
    if names is not None:
        Enricher(Names(names)).flows(batch)
    a, b = batch.to_records()
    assert a == b
    return a


def test_answered_flow_record():
    r = record(key(), val(), names=lambda proto, ip, port: ("ns", "pod", "http")
               if (proto, ip, port) == ("tcp", "10.0.1.2", 80) else None)
    assert r["client_ip"] == "10.0.0.10" and r["client_port"] == 41234
    assert r["node_ip"] == "10.0.0.1" and r["host_port"] == 8000
    assert r["pod_ip"] == "10.0.1.2" and r["pod_port"] == 80
    assert r["answered"] is True and r["latency_us"] == 250.0 and r["midstream"] is False
    assert (r["pod_namespace"], r["pod_name"], r["port_name"]) == ("ns", "pod", "http")
    assert r["masqueraded"] is False and r["snat_ip"] is None and r["drop_reason"] is None
    assert r["packets"] == 2 and r["bytes"] == 120 and r["hook"] == "prerouting"
    assert r["ts"].endswith("Z") and datetime.fromisoformat(r["ts"].replace("Z", "+00:00")).tzinfo == timezone.utc


def test_unanswered_masqueraded_dropped_ipv6():
    r = record(key("fd00::a", 5, "fd00::1", 8000, fam=6, proto=17),
               val("fd00:1::2", 53, reply=0, flags=2, snat="fd00:1::1", reason=12),
               drop_names={12: "NETFILTER_DROP"})
    assert r["family"] == 6 and r["proto"] == "udp" and r["client_ip"] == "fd00::a"
    assert r["answered"] is False and r["latency_us"] is None
    assert r["masqueraded"] is True and r["snat_ip"] == "fd00:1::1"
    assert r["drop_reason"] == "NETFILTER_DROP" and r["pod_name"] is None


def test_midstream_flow_has_no_latency():
    r = record(key(), val(flags=1 | 4))
    assert r["answered"] is True and r["midstream"] is True and r["latency_us"] is None


def test_a_reset_is_a_refusal_not_an_answer():
    r = record(key(), val(flags=0, outcome=ev.OUTCOME_REFUSED, refusal=1, refused_by=1, reply=1_040_000))
    assert r["answered"] is False and r["outcome"] == "refused" and r["latency_us"] is None
    assert (r["refusal"], r["refused_by"], r["icmp_type"], r["icmp_code"]) == ("reset", "pod", None, None)
    assert r["refusal_us"] == 40.0 and r["masqueraded"] is False      # known from the reply


def test_an_icmp_error_keeps_its_type_and_code():
    r = record(key("fd00::a", 5, "fd00::1", 5353, fam=6, proto=17),
               val("fd00:1::2", 53, flags=0, outcome=ev.OUTCOME_REFUSED, refusal=4, refused_by=2,
                   icmp=(1, 3)))
    assert (r["outcome"], r["refusal"], r["refused_by"]) == ("refused", "host-unreachable", "node")
    assert (r["icmp_type"], r["icmp_code"]) == (1, 3) and r["refusal_us"] == 250.0


def test_nothing_back_is_unanswered_or_pending_at_the_end():
    dec = ev.FlowDecoder(Key, Val, C.sizeof(Key), FixedClock(), {})
    old, young = (bytes(fill(Key, key(cport=p))) + bytes(fill(Val, val(first=f, reply=0, flags=0)))
                  for p, f in ((1, 1_000), (2, 9_000)))
    assert [r["outcome"] for r in dec.decode([old, young]).to_records()] == ["unanswered"] * 2
    # at the end of tracing, a flow younger than --timeout was cut short, not unanswered
    assert [r["outcome"] for r in dec.decode([old, young], pending_after_ns=5_000).to_records()] == [
        "unanswered", "pending"]


def test_unknown_drop_reason_keeps_its_number():
    assert record(key(), val(reason=999))["drop_reason"] == "REASON_999"


def test_miss_and_mapping_keys():
    mk = SimpleNamespace(family=4, proto=6, host_port=socket.htons(9100), hook=1,
                         client_addr=a16("10.0.0.10"), node_addr=a16("10.0.0.1"))
    m = ev.decode_miss(mk)
    rec = ev.miss_record(m, 3, int(datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()) * 10**9)
    assert rec == {"type": "miss", "ts": "2026-01-01T00:00:00.000000Z", "proto": "tcp", "family": 4,
                   "client_ip": "10.0.0.10", "node_ip": "10.0.0.1", "host_port": 9100, "hook": "output", "count": 3}
    mp = SimpleNamespace(family=4, proto=17, host_port=socket.htons(5353), pod_port=socket.htons(53), pod_addr=a16("10.0.1.9"))
    assert ev.decode_mapping(mp) == {"proto": "udp", "family": 4, "host_port": 5353, "pod_ip": "10.0.1.9", "pod_port": 53}


def test_flows_in_flight_are_not_lost_until_the_end():
    """While tracing, created-but-unreported flows are in flight, not lost; at the end they are."""
    from bpftrace_hostport.collect.netfilter.backend import NetfilterBackend

    class Probe:
        drop_names = {}

        def read_stats(self):
            return {"flows_created": 10, "flow_insert_errors": 2, "counter_full": 1, "reuse_lost": 1,
                    "kernel_claimed": 0}

        def read_mappings(self):
            return []

        def read_drops(self):
            return []

    b = object.__new__(NetfilterBackend)
    b.probe, b.reported, b.finished = Probe(), 5, False
    b.opts = SimpleNamespace(flow_records=True)
    assert b.counters()["lost"] == 2 + 1 + 1          # refused inserts, counter full, reuse lost
    b.finished = True
    assert b.counters()["lost"] == (10 - 5) + 2 + 1


def test_python_constants_match_events_h():
    """The #defines Python mirrors (hook names, flow flags, stat indexes) equal bpf/events.h's."""
    import re
    from pathlib import Path
    from bpftrace_hostport import proto
    from bpftrace_hostport.collect.netfilter import probe
    text = (Path(__file__).resolve().parents[3] / "bpf" / "events.h").read_text()
    defs = {m[1]: int(m[2]) for m in re.finditer(r"#define\s+(\w+)\s+(\d+)", text)}
    assert proto.HOOKS == {defs["HOOK_PREROUTING"]: "prerouting", defs["HOOK_OUTPUT"]: "output"}
    assert (ev.FLOW_ANSWERED, ev.FLOW_MASQUERADED, ev.FLOW_MIDSTREAM) == (
        defs["FLOW_ANSWERED"], defs["FLOW_MASQUERADED"], defs["FLOW_MIDSTREAM"])
    stats = sorted((v, k) for k, v in defs.items() if k.startswith("STAT_") and k != "STAT_MAX")
    assert len(probe.STAT_NAMES) == defs["STAT_MAX"] == len(stats)
    names = {"STAT_FLOW_INSERT_ERR": "flow_insert_errors", "STAT_REPLY_NO_FLOW": "reply_without_flow"}
    assert list(probe.STAT_NAMES) == [names.get(k, k[5:].lower()) for _, k in stats]
    assert (ev.OUTCOME_NONE, ev.OUTCOME_ANSWERED, ev.OUTCOME_REFUSED) == (
        defs["OUTCOME_NONE"], defs["OUTCOME_ANSWERED"], defs["OUTCOME_REFUSED"])
    from bpftrace_hostport.records import outcome as oc
    refusals = sorted((v, k) for k, v in defs.items() if k.startswith("REFUSAL_"))
    assert len(oc.REFUSALS) == defs["REFUSALS"] == len(refusals)
    assert [v for v, _ in refusals] == list(range(len(oc.REFUSALS)))
    words = {"NONE": None, "PORT_UNREACH": "port-unreachable", "HOST_UNREACH": "host-unreachable",
             "NET_UNREACH": "net-unreachable", "PROTO_UNREACH": "protocol-unreachable",
             "ADMIN": "admin-prohibited", "PARAM_PROBLEM": "parameter-problem",
             "UNREACH": "unreachable"}
    assert list(oc.REFUSALS) == [words.get(k[8:], k[8:].lower().replace("_", "-")) for _, k in refusals]
    by = sorted((v, k[3:].lower()) for k, v in defs.items() if k.startswith("BY_"))
    assert [None] + [name for _, name in by] == list(oc.REFUSED_BY)


def test_kernel_latency_buckets_match_the_metrics_buckets():
    """The kernel's histogram (events.h LAT_BOUNDS_US) and the exported one have the same bounds."""
    import re
    from pathlib import Path
    from bpftrace_hostport.collect.metrics import LATENCY_BOUNDS_US
    text = (Path(__file__).resolve().parents[3] / "bpf" / "events.h").read_text()
    body = re.search(r"#define LAT_BOUNDS_US ((?:[^\n]*\\\n)*[^\n]*)", text)[1].replace("\\\n", " ")
    bounds = [int(v) for v in body.split(",")]
    n = int(re.search(r"#define LAT_BUCKETS (\d+)", text)[1])
    assert len(bounds) == n - 1 == len(LATENCY_BOUNDS_US) - 1
    assert bounds == [int(b) for b in LATENCY_BOUNDS_US[:-1]]


def test_the_conntrack_cache_has_a_slot_for_every_flow_the_table_holds():
    """`ctcache` has 4 << CT_SET_BITS slots: at least --flow-table, at most twice as many."""
    from bpftrace_hostport.collect.netfilter.probe import ct_set_bits
    for size in (1024, 1025, 4096, 65535, 65536, 100_000, 1 << 22):
        slots = 4 << ct_set_bits(size)
        assert size <= slots < 2 * size


def test_mapping_ids_fit_the_cache_slot():
    """A cache slot keeps a mapping id in 14 bits, CT_PENDING being the largest: MAP_SIZE (the
    id of "no counters") must stay below it (the C source refuses to compile otherwise)."""
    from bpftrace_hostport.collect.netfilter.probe import ProbeOptions
    assert ProbeOptions().map_size < (1 << 14) - 1
