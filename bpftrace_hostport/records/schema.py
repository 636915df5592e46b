"""The record schema: one declaration of every record the tool writes, used by every writer
and reader, the README's tables and the tests.

Two encodings share these fields:

* JSON lines (`trace --format json`, `export --to jsonl`): one object per line, `type` says
  which record; the first line of a capture is a `capture` header carrying `schema`.
  Captures written before the header existed (schema 1) are read the same way.
* The recording (`trace --record`, records/recording.py): an Apache Arrow IPC stream whose
  columns are RECORDING_SCHEMA below; `record` says which record a row is.

SCHEMA_VERSION counts incompatible changes of either encoding. Readers accept every version
up to theirs and refuse newer ones with one sentence.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Tuple

SCHEMA_VERSION = 4            # 1: JSON lines without a header (before 0.2); 2: header + recording;
                              # 3: the recording's strings plain, not dictionary-encoded;
                              # 4: flow outcomes (answered, refused, unanswered, pending)
RECORDING_MAGIC = "bpftrace-hostport-recording"


@dataclass(frozen=True)
class Field:
    name: str
    type: str                 # JSON type as written: string, integer, number, boolean, object
    nullable: bool
    unit: str                 # "" when none
    meaning: str


def _f(name, typ, meaning, unit="", nullable=False) -> Field:
    return Field(name, typ, nullable, unit, meaning)


FLOW: Tuple[Field, ...] = (
    _f("type", "string", '"flow"'),
    _f("ts", "string", "first packet of the flow, ISO 8601", unit="UTC"),
    _f("proto", "string", "tcp, udp or sctp"),
    _f("family", "integer", "4 or 6"),
    _f("client_ip", "string", "the client as the node saw it (conntrack original source)"),
    _f("client_port", "integer", "the client's port"),
    _f("node_ip", "string", "the node address the client called"),
    _f("host_port", "integer", "the hostPort it called"),
    _f("pod_ip", "string", "where DNAT sent it (conntrack reply source)"),
    _f("pod_port", "integer", "the containerPort it reached"),
    _f("hook", "string", "prerouting (arrived at the node) or output (a node-local client)"),
    _f("answered", "boolean", "a real answer came back (outcome answered)"),
    _f("outcome", "string", "answered (a SYN-ACK, UDP/SCTP data from the pod), refused (a reset or "
       "an ICMP error), unanswered (nothing within --timeout) or pending (tracing ended first); "
       "null only in captures written before schema 4, where answered says it", nullable=True),
    _f("refusal", "string", "what refused it: reset, abort (SCTP), or the ICMP error: "
       "port-unreachable, host-unreachable, net-unreachable, protocol-unreachable, "
       "admin-prohibited, time-exceeded, parameter-problem, unreachable (null: not refused)",
       nullable=True),
    _f("refused_by", "string", "who sent the refusal: pod (from the pod's address), node (made on "
       "the node: a REJECT rule, a neighbour failure) or network (null: not refused)",
       nullable=True),
    _f("icmp_type", "integer", "the ICMP (IPv4) or ICMPv6 error's type (null: no ICMP error)",
       nullable=True),
    _f("icmp_code", "integer", "its code (null: no ICMP error)", nullable=True),
    _f("latency_us", "number", "first packet to first reply, for an answered flow (null: not "
       "answered, midstream or not measured by the backend)", unit="µs", nullable=True),
    _f("refusal_us", "number", "first packet to the refusal, for a refused flow (null: not "
       "refused, midstream or not measured)", unit="µs", nullable=True),
    _f("midstream", "boolean", "first seen mid-connection: it began before the tracer attached"),
    _f("masqueraded", "boolean", "the request was source-NATed on its way to the pod (null: not "
       "known, for an unanswered flow of a single packet)", nullable=True),
    _f("snat_ip", "string", "the source address it was NATed to", nullable=True),
    _f("packets", "integer", "packets in both directions so far (null: not measured)",
       unit="packets", nullable=True),
    _f("bytes", "integer", "bytes in both directions so far (null: not measured)",
       unit="bytes", nullable=True),
    _f("pod_namespace", "string", "the pod's namespace (null: unknown)", nullable=True),
    _f("pod_name", "string", "the pod's name (null: unknown)", nullable=True),
    _f("port_name", "string", "the container port's name (null: unknown or unnamed)", nullable=True),
    _f("drop_reason", "string", "kernel drop reason of a dropped packet of this flow "
       "(e.g. NETFILTER_DROP)", nullable=True),
)

MISS: Tuple[Field, ...] = (
    _f("type", "string", '"miss"'),
    _f("ts", "string", "last new miss counted for this key", unit="UTC"),
    _f("proto", "string", "tcp, udp or sctp"),
    _f("family", "integer", "4 or 6"),
    _f("client_ip", "string", "the client"),
    _f("node_ip", "string", "the node address it called"),
    _f("host_port", "integer", "the watched hostPort it called, with no DNAT"),
    _f("hook", "string", "prerouting or output"),
    _f("count", "integer", "new connections not DNATed since the previous record for this key",
       unit="connections"),
)

CAPTURE: Tuple[Field, ...] = (
    _f("type", "string", '"capture": the first line of a capture'),
    _f("schema", "integer", f"the schema version ({SCHEMA_VERSION})"),
    _f("tool", "string", "bpftrace-hostport and its version"),
    _f("session", "string", "the tracer run's id: every file of a rotated recording carries its "
       "run's (null: written before schema 4)", nullable=True),
    _f("backend", "string", "netfilter (eBPF) or conntrack (events: no latency, packets or misses)"),
    _f("node", "string", "the node's name", nullable=True),
    _f("kernel", "string", "uname -r of the node"),
    _f("netns", "string", "the traced network namespace (null: the tool's own)", nullable=True),
    _f("started", "string", "when tracing started, ISO 8601", unit="UTC"),
    _f("options", "object", "the trace options that shape what is seen (ports, protos, clients, "
       "timeout)"),
    _f("measures", "object", "which figures this backend measures: latency, packets, misses, drops "
       "(false: shown as unknown, never 0)"),
)

SUMMARY: Tuple[Field, ...] = (
    _f("type", "string", '"summary": the last line, at exit'),
    _f("duration_s", "number", "how long the tracer ran", unit="s"),
    _f("lost_events", "integer", "flows the kernel created that were never reported, plus "
       "counters that could not be created", unit="flows"),
    _f("flows", "integer", "flows over all mappings, as the kernel counted them", unit="flows"),
    _f("flows_reported", "integer", "flows written as records; with lost_events they make up every "
       "flow the kernel created (null: the backend cannot tell)", unit="flows", nullable=True),
    _f("backend", "string", "netfilter or conntrack", nullable=True),
    _f("kernel", "object", "the kernel side's raw counters (netfilter backend)", nullable=True),
    _f("mappings", "array", "one object per mapping: see the mapping fields"),
)

MAPPING: Tuple[Field, ...] = (
    _f("proto", "string", "tcp, udp or sctp"),
    _f("family", "integer", "4 or 6 (null: misses of both families)", nullable=True),
    _f("host_port", "integer", "the hostPort"),
    _f("pod_ip", "string", "where DNAT sent it (null: misses only, no DNAT happened)", nullable=True),
    _f("pod_port", "integer", "the containerPort", nullable=True),
    _f("pod_namespace", "string", "the pod's namespace", nullable=True),
    _f("pod_name", "string", "the pod's name (for a misses-only row: the hostNetwork pod that owns "
       "the port, when known)", nullable=True),
    _f("port_name", "string", "the container port's name", nullable=True),
    _f("flows", "integer", "flows (the kernel's per-mapping counter where it has one)", unit="flows"),
    _f("answered", "integer", "flows that got a real answer", unit="flows"),
    _f("refused", "integer", "flows refused: a reset or an ICMP error came back", unit="flows"),
    _f("refusals", "object", "refused flows by what refused them (reset, port-unreachable, ...)",
       unit="flows"),
    _f("refused_by", "object", "refused flows by who sent the refusal (pod, node, network)",
       unit="flows"),
    _f("unanswered", "integer", "flows with nothing back within --timeout", unit="flows"),
    _f("pending", "integer", "flows still waiting for an answer when tracing ended (younger than "
       "--timeout)", unit="flows"),
    _f("in_flight", "integer", "flows the kernel counted that no record carries yet (a running "
       "trace); at exit these are lost", unit="flows"),
    _f("packets", "integer", "packets, both directions (null: not measured)", unit="packets",
       nullable=True),
    _f("bytes", "integer", "bytes, both directions (null: not measured)", unit="bytes", nullable=True),
    _f("misses", "integer", "connections to this hostPort that were not DNATed (null: not measured)",
       unit="connections", nullable=True),
    _f("drops", "object", "drops of translated packets by kernel drop reason (null: not "
       "measured, or not known for what the records cover)", unit="packets", nullable=True),
    _f("dropped_flows", "object", "flows that had a packet dropped, by the last drop reason",
       unit="flows"),
    _f("latency_us", "object", "p50, p90, p99, max of first packet to first reply over answered "
       "flows (null values: none measured)", unit="µs"),
    _f("refusal_us", "object", "p50, p90, p99, max of first packet to the refusal over refused "
       "flows (null values: none)", unit="µs"),
    _f("flows_per_s", "number", "flows over the tracer's duration", unit="flows/s", nullable=True),
)

RECORDS: Dict[str, Tuple[Field, ...]] = {
    "capture": CAPTURE, "flow": FLOW, "miss": MISS, "summary": SUMMARY, "mapping": MAPPING,
}


def field_names(kind: str) -> List[str]:
    return [f.name for f in RECORDS[kind]]


def markdown_table(kind: str) -> str:
    """The README's table for one record kind (a test keeps the README equal to this)."""
    rows = ["| field | type | unit | meaning |", "| --- | --- | --- | --- |"]
    for f in RECORDS[kind]:
        typ = f.type + (" or null" if f.nullable else "")
        rows.append(f"| `{f.name}` | {typ} | {f.unit or ''} | {f.meaning} |")
    return "\n".join(rows)


