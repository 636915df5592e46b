"""Struct layouts, sizes and enum values read from the running kernel's BTF.

Why this module exists: the eBPF C code reads kernel structs (sk_buff, nf_conn,
nf_hook_state, ...) whose layouts change between kernel versions and configs.
Taking offsets from headers copied at build time silently reads the wrong bytes on
another kernel. The kernel describes its own types in BTF at /sys/kernel/btf/vmlinux
(CONFIG_DEBUG_INFO_BTF=y), so we read the layout from there at load time and pass
the numbers to the C code as constants.

Pure Python on purpose: no bcc, bpftool, libbpf or ctypes, so it works before any of
those are installed and is trivially testable with synthetic blobs.

Format reference: the kernel's Documentation/bpf/btf.rst ("BTF Type and String
Encoding") and include/uapi/linux/btf.h. Parsing is lazy: one pass over the type
section records where each type starts (the only way to find type N, since records
have variable length) and indexes the names of the kinds we look up by name;
members and enumerators are decoded only for the types actually asked about.
"""

from __future__ import annotations

import re
import struct
from array import array
from typing import Dict, Iterator, List, Optional, Tuple

from .errors import UserError

__all__ = ["BTFError", "BTF", "load_offsets", "VMLINUX_BTF"]

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"

# include/uapi/linux/btf.h: BTF_MAGIC 0xeB9F, BTF_VERSION 1.
_BTF_MAGIC = 0xEB9F
_BTF_VERSION = 1
# struct btf_header { __u16 magic; __u8 version; __u8 flags; __u32 hdr_len;
#                     __u32 type_off; __u32 type_len; __u32 str_off; __u32 str_len; }
_HEADER_LEN = 24

# BTF_KIND_* values (btf.rst section 2.2).
KIND_UNKN = 0
KIND_INT = 1
KIND_PTR = 2
KIND_ARRAY = 3
KIND_STRUCT = 4
KIND_UNION = 5
KIND_ENUM = 6
KIND_FWD = 7
KIND_TYPEDEF = 8
KIND_VOLATILE = 9
KIND_CONST = 10
KIND_RESTRICT = 11
KIND_FUNC = 12
KIND_FUNC_PROTO = 13
KIND_VAR = 14
KIND_DATASEC = 15
KIND_FLOAT = 16
KIND_DECL_TAG = 17
KIND_TYPE_TAG = 18
KIND_ENUM64 = 19

_KIND_NAMES = {
    KIND_INT: "int", KIND_PTR: "pointer", KIND_ARRAY: "array", KIND_STRUCT: "struct",
    KIND_UNION: "union", KIND_ENUM: "enum", KIND_FWD: "forward declaration",
    KIND_TYPEDEF: "typedef", KIND_VOLATILE: "volatile", KIND_CONST: "const",
    KIND_RESTRICT: "restrict", KIND_FUNC: "function", KIND_FUNC_PROTO: "function prototype",
    KIND_VAR: "variable", KIND_DATASEC: "data section", KIND_FLOAT: "float",
    KIND_DECL_TAG: "decl tag", KIND_TYPE_TAG: "type tag", KIND_ENUM64: "enum",
}

