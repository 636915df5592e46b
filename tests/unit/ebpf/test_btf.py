"""Tests for bpftrace_hostport.ebpf.btf: synthetic BTF blobs plus the running kernel's BTF.

The synthetic blobs are built by a tiny encoder below that follows the kernel's
Documentation/bpf/btf.rst, so each test states the exact layout it expects.
"""

from __future__ import annotations

import os
import platform
import struct
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import pytest

from bpftrace_hostport.ebpf.btf import BTF, BTFError, load_offsets
from bpftrace_hostport.errors import UserError

VMLINUX = "/sys/kernel/btf/vmlinux"

# BTF_KIND_* (btf.rst 2.2)
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)

Member = Tuple[str, int, int, int]  # (name, type_id, bit_offset, bitfield_size)


class BTFBuilder:
    """Minimal raw-BTF encoder. Type IDs are assigned in add order starting at 1.

    With `base` (a finished builder) it encodes split BTF, as the kernel does for
    modules and as libbpf's btf_new() numbers it: type IDs continue at
    btf__type_cnt(base) = base types + 1 (void), and string offsets continue at the
    base's str_len; a name the base already has reuses the base's offset, and the
    split string section does not start with an empty string.
    """

    def __init__(self, endian: str = "<", base: Optional["BTFBuilder"] = None) -> None:
        self.e = endian
        self.base = base
        if base is None:
            self.first_id = 1
            self.str_start = 0
            self.strings = bytearray(b"\0")  # offset 0 is the empty name (btf.rst 2.1)
            self._str_offs = {"": 0}
        else:
            self.first_id = base.first_id + len(base.types)
            self.str_start = base.str_start + len(base.strings)
            self.strings = bytearray()
            self._str_offs = {}
        self.types: List[bytes] = []

    def s(self, name: str) -> int:
        if self.base is not None and (name == "" or name in self.base._str_offs):
            return self.base.s(name)
        if name not in self._str_offs:
            self._str_offs[name] = self.str_start + len(self.strings)
            self.strings += name.encode() + b"\0"
        return self._str_offs[name]

    def add(self, kind: int, name: str = "", vlen: int = 0, kflag: int = 0,
            size_or_type: int = 0, tail: bytes = b"") -> int:
        info = (kflag << 31) | (kind << 24) | vlen
        self.types.append(struct.pack(self.e + "III", self.s(name), info, size_or_type) + tail)
        return self.first_id + len(self.types) - 1

    def u32(self, *vals: int) -> bytes:
        return struct.pack(self.e + "I" * len(vals), *vals)

    # --- one helper per kind
    def int_(self, name: str, size: int, signed: bool = False, bits: Optional[int] = None,
             bit_off: int = 0) -> int:
        enc = (1 if signed else 0) << 24 | bit_off << 16 | (size * 8 if bits is None else bits)
        return self.add(INT, name, size_or_type=size, tail=self.u32(enc))

    def ptr(self, t: int) -> int:
        return self.add(PTR, size_or_type=t)

    def array(self, elem: int, index_type: int, n: int) -> int:
        return self.add(ARRAY, tail=self.u32(elem, index_type, n))

    def composite(self, kind: int, name: str, size: int, members: Sequence[Member],
                  kflag: int = 0) -> int:
        tail = b""
        for mname, mtype, bit_off, bf in members:
            off = (bf << 24 | bit_off) if kflag else bit_off
            tail += self.u32(self.s(mname), mtype, off)
        return self.add(kind, name, vlen=len(members), kflag=kflag, size_or_type=size, tail=tail)

    def struct(self, name: str, size: int, members: Sequence[Member], kflag: int = 0) -> int:
        return self.composite(STRUCT, name, size, members, kflag)

    def union(self, name: str, size: int, members: Sequence[Member], kflag: int = 0) -> int:
        return self.composite(UNION, name, size, members, kflag)

    def enum(self, name: str, size: int, values: Sequence[Tuple[str, int]], signed: bool = False) -> int:
        tail = b"".join(struct.pack(self.e + "Ii", self.s(n), v) if signed
                        else struct.pack(self.e + "II", self.s(n), v) for n, v in values)
        return self.add(ENUM, name, vlen=len(values), kflag=int(signed), size_or_type=size, tail=tail)

    def enum64(self, name: str, size: int, values: Sequence[Tuple[str, int]], signed: bool = False) -> int:
        tail = b""
        for n, v in values:
            v &= (1 << 64) - 1
            tail += self.u32(self.s(n), v & 0xFFFFFFFF, v >> 32)
        return self.add(ENUM64, name, vlen=len(values), kflag=int(signed), size_or_type=size, tail=tail)

    def fwd(self, name: str, union: bool = False) -> int:
        return self.add(FWD, name, kflag=int(union))

    def typedef(self, name: str, t: int) -> int:
        return self.add(TYPEDEF, name, size_or_type=t)

    def modifier(self, kind: int, t: int) -> int:
        return self.add(kind, size_or_type=t)

    def func_proto(self, ret: int, params: Sequence[Tuple[str, int]]) -> int:
        tail = b"".join(self.u32(self.s(n), t) for n, t in params)
        return self.add(FUNC_PROTO, vlen=len(params), size_or_type=ret, tail=tail)

    def func(self, name: str, proto: int) -> int:
        return self.add(FUNC, name, vlen=1, size_or_type=proto)  # vlen = linkage (global)

    def var(self, name: str, t: int, linkage: int = 1) -> int:
        return self.add(VAR, name, size_or_type=t, tail=self.u32(linkage))

    def datasec(self, name: str, size: int, vars_: Sequence[Tuple[int, int, int]]) -> int:
        tail = b"".join(self.u32(*v) for v in vars_)
        return self.add(DATASEC, name, vlen=len(vars_), size_or_type=size, tail=tail)

    def float_(self, name: str, size: int) -> int:
        return self.add(FLOAT, name, size_or_type=size)

    def decl_tag(self, name: str, t: int, component_idx: int = -1) -> int:
        return self.add(DECL_TAG, name, size_or_type=t, tail=struct.pack(self.e + "i", component_idx))

    def type_tag(self, name: str, t: int) -> int:
        return self.add(TYPE_TAG, name, size_or_type=t)

    def blob(self, magic: int = 0xEB9F, version: int = 1, hdr_len: int = 24) -> bytes:
        types = b"".join(self.types)
        strs = bytes(self.strings)
        # type_off/str_off are relative to the end of the header (btf.rst 3.1).
        hdr = struct.pack(self.e + "HBBIIIII", magic, version, 0, hdr_len, 0, len(types),
                          len(types), len(strs))
        return hdr + b"\0" * (hdr_len - 24) + types + strs


