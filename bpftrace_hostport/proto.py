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


#: Kubernetes spells protocols in upper case (ContainerPort.protocol, the nat rules' mappings).
K8S = ("TCP", "UDP", "SCTP")


def k8s(value) -> "str | None":
    """'tcp', 'TCP', '6', 6 -> 'TCP' (as Kubernetes spells it); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return NAMES[value].upper() if value in NAMES else None
    text = str(value or "").strip().lower()
    if text.isdigit() and text.isascii():
        return NAMES[int(text)].upper() if len(text) <= 3 and int(text) in NAMES else None
    return text.upper() if text in NUMBERS else None
