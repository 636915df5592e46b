"""Protocol and hook names: the one table every module uses."""
from __future__ import annotations

import socket
from typing import Union

NAMES = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", 132: "sctp"}
NUMBERS = {v: k for k, v in NAMES.items()}
ALL = ("tcp", "udp", "sctp")
MASK_BITS = {"tcp": 1, "udp": 2, "sctp": 4}      # struct config.proto_mask (bpf/events.h)

HOOKS = {0: "prerouting", 1: "output"}            # HOOK_* in bpf/events.h
HOOK_NUMBERS = {v: k for k, v in HOOKS.items()}


def name(number: int) -> str:
    return NAMES.get(int(number)) or str(int(number))


def number(value: Union[str, int]) -> int:
    """'tcp' / 'TCP' / 6 / '6' -> 6; ValueError for anything else."""
    if isinstance(value, int):
        return value
    v = str(value).strip().lower()
    if v in NUMBERS:
        return NUMBERS[v]
    return int(v)


def hook_number(value: str) -> int:
    return HOOK_NUMBERS[value] if value in HOOK_NUMBERS else int(value)
