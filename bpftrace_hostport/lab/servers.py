"""The lab's pod servers: what runs on every containerPort of a lab pod.

TCP: a minimal HTTP/1.1 server that answers every request with its pod's name (one request
per connection, `Connection: close`), so a client can tell which pod a hostPort reached.
UDP: an echo that prefixes the pod's name. Started by lab.py inside the pod's network
namespace: `python -m bpftrace_hostport.lab.servers --pod NS/NAME --tcp 80 --udp 53`.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys


class _Http(asyncio.Protocol):
    def __init__(self, body: bytes):
        self.body = body
        self.buf = b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        if b"\r\n\r\n" in self.buf or b"\n\n" in self.buf:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                b"Content-Length: " + str(len(self.body)).encode() + b"\r\n\r\n" + self.body)
            self.transport.close()
        elif len(self.buf) > 65536:
            self.transport.close()


class _Echo(asyncio.DatagramProtocol):
    def __init__(self, prefix: bytes):
        self.prefix = prefix

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(self.prefix + data, addr)


def _families():
    fams = [socket.AF_INET]
    if socket.has_ipv6 and os.path.exists("/proc/net/if_inet6"):
        fams.append(socket.AF_INET6)
    return fams


async def serve(pod: str, tcp_ports, udp_ports, ready_fd=None, bind=None):
    loop = asyncio.get_running_loop()
    body = (pod + "\n").encode()
    servers = []
    if bind:       # one address only (a node daemon on 127.0.0.1, a stand-in on a ClusterIP)
        fam = socket.AF_INET6 if ":" in bind else socket.AF_INET
        for port in tcp_ports:
            sock = socket.socket(fam, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((bind, port))
            sock.listen(4096)
            servers.append(await loop.create_server(lambda: _Http(body), sock=sock))
        for port in udp_ports:
            sock = socket.socket(fam, socket.SOCK_DGRAM)
            sock.bind((bind, port))
            await loop.create_datagram_endpoint(lambda: _Echo((pod + " ").encode()), sock=sock)
        tcp_ports, udp_ports = [], []
    for port in tcp_ports:
        # One dual-stack listener: "::" with IPV6_V6ONLY off accepts IPv4 as well.
        for fam in _families()[::-1][:1]:
            sock = socket.socket(fam, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", port))
            sock.listen(4096)
            servers.append(await loop.create_server(lambda: _Http(body), sock=sock))
    for port in udp_ports:
        for fam in _families():
            sock = socket.socket(fam, socket.SOCK_DGRAM)
            if fam == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", port))
            await loop.create_datagram_endpoint(lambda: _Echo((pod + " ").encode()), sock=sock)
    if ready_fd is not None:
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pod", required=True)
    ap.add_argument("--tcp", type=int, action="append", default=[])
    ap.add_argument("--udp", type=int, action="append", default=[])
    ap.add_argument("--ready-fd", type=int)
    ap.add_argument("--bind", help="listen on this address only")
    a = ap.parse_args(argv)
    try:
        asyncio.run(serve(a.pod, a.tcp, a.udp, a.ready_fd, a.bind))
    except OSError as e:
        print(f"labserver {a.pod}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
