"""The compile cache: the loaded programs' instructions, kept so a warm start needs no bcc.

A compile (compiler.py, in its child) costs ~0.5 s of CPU and ~130 MB of memory for bcc, LLVM
and clang. What it produces is small: each program's instructions as bcc loaded them, and the
maps they use. On a cache miss the child stores exactly that, keyed by everything the result
depends on; on a hit the tracer itself (no child, no bcc) creates the maps, points the
instructions at them, loads the programs and attaches the tracepoint, and holds the same
descriptors, in the same order, as the child's reply would have handed over.

Relocation: bcc emits a map reference as `ld_imm64 rX, map` (two instruction slots, opcode
BPF_LD|BPF_DW|BPF_IMM = 0x18) with src_reg = BPF_PSEUDO_MAP_FD and imm = the map's fd in the
compiling process. The entry stores the map's *index* in its own map list instead; a hit writes
the new fd back (include/uapi/linux/bpf.h: struct bpf_insn, BPF_PSEUDO_MAP_FD).

The entry (JSON, one file per key, written atomically):
  {"format", "key", "digest" (sha256 of the rest), "bcc", "kernel", "license", "kern_version",
   "maps":  [{"name", "type", "key_size", "value_size", "max_entries", "map_flags", "kname"}],
            the request's maps first, in its order, then any other map a program uses;
   "progs": [{"name", "prog_type", "attach_type", "insns" (base64)}], the netfilter programs in
            the request's order, then the tracepoint's program;
   "reply": the reply the child sent (progs, maps with their key/leaf layouts, tracepoint);
   "tracepoint": {"tp", "fn"} or null}

The cache directory (default /var/cache/bpftrace-hostport, or $BPFTRACE_HOSTPORT_CACHE_DIR,
`off` to disable) is only used when it is owned by root or by us and not writable by group or
others: the entries are programs the kernel will run. Anything wrong with an entry makes it a
miss; nothing wrong with the cache ever stops tracing.
"""
from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import os
import stat
import struct
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

FORMAT = 1
ENV = "BPFTRACE_HOSTPORT_CACHE_DIR"
DEFAULT_DIR = "/var/cache/bpftrace-hostport"
MAX_ENTRIES = 8
MAX_ENTRY_BYTES = 16 << 20

BPF_LD_IMM64 = 0x18            # BPF_LD | BPF_DW | BPF_IMM: two slots, imm of the second = high half
BPF_PSEUDO_MAP_FD = 1
BPF_PSEUDO_MAP_IDX = 5         # libbpf-style fd_array indexes: refused, we never write them
_INSN = struct.Struct("=BBhi")  # struct bpf_insn: code, dst_reg:4 + src_reg:4, off, imm


class CacheError(Exception):
    """An entry that cannot be used (corrupt, from elsewhere, or refused by the kernel)."""


# -- where --------------------------------------------------------------------------------------
def cache_dir(env: Optional[Dict[str, str]] = None) -> Optional[str]:
    """The configured directory, or None when the cache is turned off."""
    value = (os.environ if env is None else env).get(ENV, DEFAULT_DIR).strip()
    if not value or value.lower() == "off":
        return None
    return value


def trusted(st: os.stat_result) -> bool:
    """Owned by root (or by us) and writable by nobody else."""
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def usable_dir(path: Optional[str], create: bool = True) -> Optional[str]:
    """`path` if it is (or, created 0700, becomes) a trusted directory; else None."""
    if not path:
        return None
    try:
        if create and not os.path.lexists(path):
            os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or not trusted(st):
        return None
    return path


# -- key ------------------------------------------------------------------------------------------
def include_texts(cflags: Sequence[str]) -> Dict[str, str]:
    """The headers the compile can include from our own -I folders (events.h): name -> text."""
    out = {}
    for flag in cflags:
        if flag.startswith("-I"):
            d = Path(flag[2:])
            with contextlib.suppress(OSError):
                for h in sorted(d.glob("*.h")):
                    out[str(h)] = h.read_text(errors="replace")
    return out


