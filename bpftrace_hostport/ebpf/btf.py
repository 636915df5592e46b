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

Kernel modules (split BTF). On distro kernels netfilter is modular, so struct nf_conn
and friends are described in /sys/kernel/btf/nf_conntrack, not in vmlinux. A module's
BTF is "split BTF": it only holds the module's own types and strings and continues
the numbering of its base (vmlinux), exactly as libbpf's btf_new() sets it up:

    start_id      = btf__type_cnt(base)   # base types + 1 for void, i.e. the first
                                          # module type ID is base.type_count + 1
    start_str_off = base->hdr.str_len     # module string offsets continue after the
                                          # base string section

so a type ID below start_id, or a string offset below start_str_off, refers to
vmlinux (libbpf btf_type_by_id() / btf__str_by_offset(); the kernel's
btf_parse_module() uses the same numbers). BTF.load() indexes vmlinux only and opens
module files one at a time, only when a name is missing from vmlinux.
"""

from __future__ import annotations

import os
import re
import struct
from array import array
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from bpftrace_hostport.errors import UserError

__all__ = ["BTFError", "BTF", "load_offsets", "VMLINUX_BTF"]

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
# Module BTF files to try first when a name is missing from vmlinux; the rest of the
# directory follows in alphabetical order.
_PREFERRED_MODULES = ("nf_conntrack", "nf_nat")

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


def _read_file(path: str) -> bytes:
    """Contents of BTF file `path`; BTFError with a plain sentence if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
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


