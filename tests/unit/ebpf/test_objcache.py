"""The compile cache without a kernel: keys, instruction relocation, trust, damaged entries."""
import base64
import json
import os
import struct
import types

import pytest

from bpftrace_hostport.ebpf import bpfsys, objcache

INSN = struct.Struct("=BBhi")


def insn(code, dst=0, src=0, off=0, imm=0):
    regs = (src << 4 | dst) if os.sys.byteorder == "little" else (dst << 4 | src)
    return INSN.pack(code, regs, off, imm)


def ld_map(dst, fd):
    """ld_imm64 dst, map (BPF_PSEUDO_MAP_FD): two slots, the second all zero."""
    return insn(0x18, dst, 1, 0, fd) + insn(0, 0, 0, 0, 0)


def ld_imm64(dst, value):
    return insn(0x18, dst, 0, 0, value & 0xFFFFFFFF) + insn(0, 0, 0, 0, value >> 32)


def program(fds):
    """mov r1, 7; ld_imm64 r2, 0x7_0000_0007 (not a map); per fd: ld map + call; exit."""
    out = insn(0xB7, 1, 0, 0, 7) + ld_imm64(2, 0x7_0000_0007)
    for fd in fds:
        out += ld_map(1, fd) + insn(0x85, 0, 0, 0, 1)      # call bpf_map_lookup_elem
    return out + insn(0x95)


REQUEST = {"text": "int f(void *ctx) { return 0; }", "cflags": ["-DA=1", "-DB=2"],
           "netfilter": ["nf_a", "nf_b"], "prog_type": 32, "attach_type": 45,
           "maps": ["flows", "events"], "tracepoint": {"tp": "skb:kfree_skb", "fn": "tp_k"}}
UNAME = ("6.18.0", "#1 SMP PREEMPT_DYNAMIC")


def key(**changes):
    req = dict(REQUEST, **{k: v for k, v in changes.items() if k not in ("headers", "uname")})
    return objcache.cache_key(req, changes.get("headers", {"events.h": "struct x;"}),
                              changes.get("uname", UNAME))


# -- key -------------------------------------------------------------------------------------
def test_key_is_stable_and_ignores_where_the_entry_goes():
    assert key() == key()
    assert key() == objcache.cache_key(dict(REQUEST, cache={"dir": "/x", "key": "y"}),
                                       {"events.h": "struct x;"}, UNAME)
    assert len(key()) == 64


@pytest.mark.parametrize("change", [
    {"text": "int f(void *ctx) { return 1; }"},
    {"headers": {"events.h": "struct y;"}},
    {"cflags": ["-DA=1", "-DB=3"]},                 # a BTF offset moved
    {"uname": ("6.18.1", UNAME[1])},
    {"uname": (UNAME[0], "#2 SMP PREEMPT_DYNAMIC")},  # same release, another build
    {"maps": ["flows"]},
    {"netfilter": ["nf_a"]},
    {"tracepoint": None},                           # --no-drops
])
def test_key_changes_with_every_input(change):
    assert key(**change) != key()


def test_include_texts_reads_our_headers(tmp_path):
    (tmp_path / "events.h").write_text("struct flow_key;")
    (tmp_path / "other.c").write_text("no")
    texts = objcache.include_texts(["-DX=1", f"-I{tmp_path}", "-I/nonexistent"])
    assert list(texts.values()) == ["struct flow_key;"]


def test_cache_dir_from_env():
    assert objcache.cache_dir({}) == objcache.DEFAULT_DIR == "/var/cache/bpftrace-hostport"
    assert objcache.cache_dir({objcache.ENV: "/tmp/c"}) == "/tmp/c"
    assert objcache.cache_dir({objcache.ENV: "off"}) is None
    assert objcache.cache_dir({objcache.ENV: "OFF"}) is None
    assert objcache.cache_dir({objcache.ENV: ""}) is None


# -- relocation --------------------------------------------------------------------------------
def test_relocation_round_trip_touches_only_map_loads():
    prog = program([9, 4, 9, 12])
    assert objcache.referenced_fds(prog) == [9, 4, 12]
    rel = objcache.fds_to_indexes(prog, {4: 0, 9: 1, 12: 2})
    assert objcache.referenced_fds(rel) == [1, 0, 2]
    # everything but the imm of the map loads is unchanged: the plain ld_imm64 keeps 7 and 7
    changed = [i for i in range(0, len(prog), 8) if prog[i:i + 8] != rel[i:i + 8]]
    assert changed == [3 * 8, 6 * 8, 9 * 8, 12 * 8]
    assert objcache.indexes_to_fds(rel, [100, 101, 102]) == program([101, 100, 101, 102])
    assert objcache.indexes_to_fds(rel, [4, 9, 12]) == prog


