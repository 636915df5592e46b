"""How an address with a port is written for people: the one formatter every output uses.

"10.0.0.1:80", "[fd00::1]:80" (an IPv6 address is bracketed when a port follows, as in a URL,
so the port can be told from the address), "8000/tcp" for a hostPort. The terminal, the live
view, the report, the pcapng comments and the findings all write them through here.
"""
from __future__ import annotations

from typing import Optional

NONE = "-"


def endpoint(ip: Optional[str], port=None, none: str = NONE) -> str:
    """ "10.0.0.1:80", "[fd00::1]:80"; an address alone stays bare ("fd00::1"); None -> `none`."""
    if ip is None or ip == "":
        return none
    ip = str(ip)
    if port is None:
        return ip
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def hostport(port, proto: Optional[str] = None) -> str:
    """ "8000/tcp": a hostPort and its protocol (lower case, as the tool writes protocols)."""
    return f"{port}/{str(proto).lower()}" if proto else str(port)


def endpoint_proto(ip: Optional[str], port, proto: Optional[str]) -> str:
    """ "[fd00::1]:8000/tcp": where a request went, with its protocol."""
    return hostport(endpoint(ip, port), proto)