def build_sample(endian: str = "<") -> BTFBuilder:
    """A small kernel-like type graph that uses every BTF kind.

    Non-struct kinds come first, so if the parser mis-sizes any record the later
    struct lookups read garbage and the tests fail.
    """
    b = BTFBuilder(endian)
    u8 = b.int_("unsigned char", 1)
    u16 = b.int_("short unsigned int", 2)
    u32 = b.int_("unsigned int", 4)
    s32 = b.int_("int", 4, signed=True)
    ulong = b.int_("long unsigned int", 8)
    b.typedef("u8", u8)
    b.typedef("u16", u16)
    tu32 = b.typedef("u32", u32)
    b.typedef("__be16", u16)
    b.float_("double", 8)
    vptr = b.ptr(0)
    b.modifier(VOLATILE, u32)
    cu32 = b.modifier(CONST, tu32)
    b.modifier(RESTRICT, vptr)
    proto = b.func_proto(s32, [("skb", vptr), ("x", u32)])
    b.func("some_func", proto)
    v = b.var("some_var", u32)
    b.datasec(".data", 4, [(v, 0, 4)])
    b.type_tag("user", u32)
    drop = b.enum("drop_reason", 4, [("NOT_DROPPED_YET", 0), ("CONSUMED", 1), ("NETFILTER_DROP", 12)])
    b.enum("signed_e", 4, [("NEG", -1), ("POS", 5)], signed=True)
    b.enum64("big_e", 8, [("HUGE", 1 << 40), ("NEG64", -2)], signed=True)
    b.enum64("ubig_e", 8, [("TOP", (1 << 64) - 1)])
    b.fwd("nf_conn")  # a forward declaration before the definition: must lose

    # struct inner { u32 a; union { u32 ip; u16 port; } u3; u8 proto; }  size 12
    u3 = b.union("inner_u3", 4, [("ip", tu32, 0, 0), ("port", u16, 0, 0)])
    inner = b.struct("inner", 12, [("a", tu32, 0, 0), ("u3", u3, 32, 0), ("proto", u8, 64, 0)])
    # struct tuple { struct inner src; struct inner dst; }  size 24
    tup = b.struct("tuple", 24, [("src", inner, 0, 0), ("dst", inner, 96, 0)])
    b.typedef("tuple_t", tup)
    # struct nf_conn { u64 pad; struct tuple th[2]; const u32 status; } size 64
    th = b.array(tup, u32, 2)
    conn = b.struct("nf_conn", 64, [("pad", ulong, 0, 0), ("th", th, 64, 0),
                                    ("status", cu32, 448, 0)])
    b.decl_tag("tagged", conn, 1)

    # sk_buff-like: fields inside anonymous unions/structs, bitfields via kind_flag.
    # struct sk { union { struct { void *next; void *prev; }; u32 rb; }; u32 len;
    #             u8 pkt_type:3, cloned:1; u16 mark; unsigned long _nfct;
    #             u16 network_header; void *head; }
    anon_s = b.struct("", 16, [("next", vptr, 0, 0), ("prev", vptr, 64, 0)])
    anon_u = b.union("", 16, [("", anon_s, 0, 0), ("rb", u32, 0, 0)])
    hdrs = b.struct("", 4, [("mark", u16, 0, 0), ("network_header", u16, 16, 0)])
    b.struct("sk", 48, [
        ("", anon_u, 0, 0),
        ("len", u32, 128, 0),
        ("pkt_type", u8, 160, 3),
        ("cloned", u8, 163, 1),
        ("", hdrs, 176, 0),           # anonymous struct at byte 22: mark@22, network_header@24
        ("_nfct", ulong, 256, 0),     # byte 32
        ("head", vptr, 320, 0),       # byte 40
    ], kflag=1)
    # Legacy (kind_flag=0) bitfield: a narrow INT type marks it (btf.rst 2.2.1).
    bf3 = b.int_("unsigned char", 1, bits=3)
    b.struct("legacy", 4, [("flags", bf3, 0, 0), ("odd", u8, 3, 0), ("whole", u16, 16, 0)])
    # Typedef to an anonymous struct (typedef struct { ... } pair_t;).
    anon_pair = b.struct("", 8, [("x", u32, 0, 0), ("y", u32, 32, 0)])
    b.typedef("pair_t", anon_pair)
    # Array of arrays: u16 grid[3][4] inside struct.
    row = b.array(u16, u32, 4)
    grid = b.array(row, u32, 3)
    b.struct("grid_s", 24, [("grid", grid, 0, 0)])
    b.typedef("drop_reason_t", drop)
    return b


@pytest.fixture
def sample() -> BTF:
    return BTF.from_bytes(build_sample().blob())


def write(tmp_path: Path, data: bytes) -> str:
    p = tmp_path / "btf"
    p.write_bytes(data)
    return str(p)


# ------------------------------------------------------------------ header parsing

def test_header_and_type_count(tmp_path: Path) -> None:
    b = build_sample()
    btf = BTF.load(write(tmp_path, b.blob()))
    assert btf.type_count == len(b.types)


