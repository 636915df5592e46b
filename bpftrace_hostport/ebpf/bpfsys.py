"""The raw bpf() syscall: maps by file descriptor, the ring buffer by mmap, object info; and,
for a start from the compile cache (objcache.py), map creation, program load and the
tracepoint attach through perf_event_open(2).

The tracer's own process never loads bcc (and with it LLVM and clang, 60+ MB resident, plus
the compile's heap): compiler.py compiles and loads the programs in a short-lived child and
hands over the file descriptors. Everything the tracer then does with maps goes through here,
with the key and value layouts as bcc compiled them (rebuilt by `ctype_from_desc`).

Kernel ABI references: include/uapi/linux/bpf.h (union bpf_attr, struct bpf_map_info,
BPF_RINGBUF_*), kernel/bpf/ringbuf.c (the mmap layout of a ring buffer map),
include/uapi/linux/perf_event.h (struct perf_event_attr, PERF_EVENT_IOC_*).
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct
from functools import lru_cache
from typing import Iterator, List, Optional, Tuple

# enum bpf_cmd
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_AND_DELETE_ELEM = 21
BPF_MAP_LOOKUP_BATCH = 24
BPF_LINK_CREATE = 28

# enum bpf_map_type (the ones we use)
PERCPU_TYPES = {5, 6, 10}          # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
BPF_MAP_TYPE_RINGBUF = 27

BPF_ANY, BPF_NOEXIST = 0, 1

# What bpf() answers when a map has no batch operations (ENOTSUPP, 524, is the kernel's own
# errno, which BPF_MAP_LOOKUP_BATCH lets through): the maps are then read key by key.
_NO_BATCH = {errno.EINVAL, errno.EOPNOTSUPP, 524}

# enum bpf_prog_type (the ones we load); BPF_PROG_TYPE_NETFILTER is in nflink.py
BPF_PROG_TYPE_TRACEPOINT = 5
BPF_OBJ_NAME_LEN = 16

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351,
            "riscv64": 280}
_libc = ctypes.CDLL(None, use_errno=True)


class BpfError(OSError):
    pass


_MACHINE = platform.machine()


def sys_bpf(cmd: int, attr: ctypes.Array) -> int:
    """bpf(cmd, attr, sizeof attr); raises BpfError with errno on failure."""
    nr = _SYS_BPF.get(_MACHINE)
    if nr is None:
        raise BpfError(errno.ENOSYS, f"unknown bpf() syscall number on {_MACHINE}")
    ret = _libc.syscall(nr, cmd, attr, ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, os.strerror(err))
    return ret


@lru_cache(maxsize=1)
def possible_cpus() -> int:
    """Per-CPU map values have one slot per *possible* CPU (e.g. "0-3,8")."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += (int(hi) if hi else int(lo)) - int(lo) + 1
    return n


# -- layouts --------------------------------------------------------------------------------
_INT_TYPES = {(1, False): ctypes.c_uint8, (2, False): ctypes.c_uint16, (4, False): ctypes.c_uint32,
              (8, False): ctypes.c_uint64, (1, True): ctypes.c_int8, (2, True): ctypes.c_int16,
              (4, True): ctypes.c_int32, (8, True): ctypes.c_int64}


def desc_from_ctype(t) -> dict:
    """A JSON description of a ctypes type as bcc built it from the compiled program."""
    if isinstance(t, type) and issubclass(t, (ctypes.Structure, ctypes.Union)):
        return {"kind": "struct", "size": ctypes.sizeof(t),
                "fields": [{"name": f[0], "offset": getattr(t, f[0]).offset, "type": desc_from_ctype(f[1])}
                           for f in t._fields_]}
    if isinstance(t, type) and issubclass(t, ctypes.Array):
        return {"kind": "array", "len": t._length_, "elem": desc_from_ctype(t._type_)}
    size = ctypes.sizeof(t)
    signed = t in (ctypes.c_int8, ctypes.c_int16, ctypes.c_int32, ctypes.c_int64, ctypes.c_long,
                   ctypes.c_longlong, ctypes.c_int, ctypes.c_short, ctypes.c_byte, ctypes.c_char)
    return {"kind": "int", "size": size, "signed": signed}