# Bytes that follow the 12-byte `struct btf_type` for each kind (btf.rst 2.2):
# a fixed trailer, plus vlen records of a fixed size.
#   INT        __u32 (encoding<<24 | offset<<16 | nr_bits)
#   ARRAY      struct btf_array { type, index_type, nelems }            12 bytes
#   STRUCT/UNION vlen * struct btf_member { name_off, type, offset }    12 bytes each
#   ENUM       vlen * struct btf_enum { name_off, val }                  8 bytes each
#   FUNC_PROTO vlen * struct btf_param { name_off, type }                8 bytes each
#   VAR        struct btf_var { linkage }                                4 bytes
#   DATASEC    vlen * struct btf_var_secinfo { type, offset, size }    12 bytes each
#   DECL_TAG   struct btf_decl_tag { component_idx }                     4 bytes
#   ENUM64     vlen * struct btf_enum64 { name_off, val_lo32, val_hi32 } 12 bytes each
# (fixed trailer, per-vlen record size)
_KIND_LAYOUT: Dict[int, Tuple[int, int]] = {
    KIND_INT: (4, 0),
    KIND_PTR: (0, 0),
    KIND_ARRAY: (12, 0),
    KIND_STRUCT: (0, 12),
    KIND_UNION: (0, 12),
    KIND_ENUM: (0, 8),
    KIND_FWD: (0, 0),
    KIND_TYPEDEF: (0, 0),
    KIND_VOLATILE: (0, 0),
    KIND_CONST: (0, 0),
    KIND_RESTRICT: (0, 0),
    KIND_FUNC: (0, 0),
    KIND_FUNC_PROTO: (0, 8),
    KIND_VAR: (4, 0),
    KIND_DATASEC: (0, 12),
    KIND_FLOAT: (0, 0),
    KIND_DECL_TAG: (4, 0),
    KIND_TYPE_TAG: (0, 0),
    KIND_ENUM64: (0, 12),
}

# Kinds that only qualify or rename another type: follow `type` to get the layout.
_MODIFIERS = frozenset({KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG})
# Kinds whose names we index (the only ones looked up by name).
_NAMED_KINDS = frozenset({KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_FWD,
                          KIND_TYPEDEF, KIND_FLOAT, KIND_ENUM64})

# "name" or "name[3]" or "name[3][1]" -- one component of a dotted member path.
_COMPONENT_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[[0-9]+\])*)$")
_INDEX_RE = re.compile(r"\[([0-9]+)\]")

_MAX_CHAIN = 64  # guard against reference loops in corrupt data


class BTFError(UserError):
    """BTF is missing, corrupt, or lacks a requested type/member.

    str(err) is one plain sentence for users. A UserError, so the CLI prints it
    without a traceback.
    """