def test_longer_header_is_honoured(tmp_path: Path) -> None:
    # hdr_len > 24 (a future header): sections are relative to hdr_len.
    btf = BTF.load(write(tmp_path, build_sample().blob(hdr_len=32)))
    assert btf.offsetof("nf_conn", "status") == 56


def test_big_endian_blob() -> None:
    btf = BTF.from_bytes(build_sample(">").blob())
    assert btf.offsetof("tuple", "dst.u3") == 16
    assert btf.enum_values("signed_e") == {"NEG": -1, "POS": 5}


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BTFError, match="No BTF file"):
        BTF.load(str(tmp_path / "nope"))


def test_missing_vmlinux_message_names_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_open = builtins.open

    def fake_open(path, *a, **kw):  # type: ignore[no-untyped-def]
        if path == VMLINUX:
            raise FileNotFoundError(2, "No such file or directory", path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", fake_open)
    with pytest.raises(BTFError) as ei:
        BTF.load()
    assert str(ei.value) == (
        "No kernel BTF at /sys/kernel/btf/vmlinux: the kernel needs CONFIG_DEBUG_INFO_BTF=y.")
    assert isinstance(ei.value, UserError)


def test_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(BTFError):
        BTF.load(str(tmp_path))


def test_bad_magic(tmp_path: Path) -> None:
    with pytest.raises(BTFError, match="bad magic"):
        BTF.load(write(tmp_path, build_sample().blob(magic=0x1234)))
    with pytest.raises(BTFError, match="not BTF"):
        BTF.load(write(tmp_path, b"\x7fELF" + b"\0" * 60))


def test_bad_version() -> None:
    with pytest.raises(BTFError, match="version 2"):
        BTF.from_bytes(build_sample().blob(version=2))


@pytest.mark.parametrize("cut", [0, 5, 23, 24, 100, -1])
def test_truncated(tmp_path: Path, cut: int) -> None:
    data = build_sample().blob()
    with pytest.raises(BTFError, match="truncated"):
        BTF.load(write(tmp_path, data[:cut]))


def test_type_section_length_not_on_record_boundary() -> None:
    b = BTFBuilder()
    b.int_("int", 4, signed=True)
    data = bytearray(b.blob())
    # Claim the type section is 2 bytes shorter than it is: the INT record overruns it.
    struct.pack_into("<I", data, 12, 14)
    with pytest.raises(BTFError, match="corrupt"):
        BTF.from_bytes(bytes(data))


def test_unknown_kind_is_corrupt() -> None:
    b = BTFBuilder()
    b.add(25, "weird")
    with pytest.raises(BTFError, match="unknown BTF kind 25"):
        BTF.from_bytes(b.blob())


def test_empty_btf() -> None:
    btf = BTF.from_bytes(BTFBuilder().blob())
    assert btf.type_count == 0
    with pytest.raises(BTFError, match="no struct named sk_buff"):
        btf.offsetof("sk_buff", "len")


# ------------------------------------------------------------------ member paths

def test_nested_struct_path(sample: BTF) -> None:
    assert sample.offsetof("tuple", "src") == 0
    assert sample.offsetof("tuple", "src.u3") == 4
    assert sample.offsetof("tuple", "src.proto") == 8
    assert sample.offsetof("tuple", "dst") == 12
    assert sample.offsetof("tuple", "dst.u3") == 16
    assert sample.offsetof("tuple", "dst.u3.port") == 16
    assert sample.offsetof("tuple", "dst.proto") == 20
    assert sample.member_size("tuple", "dst.u3") == 4
    assert sample.member_size("tuple", "dst.u3.port") == 2
    assert sample.member_size("tuple", "dst") == 12


def test_anonymous_members_are_transparent(sample: BTF) -> None:
    assert sample.offsetof("sk", "next") == 0
    assert sample.offsetof("sk", "prev") == 8
    assert sample.offsetof("sk", "rb") == 0
    assert sample.offsetof("sk", "len") == 16
    assert sample.offsetof("sk", "mark") == 22
    assert sample.offsetof("sk", "network_header") == 24
    assert sample.offsetof("sk", "_nfct") == 32
    assert sample.offsetof("sk", "head") == 40
    assert sample.member_size("sk", "network_header") == 2
    assert sample.member_size("sk", "head") == 8  # pointer size = sizeof(long)


def test_array_index(sample: BTF) -> None:
    assert sample.offsetof("nf_conn", "th") == 8
    assert sample.offsetof("nf_conn", "th[0]") == 8
    assert sample.offsetof("nf_conn", "th[1]") == 8 + 24
    assert sample.offsetof("nf_conn", "th[1].dst.u3") == 8 + 24 + 16
    assert sample.member_size("nf_conn", "th") == 48
    assert sample.member_size("nf_conn", "th[1]") == 24
    assert sample.offsetof("grid_s", "grid[2][3]") == (2 * 4 + 3) * 2
    assert sample.offsetof("grid_s", "grid[1]") == 8
    assert sample.member_size("grid_s", "grid[1]") == 8
    with pytest.raises(BTFError, match="out of range"):
        sample.offsetof("nf_conn", "th[2]")
    with pytest.raises(BTFError, match="not an array"):
        sample.offsetof("nf_conn", "status[0]")


def test_typedef_const_resolution(sample: BTF) -> None:
    assert sample.offsetof("tuple_t", "dst.proto") == 20  # typedef struct
    assert sample.offsetof("pair_t", "y") == 4            # typedef of anonymous struct
    assert sample.offsetof("nf_conn", "status") == 56     # const u32 (typedef) member
    assert sample.member_size("nf_conn", "status") == 4
    assert sample.sizeof("u32") == 4
    assert sample.sizeof("tuple_t") == 24
    assert sample.sizeof("pair_t") == 8
    assert sample.sizeof("unsigned int") == 4
    assert sample.sizeof("double") == 8
    assert sample.sizeof("drop_reason") == 4


def test_struct_preferred_over_fwd(sample: BTF) -> None:
    # "nf_conn" is both a FWD (added first) and a STRUCT.
    assert sample.sizeof("nf_conn") == 64
    assert sample.sizeof("struct nf_conn") == 64
    b = BTFBuilder()
    b.fwd("only_fwd")
    btf = BTF.from_bytes(b.blob())
    with pytest.raises(BTFError, match="only has a forward declaration"):
        btf.offsetof("only_fwd", "x")


def test_bitfields_rejected(sample: BTF) -> None:
    with pytest.raises(BTFError, match=r"sk\.pkt_type is a bitfield"):
        sample.offsetof("sk", "pkt_type")
    with pytest.raises(BTFError, match="bitfield"):
        sample.offsetof("sk", "cloned")
    # Legacy encoding (kind_flag=0): narrow INT, or a bit offset not on a byte.
    with pytest.raises(BTFError, match=r"legacy\.flags is a bitfield"):
        sample.offsetof("legacy", "flags")
    with pytest.raises(BTFError, match="bitfield"):
        sample.offsetof("legacy", "odd")
    assert sample.offsetof("legacy", "whole") == 2


def test_kind_flag_offsets() -> None:
    # With kind_flag set, btf_member.offset = bitfield_size << 24 | bit_offset.
    # A non-bitfield member (size 0) at a large bit offset must decode exactly.
    b = BTFBuilder()
    u32 = b.int_("unsigned int", 4)
    u8 = b.int_("unsigned char", 1)
    big = b.array(u8, u32, 4096)
    b.struct("kf", 4096 + 8, [
        ("blob", big, 0, 0),
        ("flag", u8, 4096 * 8, 1),
        ("after", u32, (4096 + 4) * 8, 0),
    ], kflag=1)
    btf = BTF.from_bytes(b.blob())
    assert btf.offsetof("kf", "after") == 4100
    assert btf.member_size("kf", "after") == 4
    with pytest.raises(BTFError, match="bitfield"):
        btf.offsetof("kf", "flag")
    # Without kind_flag the same raw value would be a plain (huge) bit offset.
    b2 = BTFBuilder()
    u32b = b2.int_("unsigned int", 4)
    b2.struct("nokf", 8, [("a", u32b, 32, 0)], kflag=0)
    assert BTF.from_bytes(b2.blob()).offsetof("nokf", "a") == 4


def test_missing_member_names_struct_and_member(sample: BTF) -> None:
    with pytest.raises(BTFError, match=r"struct sk has no member nope"):
        sample.offsetof("sk", "nope")
    with pytest.raises(BTFError, match=r"tuple\.dst has no member nope"):
        sample.offsetof("tuple", "dst.nope")
    with pytest.raises(BTFError, match="no struct named nosuch"):
        sample.offsetof("nosuch", "x")
    with pytest.raises(BTFError, match="not a struct or union"):
        sample.offsetof("tuple", "dst.proto.x")
    with pytest.raises(BTFError, match="Cannot parse"):
        sample.offsetof("tuple", "dst..proto")
    with pytest.raises(BTFError, match="not a struct or union"):
        sample.offsetof("u32", "x")
    with pytest.raises(BTFError):
        sample.offsetof("tuple", "")


def test_enum_values(sample: BTF) -> None:
    assert sample.enum_values("drop_reason") == {"NOT_DROPPED_YET": 0, "CONSUMED": 1, "NETFILTER_DROP": 12}
    assert sample.enum_values("enum drop_reason") == sample.enum_values("drop_reason")
    assert sample.enum_values("drop_reason_t") == sample.enum_values("drop_reason")
    assert sample.enum_values("signed_e") == {"NEG": -1, "POS": 5}
    assert sample.enum_values("big_e") == {"HUGE": 1 << 40, "NEG64": -2}
    assert sample.enum_values("ubig_e") == {"TOP": (1 << 64) - 1}
    with pytest.raises(BTFError, match="no enum named nope"):
        sample.enum_values("nope")
    with pytest.raises(BTFError, match="not an enum"):
        sample.enum_values("u32")


def test_unsigned_enum_with_high_bit() -> None:
    b = BTFBuilder()
    b.enum("flags", 4, [("HIGH", 0x80000000)], signed=False)
    assert BTF.from_bytes(b.blob()).enum_values("flags") == {"HIGH": 0x80000000}


def test_load_offsets(sample: BTF) -> None:
    got = load_offsets({
        "SK_NFCT": ("sk", "_nfct"),
        "CONN_TH1": ("nf_conn", "th[1]"),
        "TUPLE_SIZE": ("sizeof", "tuple"),
    }, sample)
    assert got == {"SK_NFCT": 32, "CONN_TH1": 32, "TUPLE_SIZE": 24}
    with pytest.raises(BTFError):
        load_offsets({"X": ("sk", "nope")}, sample)


# ------------------------------------------------------------ split (module) BTF

def build_split_base(endian: str = "<") -> Tuple[BTFBuilder, dict]:
    """A vmlinux-like base: it only forward-declares nf_conn, as distro kernels do."""
    b = BTFBuilder(endian)
    t = {}
    t["u8"] = b.int_("unsigned char", 1)
    t["u16"] = b.int_("short unsigned int", 2)
    t["u32"] = b.int_("unsigned int", 4)
    t["ulong"] = b.int_("long unsigned int", 8)
    t["tu32"] = b.typedef("u32", t["u32"])
    t["be16"] = b.typedef("__be16", t["u16"])
    t["vptr"] = b.ptr(0)
    b.fwd("nf_conn")
    b.struct("nf_ct_ext", 0, [])           # empty struct: how BTF spells an incomplete one
    arr4 = b.array(t["u32"], t["u32"], 4)
    # union nf_inet_addr { u32 all[4]; u32 ip; }  size 16
    t["inet"] = b.union("nf_inet_addr", 16, [("all", arr4, 0, 0), ("ip", t["tu32"], 0, 0)])
    # struct hlist_nulls_node { void *next; void *pprev; }  size 16
    t["hnode"] = b.struct("hlist_nulls_node", 16, [("next", t["vptr"], 0, 0), ("pprev", t["vptr"], 64, 0)])
    b.struct("sk_buff", 16, [("len", t["u32"], 0, 0), ("_nfct", t["ulong"], 64, 0)])
    return b, t


def build_nf_conntrack(base: BTFBuilder, t: dict) -> BTFBuilder:
    """Module BTF whose structs use base types and each other (nf_conntrack-like)."""
    m = BTFBuilder(base.e, base=base)
    # struct nf_conntrack_man { union nf_inet_addr u3; __be16 all; u16 l3num; }  size 20
    man = m.struct("nf_conntrack_man", 20, [("u3", t["inet"], 0, 0), ("all", t["be16"], 128, 0),
                                            ("l3num", t["u16"], 144, 0)])
    dst = m.struct("", 20, [("u3", t["inet"], 0, 0), ("all", t["be16"], 128, 0),
                            ("protonum", t["u8"], 144, 0), ("dir", t["u8"], 152, 0)])
    tup = m.struct("nf_conntrack_tuple", 40, [("src", man, 0, 0), ("dst", dst, 160, 0)])
    th = m.struct("nf_conntrack_tuple_hash", 56, [("hnnode", t["hnode"], 0, 0), ("tuple", tup, 128, 0)])
    th2 = m.array(th, t["u32"], 2)
    ext = m.struct("nf_ct_ext", 8, [("offset", m.array(t["u8"], t["u32"], 4), 0, 0),
                                    ("len", t["u8"], 32, 0)])
    conn = m.struct("nf_conn", 144, [
        ("use", t["tu32"], 0, 0),
        ("tuplehash", th2, 128, 0),                 # byte 16, 2 * 56 bytes
        ("status", t["ulong"], 128 * 8, 0),         # byte 128
        ("ext", m.ptr(ext), 136 * 8, 0),            # byte 136
    ])
    m.typedef("nf_conn_t", conn)
    m.enum("ip_conntrack_status", 4, [("IPS_EXPECTED", 1), ("IPS_SEEN_REPLY", 2)])
    return m


def one_struct_module(base: BTFBuilder, t: dict, structs: Sequence[Tuple[str, int]]) -> bytes:
    """Split BTF defining struct NAME { u8 pad[SIZE]; } for each (NAME, SIZE); SIZE 0 = empty."""
    m = BTFBuilder(base.e, base=base)
    for name, size in structs:
        if size:
            m.struct(name, size, [("pad", m.array(t["u8"], t["u32"], size), 0, 0)])
        else:
            m.struct(name, 0, [])
    return m.blob()


def make_btf_dir(tmp_path: Path, endian: str = "<") -> Path:
    """A stand-in for /sys/kernel/btf: vmlinux plus module files."""
    base, t = build_split_base(endian)
    d = tmp_path / "btf"
    d.mkdir()
    (d / "vmlinux").write_bytes(base.blob())
    (d / "nf_conntrack").write_bytes(build_nf_conntrack(base, t).blob())
    (d / "nf_nat").write_bytes(one_struct_module(
        base, t, [("nf_conn_nat", 24), ("shared_s", 2), ("nf_conntrack_tuple", 99)]))
    (d / "aaa_mod").write_bytes(one_struct_module(base, t, [("shared_s", 3), ("alpha_s", 5)]))
    (d / "bbb").write_bytes(one_struct_module(base, t, [("alpha_s", 6), ("late_s", 0)]))
    (d / "ccc").write_bytes(one_struct_module(base, t, [("late_s", 7)]))
    return d


def test_split_numbering_matches_libbpf() -> None:
    # libbpf btf_new(): start_id = btf__type_cnt(base) (types + void),
    # start_str_off = base hdr.str_len. The encoder follows that; check the reader agrees.
    base, t = build_split_base()
    mod = build_nf_conntrack(base, t)
    assert mod.first_id == len(base.types) + 1
    assert mod.s("tuplehash") >= len(base.strings)          # a new string: past the base's
    assert mod.s("nf_conn") < len(base.strings)             # reused from the base (its FWD)
    assert mod.s("len") < len(base.strings)                 # member name reused from the base
    vmlinux = BTF.from_bytes(base.blob())
    split = BTF.from_bytes(mod.blob(), base=vmlinux)
    assert split.start_id == vmlinux.type_count + 1 == len(base.types) + 1
    assert split.type_count == len(mod.types)
    # struct nf_conn in the module, with members typed by base and module IDs.
    assert split.offsetof("nf_conn", "status") == 128
    assert split.offsetof("nf_conn", "tuplehash[1].tuple.dst.protonum") == 16 + 56 + 16 + 20 + 18
    assert split.offsetof("nf_conn", "tuplehash[0].tuple.src.u3.ip") == 16 + 16
    assert split.member_size("nf_conn", "tuplehash") == 112
    assert split.member_size("nf_conn", "use") == 4           # base typedef u32
    assert split.member_size("nf_conn", "ext") == 8           # pointer: base `long`
    assert split.member_size("nf_conntrack_tuple", "src.u3") == 16
    assert split.sizeof("nf_conntrack_tuple_hash") == 56
    assert split.sizeof("u32") == 4                           # base name, via the split BTF
    assert split.enum_values("ip_conntrack_status") == {"IPS_EXPECTED": 1, "IPS_SEEN_REPLY": 2}
    # The base alone knows nothing about the module.
    with pytest.raises(BTFError, match="only has a forward declaration of struct nf_conn"):
        vmlinux.offsetof("nf_conn", "status")


def test_split_boundaries_by_hand() -> None:
    # Numbers written out by hand, independent of the encoder's bookkeeping: the base
    # has types 1-2 and strings "\0int\0x\0s\0" (str_len 9), so the split's first
    # type is ID 3 and its first string is at offset 9.
    base = BTFBuilder()
    assert base.int_("int", 4, signed=True) == 1
    assert base.struct("s", 4, [("x", 1, 0, 0)]) == 2
    assert bytes(base.strings) == b"\0int\0x\0s\0"   # "x"@5, "s"@7
    strs = b"m\0a\0b\0"                                    # "m"@9, "a"@11, "b"@13
    STRUCT_INFO = STRUCT << 24
    types = (
        # ID 3: struct x { int a; }  -- named by the base's string "x"@5
        struct.pack("<III", 5, STRUCT_INFO | 1, 4) + struct.pack("<III", 11, 1, 0)
        # ID 4: struct m { struct s a; struct x b; }  -- base ID 2, split ID 3
        + struct.pack("<III", 9, STRUCT_INFO | 2, 8)
        + struct.pack("<III", 11, 2, 0) + struct.pack("<III", 13, 3, 32))
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strs))
    split = BTF.from_bytes(hdr + types + strs, base=BTF.from_bytes(base.blob()))
    assert split.start_id == 3 and split.type_count == 2
    assert split.offsetof("m", "a") == 0 and split.member_size("m", "a") == 4
    assert split.offsetof("m", "a.x") == 0
    assert split.offsetof("m", "b") == 4 and split.offsetof("m", "b.a") == 4
    assert split.sizeof("struct x") == 4 and split.sizeof("m") == 8 and split.sizeof("s") == 4
    with pytest.raises(BTFError, match="struct m has no member x"):
        split.offsetof("m", "x")