def ctype_from_desc(d: dict, name: str = "Rec"):
    """Rebuilds a ctypes type with the exact offsets and size of the description."""
    if d["kind"] == "int":
        return _INT_TYPES[(d["size"], d["signed"])]
    if d["kind"] == "array":
        return ctype_from_desc(d["elem"]) * d["len"]
    fields, pos, gap = [], 0, 0
    for f in sorted(d["fields"], key=lambda f: f["offset"]):
        ft = ctype_from_desc(f["type"], f["name"])
        if f["offset"] > pos:
            fields.append((f"_gap{gap}", ctypes.c_uint8 * (f["offset"] - pos)))
            gap += 1
        fields.append((f["name"], ft))
        pos = f["offset"] + ctypes.sizeof(ft)
    if d["size"] > pos:
        fields.append((f"_gap{gap}", ctypes.c_uint8 * (d["size"] - pos)))
    cls = type(name, (ctypes.Structure,), {"_pack_": 1, "_fields_": fields})
    if ctypes.sizeof(cls) != d["size"]:
        raise ValueError(f"layout of {name} rebuilt as {ctypes.sizeof(cls)} bytes, expected {d['size']}")
    return cls


# -- maps -------------------------------------------------------------------------------------
class _MapInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * 16)]


def map_info(fd: int) -> _MapInfo:
    info = _MapInfo()
    attr = ctypes.create_string_buffer(16)
    struct.pack_into("<IIQ", attr, 0, fd, ctypes.sizeof(info), ctypes.addressof(info))
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return info


