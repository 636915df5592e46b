"""Capture: what a reader hands to `report` and `export`, whatever file it came from."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List


@dataclass
class Capture:
    """One or more capture files (JSON lines or recordings), read.

    flows   pandas DataFrame, one row per flow: every field of schema.FLOW except `type`
            (`ts` as datetime64[ns, UTC]; ints as nullable Int64 where the schema allows
            null; strings as object), plus `node` (str, from the file's header; "" unknown)
            and `source` (the file it came from).
    misses  DataFrame of schema.MISS fields except `type`, plus `node` and `source`.
    summaries  the files' summary records (dicts of schema.SUMMARY), each with "node" and
            "source" added; the kernel's per-mapping totals are authoritative for flows,
            packets, bytes, drops and misses.
    headers the files' capture headers (schema.CAPTURE dicts; a synthesized one, with
            "schema": 1, for captures written before headers existed), each with "source".
    snapshots  pods/rules snapshots: dicts {"kind": "pods"|"rules", "ts": iso, "node": ...,
            "items": [...], "source": ...}.
    notes   one sentence each: a torn tail, a missing end marker, a missing summary...
    truncated  True when any file did not end cleanly (figures cover only what was read).
    """
    flows: Any
    misses: Any
    summaries: List[Dict[str, Any]] = field(default_factory=list)
    headers: List[Dict[str, Any]] = field(default_factory=list)
    snapshots: List[Dict[str, Any]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    truncated: bool = False