def test_split_big_endian() -> None:
    base, t = build_split_base(">")
    split = BTF.from_bytes(build_nf_conntrack(base, t).blob(), base=BTF.from_bytes(base.blob()))
    assert split.offsetof("nf_conntrack_tuple", "dst.u3") == 20
    assert split.member_size("nf_conn", "status") == 8


def test_split_byte_order_must_match_base() -> None:
    base, t = build_split_base(">")
    little = build_split_base("<")[0]
    with pytest.raises(BTFError, match="different byte order"):
        BTF.from_bytes(build_nf_conntrack(base, t).blob(), base=BTF.from_bytes(little.blob()))


def test_split_bad_references_are_corrupt() -> None:
    base, t = build_split_base()
    m = BTFBuilder(base=base)
    m.struct("broken", 8, [("x", m.first_id + 50, 0, 0)])
    split = BTF.from_bytes(m.blob(), base=BTF.from_bytes(base.blob()))
    with pytest.raises(BTFError, match=f"refers to type {m.first_id + 50}, which does not exist"):
        split.member_size("broken", "x")
    m2 = BTFBuilder(base=base)
    m2.add(STRUCT, "", size_or_type=4)
    data = bytearray(m2.blob())
    struct.pack_into("<I", data, 24, len(base.strings) + 1000)  # name_off past both sections
    with pytest.raises(BTFError, match="name outside the string section"):
        BTF.from_bytes(bytes(data), base=BTF.from_bytes(base.blob()))


