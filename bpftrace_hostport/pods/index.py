"""Answers "which pod and port is this IP:port?" from a list of PodInfo records.

A hostNetwork pod shares the node's IPs, so an address match on it is never pinned on one
pod: it is labelled hostNetwork instead, unless exactly one hostNetwork pod declares that
port (then that pod is the one listening on the node's socket).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Set, Tuple

from bpftrace_hostport.model import ContainerPort, PodInfo

Names = Tuple[Optional[str], Optional[str], Optional[str]]


class PodIndex:
    def __init__(self, pods: Iterable[PodInfo] = ()):
        self.pods: List[PodInfo] = []
        self._by_ip: Dict[str, List[PodInfo]] = {}
        self._host_network: List[PodInfo] = []
        self.extend(pods)

    def extend(self, pods: Iterable[PodInfo]) -> None:
        for p in pods:
            self.pods.append(p)
            if p.host_network:
                self._host_network.append(p)
                continue
            for ip in p.ips:
                self._by_ip.setdefault(ip, []).append(p)

    @staticmethod
    def _port(pod: PodInfo, proto: str, port: int) -> Optional[ContainerPort]:
        for cp in pod.ports:
            if cp.container_port == port and cp.protocol.lower() == proto.lower():
                return cp
        return None

    def lookup(self, proto: str, ip: str, port: int) -> Optional[Tuple[PodInfo, Optional[ContainerPort]]]:
        cands = self._by_ip.get(ip, [])
        # Prefer a running pod that declares the port: a recycled IP may name two pods.
        best = None
        for pod in cands:
            cp = self._port(pod, proto, port)
            score = (cp is not None, pod.phase in (None, "Running"))
            if best is None or score > best[0]:
                best = (score, pod, cp)
        if best:
            return best[1], best[2]
        return None

    def names(self, proto: str, ip: str, port: int) -> Optional[Names]:
        found = self.lookup(proto, ip, port)
        if not found:
            return None
        pod, cp = found
        return pod.namespace, pod.name, (cp.name if cp else None)

    def host_network_owner(self, proto: str, host_port: int) -> Optional[PodInfo]:
        owners = [p for p in self._host_network
                  if any(cp.host_port == host_port and cp.protocol.lower() == proto.lower()
                         for cp in p.ports)]
        return owners[0] if len(owners) == 1 else None

    def host_ports(self) -> Set[Tuple[str, int]]:
        out = set()
        for p in self.pods:
            for cp in p.ports:
                if cp.host_port:
                    out.add((cp.protocol.lower(), cp.host_port))
        return out
