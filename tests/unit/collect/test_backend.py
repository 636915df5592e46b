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
from bpftrace_hostport.collect.batch import FlowBatch

S = 1_000_000_000


class TableProbe:
    """A probe whose flow table is empty or not; counts its walks."""

    def __init__(self):
        self.empty = True
        self.walks = []
        self.checks = 0

    def flows_empty(self):
        self.checks += 1
        return self.empty

    def take_pending(self, older_than_ns):
        self.walks.append(older_than_ns)
        return []


def backend(probe, monkeypatch, clock):
    b = object.__new__(bk.NetfilterBackend)
    b.probe, b.opts, b.reported, b.quiet_until_ns = probe, SimpleNamespace(timeout=5.0), 0, 0
    b.decoder = SimpleNamespace(decode=lambda raws: FlowBatch.empty())
    monkeypatch.setattr(ev.Clock, "now_mono_ns", staticmethod(lambda: clock[0]))
    return b


def test_an_empty_flow_table_is_not_walked_again_before_a_flow_could_time_out(monkeypatch):
    clock = [100 * S]
    p = TableProbe()
    b = backend(p, monkeypatch, clock)
    b.expire()
    assert p.checks == 1 and p.walks == []
    # A flow that arrives now is due at 105 s: nothing is looked at before 105 s less the slack.
    p.empty = False
    quiet = 100 * S + 5 * S - bk.INSERT_SLACK_NS
    for t in range(100 * S, quiet, S // 4):
        clock[0] = t
        assert len(b.expire()) == 0
    assert p.checks == 1 and p.walks == []
    clock[0] = quiet
    b.expire()
    assert p.checks == 2 and p.walks == [quiet - 5 * S]


def test_a_table_with_flows_is_walked_at_every_batch(monkeypatch):
    clock = [100 * S]
    p = TableProbe()
    p.empty = False
    b = backend(p, monkeypatch, clock)
    for i in range(4):
        clock[0] = 100 * S + i * S // 4
        b.expire()
    assert p.walks == [100 * S + i * S // 4 - 5 * S for i in range(4)]
    # Once it is empty the walks stop until a flow could be due.
    p.empty = True
    clock[0] += S // 4
    b.expire()
    clock[0] += S // 4
    b.expire()
    assert len(p.walks) == 4 and p.checks == 5


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
