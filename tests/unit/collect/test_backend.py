"""The netfilter backend's loop-side logic, without a kernel: when the flow table is walked for
flows past --timeout, and how answered-flow records are taken from the ring buffer."""
import ctypes
import os
import select
import socket
import threading
from types import SimpleNamespace

from bpftrace_hostport.collect.netfilter import backend as bk
from bpftrace_hostport.collect.netfilter import decode as ev
from bpftrace_hostport.records.batch import FlowBatch

S = 1_000_000_000


class TableProbe:
    """A probe whose flow table holds flows that began at `firsts` (mono ns); counts its reads
    of the table and its walks, and a walk claims the flows due."""

    def __init__(self, firsts=()):
        self.firsts = list(firsts)
        self.reads = 0
        self.walks = []

    def flows_earliest_ns(self):
        self.reads += 1
        return min(self.firsts) if self.firsts else None

    def take_pending(self, older_than_ns):
        self.walks.append(older_than_ns)
        due = [f for f in self.firsts if f <= older_than_ns]
        self.firsts = [f for f in self.firsts if f > older_than_ns]
        return [b"x"] * len(due)


def backend(probe, monkeypatch, clock, timeout=5.0):
    b = object.__new__(bk.NetfilterBackend)
    b.probe, b.opts, b.reported = probe, SimpleNamespace(timeout=timeout), 0
    b.quiet_until_ns, b.claiming = 0, False
    b.decoder = SimpleNamespace(decode=lambda raws, pending_after_ns=None: FlowBatch.empty(len(raws)))
    monkeypatch.setattr(ev.Clock, "now_mono_ns", staticmethod(lambda: clock[0]))
    return b


