"""Compile and load the eBPF programs with bcc, in a short-lived child process.

The only module that imports bcc. loader.py runs it as
`python -m bpftrace_hostport.ebpf.compiler SOCKET_FD` with a JSON request on stdin, and gets back,
over a SOCK_SEQPACKET socket, one JSON reply plus the file descriptors of the loaded programs,
the maps and the tracepoint's perf event (SCM_RIGHTS). The child then exits: the kernel objects
live on through the tracer's descriptors, while bcc, LLVM and clang's compile heap (well over
100 MB) leave with the child instead of staying resident in the tracer.

Request: {"text": C source, "cflags": [...], "netfilter": [function names], "prog_type": int,
          "attach_type": int, "maps": [names], "tracepoint": {"tp": "skb:kfree_skb", "fn": "..."} | null,
          "cache": {"dir": path, "key": sha256} (optional)}
Reply:   {"ok": true, "progs": [names], "maps": [{"name", "key", "leaf"}], "tracepoint": bool}
         with fds in the order progs, maps, tracepoint perf fd;
         or {"ok": false, "kind": "compile" | "load" | "tracepoint", "message": ..., "log": ...}

With "cache" in the request, the child also stores what it loaded in the compile cache
(objcache.py) before it replies, so that the next start with the same key needs no compile.
A failure to store is silent: the reply is the same either way.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import sys
import tempfile
import threading


def _send(sock: socket.socket, reply: dict, fds=()) -> None:
    socket.send_fds(sock, [json.dumps(reply).encode()], list(fds))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(argv[0]))
    req = json.loads(sys.stdin.read())
    from bcc import BPF   # noqa: E402 - the child exists to import it

    from bpftrace_hostport.ebpf.bpfsys import desc_from_ctype

    log = tempfile.NamedTemporaryFile("w+", suffix=".log")
    saved = os.dup(2)
    os.dup2(log.fileno(), 2)      # clang prints straight to fd 2
    try:
        try:
            with _heap_trimmed():
                b = BPF(text=req["text"], cflags=req["cflags"])
        except Exception as e:  # noqa: BLE001 - reported to the parent, which explains it
            os.dup2(saved, 2)
            log.seek(0)
            _send(sock, {"ok": False, "kind": "compile", "message": str(e), "log": log.read()[-4000:]})
            return 1
    finally:
        os.dup2(saved, 2)
    progs, fds = [], []
    log.seek(0)
    log.truncate()
    os.dup2(log.fileno(), 2)      # bcc prints the verifier's log there when a load fails
    try:
        for name in req["netfilter"]:
            fn = b.load_func(name, req["prog_type"], attach_type=req["attach_type"])
            progs.append(name)
            fds.append(fn.fd)
    except Exception as e:  # noqa: BLE001
        os.dup2(saved, 2)
        log.seek(0)
        _send(sock, {"ok": False, "kind": "load", "message": str(e), "log": log.read()[-8000:]})
        return 1
    finally:
        os.dup2(saved, 2)
    maps = []
    for name in req["maps"]:
        t = b[name]
        leaf = getattr(t, "sLeaf", t.Leaf)      # per-CPU tables: the one-CPU value type
        key = getattr(t, "Key", None)            # queues and stacks have no key
        maps.append({"name": name, "key": None if key is None else desc_from_ctype(key),
                     "leaf": desc_from_ctype(leaf)})
        fds.append(t.map_fd)
    tp_ok = False
    if req.get("tracepoint"):
        tp = req["tracepoint"]
        try:
            b.attach_tracepoint(tp=tp["tp"], fn_name=tp["fn"])
            fds.append(b.tracepoint_fds[tp["tp"].encode()])
            tp_ok = True
        except Exception as e:  # noqa: BLE001
            _send(sock, {"ok": False, "kind": "tracepoint", "message": str(e), "log": ""})
            return 1
    reply = {"ok": True, "progs": progs, "maps": maps, "tracepoint": tp_ok}
    if req.get("cache"):
        _save_cache_entry(b, req, reply)
    _send(sock, reply, fds)
    sock.recv(1)      # the parent holds the descriptors now
    return 0


@contextlib.contextmanager
def _heap_trimmed(period_s: float = 0.02):
    """Hands the heap that clang and LLVM free back to the kernel while they compile.

    clang parses the program twice (bcc's rewrite, then the compile) and frees each parse's
    AST, but glibc keeps the freed heap mapped (about 24 MB here); the code generation that
    follows maps another 10-15 MB of LLVM's code on top of it. A thread calling malloc_trim
    every period_s (ctypes releases the GIL while bcc compiles) returns that heap as soon as
    it is free, so the child's peak is its first parse instead of the end of the compile:
    about 5 MB less beside the tracer. Without glibc (no malloc_trim) nothing changes."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is None:
        yield
        return
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    done = threading.Event()

    def run() -> None:
        while not done.wait(period_s):
            trim(0)

    thread = threading.Thread(target=run, name="malloc-trim", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        trim(0)


def _save_cache_entry(b, req: dict, reply: dict) -> bool:
    """The loaded programs' instructions and their maps' parameters, into the compile cache."""
    try:
        import bcc
        from bcc import BPF, lib
        from bpftrace_hostport.ebpf import bpfsys, objcache
        progs = [(name, req["prog_type"], req["attach_type"], b.dump_func(name)) for name in reply["progs"]]
        if reply["tracepoint"]:
            progs.append((req["tracepoint"]["fn"], BPF.TRACEPOINT, 0, b.dump_func(req["tracepoint"]["fn"])))
        lic = lib.bpf_module_license(b.module)
        entry = objcache.make_entry(
            req["cache"]["key"], req, reply, progs, {name: b[name].map_fd for name in req["maps"]},
            bpfsys.map_info, lic.decode() if isinstance(lic, bytes) else str(lic or "GPL"),
            lib.bpf_module_kern_version(b.module), str(getattr(bcc, "__version__", "unknown")))
        return objcache.save(req["cache"]["dir"], entry)
    except Exception:  # noqa: BLE001 - the cache is an optimisation: never fail the compile for it
        return False


if __name__ == "__main__":
    # os._exit: bcc's atexit cleanup would detach the tracepoint (PERF_EVENT_IOC_DISABLE acts on
    # the open file the parent now shares) and close what the parent still uses.
    sys.stdout.flush()
    os._exit(main())
