"""Layouts survive the trip from the compiler child to the tracer exactly."""
import ctypes as C

from bpftrace_hostport.ebpf import bpfsys


class Inner(C.Structure):
    _fields_ = [("family", C.c_ubyte), ("proto", C.c_ubyte), ("port", C.c_ushort), ("addr", C.c_ubyte * 16)]


class Outer(C.Structure):      # natural alignment: padding after `a` and at the end
    _fields_ = [("a", C.c_ubyte), ("n", C.c_ulonglong), ("inner", Inner), ("reason", C.c_uint),
                ("s", C.c_int), ("tail", C.c_ubyte)]


def offsets(t, base=0, prefix=""):
    out = {}
    for name, ft in t._fields_:
        off = base + getattr(t, name).offset
        if isinstance(ft, type) and issubclass(ft, C.Structure):
            out.update(offsets(ft, off, prefix + name + "."))
        else:
            out[prefix + name] = (off, C.sizeof(ft))
    return out


def test_layout_round_trip_keeps_offsets_sizes_and_values():
    desc = bpfsys.desc_from_ctype(Outer)
    rebuilt = bpfsys.ctype_from_desc(desc, "Outer")
    assert C.sizeof(rebuilt) == C.sizeof(Outer)
    assert {k: v for k, v in offsets(rebuilt).items() if not k.split(".")[-1].startswith("_")} == offsets(Outer)
    o = Outer(a=1, n=2**40, reason=12, s=-5, tail=9)
    o.inner.port = 8000
    o.inner.addr[3] = 7
    r = rebuilt.from_buffer_copy(bytes(o))
    assert (r.a, r.n, r.reason, r.s, r.tail, r.inner.port, r.inner.addr[3]) == (1, 2**40, 12, -5, 9, 8000, 7)
    assert bytes(r) == bytes(o)


def test_possible_cpus_parses_ranges(monkeypatch, tmp_path):
    bpfsys.possible_cpus.cache_clear()
    assert bpfsys.possible_cpus() >= 1
    bpfsys.possible_cpus.cache_clear()


def test_hidden_kernel_symbols_are_detected(tmp_path):
    from bpftrace_hostport.collect.netfilter.preflight import kernel_symbols_visible
    shown, hidden = tmp_path / "shown", tmp_path / "hidden"
    shown.write_text("ffffffff81000000 T _stext\nffffffff812a0b50 T bpf_probe_read_kernel\n")
    hidden.write_text("0000000000000000 T _stext\n0000000000000000 T bpf_probe_read_kernel\n")
    assert kernel_symbols_visible(str(shown)) and not kernel_symbols_visible(str(hidden))
    assert kernel_symbols_visible(str(tmp_path / "missing"))


def test_ring_buffer_fixed_size_records_in_one_read():
    """consume_fixed reads submitted records in one go, skips discarded ones, stops at a busy one
    and advances the consumer position past what it read (kernel/bpf/ringbuf.c layout)."""
    import mmap
    import struct
    page, size, rec = mmap.PAGESIZE, 4096, 20
    stride = (rec + 8 + 7) // 8 * 8
    rb = object.__new__(bpfsys.RingBuffer)
    rb.size, rb.mask, rb.page, rb._ep, rb._also = size, size - 1, page, None, set()
    rb.cons, rb.prod = mmap.mmap(-1, page), mmap.mmap(-1, page + 2 * size)
    headers = [rec, rec | bpfsys.BPF_RINGBUF_DISCARD_BIT, rec, rec | bpfsys.BPF_RINGBUF_BUSY_BIT, rec]
    for i, hdr in enumerate(headers):
        off = page + i * stride
        struct.pack_into("<II", rb.prod, off, hdr, 0)
        rb.prod[off + 8: off + 8 + rec] = bytes([i]) * rec
    struct.pack_into("<Q", rb.prod, 0, len(headers) * stride)       # producer position
    assert rb.consume_fixed(rec) == bytes([0]) * rec + bytes([2]) * rec
    assert struct.unpack_from("<Q", rb.cons, 0)[0] == 3 * stride     # up to the busy record
    assert rb.consume_fixed(rec) == b""
    struct.pack_into("<I", rb.prod, page + 3 * stride, rec)          # now submitted
    assert rb.consume_fixed(rec) == bytes([3]) * rec + bytes([4]) * rec
    rb.close()


def test_ring_buffer_records_all_submitted_are_read_in_one_step():
    """Every record submitted, none discarded (the usual case): all payloads, in order, and the
    consumer position past the last one."""
    import mmap
    import struct
    page, size, rec = mmap.PAGESIZE, 4096, 20
    stride = (rec + 8 + 7) // 8 * 8
    rb = object.__new__(bpfsys.RingBuffer)
    rb.size, rb.mask, rb.page, rb._ep, rb._also = size, size - 1, page, None, set()
    rb.cons, rb.prod = mmap.mmap(-1, page), mmap.mmap(-1, page + 2 * size)
    start = 5 * stride                                               # not at the ring's start
    struct.pack_into("<Q", rb.cons, 0, start)
    for i in range(4):
        off = page + start + i * stride
        struct.pack_into("<II", rb.prod, off, rec, 0)
        rb.prod[off + 8: off + 8 + rec] = bytes([i + 1]) * rec
    struct.pack_into("<Q", rb.prod, 0, start + 4 * stride)
    assert rb.consume_fixed(rec) == b"".join(bytes([i + 1]) * rec for i in range(4))
    assert struct.unpack_from("<Q", rb.cons, 0)[0] == start + 4 * stride
    assert rb.consume_fixed(rec) == b""
    rb.close()
