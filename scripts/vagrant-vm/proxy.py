#!/usr/bin/env python3
"""The package-registry proxy for scripts/check-vagrant-vm.sh's guest.

libvirt, its network and the guest live in a network namespace of their own that has no route
out. This proxy takes the one step across: its listening socket is made inside that namespace
(setns, bind, setns back), and every connection it makes afterwards comes from the namespace it
was started in (the root one), where the registries are reachable. Only the hosts and ports named
with --allow and --ports are served; everything else gets 403.

Two kinds of request, which is what apt and pip send through an HTTP proxy:
  CONNECT host:443          (https: a byte tunnel, TLS end to end)
  GET http://host/path ...  (plain http, absolute-form: forwarded in origin-form; keep-alive and
                             pipelining kept, one upstream host per client connection)
One log line per connection (method, host:port, result, bytes each way) to --log.
Standard library only: it runs with the machine's python3, before any virtualenv exists.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import sys
import threading
import time

CLONE_NEWNET = 0x40000000
IDLE_S = 300           # a connection quiet for this long is closed
MAX_HEAD = 64 * 1024
HOP_HEADERS = {b"proxy-connection", b"proxy-authorization", b"proxy-authenticate"}

_libc = ctypes.CDLL(None, use_errno=True)
_log_lock = threading.Lock()
_log_file = None


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open as fd (threads started later
    from it inherit it)."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def log(*fields) -> None:
    line = time.strftime("%H:%M:%S ") + " ".join(str(f) for f in fields) + "\n"
    with _log_lock:
        _log_file.write(line)
        _log_file.flush()


def listen_in(netns: str, port: int) -> socket.socket:
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(netns, os.O_RDONLY)
    try:
        setns(target)
        try:
            srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind(("0.0.0.0", port))
            srv.listen(64)
        finally:
            setns(home)
    finally:
        os.close(target)
        os.close(home)
    return srv


def read_head(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
    """-> (request head up to and without the blank line, bytes after it); (b"", b"") at EOF."""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEAD:
            raise ValueError("request head too long")
        chunk = sock.recv(65536)
        if not chunk:
            return b"", b""
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def split_target(hostport: str, default_port: int) -> tuple[str, int]:
    if hostport.startswith("["):
        host, _, port = hostport[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = hostport.partition(":")
    return host.lower(), int(port) if port else default_port


def origin_form(target: bytes) -> tuple[str | None, bytes]:
    """b"http://host:port/path?q" -> ("host:port", b"/path?q"); an origin-form target as it is."""
    if not target.startswith(b"http://"):
        return None, target
    hostport, _, path = target[7:].partition(b"/")
    return hostport.decode("latin-1"), b"/" + path


class Proxy:
    def __init__(self, allow: set[str], ports: set[int]):
        self.allow, self.ports = allow, ports

    def allowed(self, host: str, port: int) -> bool:
        return host in self.allow and port in self.ports

    def serve(self, srv: socket.socket) -> None:
        while True:
            cli, addr = srv.accept()
            threading.Thread(target=self.handle, args=(cli, addr[0]), daemon=True).start()

    def handle(self, cli: socket.socket, peer: str) -> None:
        up = None
        counts = [0, 0]
        what = "?"
        try:
            cli.settimeout(IDLE_S)
            head, rest = read_head(cli, b"")
            if not head:
                return
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, target, _version = line.split(" ", 2)
            if method == "CONNECT":
                host, port = split_target(target, 443)
                what = f"CONNECT {host}:{port}"
                if not self.allowed(host, port):
                    cli.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                    log(peer, what, "denied")
                    return
                up = socket.create_connection((host, port), timeout=30)
                up.settimeout(IDLE_S)
                cli.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                if rest:
                    up.sendall(rest)
                    counts[0] += len(rest)
                t = threading.Thread(target=self.pump, args=(up, cli, counts, 1), daemon=True)
                t.start()
                self.pump(cli, up, counts, 0)
                t.join()
            else:
                if not target.startswith("http://"):
                    cli.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    log(peer, method, target[:80], "not a proxy request")
                    return
                host, port = split_target(target[7:].split("/", 1)[0], 80)
                what = f"{method} {host}:{port}"
                if not self.allowed(host, port):
                    cli.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                    log(peer, what, "denied")
                    return
                up = socket.create_connection((host, port), timeout=30)
                up.settimeout(IDLE_S)
                t = threading.Thread(target=self.pump, args=(up, cli, counts, 1), daemon=True)
                t.start()
                self.forward_requests(cli, up, head, rest, host, port, counts)
                t.join()
            log(peer, what, "ok", f"up {counts[0]}", f"down {counts[1]}")
        except (OSError, ValueError) as e:
            log(peer, what, "error", type(e).__name__, str(e)[:120])
        finally:
            for s in (cli, up):
                if s is not None:
                    s.close()

    def forward_requests(self, cli, up, head, rest, host, port, counts) -> None:
        """Plain http: each request head rewritten to origin-form, its body (Content-Length)
        passed through; stops at EOF or when a request names another host."""
        while head:
            lines = head.split(b"\r\n")
            method, target, version = lines[0].split(b" ", 2)
            hostport, path = origin_form(target)
            if hostport is not None and split_target(hostport, 80) != (host, port):
                break           # apt keeps one connection per host; a client that does not reconnects
            kept = [ln for ln in lines[1:] if ln.split(b":", 1)[0].strip().lower() not in HOP_HEADERS]
            length = 0
            for ln in kept:
                name, _, value = ln.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
                if name.strip().lower() == b"transfer-encoding":
                    raise ValueError("chunked request bodies are not supported")
            out = b"\r\n".join([b" ".join([method, path, version])] + kept) + b"\r\n\r\n"
            up.sendall(out)
            counts[0] += len(out)
            body, rest = rest[:length], rest[length:]
            while len(body) < length:
                chunk = cli.recv(min(65536, length - len(body)))
                if not chunk:
                    raise ValueError("client closed inside a request body")
                body += chunk
            if body:
                up.sendall(body)
                counts[0] += len(body)
            head, rest = read_head(cli, rest)
        try:
            up.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    @staticmethod
    def pump(src, dst, counts, i) -> None:
        try:
            while True:
                chunk = src.recv(65536)
                if not chunk:
                    break
                dst.sendall(chunk)
                counts[i] += len(chunk)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--netns", required=True, help="the namespace to listen in (/run/netns/NAME)")
    ap.add_argument("--port", type=int, default=3128)
    ap.add_argument("--allow", required=True, help="comma-separated host names to serve")
    ap.add_argument("--ports", default="80,443", help="comma-separated ports to serve")
    ap.add_argument("--log", required=True)
    ap.add_argument("--ready-file", required=True, help="written once the socket listens")
    a = ap.parse_args()
    global _log_file
    _log_file = open(a.log, "a", buffering=1)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    try:
        srv = listen_in(a.netns, a.port)
    except OSError as e:
        print(f"proxy: cannot listen on port {a.port} in {a.netns}: {e}", file=sys.stderr)
        return 2
    allow = {h.strip().lower() for h in a.allow.split(",") if h.strip()}
    ports = {int(p) for p in a.ports.split(",") if p.strip()}
    log("listening", f"port {a.port} in {a.netns}; serving", ",".join(sorted(allow)), "ports",
        ",".join(map(str, sorted(ports))))
    with open(a.ready_file, "w") as f:
        f.write(f"{os.getpid()}\n")
    Proxy(allow, ports).serve(srv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