def cache_key(request: dict, headers: Optional[Dict[str, str]] = None,
              uname: Optional[Tuple[str, str]] = None) -> str:
    """sha256 over all a compile's result depends on: the source, our headers, the cflags (every
    BTF offset and size is a -D), the kernel release and build, the format of the entry and
    what the request asks to be loaded. bcc's version cannot be known without importing it;
    it is recorded in the entry for information."""
    if headers is None:
        headers = include_texts(request.get("cflags", ()))
    if uname is None:
        u = os.uname()
        uname = (u.release, u.version)
    material = {
        "format": FORMAT,
        "text": request["text"],
        "headers": headers,
        "cflags": list(request["cflags"]),
        "kernel": list(uname),
        "machine": os.uname().machine,
        "netfilter": list(request["netfilter"]),
        "prog_type": request["prog_type"],
        "attach_type": request["attach_type"],
        "maps": list(request["maps"]),
        "tracepoint": request.get("tracepoint"),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


# -- relocation -------------------------------------------------------------------------------
def _src_reg(regs: int) -> int:
    return regs >> 4 if sys.byteorder == "little" else regs & 0x0F


def _map_loads(insns: bytes):
    """(slot index, src_reg, imm) of every ld_imm64 that refers to a map; raises CacheError on
    a truncated program or a map reference of a kind we do not relocate."""
    if len(insns) % 8:
        raise CacheError("instructions are not a multiple of 8 bytes")
    n = len(insns) // 8
    i = 0
    while i < n:
        code, regs, _off, imm = _INSN.unpack_from(insns, i * 8)
        if code == BPF_LD_IMM64:
            if i + 1 >= n:
                raise CacheError("a 64-bit load is cut off at the end of the program")
            src = _src_reg(regs)
            if src == BPF_PSEUDO_MAP_FD:
                yield i, imm
            elif src != 0:
                raise CacheError(f"a 64-bit load of kind {src} cannot be cached")
            i += 2
        else:
            i += 1


def referenced_fds(insns: bytes) -> List[int]:
    """The map fds a program refers to, in order of first use."""
    out: List[int] = []
    for _i, fd in _map_loads(insns):
        if fd not in out:
            out.append(fd)
    return out


def _rewrite(insns: bytes, fn: Callable[[int], int]) -> bytes:
    buf = bytearray(insns)
    for i, imm in list(_map_loads(insns)):
        code, regs, off, _ = _INSN.unpack_from(buf, i * 8)
        _INSN.pack_into(buf, i * 8, code, regs, off, fn(imm))
    return bytes(buf)


def fds_to_indexes(insns: bytes, index_of_fd: Dict[int, int]) -> bytes:
    def fn(fd: int) -> int:
        if fd not in index_of_fd:
            raise CacheError(f"a program refers to map fd {fd}, which is not among its maps")
        return index_of_fd[fd]
    return _rewrite(insns, fn)


def indexes_to_fds(insns: bytes, fds: Sequence[int]) -> bytes:
    def fn(idx: int) -> int:
        if not 0 <= idx < len(fds):
            raise CacheError(f"a program refers to map #{idx} of {len(fds)}")
        return fds[idx]
    return _rewrite(insns, fn)


# -- entries --------------------------------------------------------------------------------
def _digest(entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def make_entry(key: str, request: dict, reply: dict, progs: Sequence[Tuple[str, int, int, bytes]],
               map_fds: Dict[str, int], map_info: Callable[[int], object],
               license: str, kern_version: int, bcc_version: str) -> dict:
    """An entry from what the compile child has loaded.

    progs: (name, prog type, expected attach type, instructions as loaded) in reply order, the
    tracepoint's program last; map_fds: the request's map names -> the child's fds;
    map_info(fd): BPF_OBJ_GET_INFO_BY_FD (bpfsys.map_info).
    """
    order = [map_fds[name] for name in request["maps"]]
    names = {fd: name for name, fd in map_fds.items()}
    for _n, _t, _a, insns in progs:
        for fd in referenced_fds(insns):
            if fd not in order:
                order.append(fd)
    maps = []
    for fd in order:
        info = map_info(fd)
        kname = bytes(info.name).split(b"\0", 1)[0].decode(errors="replace")
        maps.append({"name": names.get(fd), "kname": kname, "type": int(info.type),
                     "key_size": int(info.key_size), "value_size": int(info.value_size),
                     "max_entries": int(info.max_entries), "map_flags": int(info.map_flags)})
    index_of = {fd: i for i, fd in enumerate(order)}
    entry = {
        "format": FORMAT, "key": key, "bcc": bcc_version, "kernel": os.uname().release,
        "license": license, "kern_version": int(kern_version), "maps": maps,
        "progs": [{"name": n, "prog_type": int(t), "attach_type": int(a),
                   "insns": base64.b64encode(fds_to_indexes(insns, index_of)).decode()}
                  for n, t, a, insns in progs],
        "reply": {"ok": True, "progs": list(reply["progs"]), "maps": list(reply["maps"]),
                  "tracepoint": bool(reply["tracepoint"])},
        "tracepoint": request.get("tracepoint") if reply["tracepoint"] else None,
    }
    entry["digest"] = _digest(entry)
    return entry


def validate(entry: object, key: str) -> dict:
    """The entry if it is whole and ours; CacheError otherwise."""
    if not isinstance(entry, dict) or entry.get("format") != FORMAT:
        raise CacheError("not an entry of this format")
    if entry.get("key") != key:
        raise CacheError("the entry belongs to another key")
    if entry.get("digest") != _digest(entry):
        raise CacheError("the entry's digest does not match")
    try:
        maps, progs, reply = entry["maps"], entry["progs"], entry["reply"]
        for m in maps:
            for f in ("type", "key_size", "value_size", "max_entries", "map_flags"):
                if not isinstance(m[f], int):
                    raise CacheError(f"map field {f} is not a number")
        for p in progs:
            insns = base64.b64decode(p["insns"], validate=True)
            for _i, idx in _map_loads(insns):
                if not 0 <= idx < len(maps):
                    raise CacheError("a program refers to a map the entry lacks")
        nmaps = len(reply["maps"])
        if [m["name"] for m in maps[:nmaps]] != [m["name"] for m in reply["maps"]]:
            raise CacheError("the entry's maps and reply disagree")
        if len(reply["progs"]) + (1 if reply["tracepoint"] else 0) != len(progs):
            raise CacheError("the entry's programs and reply disagree")
        if reply["tracepoint"] and not entry.get("tracepoint"):
            raise CacheError("the entry attaches a tracepoint it does not name")
    except (KeyError, TypeError, ValueError) as e:
        raise CacheError(f"malformed entry ({e})") from None
    return entry


def entry_path(directory: str, key: str) -> str:
    return os.path.join(directory, f"{key}.json")


def load(directory: str, key: str) -> Optional[dict]:
    """The entry for `key`, or None (a miss). A corrupt or untrusted file is removed."""
    path = entry_path(directory, key)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or not trusted(st) or st.st_size > MAX_ENTRY_BYTES:
                raise CacheError("not a trusted regular file")
            entry = validate(json.loads(f.read()), key)
    except (CacheError, OSError, ValueError, UnicodeDecodeError):
        discard(directory, key)
        return None
    with contextlib.suppress(OSError):
        os.utime(path)            # recently used: the last to be pruned
    return entry


def discard(directory: str, key: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(entry_path(directory, key))


def save(directory: str, entry: dict, keep: int = MAX_ENTRIES) -> bool:
    """Writes the entry atomically (a temp file in the directory, renamed over), then keeps only
    the `keep` most recently used entries. False (and nothing left behind) on any error."""
    if usable_dir(directory, create=True) is None:
        return False
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, entry_path(directory, entry["key"]))
        tmp = None
    except OSError:
        return False
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    prune(directory, keep)
    return True


def prune(directory: str, keep: int = MAX_ENTRIES) -> None:
    """Deletes all but the `keep` newest entries (by mtime: a hit touches its entry)."""
    entries = []
    with contextlib.suppress(OSError):
        for e in os.scandir(directory):
            if e.name.endswith(".json") and not e.name.startswith("."):
                with contextlib.suppress(OSError):
                    entries.append((e.stat(follow_symlinks=False).st_mtime_ns, e.path))
    entries.sort(reverse=True)
    for _mtime, path in entries[keep:]:
        with contextlib.suppress(OSError):
            os.unlink(path)


# -- a hit: the kernel objects, without bcc ---------------------------------------------------
def tracepoint_id(tp: str, tracefs_roots: Sequence[str] = ("/sys/kernel/tracing",
                                                           "/sys/kernel/debug/tracing")) -> int:
    category, _, name = tp.partition(":")
    for root in tracefs_roots:
        with contextlib.suppress(OSError, ValueError):
            return int(Path(root, "events", category, name, "id").read_text().strip())
    raise OSError(errno.ENOENT, f"no tracefs id for {tp}")


class Instantiated:
    """What a hit produced: the reply the child would have sent and its fds, in its order."""

    def __init__(self, reply: dict, fds: List[int]):
        self.reply, self.fds = reply, fds


def instantiate(entry: dict) -> Instantiated:
    """Creates the maps, loads the programs and attaches the tracepoint of an entry.

    Raises bpfsys.ProgLoadError when the verifier refuses a program (the entry is stale),
    bpfsys.BpfError / OSError for anything else; everything created is closed again then.
    """
    from bpftrace_hostport.ebpf import bpfsys

    opened: List[int] = []
    try:
        map_fds = []
        for m in entry["maps"]:
            fd = _retry_memlock(lambda: bpfsys.map_create(m["type"], m["key_size"], m["value_size"],
                                                          m["max_entries"], m["map_flags"], m["kname"]))
            opened.append(fd)
            map_fds.append(fd)
        prog_fds = []
        for p in entry["progs"]:
            insns = indexes_to_fds(base64.b64decode(p["insns"]), map_fds)
            fd = _retry_memlock(lambda: bpfsys.prog_load(p["prog_type"], insns, entry["license"], p["name"],
                                                         p["attach_type"], entry["kern_version"]))
            opened.append(fd)
            prog_fds.append(fd)
        reply = entry["reply"]
        nprogs, nmaps = len(reply["progs"]), len(reply["maps"])
        fds = prog_fds[:nprogs] + map_fds[:nmaps]
        if reply["tracepoint"]:
            perf = bpfsys.perf_event_open_tracepoint(tracepoint_id(entry["tracepoint"]["tp"]))
            opened.append(perf)
            bpfsys.perf_event_attach_bpf(perf, prog_fds[nprogs])
            fds.append(perf)
    except BaseException:
        for fd in opened:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    # The tracepoint's program is held by its perf event, maps only a program uses by the
    # programs: the tracer keeps just the descriptors the child's reply would have carried.
    for fd in opened:
        if fd not in fds:
            os.close(fd)
    return Instantiated(dict(reply), fds)


def _retry_memlock(fn):
    """As bcc does: EPERM may be RLIMIT_MEMLOCK on kernels before 5.11; lift it once, retry."""
    from bpftrace_hostport.ebpf import bpfsys
    try:
        return fn()
    except bpfsys.BpfError as e:
        if e.errno != errno.EPERM:
            raise
        import resource
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        except (OSError, ValueError):
            raise e from None
        return fn()