class BTF:
    """An indexed raw BTF blob (e.g. /sys/kernel/btf/vmlinux).

    Construct with BTF.load(path) or BTF.from_bytes(data). Lookups take C names
    ("sk_buff", "nf_conn", "unsigned int"); an optional "struct ", "union " or
    "enum " prefix restricts the kind.
    """

    def __init__(self, data: bytes, source: str = "<bytes>") -> None:
        self._source = source
        self._data = data
        if len(data) < _HEADER_LEN:
            raise BTFError(f"{source} is truncated: {len(data)} bytes is too short for a BTF header.")
        magic_le = struct.unpack_from("<H", data, 0)[0]
        if magic_le == _BTF_MAGIC:
            self._endian = "<"
        elif magic_le == 0x9FEB:  # written by a big-endian host
            self._endian = ">"
        else:
            raise BTFError(f"{source} is not BTF data (bad magic 0x{magic_le:04x}, expected 0xeb9f).")
        e = self._endian
        _magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            e + "HBBIIIII", data, 0)
        if version != _BTF_VERSION:
            raise BTFError(f"{source} has BTF version {version}, but only version {_BTF_VERSION} is supported.")
        if hdr_len < _HEADER_LEN:
            raise BTFError(f"{source} is corrupt: its BTF header length {hdr_len} is below {_HEADER_LEN}.")
        # btf.rst 3.1: type_off and str_off are relative to the end of the header.
        self._type_start = hdr_len + type_off
        self._type_end = self._type_start + type_len
        self._str_start = hdr_len + str_off
        self._str_end = self._str_start + str_len
        if self._type_end > len(data) or self._str_end > len(data):
            raise BTFError(
                f"{source} is truncated: the header describes {max(self._type_end, self._str_end)} "
                f"bytes but the file has {len(data)}.")
        self._strings = data[self._str_start:self._str_end]
        self._u32 = struct.Struct(e + "I")
        self._u32x2 = struct.Struct(e + "II")
        self._u32x3 = struct.Struct(e + "III")
        self._i32 = struct.Struct(e + "i")
        # _offsets[type_id] = absolute offset of that type's struct btf_type. Type ID 0
        # is void and has no record (btf.rst 2.1), so slot 0 holds a dummy.
        self._offsets = array("L", [0])
        self._by_name: Dict[bytes, List[int]] = {}
        self._index()
        self._ptr_size: Optional[int] = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str = VMLINUX_BTF) -> "BTF":
        """Read and index a raw BTF file. Raises BTFError if missing, unreadable or corrupt."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            if path == VMLINUX_BTF:
                raise BTFError(
                    f"No kernel BTF at {path}: the kernel needs CONFIG_DEBUG_INFO_BTF=y.") from None
            raise BTFError(f"No BTF file at {path}.") from None
        except PermissionError:
            raise BTFError(f"Cannot read BTF at {path}: permission denied (run as root).") from None
        except IsADirectoryError:
            raise BTFError(f"Cannot read BTF at {path}: it is a directory.") from None
        except OSError as err:
            raise BTFError(f"Cannot read BTF at {path}: {err.strerror or err}.") from None
        return cls(data, source=path)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> "BTF":
        """Index a raw BTF blob already in memory."""
        return cls(bytes(data), source=source)

    def _index(self) -> None:
        """One pass over the type section: record offsets, index names of lookup-able kinds."""
        data = self._data
        unpack_hdr = self._u32x3.unpack_from
        strings = self._strings
        str_len = len(strings)
        offsets = self._offsets
        append = offsets.append
        by_name = self._by_name
        layout = _KIND_LAYOUT
        named = _NAMED_KINDS
        pos = self._type_start
        end = self._type_end
        while pos < end:
            if pos + 12 > end:
                raise BTFError(f"{self._source} is corrupt: a type record is cut off at the end of the type section.")
            name_off, info, _size_or_type = unpack_hdr(data, pos)
            # info: bits 0-15 vlen, bits 24-28 kind, bit 31 kind_flag (btf.rst 2.2).
            kind = (info >> 24) & 0x1F
            try:
                fixed, per = layout[kind]
            except KeyError:
                raise BTFError(
                    f"{self._source} is corrupt or too new: type {len(offsets)} has unknown BTF kind {kind}.") from None
            append(pos)
            if name_off and kind in named:
                if name_off >= str_len:
                    raise BTFError(f"{self._source} is corrupt: type {len(offsets) - 1} has a name outside the string section.")
                nul = strings.find(b"\0", name_off)
                if nul < 0:
                    raise BTFError(f"{self._source} is corrupt: the string section is not NUL-terminated.")
                key = strings[name_off:nul]
                ids = by_name.get(key)
                if ids is None:
                    by_name[key] = [len(offsets) - 1]
                else:
                    ids.append(len(offsets) - 1)
            pos += 12 + fixed + per * (info & 0xFFFF)
        if pos != end:
            raise BTFError(f"{self._source} is corrupt: the last type record runs past the type section.")

    # ---------------------------------------------------------------- raw access

    @property
    def type_count(self) -> int:
        """Number of types, not counting void (type ID 0)."""
        return len(self._offsets) - 1

    def _hdr(self, tid: int) -> Tuple[int, int, int, int, int]:
        """(kind, kind_flag, vlen, name_off, size_or_type) of type `tid`."""
        if tid <= 0 or tid >= len(self._offsets):
            raise BTFError(f"{self._source} is corrupt: it refers to type {tid}, which does not exist.")
        name_off, info, st = self._u32x3.unpack_from(self._data, self._offsets[tid])
        return (info >> 24) & 0x1F, info >> 31, info & 0xFFFF, name_off, st

    def _str(self, off: int) -> str:
        strings = self._strings
        if off >= len(strings):
            raise BTFError(f"{self._source} is corrupt: a name points outside the string section.")
        nul = strings.find(b"\0", off)
        if nul < 0:
            nul = len(strings)
        return strings[off:nul].decode("utf-8", "replace")

    def _members(self, tid: int) -> Iterator[Tuple[str, int, int, int]]:
        """(name, type_id, bit_offset, bitfield_size) for each member of a struct/union.

        btf.rst 2.2.4: if the struct's kind_flag is set, btf_member.offset holds the
        bitfield size in bits 24-31 and the bit offset in bits 0-23; otherwise it is
        the plain bit offset and bitfield-ness is encoded in the member's INT type.
        """
        kind, kflag, vlen, _n, _st = self._hdr(tid)
        pos = self._offsets[tid] + 12
        unpack = self._u32x3.unpack_from
        data = self._data
        for _ in range(vlen):
            name_off, mtype, moff = unpack(data, pos)
            pos += 12
            if kflag:
                yield (self._str(name_off) if name_off else "", mtype, moff & 0xFFFFFF, moff >> 24)
            else:
                yield (self._str(name_off) if name_off else "", mtype, moff, 0)

    def _resolve(self, tid: int) -> int:
        """Follow typedef/const/volatile/restrict/type_tag to the underlying type ID."""
        for _ in range(_MAX_CHAIN):
            if tid == 0:
                return 0
            kind, _kf, _vlen, _n, st = self._hdr(tid)
            if kind not in _MODIFIERS:
                return tid
            tid = st
        raise BTFError(f"{self._source} is corrupt: a typedef/qualifier chain loops.")

    def _pointer_size(self) -> int:
        # BTF_KIND_PTR carries no size (btf.rst 2.2.2); use the target's `long`.
        if self._ptr_size is None:
            self._ptr_size = 8
            for cname in (b"long unsigned int", b"long int", b"unsigned long", b"long"):
                for tid in self._by_name.get(cname, ()):
                    kind, _kf, _vlen, _n, size = self._hdr(tid)
                    if kind == KIND_INT:
                        self._ptr_size = size
                        return size
        return self._ptr_size

    def _type_size(self, tid: int, what: str) -> int:
        """Size in bytes of type `tid`; `what` names it for error messages."""
        for _ in range(_MAX_CHAIN):
            if tid == 0:
                raise BTFError(f"{what} has type void, which has no size.")
            kind, _kf, _vlen, _n, st = self._hdr(tid)
            if kind in (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64,
                        KIND_FLOAT, KIND_DATASEC):
                return st  # these kinds store `size` in the size/type union
            if kind == KIND_PTR:
                return self._pointer_size()
            if kind == KIND_ARRAY:
                elem, _index_type, nelems = self._array(tid)
                return nelems * self._type_size(elem, what)
            if kind in _MODIFIERS or kind == KIND_VAR:
                tid = st
                continue
            if kind == KIND_FWD:
                raise BTFError(f"{what} is only forward-declared in BTF, so its size is unknown.")
            raise BTFError(f"{what} is a {_KIND_NAMES.get(kind, f'kind {kind}')}, which has no size.")
        raise BTFError(f"{self._source} is corrupt: a typedef/qualifier chain loops.")

    def _array(self, tid: int) -> Tuple[int, int, int]:
        """struct btf_array { type, index_type, nelems } following the btf_type."""
        return self._u32x3.unpack_from(self._data, self._offsets[tid] + 12)

    # --------------------------------------------------------------- name lookup

    def _find(self, name: str, kinds: Tuple[int, ...], what: str) -> int:
        """Type ID named `name`, preferring kinds in the order given.

        Within a kind, a complete definition wins over an empty one (an ENUM with no
        values is how BTF encodes an enum forward declaration). FWD is never returned:
        a caller that only finds one gets a BTFError saying so.
        """
        cname = name.strip()
        for prefix, only in (("struct ", (KIND_STRUCT,)), ("union ", (KIND_UNION,)),
                             ("enum ", (KIND_ENUM, KIND_ENUM64))):
            if cname.startswith(prefix):
                cname = cname[len(prefix):].strip()
                kinds = tuple(k for k in kinds if k in only) or only
                break
        ids = self._by_name.get(cname.encode("utf-8"), [])
        for want in kinds:
            fallback = None
            for tid in ids:
                kind, _kf, vlen, _n, size = self._hdr(tid)
                if kind != want:
                    continue
                if kind in (KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64) and vlen == 0 and size == 0:
                    fallback = fallback or tid
                    continue
                return tid
            if fallback is not None:
                return fallback
        if any(self._hdr(tid)[0] == KIND_FWD for tid in ids):
            raise BTFError(f"The kernel BTF ({self._source}) only has a forward declaration of "
                           f"{what} {cname}, not its layout.")
        raise BTFError(f"The kernel BTF ({self._source}) has no {what} named {cname}.")

    def _find_struct(self, name: str) -> int:
        tid = self._find(name, (KIND_STRUCT, KIND_UNION, KIND_TYPEDEF), "struct")
        rid = self._resolve(tid)
        if rid == 0 or self._hdr(rid)[0] not in (KIND_STRUCT, KIND_UNION):
            raise BTFError(f"{name} in the kernel BTF is not a struct or union.")
        return rid

    # ------------------------------------------------------------ member paths

    def _lookup_member(self, tid: int, member: str) -> Optional[Tuple[int, int, int]]:
        """(type_id, bit_offset, bitfield_size) of `member` in struct/union `tid`.

        Members of anonymous struct/union members are searched transparently, as C
        does (sk_buff keeps _nfct, len, head... inside anonymous unions/structs).
        """
        anon: List[Tuple[int, int]] = []
        for mname, mtype, bitoff, bfsize in self._members(tid):
            if mname == member:
                return mtype, bitoff, bfsize
            if not mname:
                anon.append((mtype, bitoff))
        for mtype, bitoff in anon:
            rid = self._resolve(mtype)
            if rid and self._hdr(rid)[0] in (KIND_STRUCT, KIND_UNION):
                found = self._lookup_member(rid, member)
                if found is not None:
                    return found[0], bitoff + found[1], found[2]
        return None

    def _walk(self, struct_name: str, path: str) -> Tuple[int, int]:
        """(byte_offset, final_type_id) of dotted/indexed `path` inside `struct_name`."""
        if not path or not path.strip():
            raise BTFError(f"No member given for struct {struct_name}.")
        cur = self._find_struct(struct_name)
        bits = 0
        seen: List[str] = []
        for comp in path.strip().split("."):
            m = _COMPONENT_RE.match(comp.strip())
            if not m:
                raise BTFError(f"Cannot parse member path {path!r} for struct {struct_name}.")
            member, indexes = m.group(1), m.group(2)
            rid = self._resolve(cur)
            where = ".".join([struct_name] + seen)
            if rid == 0 or self._hdr(rid)[0] not in (KIND_STRUCT, KIND_UNION):
                raise BTFError(f"{where} is not a struct or union, so it has no member {member}.")
            found = self._lookup_member(rid, member)
            if found is None:
                owner = where if seen else f"struct {struct_name}"
                raise BTFError(f"{owner} has no member {member} in the kernel BTF ({self._source}).")
            mtype, moff, bfsize = found
            here = ".".join([struct_name] + seen + [member])
            seen.append(comp.strip())
            if bfsize or moff % 8 or self._is_int_bitfield(mtype):
                raise BTFError(f"{here} is a bitfield, so it has no byte offset.")
            bits += moff
            cur = mtype
            for idx_s in _INDEX_RE.findall(indexes):
                idx = int(idx_s)
                arr = self._resolve(cur)
                if arr == 0 or self._hdr(arr)[0] != KIND_ARRAY:
                    raise BTFError(f"{here} is not an array, so it cannot be indexed with [{idx}].")
                elem, _index_type, nelems = self._array(arr)
                # nelems == 0 is a flexible array member (`u8 data[]`): any index goes.
                if nelems and idx >= nelems:
                    raise BTFError(f"Index {idx} is out of range for {here}, which has {nelems} elements.")
                bits += idx * self._type_size(elem, here) * 8
                cur = elem
        return bits // 8, cur

    def _is_int_bitfield(self, tid: int) -> bool:
        # Without kind_flag, a bitfield member points at an INT whose nr_bits is
        # narrower than its size or whose bit offset is non-zero (btf.rst 2.2.1).
        rid = self._resolve(tid)
        if rid == 0:
            return False
        kind, _kf, _vlen, _n, size = self._hdr(rid)
        if kind != KIND_INT:
            return False
        enc = self._u32.unpack_from(self._data, self._offsets[rid] + 12)[0]
        nr_bits = enc & 0xFF
        bit_off = (enc >> 16) & 0xFF
        return bit_off != 0 or nr_bits != size * 8

    # -------------------------------------------------------------- public API

    def offsetof(self, struct: str, path: str) -> int:
        """Byte offset of member `path` ("dst.u3", "tuplehash[1]", "_nfct") in `struct`."""
        return self._walk(struct, path)[0]

    def member_size(self, struct: str, path: str) -> int:
        """Size in bytes of the type of member `path` in `struct`."""
        _off, tid = self._walk(struct, path)
        return self._type_size(tid, f"{struct}.{path}")

    def sizeof(self, name: str) -> int:
        """Size in bytes of the struct/union/enum/typedef/int/float named `name`."""
        tid = self._find(name, (KIND_STRUCT, KIND_UNION, KIND_TYPEDEF, KIND_INT, KIND_ENUM,
                                KIND_ENUM64, KIND_FLOAT), "type")
        return self._type_size(tid, name)

    def enum_values(self, enum_name: str) -> Dict[str, int]:
        """{enumerator: value} of the enum named `enum_name`, in declaration order."""
        tid = self._find(enum_name, (KIND_ENUM, KIND_ENUM64, KIND_TYPEDEF), "enum")
        rid = self._resolve(tid)
        if rid == 0 or self._hdr(rid)[0] not in (KIND_ENUM, KIND_ENUM64):
            raise BTFError(f"{enum_name} in the kernel BTF is not an enum.")
        kind, kflag, vlen, _n, size = self._hdr(rid)
        pos = self._offsets[rid] + 12
        data = self._data
        out: Dict[str, int] = {}
        if kind == KIND_ENUM:
            # struct btf_enum { name_off; __s32 val; }. kind_flag set = signed values,
            # clear = unsigned (btf.rst 2.2.6).
            unpack = self._u32x2.unpack_from
            for _ in range(vlen):
                name_off, val = unpack(data, pos)
                pos += 8
                if kflag and val & 0x80000000:
                    val -= 1 << 32
                out[self._str(name_off)] = val
        else:
            # struct btf_enum64 { name_off; __u32 val_lo32; __u32 val_hi32; } (2.2.19).
            unpack = self._u32x3.unpack_from
            for _ in range(vlen):
                name_off, lo, hi = unpack(data, pos)
                pos += 12
                val = (hi << 32) | lo
                if kflag and val & (1 << 63):
                    val -= 1 << 64
                out[self._str(name_off)] = val
        return out


def load_offsets(spec: Dict[str, Tuple[str, str]], btf: Optional[BTF] = None) -> Dict[str, int]:
    """Resolve a table of named layout constants against the kernel BTF.

    {"SKB_NFCT": ("sk_buff", "_nfct"), "TUPLEHASH_SIZE": ("sizeof", "nf_conntrack_tuple_hash")}
    -> {"SKB_NFCT": 104, "TUPLEHASH_SIZE": 56}. Loads /sys/kernel/btf/vmlinux if `btf`
    is None. Raises BTFError on the first constant that cannot be resolved.
    """
    if btf is None:
        btf = BTF.load()
    out: Dict[str, int] = {}
    for key, (struct_name, path) in spec.items():
        if struct_name == "sizeof":
            out[key] = btf.sizeof(path)
        else:
            out[key] = btf.offsetof(struct_name, path)
    return out