def test_load_finds_module_structs(tmp_path: Path) -> None:
    d = make_btf_dir(tmp_path)
    for btf in (BTF.load(str(d / "vmlinux"), module_dir=str(d)),
                BTF.load(str(d / "vmlinux"))):            # module_dir defaults to path's directory
        assert btf.type_count == len(build_split_base()[0].types)
        assert btf.offsetof("sk_buff", "_nfct") == 8       # vmlinux
        assert btf.offsetof("nf_conn", "status") == 128    # FWD in vmlinux, struct in nf_conntrack
        assert btf.offsetof("struct nf_conn", "tuplehash[1]") == 16 + 56
        assert btf.member_size("nf_conn", "tuplehash[1].tuple.dst.u3") == 16
        assert btf.member_size("nf_conn", "ext") == 8
        assert btf.offsetof("nf_conn_t", "ext") == 136     # typedef defined in the module
        assert btf.sizeof("nf_ct_ext") == 8                # empty in vmlinux, complete in module
        assert btf.sizeof("nf_conntrack_tuple_hash") == 56
        assert btf.enum_values("ip_conntrack_status")["IPS_SEEN_REPLY"] == 2
        got = load_offsets({"STATUS": ("nf_conn", "status"), "LEN": ("sk_buff", "len"),
                            "HASH": ("sizeof", "nf_conntrack_tuple_hash")}, btf)
        assert got == {"STATUS": 128, "LEN": 0, "HASH": 56}


