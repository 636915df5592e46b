"""Domain records shared by every module: pods, their ports, and nat-rule mappings.

Plain frozen dataclasses with names instead of codes and None instead of sentinels.
Protocols are upper-case strings as Kubernetes spells them ("TCP", "UDP", "SCTP").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple


@dataclass(frozen=True)
class ContainerPort:
    container: str                 # container name
    container_port: int
    protocol: str = "TCP"          # "TCP" | "UDP" | "SCTP"
    name: Optional[str] = None     # the port's name ("http"), None when unnamed
    host_port: Optional[int] = None
    host_ip: Optional[str] = None


@dataclass(frozen=True)
class PodInfo:
    namespace: str
    name: str
    uid: Optional[str] = None
    node: Optional[str] = None
    ips: Tuple[str, ...] = ()      # status.podIPs (IPv4 and/or IPv6); the node's IPs when host_network
    host_network: bool = False
    ports: Tuple[ContainerPort, ...] = ()
    phase: Optional[str] = None
    start_time: Optional[str] = None   # ISO 8601 as the API gives it
    container_ids: Tuple[str, ...] = field(default=(), compare=False)  # sandbox / container ids when known

    @property
    def host_ports(self) -> Tuple[ContainerPort, ...]:
        return tuple(p for p in self.ports if p.host_port)


@dataclass(frozen=True)
class HostPortRule:
    """One DNAT mapping found in the node's nat rules."""
    proto: str                     # "TCP" | "UDP" | "SCTP"
    host_port: int
    target_ip: str
    target_port: int
    host_ip: Optional[str] = None  # destination address the rule is limited to, None = any local
    chain: Optional[str] = None    # e.g. "CNI-DN-1a2b..." or "cni_hostport/hostip_hostport"
    container_id: Optional[str] = None
    packets: Optional[int] = None
    bytes: Optional[int] = None
    source: str = "iptables"       # "iptables-nft" | "iptables-legacy" | "nftables" | "crio" | "docker"
    family: int = 4                # 4 | 6
