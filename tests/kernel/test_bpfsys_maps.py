"""bpfsys's map operations on real maps of the kinds the tracer reads (made with BPF_MAP_CREATE,
no program needed): batch reads give what reading key by key gives, and the probe's once-a-second
readers (read_mappings, read_stats) give what they gave with a lookup per key."""
import ctypes
import os
import struct

import pytest

from bpftrace_hostport.collect.netfilter import probe as probemod
from bpftrace_hostport.ebpf import bpfsys
from tests.conftest import require_kernel

HASH, ARRAY, PERCPU_ARRAY, LRU_HASH = 1, 2, 6, 9
CPUS = bpfsys.possible_cpus()


class MappingKey(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("family", ctypes.c_uint8), ("proto", ctypes.c_uint8), ("host_port", ctypes.c_uint16),
                ("pod_port", ctypes.c_uint16), ("_pad", ctypes.c_uint16), ("pod_addr", ctypes.c_uint8 * 16)]


class MappingVal(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("flows", ctypes.c_uint64), ("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class MappingLat(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("answered", ctypes.c_uint64), ("lat_sum_ns", ctypes.c_uint64),
                ("lat_hist", ctypes.c_uint64 * 20), ("refused", ctypes.c_uint64 * 11)]


class Maps:
    def __init__(self):
        self.fds = []

    def make(self, kind, key_t, val_t, entries, name):
        fd = bpfsys.map_create(kind, ctypes.sizeof(key_t), ctypes.sizeof(val_t), entries, name=name)
        self.fds.append(fd)
        return bpfsys.BpfMap(name, fd, key_t, val_t)

    def close(self):
        for fd in self.fds:
            os.close(fd)


@pytest.fixture
def maps():
    require_kernel()
    m = Maps()
    try:
        yield m
    finally:
        m.close()


def key_by_key(m):
    """items() as it was: every key, then a lookup of each."""
    return [(bytes(k), m.lookup_raw(bytes(k))) for k in m.keys()]


def raw_items(m):
    out = []
    for k, v in m.items():
        out.append((bytes(k), b"".join(bytes(x) for x in v) if m.percpu else bytes(v)))
    return out


class FlowVal(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("ct", ctypes.c_uint64), ("first_ns", ctypes.c_uint64), ("rest", ctypes.c_uint8 * 100)]


@pytest.mark.parametrize("batches", [True, False])
def test_earliest_flow_of_the_table(maps, batches):
    flows = maps.make(HASH, MappingKey, FlowVal, 65536, "flows")
    flows.batches = batches
    p = object.__new__(probemod.Probe)
    p.maps = {"flows": flows}
    assert p.flows_earliest_ns() is None
    for i in range(3000):
        flows.update(MappingKey(family=4, proto=6, host_port=i), FlowVal(i, 10**12 + (i * 7919) % 3001))
    assert p.flows_earliest_ns() == 10**12 + min((i * 7919) % 3001 for i in range(3000))


@pytest.mark.parametrize("kind", [HASH, LRU_HASH])
def test_hash_items_in_one_batch_equal_key_by_key(maps, kind):
    h = maps.make(kind, MappingKey, ctypes.c_uint32, 4096, "t_items")
    assert h.items() == []
    for i in range(1000):
        k = MappingKey(family=4, proto=6, host_port=i)
        h.update(k, ctypes.c_uint32(i * 3))
    got = raw_items(h)
    assert sorted(got) == sorted(key_by_key(h)) and len(got) == 1000
    assert h.batches
    h.batches = False                         # the key-by-key path gives the same
    assert raw_items(h) == got


def test_hash_items_over_many_batches_and_long_buckets(maps, monkeypatch):
    """Batches of 1 entry: many calls, each going on where the last stopped, and a bucket
    holding more than one entry (ENOSPC) makes the batch larger."""
    monkeypatch.setattr(bpfsys, "BATCH_ENTRIES", 1)
    h = maps.make(HASH, ctypes.c_uint64, ctypes.c_uint64, 4096, "t_small")
    for i in range(3000):
        h.update(ctypes.c_uint64(i), ctypes.c_uint64(i + 1))
    got = raw_items(h)
    assert sorted(got) == sorted(key_by_key(h)) and len(got) == 3000


def test_array_values_in_one_batch_equal_lookups(maps):
    for kind, val_t in ((ARRAY, MappingLat), (PERCPU_ARRAY, MappingVal)):
        a = maps.make(kind, ctypes.c_uint32, val_t, 64, "t_arr")
        for i in (0, 1, 2, 5, 63):
            a.update(ctypes.c_uint32(i), val_t(*([i + 1] * 2)))
        for first, n in ((0, 3), (1, 5), (60, 4), (63, 1)):
            want = b"".join(a.lookup_raw(struct.pack("<I", k)) for k in range(first, first + n))
            assert a.values_raw(first, n) == want
            a.batches = False
            assert a.values_raw(first, n) == want
            a.batches = True


def probe_with(maps, ids, stats):
    mid = maps.make(HASH, MappingKey, ctypes.c_uint32, 4096, "mapping_ids")
    counts = maps.make(PERCPU_ARRAY, ctypes.c_uint32, MappingVal, 4096, "mappings")
    lats = maps.make(ARRAY, ctypes.c_uint32, MappingLat, 4096, "mapping_lat")
    st = maps.make(PERCPU_ARRAY, ctypes.c_uint32, ctypes.c_uint64, len(probemod.STAT_NAMES), "stats")
    for n, i in enumerate(ids):
        mid.update(MappingKey(family=4, proto=6, host_port=8000 + n), ctypes.c_uint32(i))
        counts.update(ctypes.c_uint32(i), MappingVal(n + 1, 10 * n + 2, 100 * n + 3))   # on every CPU
        hist = (ctypes.c_uint64 * 20)(*range(n, n + 20))
        lats.update(ctypes.c_uint32(i), MappingLat(n, 7 * n, hist, (ctypes.c_uint64 * 11)(*range(n, n + 11))))
    for i, v in enumerate(stats):
        st.update(ctypes.c_uint32(i), ctypes.c_uint64(v))
    p = object.__new__(probemod.Probe)
    p.maps = {"mapping_ids": mid, "mappings": counts, "mapping_lat": lats, "stats": st}
    return p


def read_mappings_key_by_key(p):
    """read_mappings as it was: two lookups per mapping."""
    out = []
    for k, mid in p.maps["mapping_ids"].items():
        per_cpu, lat = p.maps["mappings"].lookup(mid), p.maps["mapping_lat"].lookup(mid)
        c = {f: sum(getattr(v, f) for v in per_cpu) for f in ("flows", "packets", "bytes")}
        c.update(answered=int(lat.answered), lat_sum_ns=int(lat.lat_sum_ns), lat_hist=list(lat.lat_hist),
                 refused=list(lat.refused))
        out.append((bytes(k), c))
    return out


@pytest.mark.parametrize("ids", [[], [0], list(range(40)), [0, 1, 2, 4000], [3, 2500, 4095]])
def test_read_mappings_gives_what_a_lookup_per_mapping_gave(maps, ids):
    p = probe_with(maps, ids, [])
    got = [(bytes(k), c) for k, c in p.read_mappings()]
    assert got == read_mappings_key_by_key(p)
    assert len(got) == len(ids)
    for _, c in got:
        n = c["answered"]                        # the n-th mapping made above
        assert (c["flows"], c["packets"], c["bytes"]) == (CPUS * (n + 1), CPUS * (10 * n + 2), CPUS * (100 * n + 3))
        assert c["lat_hist"] == list(range(n, n + 20)) and type(c["flows"]) is int
        assert c["refused"] == list(range(n, n + 11))


def test_read_stats_sums_every_cpu(maps):
    p = probe_with(maps, [], [5, 6, 7, 8, 9, 10, 11, 12, 13])
    assert p.read_stats() == {n: CPUS * (5 + i) for i, n in enumerate(probemod.STAT_NAMES)}
