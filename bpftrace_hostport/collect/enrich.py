"""Enrichment: pod names are attached once, per batch, after decoding and before the sinks.

The decoder knows bytes, this step knows pods, the sinks know neither (STYLE.md, habit 11).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from bpftrace_hostport import proto as protomod
from bpftrace_hostport.records.batch import AddrNames, FlowBatch, group_rows


class Enricher:
    def __init__(self, index):
        self.index = index                   # PodIndex or Resolver: names(), host_network_owner()
        self._names: Dict[Tuple[int, bytes, int, int], Optional[tuple]] = {}
        self._addr = AddrNames()

    def forget(self) -> None:
        """Pods change: drop the cached answers (called once a second)."""
        self._names.clear()

    def flows(self, b: FlowBatch) -> FlowBatch:
        """Fills b.pods and the `pod` column from (proto, pod address, pod port)."""
        n = len(b)
        if n == 0 or self.index is None:
            return b
        first, inv = group_rows(b["proto"], b["family"], b["pod_addr"], b["pod_port"])
        table: List[tuple] = []
        slot = np.full(len(first), -1, np.int32)
        for j, i in enumerate(first.tolist()):
            names = self._lookup(int(b["proto"][i]), b["pod_addr"][i].tobytes(), int(b["family"][i]),
                                 int(b["pod_port"][i]))
            if names and any(v is not None for v in names):
                slot[j] = len(table)
                table.append(tuple(names))
        b.pods = table
        b.cols["pod"] = slot[inv]
        return b

    def _lookup(self, proto: int, raw: bytes, family: int, port: int) -> Optional[tuple]:
        key = (proto, raw, family, port)
        if key not in self._names:
            self._names[key] = self.index.names(protomod.name(proto), self._addr(raw, family), port)
        return self._names[key]

    def misses(self, recs: List[dict]) -> List[dict]:
        """Adds the hostNetwork pod that owns a missed port, when one does."""
        for r in recs:
            owner = self.index.host_network_owner(r["proto"], r["host_port"]) if self.index else None
            r["pod_namespace"] = owner.namespace if owner else None
            r["pod_name"] = owner.name if owner else None
        return recs