class BpfMap:
    """A map by file descriptor, with bcc's key/value types. Values of per-CPU maps are lists."""

    def __init__(self, name: str, fd: int, key_type, value_type):
        self.name, self.fd = name, fd
        self.Key, self.Leaf = key_type, value_type
        info = map_info(fd)
        self.type, self.max_entries = info.type, info.max_entries
        self.percpu = info.type in PERCPU_TYPES
        self.key_size = info.key_size
        self.value_size = info.value_size
        if key_type is not None and self.key_size != ctypes.sizeof(key_type) and info.type != BPF_MAP_TYPE_RINGBUF:
            raise ValueError(f"map {name}: key is {self.key_size} bytes, layout says {ctypes.sizeof(key_type)}")
        self._slot = (self.value_size + 7) // 8 * 8
        self._vbuf_size = self._slot * possible_cpus() if self.percpu else self.value_size
        self.batches = True              # False once the kernel refused BPF_MAP_LOOKUP_BATCH
        self._bufs: Optional[_BatchBuffers] = None

    def _attr(self, key: bytes, val_addr: int = 0, flags: int = 0):
        kbuf = ctypes.create_string_buffer(key, len(key))
        attr = ctypes.create_string_buffer(32)
        struct.pack_into("<IIQQQ", attr, 0, self.fd, 0, ctypes.addressof(kbuf), val_addr, flags)
        return attr, kbuf

    def lookup_raw(self, key: bytes, cmd: int = BPF_MAP_LOOKUP_ELEM) -> Optional[bytes]:
        """The value's bytes, or None when the key is not there; `cmd` may also be
        BPF_MAP_LOOKUP_AND_DELETE_ELEM."""
        vbuf = ctypes.create_string_buffer(self._vbuf_size)
        attr, _k = self._attr(key, ctypes.addressof(vbuf))
        try:
            sys_bpf(cmd, attr)
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return vbuf.raw

    def lookup(self, key):
        raw = self.lookup_raw(bytes(key))
        if raw is None:
            return None
        return self._value(raw)

    def update(self, key, value, flags: int = BPF_ANY) -> None:
        vbytes = bytes(value)
        if self.percpu:
            one = vbytes.ljust(self._slot, b"\0")
            vbytes = one * possible_cpus()
        vbuf = ctypes.create_string_buffer(vbytes, len(vbytes))
        attr, _k = self._attr(bytes(key), ctypes.addressof(vbuf), flags)
        sys_bpf(BPF_MAP_UPDATE_ELEM, attr)

    def lookup_and_delete(self, key):
        """The value, deleted in the same step (hash maps: Linux >= 5.14), or None when the key
        is not there: the atomic claim of an entry that someone else may delete too."""
        if self.percpu:
            raise ValueError("lookup_and_delete of a per-CPU map is not used here")
        raw = self.lookup_raw(bytes(key), BPF_MAP_LOOKUP_AND_DELETE_ELEM)
        return None if raw is None else self.Leaf.from_buffer_copy(raw)

    def push(self, value) -> None:
        """Adds a value to a queue or stack map (no key: bpf_attr.key is NULL)."""
        vbytes = bytes(value)
        vbuf = ctypes.create_string_buffer(vbytes, len(vbytes))
        attr = ctypes.create_string_buffer(32)
        struct.pack_into("<IIQQQ", attr, 0, self.fd, 0, 0, ctypes.addressof(vbuf), BPF_ANY)
        sys_bpf(BPF_MAP_UPDATE_ELEM, attr)

    def delete(self, key) -> bool:
        """True if this call removed the key (the atomic claim trace.py relies on)."""
        attr, _k = self._attr(bytes(key))
        try:
            sys_bpf(BPF_MAP_DELETE_ELEM, attr)
            return True
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return False
            raise

    def keys(self) -> Iterator:
        prev = None
        nbuf = ctypes.create_string_buffer(self.key_size)
        while True:
            attr = ctypes.create_string_buffer(32)
            if prev is None:
                struct.pack_into("<IIQQ", attr, 0, self.fd, 0, 0, ctypes.addressof(nbuf))
                kbuf = None
            else:
                kbuf = ctypes.create_string_buffer(prev, len(prev))
                struct.pack_into("<IIQQ", attr, 0, self.fd, 0, ctypes.addressof(kbuf), ctypes.addressof(nbuf))
            try:
                sys_bpf(BPF_MAP_GET_NEXT_KEY, attr)
            except BpfError as e:
                if e.errno == errno.ENOENT:
                    return
                raise
            prev = nbuf.raw
            yield self.Key.from_buffer_copy(prev)

    def _value(self, raw, offset: int = 0):
        if self.percpu:
            return [self.Leaf.from_buffer_copy(raw, offset + i * self._slot) for i in range(possible_cpus())]
        return self.Leaf.from_buffer_copy(raw, offset)

    def lookup_batch(self, start: Optional[bytes], count: int) -> Tuple[int, bytes, bytes, Optional[bytes]]:
        """BPF_MAP_LOOKUP_BATCH (Linux >= 5.6): up to `count` entries from the batch position
        `start` (None: the beginning) in one call, as (n, n keys back to back, n values back
        to back, the next position or None when the map is done). A per-CPU value is one slot
        per possible CPU, as lookup_raw gives it. Raises BpfError (errno in _NO_BATCH) where
        the map type has no batch lookup; ENOSPC when a hash bucket holds more than `count`.

        union bpf_attr for the BPF_MAP_*_BATCH commands:
            0 u64 in_batch   8 u64 out_batch   16 u64 keys   24 u64 values   32 u32 count
           36 u32 map_fd    40 u64 elem_flags  48 u64 flags
        The position is opaque: a bucket index (u32) for hash maps, a key for arrays."""
        b = self._batch_buffers(count)
        if start is not None:
            ctypes.memmove(b.inb, start, min(len(start), len(b.inb)))
        struct.pack_into("<QQQQIIQQ", b.attr, 0, ctypes.addressof(b.inb) if start is not None else 0,
                         ctypes.addressof(b.outb), ctypes.addressof(b.keys), ctypes.addressof(b.values),
                         count, self.fd, 0, 0)
        done = False
        try:
            sys_bpf(BPF_MAP_LOOKUP_BATCH, b.attr)
        except BpfError as e:
            if e.errno != errno.ENOENT:
                raise
            done = True                       # the last entries (maybe none) are in the buffers
        n = struct.unpack_from("<I", b.attr, 32)[0]
        return (n, ctypes.string_at(b.keys, n * self.key_size), ctypes.string_at(b.values, n * self._vbuf_size),
                None if done else b.outb.raw)

    def _batch_buffers(self, count: int) -> "_BatchBuffers":
        """Buffers for `count` entries, kept from call to call (the maps are read every second)."""
        b = self._bufs
        if b is None or b.count < count:
            b = self._bufs = _BatchBuffers(count, self.key_size, self._vbuf_size)
        return b

    def items(self) -> List[Tuple[object, object]]:
        """Every (key, value): in one BPF_MAP_LOOKUP_BATCH where the kernel has it (a call for
        up to BATCH_ENTRIES entries instead of two per key), else key by key."""
        out = []
        ks, vs = self.key_size, self._vbuf_size
        for n, keys, values in self.chunks():
            out += [(self.Key.from_buffer_copy(keys, i * ks), self._value(values, i * vs)) for i in range(n)]
        return out

    def chunks(self) -> Iterator[Tuple[int, bytes, bytes]]:
        """The whole map as (n, n keys back to back, n values back to back) chunks: from
        BPF_MAP_LOOKUP_BATCH, up to BATCH_ENTRIES entries each (more where a hash bucket holds
        more), or, where the kernel has no batch lookup, one chunk read key by key."""
        start, count = None, min(self.max_entries, BATCH_ENTRIES)
        while self.batches:
            try:
                n, keys, values, nxt = self.lookup_batch(start, count)
            except BpfError as e:
                if e.errno == errno.ENOSPC and count < self.max_entries:
                    count = min(self.max_entries, count * 2)     # a hash bucket longer than count
                    continue
                if e.errno in _NO_BATCH and start is None:
                    self.batches = False                         # refused at once: key by key
                    break
                raise
            yield n, keys, values
            if nxt is None:
                return
            start = nxt
        keys, values = [], []
        for k in list(self.keys()):
            v = self.lookup_raw(bytes(k))
            if v is not None:
                keys.append(bytes(k))
                values.append(v)
        yield len(keys), b"".join(keys), b"".join(values)

    def values_at(self, slots: List[int]) -> list:
        """The values of an array map at `slots`, as lookup() gives them. Slots that mostly fill
        their range (an id table handed out from 0 upwards) are read in one call for the whole
        range; slots far apart, in a call each."""
        if not slots:
            return []
        lo, hi = min(slots), max(slots)
        size = self._vbuf_size
        if hi - lo + 1 <= 2 * len(slots) + 64:
            raw = self.values_raw(lo, hi - lo + 1)
            return [self._value(raw, (s - lo) * size) for s in slots]
        return [self._value(self.values_raw(s, 1)) for s in slots]

    def values_raw(self, first: int, n: int) -> bytes:
        """The values of keys first .. first + n - 1 of an array map, back to back (per-CPU:
        lookup_raw's layout), in one BPF_MAP_LOOKUP_BATCH where the kernel has it."""
        if n <= 0:
            return b""
        if self.batches:
            try:
                start = struct.pack("<I", first - 1) if first > 0 else None    # batches start after it
                got, keys, values, _ = self.lookup_batch(start, n)
                if got == n and keys[:4] == struct.pack("<I", first):
                    return values
            except BpfError as e:
                if e.errno not in _NO_BATCH:
                    raise
                self.batches = False
        return b"".join(self.lookup_raw(struct.pack("<I", k)) or bytes(self._vbuf_size)
                        for k in range(first, first + n))