def test_module_search_order(tmp_path: Path) -> None:
    btf = BTF.load(str(make_btf_dir(tmp_path) / "vmlinux"))
    assert btf.sizeof("nf_conntrack_tuple") == 40   # nf_conntrack beats nf_nat (99)
    assert btf.sizeof("shared_s") == 2              # nf_nat beats aaa_mod (alphabetical) (3)
    assert btf.sizeof("alpha_s") == 5               # aaa_mod beats bbb (6)
    assert btf.sizeof("late_s") == 7                # bbb only has an empty one; ccc is complete
    assert btf.sizeof("nf_conn_nat") == 24


def test_modules_are_read_lazily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    d = make_btf_dir(tmp_path)
    opened: List[str] = []
    real_open = builtins.open

    def spy_open(path, *a, **kw):  # type: ignore[no-untyped-def]
        opened.append(os.path.basename(str(path)))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", spy_open)
    btf = BTF.load(str(d / "vmlinux"))
    assert btf.offsetof("sk_buff", "len") == 0
    assert btf.sizeof("u32") == 4
    assert opened == ["vmlinux"]                    # found in vmlinux: no module touched
    btf.offsetof("nf_conn", "status")
    btf.sizeof("nf_conntrack_tuple")
    assert opened == ["vmlinux", "nf_conntrack"]    # first in order, and read only once
    btf.sizeof("alpha_s")
    assert opened == ["vmlinux", "nf_conntrack", "nf_nat", "aaa_mod"]