def test_relocation_refuses_what_it_cannot_map():
    with pytest.raises(objcache.CacheError, match="not among its maps"):
        objcache.fds_to_indexes(program([5]), {6: 0})
    with pytest.raises(objcache.CacheError, match="map #3 of 2"):
        objcache.indexes_to_fds(objcache.fds_to_indexes(program([5]), {5: 3}), [10, 11])
    with pytest.raises(objcache.CacheError, match="multiple of 8"):
        objcache.referenced_fds(program([5])[:-3])
    with pytest.raises(objcache.CacheError, match="cut off"):
        objcache.referenced_fds(insn(0xB7) + insn(0x18, 1, 1, 0, 5))
    with pytest.raises(objcache.CacheError, match="kind 2"):      # BPF_PSEUDO_MAP_VALUE
        objcache.referenced_fds(insn(0x18, 1, 2, 0, 5) + insn(0))


# -- entries ---------------------------------------------------------------------------------
MAPINFO = {4: (9, 40, 120, 65536, 2, b"flows"), 7: (27, 0, 0, 1 << 22, 0, b"events"),
           11: (9, 8, 24, 65536, 2, b"known")}


def fake_info(fd):
    t, k, v, n, f, name = MAPINFO[fd]
    return types.SimpleNamespace(type=t, key_size=k, value_size=v, max_entries=n, map_flags=f, name=name)


REPLY = {"ok": True, "progs": ["nf_a", "nf_b"], "tracepoint": True,
         "maps": [{"name": "flows", "key": {"kind": "int", "size": 8, "signed": False},
                   "leaf": {"kind": "int", "size": 8, "signed": False}},
                  {"name": "events", "key": {"kind": "int", "size": 4, "signed": False},
                   "leaf": {"kind": "int", "size": 4, "signed": False}}]}


def entry(k=None):
    progs = [("nf_a", 32, 45, program([4, 11])), ("nf_b", 32, 45, program([7, 4])),
             ("tp_k", 5, 0, program([4]))]
    return objcache.make_entry(k or key(), REQUEST, REPLY, progs, {"flows": 4, "events": 7}, fake_info,
                               "GPL", 0x060C00, "0.26.0")


def test_entry_lists_requested_maps_first_then_the_others_programs_use():
    e = entry()
    assert [(m["name"], m["kname"]) for m in e["maps"]] == [("flows", "flows"), ("events", "events"),
                                                          (None, "known")]
    assert e["maps"][2] == {"name": None, "kname": "known", "type": 9, "key_size": 8, "value_size": 24,
                            "max_entries": 65536, "map_flags": 2}
    insns = [base64.b64decode(p["insns"]) for p in e["progs"]]
    assert [objcache.referenced_fds(i) for i in insns] == [[0, 2], [1, 0], [0]]
    assert e["license"] == "GPL" and e["bcc"] == "0.26.0"
    assert e["tracepoint"] == REQUEST["tracepoint"] and e["reply"]["maps"] == REPLY["maps"]


def test_save_and_load_round_trip(tmp_path):
    d = str(tmp_path / "cache")
    assert objcache.usable_dir(d) == d
    assert os.stat(d).st_mode & 0o777 == 0o700
    e = entry()
    assert objcache.save(d, e)
    assert objcache.load(d, e["key"]) == e
    assert os.listdir(d) == [e["key"] + ".json"]           # no temp file left behind
    assert objcache.load(d, "0" * 64) is None


def test_save_keeps_the_newest_entries(tmp_path):
    d = str(tmp_path)
    keys = [key(text=f"int x{i};") for i in range(11)]
    for i, k in enumerate(keys):
        assert objcache.save(d, entry(k), keep=8)
        os.utime(objcache.entry_path(d, k), ns=(i * 10**9, i * 10**9))
    objcache.prune(d, keep=8)
    assert sorted(os.listdir(d)) == sorted(k + ".json" for k in keys[3:])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "digest", "other_key", "format",
                                    "bad_index", "group_writable"])