BATCH_ENTRIES = 1024      # entries a batch read asks for at once (more calls for larger maps)


class _BatchBuffers:
    def __init__(self, count: int, key_size: int, value_size: int):
        self.count = count
        pos = max(8, key_size)                # a bucket index (u32) or a key
        self.inb, self.outb = ctypes.create_string_buffer(pos), ctypes.create_string_buffer(pos)
        self.keys = ctypes.create_string_buffer(count * key_size)
        self.values = ctypes.create_string_buffer(count * value_size)
        self.attr = ctypes.create_string_buffer(56)


# -- ring buffer ------------------------------------------------------------------------------
BPF_RINGBUF_BUSY_BIT = 1 << 31
BPF_RINGBUF_DISCARD_BIT = 1 << 30
BPF_RINGBUF_HDR_SZ = 8


class RingBuffer:
    """Consumer side of a BPF_MAP_TYPE_RINGBUF map, read through its mmap (kernel/bpf/ringbuf.c).

    Page 0: consumer position (read-write). Page 1: producer position, then the data area,
    mapped twice in a row by the kernel so that a record never wraps for the reader.
    """

    def __init__(self, fd: int, size: int):
        self.fd = fd
        self._ep = None
        self._also: set = set()
        self.size = size
        self.mask = size - 1
        self.page = mmap.PAGESIZE
        self.cons = mmap.mmap(fd, self.page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self.prod = mmap.mmap(fd, self.page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=self.page)

    def wait(self, timeout_s: Optional[float], also: Tuple[int, ...] = ()) -> None:
        """Sleeps until the kernel wakes readers of the ring (a record submitted with a wake-up),
        one of the `also` descriptors is readable, or timeout_s passes (None: no timeout).

        Edge-triggered: a ring buffer's fd polls readable for as long as any record is unread,
        so a level-triggered poll would return at once after every partial drain and the reader
        would spin, taking a few records per turn. With EPOLLET only the kernel's wake-ups end
        the sleep."""
        import select
        try:
            if self._ep is None:
                self._ep = select.epoll()
                self._ep.register(self.fd, select.EPOLLIN | select.EPOLLET)
            for fd in also:
                if fd not in self._also:
                    self._ep.register(fd, select.EPOLLIN)
                    self._also.add(fd)
            self._ep.poll(timeout_s)
        except (OSError, ValueError):    # closed meanwhile
            pass

    def consume(self) -> List[bytes]:
        cons_pos = struct.unpack_from("<Q", self.cons, 0)[0]
        prod_pos = struct.unpack_from("<Q", self.prod, 0)[0]
        out = []
        start = cons_pos
        while cons_pos < prod_pos:
            off = self.page + (cons_pos & self.mask)
            hdr = struct.unpack_from("<I", self.prod, off)[0]
            if hdr & BPF_RINGBUF_BUSY_BIT:
                break                      # reserved, not yet submitted
            length = hdr & ~(BPF_RINGBUF_BUSY_BIT | BPF_RINGBUF_DISCARD_BIT)
            if not hdr & BPF_RINGBUF_DISCARD_BIT:
                out.append(self.prod[off + BPF_RINGBUF_HDR_SZ: off + BPF_RINGBUF_HDR_SZ + length])
            cons_pos += (length + BPF_RINGBUF_HDR_SZ + 7) // 8 * 8
        if cons_pos != start:
            struct.pack_into("<Q", self.cons, 0, cons_pos)
        return out

    def consume_fixed(self, size: int) -> bytes:
        """The payloads of every submitted record, concatenated, when every record is `size`
        bytes (our ring carries one record type): the headers are read as one numpy column and
        the payloads copied in one go, instead of a Python step per record."""
        import numpy as np
        stride = (size + BPF_RINGBUF_HDR_SZ + 7) // 8 * 8
        cons_pos = struct.unpack_from("<Q", self.cons, 0)[0]
        prod_pos = struct.unpack_from("<Q", self.prod, 0)[0]
        n = (prod_pos - cons_pos) // stride
        if n <= 0:
            return b""
        # The data area is mapped twice in a row: the span never wraps for the reader.
        recs = np.frombuffer(self.prod, np.uint8, n * stride, self.page + (cons_pos & self.mask))
        recs = recs.reshape(n, stride)
        hdrs = recs[:, :4].copy().view("<u4").ravel()      # read the headers before the payloads
        if (hdrs == size).all():
            # The usual case, checked in one step: every record submitted (not busy), none
            # discarded, all of this size.
            payload = recs[:, BPF_RINGBUF_HDR_SZ:BPF_RINGBUF_HDR_SZ + size].tobytes()
            del recs
            struct.pack_into("<Q", self.cons, 0, cons_pos + n * stride)
            return payload
        busy = np.flatnonzero(hdrs & BPF_RINGBUF_BUSY_BIT)
        n = int(busy[0]) if len(busy) else n               # stop at the first one still reserved
        lengths = hdrs[:n] & ~np.uint32(BPF_RINGBUF_BUSY_BIT | BPF_RINGBUF_DISCARD_BIT)
        if not (lengths == size).all():
            del recs
            return b"".join(self.consume())                # another record size: the general walk
        keep = (hdrs[:n] & BPF_RINGBUF_DISCARD_BIT) == 0
        payload = recs[:n][keep][:, BPF_RINGBUF_HDR_SZ:BPF_RINGBUF_HDR_SZ + size].tobytes()
        del recs                                           # no view of the mmap may outlive this
        if n:
            struct.pack_into("<Q", self.cons, 0, cons_pos + n * stride)
        return payload

    def close(self) -> None:
        if self._ep is not None:
            self._ep.close()
            self._ep = None
        for m in (self.cons, self.prod):
            m.close()


# -- creating maps, loading programs (a start from the compile cache) -------------------------
def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, map_flags: int = 0,
               name: str = "") -> int:
    """BPF_MAP_CREATE without BTF; returns the new map's fd.

    union bpf_attr, the anonymous struct for BPF_MAP_CREATE (zero-filled past what is set):
        0 u32 map_type      4 u32 key_size     8 u32 value_size    12 u32 max_entries
       16 u32 map_flags    20 u32 inner_map_fd 24 u32 numa_node    28 char map_name[16]
       44 u32 map_ifindex  48 u32 btf_fd  52 btf_key_type_id  56 btf_value_type_id ...
    """
    attr = ctypes.create_string_buffer(72)
    struct.pack_into("<IIIII", attr, 0, map_type, key_size, value_size, max_entries, map_flags)
    struct.pack_into("15s", attr, 28, name.encode()[:BPF_OBJ_NAME_LEN - 1])
    return sys_bpf(BPF_MAP_CREATE, attr)