def test_modules_disabled_or_listed(tmp_path: Path) -> None:
    d = make_btf_dir(tmp_path)
    vml = str(d / "vmlinux")
    off = BTF.load(vml, modules=[])
    with pytest.raises(BTFError) as ei:
        off.offsetof("nf_conn", "status")
    assert str(ei.value) == (f"The kernel BTF ({vml}) only has a forward declaration of "
                             "struct nf_conn, not its layout.")
    assert off.sizeof("nf_ct_ext") == 0             # vmlinux's empty struct, as before
    only_nat = BTF.load(vml, modules=["nf_nat"])
    assert only_nat.sizeof("shared_s") == 2
    assert only_nat.sizeof("nf_conntrack_tuple") == 99
    with pytest.raises(BTFError, match=r"forward declaration of struct nf_conn.*module BTF files nf_nat"):
        only_nat.offsetof("nf_conn", "status")
    # A path works too, and a single name is not split into characters.
    assert BTF.load(vml, modules=[str(d / "ccc")]).sizeof("late_s") == 7
    assert BTF.load(vml, modules="ccc").sizeof("late_s") == 7


def test_missing_struct_message_with_modules(tmp_path: Path) -> None:
    d = make_btf_dir(tmp_path)
    vml = str(d / "vmlinux")
    btf = BTF.load(vml)
    with pytest.raises(BTFError) as ei:
        btf.offsetof("nf_conntrack_expect", "tuple")
    msg = str(ei.value)
    assert msg.startswith(f"The kernel BTF has no struct named nf_conntrack_expect (looked in {vml} "
                          f"and 5 module BTF files in {d}).")
    assert "modprobe nf_conntrack" in msg
    assert isinstance(ei.value, UserError)
    with pytest.raises(BTFError) as ei:
        btf.sizeof("task_struct")
    assert str(ei.value) == (f"The kernel BTF has no type named task_struct (looked in {vml} "
                             f"and 5 module BTF files in {d}).")
    with pytest.raises(BTFError, match="no enum named nf_nope"):
        btf.enum_values("nf_nope")
    # No module files at all (this machine's /sys/kernel/btf).
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "vmlinux").write_bytes((d / "vmlinux").read_bytes())
    with pytest.raises(BTFError) as ei:
        BTF.load(str(lone / "vmlinux")).offsetof("nf_conn", "status")
    assert str(ei.value) == (
        "The kernel BTF only has a forward declaration of struct nf_conn, not its layout "
        f"(looked in {lone / 'vmlinux'} and found no module BTF files in {lone}). Names starting "
        "with nf_ come from netfilter, which distributions build as modules; load it with "
        "`modprobe nf_conntrack` and try again.")


def test_unusable_module_files_are_skipped_and_reported(tmp_path: Path) -> None:
    d = make_btf_dir(tmp_path)
    (d / "aa_garbage").write_bytes(b"\x7fELF" + b"\0" * 60)
    (d / "aa_big_endian").write_bytes(one_struct_module(build_split_base(">")[0], {"u8": 1, "u32": 3},
                                                        [("alpha_s", 9)]))
    (d / "subdir").mkdir()                          # not a file: ignored
    btf = BTF.load(str(d / "vmlinux"))
    assert btf.sizeof("alpha_s") == 5               # the two bad files before aaa_mod are skipped
    with pytest.raises(BTFError) as ei:
        btf.offsetof("nf_nope", "x")
    msg = str(ei.value)
    assert "7 module BTF files" in msg
    assert "2 module BTF files could not be used; the first: " in msg
    assert "different byte order" in msg           # aa_big_endian sorts first


def test_module_file_vanishes(tmp_path: Path) -> None:
    # Modules can be unloaded between listing the directory and reading a file.
    d = make_btf_dir(tmp_path)
    btf = BTF.load(str(d / "vmlinux"))
    assert btf.sizeof("nf_conn") == 144             # lists the directory, reads nf_conntrack
    (d / "nf_nat").unlink()
    assert btf.sizeof("alpha_s") == 5
    with pytest.raises(BTFError, match=r"could not be used; the first: No BTF file at .*nf_nat\."):
        btf.sizeof("nf_conn_nat")


# ------------------------------------------------------------ the running kernel

REAL_SPEC = {
    "SKB_NFCT": ("sk_buff", "_nfct"),
    "SKB_HEAD": ("sk_buff", "head"),
    "SKB_NETWORK_HEADER": ("sk_buff", "network_header"),
    "SKB_LEN": ("sk_buff", "len"),
    "NF_CONN_STATUS": ("nf_conn", "status"),
    "NF_CONN_TUPLEHASH": ("nf_conn", "tuplehash"),
    "NF_CONN_TUPLEHASH_REPLY": ("nf_conn", "tuplehash[1]"),
    "TUPLEHASH_SIZE": ("sizeof", "nf_conntrack_tuple_hash"),
    "TUPLE_SRC_U3": ("nf_conntrack_tuple", "src.u3"),
    "TUPLE_SRC_U": ("nf_conntrack_tuple", "src.u"),
    "TUPLE_SRC_L3NUM": ("nf_conntrack_tuple", "src.l3num"),
    "TUPLE_DST_U3": ("nf_conntrack_tuple", "dst.u3"),
    "TUPLE_DST_U": ("nf_conntrack_tuple", "dst.u"),
    "TUPLE_DST_PROTONUM": ("nf_conntrack_tuple", "dst.protonum"),
    "HOOK_STATE_HOOK": ("nf_hook_state", "hook"),
    "HOOK_STATE_PF": ("nf_hook_state", "pf"),
    "NF_CTX_SKB": ("bpf_nf_ctx", "skb"),
    "NF_CTX_STATE": ("bpf_nf_ctx", "state"),
    "NETDEV_IFINDEX": ("net_device", "ifindex"),
}