class BTF:
    """An indexed raw BTF blob (e.g. /sys/kernel/btf/vmlinux), optionally with modules.

    Construct with BTF.load(path) or BTF.from_bytes(data). Lookups take C names
    ("sk_buff", "nf_conn", "unsigned int"); an optional "struct ", "union " or
    "enum " prefix restricts the kind. A BTF made by BTF.load() also searches kernel
    module BTF (split BTF) for names that vmlinux lacks; see BTF.load().
    """

    def __init__(self, data: bytes, source: str = "<bytes>", base: Optional["BTF"] = None) -> None:
        self._source = source
        self._data = data
        # Split BTF (btf.rst / libbpf btf_new()): with a base, type IDs start at the
        # base's type count including void, and string offsets at the base's str_len.
        if base is not None and base._base is not None:
            raise BTFError(f"{source} cannot be read on top of {base._source}, which is itself split BTF.")
        self._base = base
        self._start_id = base._start_id + base.type_count if base is not None else 1
        self._start_str_off = base._start_str_off + len(base._strings) if base is not None else 0
        if len(data) < _HEADER_LEN:
            raise BTFError(f"{source} is truncated: {len(data)} bytes is too short for a BTF header.")
        magic_le = struct.unpack_from("<H", data, 0)[0]
        if magic_le == _BTF_MAGIC:
            self._endian = "<"
        elif magic_le == 0x9FEB:  # written by a big-endian host
            self._endian = ">"
        else:
            raise BTFError(f"{source} is not BTF data (bad magic 0x{magic_le:04x}, expected 0xeb9f).")
        if base is not None and base._endian != self._endian:
            raise BTFError(f"{source} has a different byte order from its base BTF {base._source}.")
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
        # _offsets[type_id - _start_id] = absolute offset of that type's struct btf_type.
        # Type ID 0 is void and has no record (btf.rst 2.1).
        self._offsets = array("L")
        self._by_name: Dict[bytes, List[int]] = {}
        self._index()
        self._ptr_size: Optional[int] = None
        # Module BTF searched when a name is missing here (set up by BTF.load()).
        self._module_dir: Optional[str] = None
        self._module_list: Optional[List[str]] = None   # names or paths, in search order
        self._module_explicit = False
        self._modules: Dict[str, Optional["BTF"]] = {}  # loaded (None = could not be used)
        self._module_errors: Dict[str, str] = {}

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str = VMLINUX_BTF, modules: Optional[Sequence[str]] = None,
             module_dir: Optional[str] = None) -> "BTF":
        """Read and index a raw BTF file. Raises BTFError if missing, unreadable or corrupt.

        Kernel modules: `module_dir` (default: the directory holding `path`, i.e.
        /sys/kernel/btf) holds one split-BTF file per loaded module. With
        `modules=None`, a name that vmlinux lacks (or only forward-declares) is looked
        up in those files -- nf_conntrack first, then nf_nat, then the rest
        alphabetically -- and the first file that defines it completely is used. Each
        file is read and indexed only when first needed, so loading vmlinux costs the
        same as before. `modules=["nf_conntrack", ...]` searches only those files
        (names in `module_dir`, or paths), in that order; `modules=[]` disables
        module lookups.
        """
        btf = cls(_read_file(path), source=path)
        if modules is not None and isinstance(modules, (str, bytes)):
            modules = [os.fsdecode(modules)]
        if modules is None or len(modules) > 0:
            btf._module_dir = module_dir if module_dir is not None else (os.path.dirname(path) or ".")
            if modules is not None:
                btf._module_list = list(modules)
                btf._module_explicit = True
        return btf

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>", base: Optional["BTF"] = None) -> "BTF":
        """Index a raw BTF blob already in memory; `base` makes it split BTF on top of `base`."""
        return cls(bytes(data), source=source, base=base)

    def _index(self) -> None:
        """One pass over the type section: record offsets, index names of lookup-able kinds."""
        data = self._data
        unpack_hdr = self._u32x3.unpack_from
        strings = self._strings
        str_len = len(strings)
        sso = self._start_str_off  # 0 unless split BTF
        first = self._start_id
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
                    f"{self._source} is corrupt or too new: type {first + len(offsets)} "
                    f"has unknown BTF kind {kind}.") from None
            append(pos)
            if name_off and kind in named:
                if name_off >= sso:
                    off = name_off - sso
                    if off >= str_len:
                        raise BTFError(f"{self._source} is corrupt: type {first + len(offsets) - 1} "
                                       f"has a name outside the string section.")
                    nul = strings.find(b"\0", off)
                    if nul < 0:
                        raise BTFError(f"{self._source} is corrupt: the string section is not NUL-terminated.")
                    key = strings[off:nul]
                else:
                    # Split BTF reuses a name already in the base's string section.
                    key = self._str_bytes(name_off)
                ids = by_name.get(key)
                if ids is None:
                    by_name[key] = [first + len(offsets) - 1]
                else:
                    ids.append(first + len(offsets) - 1)
            pos += 12 + fixed + per * (info & 0xFFFF)
        if pos != end:
            raise BTFError(f"{self._source} is corrupt: the last type record runs past the type section.")

    # ------------------------------------------------------------ kernel modules

    def _module_names(self) -> List[str]:
        """Module BTF files to search, in order (listed once, on first use)."""
        if self._module_list is None:
            names: List[str] = []
            mdir = self._module_dir or "."
            try:
                own = os.path.realpath(self._source)
                with os.scandir(mdir) as it:
                    for entry in it:
                        if entry.name == "vmlinux" or entry.name.startswith("."):
                            continue
                        try:
                            if not entry.is_file() or os.path.realpath(entry.path) == own:
                                continue
                        except OSError:
                            continue
                        names.append(entry.name)
            except FileNotFoundError:
                pass
            except OSError as err:
                self._module_errors[mdir] = f"Cannot list module BTF in {mdir}: {err.strerror or err}."
            rank = {n: i for i, n in enumerate(_PREFERRED_MODULES)}
            names.sort(key=lambda n: (rank.get(n, len(rank)), n))
            self._module_list = names
        return self._module_list

    def _module(self, name: str) -> Optional["BTF"]:
        """The split BTF of module file `name`, read and indexed on first use."""
        if name in self._modules:
            return self._modules[name]
        path = name if os.sep in name else os.path.join(self._module_dir or ".", name)
        mod: Optional[BTF] = None
        try:
            mod = BTF(_read_file(path), source=path, base=self)
        except BTFError as err:
            self._module_errors[name] = str(err)
        self._modules[name] = mod
        return mod

    def _searched(self) -> Tuple[str, str]:
        """("(looked in ...)", extra sentences) for a name-not-found message with modules."""
        names = self._module_names()
        if self._module_explicit:
            where = f"{self._source} and the module BTF files {', '.join(names)}"
        elif names:
            n = len(names)
            where = f"{self._source} and {n} module BTF file{'s' if n != 1 else ''} in {self._module_dir}"
        else:
            where = f"{self._source} and found no module BTF files in {self._module_dir}"
        extra = ""
        if self._module_errors:
            n = len(self._module_errors)
            first = next(iter(self._module_errors.values()))
            extra = f" {n} module BTF file{'s' if n != 1 else ''} could not be used; the first: {first}"
        return f"(looked in {where})", extra

    # ---------------------------------------------------------------- raw access

    @property
    def type_count(self) -> int:
        """Number of types in this blob, not counting void (type ID 0)."""
        return len(self._offsets)

    @property
    def start_id(self) -> int:
        """Type ID of this blob's first type: 1, or base type count + 1 for split BTF."""
        return self._start_id

    def _loc(self, tid: int) -> Tuple[bytes, int]:
        """(data, absolute offset) of type `tid`'s struct btf_type, in this blob or the base."""
        idx = tid - self._start_id
        if 0 <= idx < len(self._offsets):
            return self._data, self._offsets[idx]
        if 0 < tid < self._start_id and self._base is not None:
            return self._base._loc(tid)
        raise BTFError(f"{self._source} is corrupt: it refers to type {tid}, which does not exist.")

    def _hdr(self, tid: int) -> Tuple[int, int, int, int, int]:
        """(kind, kind_flag, vlen, name_off, size_or_type) of type `tid`."""
        data, pos = self._loc(tid)
        name_off, info, st = self._u32x3.unpack_from(data, pos)
        return (info >> 24) & 0x1F, info >> 31, info & 0xFFFF, name_off, st

    def _str_bytes(self, off: int) -> bytes:
        """The NUL-terminated string at offset `off` (split BTF: below start_str_off = base)."""
        if off < self._start_str_off:
            assert self._base is not None
            return self._base._str_bytes(off)
        off -= self._start_str_off
        strings = self._strings
        if off >= len(strings):
            raise BTFError(f"{self._source} is corrupt: a name points outside the string section.")
        nul = strings.find(b"\0", off)
        if nul < 0:
            nul = len(strings)
        return strings[off:nul]

    def _str(self, off: int) -> str:
        return self._str_bytes(off).decode("utf-8", "replace")

    def _members(self, tid: int) -> Iterator[Tuple[str, int, int, int]]:
        """(name, type_id, bit_offset, bitfield_size) for each member of a struct/union.

        btf.rst 2.2.4: if the struct's kind_flag is set, btf_member.offset holds the
        bitfield size in bits 24-31 and the bit offset in bits 0-23; otherwise it is
        the plain bit offset and bitfield-ness is encoded in the member's INT type.
        """
        kind, kflag, vlen, _n, _st = self._hdr(tid)
        data, pos = self._loc(tid)
        pos += 12
        unpack = self._u32x3.unpack_from
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
        if self._base is not None:
            return self._base._pointer_size()  # module BTF: `long` lives in vmlinux
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
        data, pos = self._loc(tid)
        return self._u32x3.unpack_from(data, pos + 12)

    # --------------------------------------------------------------- name lookup

    def _find_local(self, cname: str, kinds: Tuple[int, ...]) -> Tuple[Optional[int], bool, bool]:
        """(type_id or None, complete, has_fwd) for `cname` among this blob's own types.

        Prefers kinds in the order given. Within a kind, a complete definition wins
        over an empty one (an ENUM with no values is how BTF encodes an enum forward
        declaration); an empty one is returned with complete=False. FWD is never
        returned, only reported through has_fwd.
        """
        ids = self._by_name.get(cname.encode("utf-8"), ())
        for want in kinds:
            fallback = None
            for tid in ids:
                kind, _kf, vlen, _n, size = self._hdr(tid)
                if kind != want:
                    continue
                if kind in (KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64) and vlen == 0 and size == 0:
                    fallback = fallback or tid
                    continue
                if kind == KIND_TYPEDEF and not self._is_complete(tid):
                    fallback = fallback or tid
                    continue
                return tid, True, False
            if fallback is not None:
                return fallback, False, False
        return None, False, any(self._hdr(tid)[0] == KIND_FWD for tid in ids)

    def _is_complete(self, tid: int) -> bool:
        """False if typedef chain `tid` ends at a FWD or an empty struct/union/enum."""
        try:
            rid = self._resolve(tid)
        except BTFError:
            return False
        if rid == 0:
            return True
        kind, _kf, vlen, _n, size = self._hdr(rid)
        if kind == KIND_FWD:
            return False
        return not (kind in (KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64) and vlen == 0 and size == 0)

    def _find(self, name: str, kinds: Tuple[int, ...], what: str) -> Tuple["BTF", int]:
        """(btf, type_id) of the type named `name`, preferring kinds in the order given.

        `btf` is this object, or the module BTF that defines the type when vmlinux
        lacks a complete definition (see BTF.load()); further lookups on the type ID
        must go through `btf`, which also sees vmlinux's types.
        """
        cname = name.strip()
        for prefix, only in (("struct ", (KIND_STRUCT,)), ("union ", (KIND_UNION,)),
                             ("enum ", (KIND_ENUM, KIND_ENUM64))):
            if cname.startswith(prefix):
                cname = cname[len(prefix):].strip()
                kinds = tuple(k for k in kinds if k in only) or only
                break
        tid, complete, has_fwd = self._find_local(cname, kinds)
        if tid is not None and complete:
            return self, tid
        if self._base is not None:  # split BTF used on its own: its base's names count too
            btid, bcomplete, bfwd = self._base._find_local(cname, kinds)
            if btid is not None and (bcomplete or tid is None):
                return self, btid
            has_fwd = has_fwd or bfwd
        if self._module_dir is not None:
            for mname in self._module_names():
                mod = self._module(mname)
                if mod is None:
                    continue
                mtid, mcomplete, mfwd = mod._find_local(cname, kinds)
                if mtid is not None and mcomplete:
                    return mod, mtid
                has_fwd = has_fwd or mfwd
        if tid is not None:
            return self, tid  # only an empty definition exists anywhere: use it, as before
        if self._module_dir is None:  # vmlinux only (BTF.from_bytes, or modules=[])
            if has_fwd:
                raise BTFError(f"The kernel BTF ({self._source}) only has a forward declaration of "
                               f"{what} {cname}, not its layout.")
            raise BTFError(f"The kernel BTF ({self._source}) has no {what} named {cname}.")
        where, extra = self._searched()
        hint = ""
        if cname.startswith("nf_"):
            hint = (" Names starting with nf_ come from netfilter, which distributions build as"
                    " modules; load it with `modprobe nf_conntrack` and try again.")
        if has_fwd:
            raise BTFError(f"The kernel BTF only has a forward declaration of {what} {cname}, not its "
                           f"layout {where}.{hint}{extra}")
        raise BTFError(f"The kernel BTF has no {what} named {cname} {where}.{hint}{extra}")

    def _find_struct(self, name: str) -> Tuple["BTF", int]:
        btf, tid = self._find(name, (KIND_STRUCT, KIND_UNION, KIND_TYPEDEF), "struct")
        rid = btf._resolve(tid)
        if rid == 0 or btf._hdr(rid)[0] not in (KIND_STRUCT, KIND_UNION):
            raise BTFError(f"{name} in the kernel BTF is not a struct or union.")
        return btf, rid

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

    def _walk(self, struct_name: str, path: str) -> Tuple["BTF", int, int]:
        """(btf, byte_offset, final_type_id) of dotted/indexed `path` inside `struct_name`.

        `btf` is the blob (vmlinux or a module) whose ID space final_type_id is in.
        """
        if not path or not path.strip():
            raise BTFError(f"No member given for struct {struct_name}.")
        btf, cur = self._find_struct(struct_name)
        off, tid = btf._walk_from(cur, struct_name, path)
        return btf, off, tid

    def _walk_from(self, cur: int, struct_name: str, path: str) -> Tuple[int, int]:
        """(byte_offset, final_type_id) of `path` inside struct/union type `cur`."""
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
        data, pos = self._loc(rid)
        enc = self._u32.unpack_from(data, pos + 12)[0]
        nr_bits = enc & 0xFF
        bit_off = (enc >> 16) & 0xFF
        return bit_off != 0 or nr_bits != size * 8

    # -------------------------------------------------------------- public API

    def offsetof(self, struct: str, path: str) -> int:
        """Byte offset of member `path` ("dst.u3", "tuplehash[1]", "_nfct") in `struct`."""
        return self._walk(struct, path)[1]

    def member_size(self, struct: str, path: str) -> int:
        """Size in bytes of the type of member `path` in `struct`."""
        btf, _off, tid = self._walk(struct, path)
        return btf._type_size(tid, f"{struct}.{path}")

    def sizeof(self, name: str) -> int:
        """Size in bytes of the struct/union/enum/typedef/int/float named `name`."""
        btf, tid = self._find(name, (KIND_STRUCT, KIND_UNION, KIND_TYPEDEF, KIND_INT, KIND_ENUM,
                                     KIND_ENUM64, KIND_FLOAT), "type")
        return btf._type_size(tid, name)

    def enum_values(self, enum_name: str) -> Dict[str, int]:
        """{enumerator: value} of the enum named `enum_name`, in declaration order."""
        btf, tid = self._find(enum_name, (KIND_ENUM, KIND_ENUM64, KIND_TYPEDEF), "enum")
        return btf._enum_values(tid, enum_name)

    def _enum_values(self, tid: int, enum_name: str) -> Dict[str, int]:
        rid = self._resolve(tid)
        if rid == 0 or self._hdr(rid)[0] not in (KIND_ENUM, KIND_ENUM64):
            raise BTFError(f"{enum_name} in the kernel BTF is not an enum.")
        kind, kflag, vlen, _n, size = self._hdr(rid)
        data, pos = self._loc(rid)
        pos += 12
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
    -> {"SKB_NFCT": 104, "TUPLEHASH_SIZE": 56}. Loads /sys/kernel/btf/vmlinux (and,
    on demand, module BTF such as nf_conntrack) if `btf` is None. Raises BTFError on
    the first constant that cannot be resolved.
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
