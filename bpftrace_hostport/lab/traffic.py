"""The lab's traffic generator: real requests through a hostPort, bounded in count and time.

Runs inside a client's network namespace (lab.py starts it there) and prints one JSON object:
{"sent", "answered", "failed", "by_pod": {pod: n}, "errors": {text: n}, "elapsed_s"}, and with
--port-base N also "flows": [[client port, what the client saw], ...], request i going from
port N + i: "answered", "refused" (a reset: ECONNREFUSED; for UDP an ICMP port unreachable),
"unreachable" (EHOSTUNREACH / ENETUNREACH: an ICMP error), "timeout" (nothing came back).
TCP: one HTTP GET per connection. UDP: one datagram per request, answered by the pod's echo.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from collections import Counter


def _local(host, source, sport):
    if not source and not sport:
        return {}
    return {"local_addr": (source or ("::" if ":" in host else "0.0.0.0"), sport or 0)}


async def _tcp_once(host, port, timeout, source, sport):
    kw = _local(host, source, sport)
    r, w = await asyncio.wait_for(asyncio.open_connection(host, port, **kw), timeout)
    try:
        w.write(b"GET / HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(r.read(), timeout)
    finally:
        w.close()
    body = data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace").strip()
    if not data.startswith(b"HTTP/1.1 200"):
        raise RuntimeError("bad answer")
    return body


class _UdpOnce(asyncio.DatagramProtocol):
    def __init__(self):
        self.fut = asyncio.get_running_loop().create_future()

    def datagram_received(self, data, addr):
        if not self.fut.done():
            self.fut.set_result(data)

    def error_received(self, exc):
        if not self.fut.done():
            self.fut.set_exception(exc)


async def _udp_once(host, port, timeout, source, sport, payload=b"ping"):
    loop = asyncio.get_running_loop()
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    kw = _local(host, source, sport)
    # A fixed source port keeps one conntrack entry for the whole stream (stale-udp scenario).
    tr, proto = await loop.create_datagram_endpoint(_UdpOnce, remote_addr=(host, port), family=fam,
                                                    reuse_port=bool(sport), **kw)
    # Every ICMP error reported, not only the "hard" ones: without IP_RECVERR a UDP socket
    # keeps quiet about host and network unreachable (RFC 1122 4.1.3.3), which it did receive.
    sock = tr.get_extra_info("socket")
    if fam == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, getattr(socket, "IPV6_RECVERR", 25), 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_RECVERR", 11), 1)
    try:
        tr.sendto(payload)
        data = await asyncio.wait_for(proto.fut, timeout)
    finally:
        tr.close()
    return data.decode(errors="replace").split(" ", 1)[0]


def seen(exc: BaseException) -> str:
    """What a client saw, from the error its request ended with."""
    import errno
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES,
                                                  errno.EPERM):
        return "unreachable"
    return "error"


async def run(host, port, proto, count, rate, concurrency, timeout, source, max_seconds,
              sport=None, ready_fd=None, ready_after=0, port_base=None):
    sem = asyncio.Semaphore(concurrency)
    res = {"sent": 0, "answered": 0, "failed": 0}
    by_pod, errors = Counter(), Counter()
    flows = []
    start = time.monotonic()
    once = _tcp_once if proto == "tcp" else _udp_once

    async def one(i):
        p = port_base + i if port_base else sport
        try:
            pod = await once(host, port, timeout, source, p)
            res["answered"] += 1
            by_pod[pod] += 1
            flows.append([p, "answered"])
        except Exception as e:  # noqa: BLE001 - every failure is counted, by kind
            res["failed"] += 1
            errors[type(e).__name__ if not str(e) else str(e)[:60]] += 1
            flows.append([p, seen(e)])
        finally:
            sem.release()

    tasks = []
    for i in range(count):
        if time.monotonic() - start > max_seconds:
            break
        if rate:
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await sem.acquire()
        if ready_fd is not None and res["sent"] >= ready_after:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)
            ready_fd = None
        res["sent"] += 1
        tasks.append(asyncio.ensure_future(one(i)))
    if tasks:
        await asyncio.gather(*tasks)
    if port_base:
        res["flows"] = sorted(flows)
    res["by_pod"] = dict(by_pod)
    res["errors"] = dict(errors)
    res["elapsed_s"] = round(time.monotonic() - start, 3)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--proto", choices=["tcp", "udp"], default="tcp")
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--rate", type=float, default=0.0)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--source")
    ap.add_argument("--max-seconds", type=float, default=120.0)
    ap.add_argument("--source-port", type=int)
    ap.add_argument("--ready-fd", type=int, help="write 'ready' here once --ready-after requests were sent")
    ap.add_argument("--ready-after", type=int, default=0)
    ap.add_argument("--port-base", type=int, help="request i from client port N + i; report each")
    a = ap.parse_args(argv)
    res = asyncio.run(run(a.host, a.port, a.proto, a.count, a.rate, max(1, a.concurrency),
                          a.timeout, a.source, a.max_seconds, a.source_port, a.ready_fd,
                          a.ready_after, a.port_base))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