needs_vmlinux = pytest.mark.skipif(not os.path.exists(VMLINUX), reason=f"{VMLINUX} is absent")


@pytest.fixture(scope="module")
def kernel_btf() -> BTF:
    if not os.path.exists(VMLINUX):
        pytest.skip(f"{VMLINUX} is absent")
    return BTF.load()


@needs_vmlinux
def test_real_kernel_offsets(kernel_btf: BTF) -> None:
    t0 = time.perf_counter()
    btf = BTF.load()
    t1 = time.perf_counter()
    got = load_offsets(REAL_SPEC, btf)
    drops = btf.enum_values("skb_drop_reason")
    t2 = time.perf_counter()
    print(f"\nBTF: {btf.type_count} types; load {1000 * (t1 - t0):.1f} ms, "
          f"{len(REAL_SPEC)} lookups + enum {1000 * (t2 - t1):.1f} ms")
    print(got)

    # Layout invariants that hold on every kernel, whatever the config.
    for key, (st, path) in REAL_SPEC.items():
        if st != "sizeof":
            assert 0 <= got[key] < btf.sizeof(st), key
    assert got["TUPLEHASH_SIZE"] == btf.sizeof("struct nf_conntrack_tuple_hash")
    assert got["NF_CONN_TUPLEHASH_REPLY"] == got["NF_CONN_TUPLEHASH"] + got["TUPLEHASH_SIZE"]
    assert btf.member_size("nf_conn", "tuplehash") == 2 * got["TUPLEHASH_SIZE"]
    # struct nf_conntrack_tuple: src { u3 (16), u (2), l3num (2) }, dst { u3, u, protonum, dir }.
    assert got["TUPLE_SRC_U3"] == 0
    assert got["TUPLE_SRC_U"] == 16
    assert got["TUPLE_SRC_L3NUM"] == 18
    assert got["TUPLE_DST_U3"] == 20
    assert got["TUPLE_DST_U"] == 36
    assert got["TUPLE_DST_PROTONUM"] == 38
    assert btf.member_size("nf_conntrack_tuple", "dst.u3") == 16
    assert btf.member_size("nf_conntrack_tuple", "dst.protonum") == 1
    assert btf.member_size("sk_buff", "network_header") == 2
    assert btf.member_size("sk_buff", "len") == 4
    assert btf.member_size("net_device", "ifindex") == 4
    assert btf.member_size("nf_hook_state", "pf") == 1
    assert got["NF_CTX_SKB"] != got["NF_CTX_STATE"]
    assert drops["SKB_NOT_DROPPED_YET"] == 0
    assert "SKB_DROP_REASON_NETFILTER_DROP" in drops
    with pytest.raises(BTFError, match="bitfield"):
        btf.offsetof("sk_buff", "pkt_type")


@needs_vmlinux
@pytest.mark.skipif(not platform.release().startswith("6.18"),
                    reason="reference values are for this machine's 6.18 kernel only")
def test_this_machines_kernel_reference_values(kernel_btf: BTF) -> None:
    """THIS MACHINE'S KERNEL (6.18): cross-check against known-good numbers.

    Other kernels and configs legitimately differ; this only proves the parser
    reads the same layout the compiler produced here.
    """
    b = kernel_btf
    assert b.offsetof("sk_buff", "head") == 192
    assert b.offsetof("sk_buff", "network_header") == 180
    assert b.offsetof("sk_buff", "_nfct") == 104
    assert b.offsetof("nf_conn", "tuplehash") == 16
    assert b.offsetof("nf_conn", "status") == 128
    assert b.sizeof("nf_conntrack_tuple_hash") == 56


def module_btf_files() -> List[str]:
    try:
        return sorted(n for n in os.listdir(os.path.dirname(VMLINUX)) if n != "vmlinux")
    except OSError:
        return []


@needs_vmlinux
@pytest.mark.skipif(not module_btf_files(), reason="/sys/kernel/btf has no module BTF files")
def test_real_module_btf() -> None:
    """One struct from a real module's split BTF, resolved against the real vmlinux."""
    mods = module_btf_files()
    name = "nf_conntrack" if "nf_conntrack" in mods else mods[0]
    path = os.path.join(os.path.dirname(VMLINUX), name)
    vmlinux = BTF.load(modules=[])
    with open(path, "rb") as f:
        mod = BTF.from_bytes(f.read(), source=path, base=vmlinux)
    assert mod.start_id == vmlinux.type_count + 1
    # Pick the module's largest struct with named members (reaching into the index:
    # there is no public "list types" API).
    best: Optional[Tuple[int, str, int]] = None
    for key, ids in mod._by_name.items():
        for tid in ids:
            kind, _kf, vlen, _n, size = mod._hdr(tid)
            if kind == STRUCT and vlen and (best is None or size > best[0]):
                best = (size, key.decode(), tid)
    if best is None:
        pytest.skip(f"module BTF {name} defines no struct")
    size, sname, tid = best
    checked = 0
    for mname, _mtype, _bits, _bf in mod._members(tid):
        if not mname:
            continue
        try:
            off = mod.offsetof(sname, mname)
        except BTFError as err:
            assert "bitfield" in str(err)
            continue
        # Member types are often vmlinux IDs (u32, list_head, ...): sizes must resolve.
        assert 0 <= off and off + mod.member_size(sname, mname) <= size, (sname, mname)
        checked += 1
    assert checked
    # Through BTF.load(): found in vmlinux if it is complete there, else in a module.
    assert BTF.load().sizeof(f"struct {sname}") > 0
    if name == "nf_conntrack":
        btf = BTF.load()
        hash_size = btf.sizeof("nf_conntrack_tuple_hash")
        assert btf.offsetof("nf_conn", "tuplehash[1]") == btf.offsetof("nf_conn", "tuplehash") + hash_size
        assert btf.offsetof("nf_conntrack_tuple", "dst.u3") == 20