def batches(b, clock, start, end):
    """expire() at every batch (250 ms) from start to end: the ones that claimed flows, by time."""
    out = {}
    for t in range(start, end, S // 4):
        clock[0] = t
        n = len(b.expire())
        if n:
            out[t] = n
    return out


def test_an_empty_flow_table_is_not_looked_at_again_before_a_flow_could_time_out(monkeypatch):
    clock = [100 * S]
    p = TableProbe()
    b = backend(p, monkeypatch, clock)
    assert batches(b, clock, 100 * S, 104 * S) == {}
    assert p.reads == 1 and p.walks == []          # once: nothing can be due before 104 s
    batches(b, clock, 104 * S, 108 * S)
    assert p.reads == 2 and p.walks == []


def test_young_flows_are_not_walked_until_the_oldest_could_be_due(monkeypatch):
    clock = [100 * S]
    p = TableProbe([100 * S - S // 10, 100 * S - S // 2])    # answered soon, as most are
    b = backend(p, monkeypatch, clock)
    batches(b, clock, 100 * S, 104 * S)
    assert p.reads == 1 and p.walks == []


def test_an_unanswered_flow_is_claimed_at_the_same_batch_as_when_walking_every_time(monkeypatch):
    clock = [100 * S]
    first = 100 * S - 3 * S - S // 10                          # due at 101.9 s
    p = TableProbe([first])
    b = backend(p, monkeypatch, clock)
    claimed = batches(b, clock, 100 * S, 104 * S)
    assert claimed == {102 * S: 1}                             # the first batch after 101.9 s
    # Read at 100 s (quiet until 101.9), at 102 (due: walked), once more walked (it claimed),
    # then read at 102.5 (empty: quiet for 4 s).
    assert p.reads == 3 and p.walks == [102 * S - 5 * S, 102 * S + S // 4 - 5 * S]


def test_a_stream_of_unanswered_flows_is_walked_at_every_batch_without_reading_first(monkeypatch):
    clock = [100 * S]
    p = TableProbe([100 * S - 5 * S + i * S // 4 for i in range(20)])  # one due at every batch
    b = backend(p, monkeypatch, clock)
    claimed = batches(b, clock, 100 * S, 105 * S)
    assert sum(claimed.values()) == 20 and len(p.walks) == 20 and p.reads == 1


def test_a_timeout_within_the_slack_walks_at_every_batch(monkeypatch):
    clock = [100 * S]
    p = TableProbe()
    b = backend(p, monkeypatch, clock, timeout=0.5)
    batches(b, clock, 100 * S, 101 * S)
    assert p.reads == 0 and len(p.walks) == 4


class Ring:
    """A ring buffer the drain thread sleeps on until the test (the kernel) or stop() wakes it."""

    def __init__(self):
        self.r, self.w = os.pipe()

    def kick(self):
        os.write(self.w, b"x")

    def wait(self, timeout_s, also=()):
        assert timeout_s is None                 # no timer: only the kernel's wake-ups
        ready, _, _ = select.select([self.r, *also], [], [])
        if self.r in ready:
            os.read(self.r, 1)

    def close(self):
        os.close(self.r)
        os.close(self.w)


def test_ring_records_come_out_in_order_from_the_thread_and_the_loop():
    ring = Ring()
    pending = [b"a", b"b"]
    probe = SimpleNamespace(ring=ring, consume=lambda: pending.pop(0) if pending else b"")
    d = bk._RingDrain(probe)
    try:
        ring.kick()                          # the kernel wakes the thread: it takes "a"
        for _ in range(200):
            if d.buf:
                break
            threading.Event().wait(0.01)
        assert list(d.buf) == [b"a"]
        assert d.take(rest=True) == [b"a", b"b"]  # the loop: the thread's chunk, then the rest
        assert d.take(rest=True) == [] and d.take() == []
    finally:
        d.stop()
        ring.close()
    assert not d.thread.is_alive()


class MissKey(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("family", ctypes.c_uint8), ("proto", ctypes.c_uint8), ("host_port", ctypes.c_uint16),
                ("hook", ctypes.c_uint8), ("_pad", ctypes.c_uint8 * 3),
                ("client_addr", ctypes.c_uint8 * 16), ("node_addr", ctypes.c_uint8 * 16)]


def miss_key(client: int) -> MissKey:
    k = MissKey(family=4, proto=6, host_port=socket.htons(9000))
    k.client_addr[:4] = [10, 0, 0, client]
    k.node_addr[:4] = [10, 0, 0, 1]
    return k


def test_misses_are_the_counters_that_grew_and_only_those_are_decoded(monkeypatch):
    counts = {1: 2, 2: 1}
    probe = SimpleNamespace(read_misses=lambda: [(miss_key(c), SimpleNamespace(count=n, last_ns=0))
                                                 for c, n in counts.items()])
    b = object.__new__(bk.NetfilterBackend)
    b.probe, b.miss_seen, b.clock = probe, {}, SimpleNamespace(offset_ns=0)
    decoded = []
    real = ev.decode_miss
    monkeypatch.setattr(ev, "decode_miss", lambda k: decoded.append(k.client_addr[3]) or real(k))
    first = b.misses()
    assert [(r["client_ip"], r["count"]) for r in first] == [("10.0.0.1", 2), ("10.0.0.2", 1)]
    assert b.misses() == [] and decoded == [1, 2]         # nothing grew: nothing decoded
    counts[2] = 4
    counts[3] = 1
    assert [(r["client_ip"], r["count"]) for r in b.misses()] == [("10.0.0.2", 3), ("10.0.0.3", 1)]
    assert decoded == [1, 2, 2, 3]


class _K(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint16), ("client_port", ctypes.c_uint16), ("host_port", ctypes.c_uint16)]


class _V(ctypes.Structure):
    _fields_ = [("ct", ctypes.c_uint64), ("first_ns", ctypes.c_uint64), ("mapping_id", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32)]


class _Claimed(ctypes.Structure):
    _fields_ = [("client_port", ctypes.c_uint16), ("host_port", ctypes.c_uint16), ("mapping_id", ctypes.c_uint32)]


class _FlowsMap:
    """`flows` as bpfsys.BpfMap shows it: chunks of keys and values back to back (an empty one
    too, as a batch read can give), and lookup_and_delete, which finds nothing for a flow the
    kernel reported meanwhile."""
    Key, Leaf = _K, _V
    key_size, value_size = ctypes.sizeof(_K), ctypes.sizeof(_V)

    def __init__(self, firsts, reported=()):
        self.rows = {i: _V(ct=1000 + i, first_ns=f, mapping_id=i % 3) for i, f in enumerate(firsts)}
        self.reported = set(reported)

    def chunks(self):
        items = sorted(self.rows.items())
        yield 0, b"", b""
        for part in (items[:2], items[2:]):
            yield (len(part), b"".join(bytes(_K(i, 40000 + i, 8000)) for i, _ in part),
                   b"".join(bytes(v) for _, v in part))

    def lookup_and_delete(self, k):
        v = self.rows.pop(k.id, None)
        return None if k.id in self.reported else v


class _ClaimedMap:
    Leaf = _Claimed

    def __init__(self):
        self.rows = {}

    def update(self, ct, v):
        self.rows[ct.value] = (v.client_port, v.host_port, v.mapping_id)


def test_take_pending_claims_the_due_flows_from_one_read_of_the_table():
    from bpftrace_hostport.collect.netfilter.probe import Probe
    p = object.__new__(Probe)
    flows, claimed = _FlowsMap([10, 50, 90, 20, 70], reported={3}), _ClaimedMap()
    p.maps = {"flows": flows, "claimed": claimed}
    p._key_size, p._val_off = 6, 8
    got = p.take_pending(50)
    # due: the flows that began at 10, 50 and 20; the one at 20 (id 3) the kernel reported first
    assert [bytes(_V.from_buffer_copy(r, 8)) for r in got] == [bytes(_V(ct=1000, first_ns=10, mapping_id=0)),
                                                                 bytes(_V(ct=1001, first_ns=50, mapping_id=1))]
    assert claimed.rows == {1000: (40000, 8000, 0), 1001: (40001, 8000, 1), 1003: (40003, 8000, 0)}
    assert sorted(flows.rows) == [2, 4]                   # not yet due: untouched
    assert len(p.take_pending(None)) == 2 and not flows.rows