# -- the recording's columns ------------------------------------------------------------------
# Flows and misses are stored compactly (addresses as 16 raw bytes, as the kernel keeps them);
# the reader turns them back into the fields above. Rows of the other records keep their JSON
# object in `payload`. Schema 2 recordings stored the strings
# dictionary-encoded; the reader decodes them into the plain strings of schema 3.
RECORD_KINDS = ("meta", "pods", "rules", "flow", "miss", "summary", "end")
#: Columns a recording may lack: added in schema 4 (flow outcomes). Every other column of
#: RECORDING_COLUMNS is in every recording since schema 2.
RECORDING_COLUMNS_SINCE_4 = ("outcome", "refusal", "refused_by", "icmp_type", "icmp_code",
                             "refusal_us")

RECORDING_COLUMNS: Tuple[Tuple[str, str, bool], ...] = (     # name, type, nullable
    ("record", "string", False), ("ts", "timestamp", True),
    ("proto", "uint8", True), ("family", "uint8", True), ("hook", "uint8", True),
    ("client_addr", "addr", True), ("client_port", "uint16", True),
    ("node_addr", "addr", True), ("host_port", "uint16", True),
    ("pod_addr", "addr", True), ("pod_port", "uint16", True),
    ("answered", "bool", True), ("outcome", "uint8", True), ("refusal", "uint8", True),
    ("refused_by", "uint8", True), ("icmp_type", "uint8", True), ("icmp_code", "uint8", True),
    ("refusal_us", "float64", True), ("midstream", "bool", True),
    ("masqueraded", "bool", True), ("snat_addr", "addr", True),
    ("latency_us", "float64", True),
    ("packets", "uint64", True), ("bytes", "uint64", True),
    ("pod_namespace", "string", True), ("pod_name", "string", True), ("port_name", "string", True),
    ("drop_reason", "string", True),
    ("count", "uint64", True),
    ("payload", "string", True),
)


@functools.lru_cache(maxsize=None)
def recording_schema():
    """The Arrow schema of a recording as pyarrow sees it (readers and tests; the tracer writes
    with records/arrowout.py, whose schema message nanoarrow builds)."""
    import pyarrow as pa
    types = {"string": pa.string(), "timestamp": pa.timestamp("ns", tz="UTC"), "uint8": pa.uint8(),
             "uint16": pa.uint16(), "uint64": pa.uint64(), "bool": pa.bool_(),
             "float64": pa.float64(), "addr": pa.binary(16)}
    return pa.schema([pa.field(name, types[kind], nullable=nullable)
                      for name, kind, nullable in RECORDING_COLUMNS],
                     metadata={"format": RECORDING_MAGIC, "schema": str(SCHEMA_VERSION)})
