"""The summary record (records/schema.py SUMMARY and MAPPING) from the roll-up's figures.

The live session writes it at exit (and builds it once a second for the sinks that tick);
`summary` and `report` rebuild the same figures from a capture through the same roll-up.
"""
from __future__ import annotations

from typing import Optional

from bpftrace_hostport.analysis.rollup import Figures
from bpftrace_hostport.records.schema import field_names

MAPPING_FIELDS = tuple(field_names("mapping"))


def summary_record(fig: Figures, duration_s: float, lost_events: Optional[int]) -> dict:
    """A "summary" record: per mapping the figures of MAPPING, in report order."""
    mappings = [{k: m[k] for k in MAPPING_FIELDS} for m in fig.mappings]
    return {"type": "summary", "duration_s": round(float(duration_s or 0.0), 3),
            "lost_events": int(lost_events or 0),
            "flows": int(sum(m["flows"] for m in mappings)), "mappings": mappings}


def summarize_records(flows, misses=(), duration_s: float = 0.0, lost_events: int = 0) -> dict:
    """The summary record of JSON flow and miss records (tests, small captures), through the
    same roll-up as everything else."""
    from bpftrace_hostport.analysis.rollup import Rollup
    from bpftrace_hostport.records.batch import FlowBatch
    r = Rollup(series=False, clients=False)
    r.add_flows(FlowBatch.from_records(list(flows)))
    r.add_misses(list(misses))
    return summary_record(r.figures(), duration_s, lost_events)