def test_damaged_entry_is_a_miss_and_removed(tmp_path, damage):
    d = str(tmp_path)
    e = entry()
    objcache.save(d, e)
    path = objcache.entry_path(d, e["key"])
    raw = open(path, "rb").read()
    if damage == "truncate":
        open(path, "wb").write(raw[: len(raw) // 2])
    elif damage == "garbage":
        open(path, "wb").write(b"\x00\xff" * 100)
    elif damage == "empty":
        open(path, "wb").close()
    elif damage == "group_writable":
        os.chmod(path, 0o620)
    else:
        bad = json.loads(raw)
        if damage == "digest":               # one instruction changed, digest not recomputed
            ins = bytearray(base64.b64decode(bad["progs"][0]["insns"]))
            ins[0] ^= 1
            bad["progs"][0]["insns"] = base64.b64encode(bytes(ins)).decode()
        elif damage == "other_key":
            bad["key"] = "f" * 64
            bad["digest"] = objcache._digest(bad)
        elif damage == "format":
            bad["format"] = 99
        elif damage == "bad_index":          # well-formed, digest right, a map index out of range
            bad["progs"][0]["insns"] = base64.b64encode(program([7])).decode()
            bad["digest"] = objcache._digest(bad)
        open(path, "w").write(json.dumps(bad))
    assert objcache.load(d, e["key"]) is None
    assert not os.path.exists(path)
    assert objcache.save(d, e) and objcache.load(d, e["key"]) == e     # and replaced


def test_symlinked_entry_is_not_followed(tmp_path):
    d = tmp_path / "c"
    d.mkdir(mode=0o700)
    e = entry()
    objcache.save(str(tmp_path), e)
    os.symlink(objcache.entry_path(str(tmp_path), e["key"]), objcache.entry_path(str(d), e["key"]))
    assert objcache.load(str(d), e["key"]) is None


# -- trust ----------------------------------------------------------------------------------
def test_dir_is_created_0700(tmp_path):
    d = tmp_path / "a" / "b"
    assert objcache.usable_dir(str(d)) == str(d)
    assert d.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("mode", [0o770, 0o702, 0o777])
def test_dir_writable_by_others_is_ignored(tmp_path, mode):
    d = tmp_path / "c"
    d.mkdir()
    os.chmod(d, mode)
    assert objcache.usable_dir(str(d)) is None
    assert not objcache.save(str(d), entry())
    assert os.listdir(d) == []


def test_dir_owned_by_someone_else_is_ignored(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    d = tmp_path / "c"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    assert objcache.usable_dir(str(d)) is None


def test_not_a_dir_or_off_is_ignored(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert objcache.usable_dir(str(f)) is None
    assert objcache.usable_dir(None) is None
    assert objcache.usable_dir(str(f / "sub")) is None      # cannot be created: no crash


# -- instantiate: everything opened is closed again on failure ---------------------------------
def test_instantiate_failure_closes_what_it_opened(monkeypatch):
    opened = []

    def fake_map_create(*a, **k):
        fd = os.open(os.devnull, os.O_RDONLY)
        opened.append(fd)
        return fd

    def refuse(*a, **k):
        raise bpfsys.ProgLoadError(13, "Permission denied", "R1 invalid mem access")

    monkeypatch.setattr(bpfsys, "map_create", fake_map_create)
    monkeypatch.setattr(bpfsys, "prog_load", refuse)
    with pytest.raises(bpfsys.ProgLoadError):
        objcache.instantiate(entry())
    assert len(opened) == 3
    for fd in opened:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_instantiate_hands_over_the_reply_order(monkeypatch):
    made = {}

    def fake_open(kind):
        def f(*a, **k):
            fd = os.open(os.devnull, os.O_RDONLY)
            made[fd] = (kind, a)
            return fd
        return f

    monkeypatch.setattr(bpfsys, "map_create", fake_open("map"))
    monkeypatch.setattr(bpfsys, "prog_load", fake_open("prog"))
    monkeypatch.setattr(bpfsys, "perf_event_open_tracepoint", fake_open("perf"))
    monkeypatch.setattr(bpfsys, "perf_event_attach_bpf", lambda perf, prog: made.setdefault("attached", (perf, prog)))
    monkeypatch.setattr(objcache, "tracepoint_id", lambda tp: 1234)
    got = objcache.instantiate(entry())
    try:
        kinds = [made[fd][0] for fd in got.fds]
        assert kinds == ["prog", "prog", "map", "map", "perf"]
        assert [made[fd][1][-1] for fd in got.fds[2:4]] == ["flows", "events"]     # map names
        # the programs were loaded with the new fds of their maps, in the entry's order
        map_fds = sorted(fd for fd, v in made.items() if isinstance(fd, int) and v[0] == "map")
        loaded = [v[1][1] for fd, v in sorted((fd, v) for fd, v in made.items() if isinstance(fd, int))
                  if v[0] == "prog"]
        assert objcache.referenced_fds(loaded[0]) == [map_fds[0], map_fds[2]]
        assert made["attached"][0] == got.fds[4]
        assert got.reply["progs"] == ["nf_a", "nf_b"] and got.reply["tracepoint"] is True
    finally:
        for fd in got.fds:
            os.close(fd)