class ProgLoadError(BpfError):
    """BPF_PROG_LOAD failed; .log holds the tail of the verifier's log (may be empty)."""

    def __init__(self, err: int, msg: str, log: str = ""):
        super().__init__(err, msg)
        self.log = log


def prog_load(prog_type: int, insns: bytes, license: str = "GPL", name: str = "",
              expected_attach_type: int = 0, kern_version: int = 0,
              log_size: int = 1 << 20) -> int:
    """BPF_PROG_LOAD of raw instructions (struct bpf_insn, 8 bytes each); returns the prog fd.

    Loaded first without a verifier log (the fast path); on failure once more with a log
    buffer (log_level 1) so that ProgLoadError can say why. union bpf_attr for BPF_PROG_LOAD:
        0 u32 prog_type     4 u32 insn_cnt      8 u64 insns (pointer)  16 u64 license (pointer)
       24 u32 log_level    28 u32 log_size     32 u64 log_buf         40 u32 kern_version
       44 u32 prog_flags   48 char prog_name[16]                      64 u32 prog_ifindex
       68 u32 expected_attach_type   72 u32 prog_btf_fd ...
    """
    if len(insns) % 8:
        raise ValueError("BPF instructions must be a multiple of 8 bytes")
    ibuf = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())

    def attempt(log_level: int, logbuf) -> int:
        attr = ctypes.create_string_buffer(128)
        struct.pack_into("<IIQQIIQII", attr, 0, prog_type, len(insns) // 8, ctypes.addressof(ibuf),
                         ctypes.addressof(lic), log_level, len(logbuf) if logbuf is not None else 0,
                         ctypes.addressof(logbuf) if logbuf is not None else 0, kern_version, 0)
        struct.pack_into("15s", attr, 48, name.encode()[:BPF_OBJ_NAME_LEN - 1])
        struct.pack_into("<I", attr, 68, expected_attach_type)
        return sys_bpf(BPF_PROG_LOAD, attr)

    try:
        return attempt(0, None)
    except BpfError as first:
        logbuf = ctypes.create_string_buffer(log_size)
        try:
            return attempt(1, logbuf)      # a transient failure: it loaded this time
        except BpfError:
            pass
        log = logbuf.value.decode(errors="replace")
        raise ProgLoadError(first.errno, first.strerror, log[-4000:]) from None


