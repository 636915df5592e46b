"""Compile and load the eBPF programs with bcc, in a short-lived child process.

The only module that imports bcc. loader.py runs it as
`python -m bpftrace_hostport.ebpf.compiler SOCKET_FD` with a JSON request on stdin, and gets back,
over a SOCK_SEQPACKET socket, one JSON reply plus the file descriptors of the loaded programs,
the maps and the tracepoint's perf event (SCM_RIGHTS). The child then exits: the kernel objects
live on through the tracer's descriptors, while bcc, LLVM and clang's compile heap (well over
100 MB) leave with the child instead of staying resident in the tracer.

Request: {"text": C source, "cflags": [...], "netfilter": [function names], "prog_type": int,
          "attach_type": int, "tracepoint": {"tp": "skb:kfree_skb", "fn": "..."} | null}
Reply:   {"ok": true, "progs": [names], "maps": [{"name", "key", "leaf"}], "tracepoint": bool}
         with fds in the order progs, maps, tracepoint perf fd;
         or {"ok": false, "kind": "compile" | "load" | "tracepoint", "message": ..., "log": ...}
"""
from __future__ import annotations

import json
import os
import socket
import sys
import tempfile


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
            b = BPF(text=req["text"], cflags=req["cflags"])
        except Exception as e:  # noqa: BLE001 - reported to the parent, which explains it
            os.dup2(saved, 2)
            log.seek(0)
            _send(sock, {"ok": False, "kind": "compile", "message": str(e), "log": log.read()[-4000:]})
            return 1
    finally:
        os.dup2(saved, 2)
    progs, fds = [], []
    try:
        for name in req["netfilter"]:
            fn = b.load_func(name, req["prog_type"], attach_type=req["attach_type"])
            progs.append(name)
            fds.append(fn.fd)
    except Exception as e:  # noqa: BLE001
        _send(sock, {"ok": False, "kind": "load", "message": str(e), "log": ""})
        return 1
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
    _send(sock, {"ok": True, "progs": progs, "maps": maps, "tracepoint": tp_ok}, fds)
    sock.recv(1)      # the parent holds the descriptors now
    return 0


if __name__ == "__main__":
    # os._exit: bcc's atexit cleanup would detach the tracepoint (PERF_EVENT_IOC_DISABLE acts on
    # the open file the parent now shares) and close what the parent still uses.
    sys.stdout.flush()
    os._exit(main())