# perf_event_open(2): syscall numbers, and struct perf_event_attr as bcc's
# bpf_attach_tracing_event fills it (src/cc/libbpf.c): type, config, sample_period 1, wakeup_events 1.
_SYS_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "armv7l": 364, "ppc64le": 319, "s390x": 331,
                        "riscv64": 241}
PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_ATTR_SIZE_VER0 = 64
# _IO('$', 0) and _IOW('$', 8, __u32); powerpc encodes the write direction as 4 << 29
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_SET_BPF = 0x80042408 if platform.machine().startswith("ppc") else 0x40042408


def perf_event_open_tracepoint(tp_id: int, cpu: int = 0) -> int:
    """A perf event on tracepoint `tp_id` (events/<cat>/<name>/id in tracefs), pid -1, one cpu.

    struct perf_event_attr (its first PERF_ATTR_SIZE_VER0 bytes; the rest stays zero):
        0 u32 type   4 u32 size   8 u64 config   16 u64 sample_period   24 u64 sample_type
       32 u64 read_format   40 u64 flag bits (disabled, inherit, ...)   48 u32 wakeup_events
    A tracepoint event fires on every CPU whatever `cpu` says; the kernel only wants pid and
    cpu not both -1.
    """
    machine = platform.machine()
    if machine not in _SYS_PERF_EVENT_OPEN:
        raise BpfError(errno.ENOSYS, f"unknown perf_event_open() syscall number on {machine}")
    attr = ctypes.create_string_buffer(PERF_ATTR_SIZE_VER0)
    struct.pack_into("<IIQQ", attr, 0, PERF_TYPE_TRACEPOINT, PERF_ATTR_SIZE_VER0, tp_id, 1)
    struct.pack_into("<I", attr, 48, 1)
    fd = _libc.syscall(_SYS_PERF_EVENT_OPEN[machine], attr, -1, cpu, -1,
                       ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise BpfError(err, os.strerror(err))
    return fd


def perf_event_attach_bpf(perf_fd: int, prog_fd: int) -> None:
    """ioctl PERF_EVENT_IOC_SET_BPF (the event holds its own reference on the program), then
    PERF_EVENT_IOC_ENABLE, as bcc's bpf_attach_tracing_event does."""
    import fcntl
    try:
        fcntl.ioctl(perf_fd, PERF_EVENT_IOC_SET_BPF, prog_fd)
        fcntl.ioctl(perf_fd, PERF_EVENT_IOC_ENABLE, 0)
    except OSError as e:
        raise BpfError(e.errno, e.strerror) from None


def recv_fds(sock, msglen: int = 1 << 20, maxfds: int = 64):
    """One message and the file descriptors sent with it (SCM_RIGHTS)."""
    import socket
    return socket.recv_fds(sock, msglen, maxfds)
