"""Per-mapping summary of the tracer's flow and miss records.

The tracer prints one JSON object per line: "flow" records (one per flow, emitted when the
flow is answered or times out, carrying its packets/bytes *so far*), "miss" records (hostPort
traffic that reached the node but was never DNATed) and, at the end, a "summary" record built
by :func:`summarize`.  The kernel also keeps per-mapping counters; when the caller has them
they are authoritative for flows/packets/bytes, because flow records undercount traffic that
keeps flowing after the record was printed.

Public API:

* :func:`summarize` -- flow/miss records (+ kernel counters) -> the summary record (plain,
  JSON-serialisable Python types only).
* :func:`render_summary` -- the summary record -> a human table (rich, no colour).
* :func:`read_jsonl` -- a JSON-lines file (or iterable of lines) -> (flows, misses, summary).
"""
from __future__ import annotations

import io
from array import array
import ipaddress
import json
import math
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import pandas as pd

from bpftrace_hostport.errors import UserError

#: Group key of a mapping, in this order.
KEY = ("proto", "family", "host_port", "pod_ip", "pod_port")

#: Percentiles reported for answered-flow latency (numpy "linear" interpolation).
PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))

Key = Tuple[str, int, int, Optional[str], Optional[int]]


# --------------------------------------------------------------------------------------------
# Small conversions: everything that leaves this module is a plain Python type, never NaN.
# --------------------------------------------------------------------------------------------

def _py(value: Any) -> Any:
    """numpy/pandas scalar -> plain Python; NaN / NA / NaT -> None."""
    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            pass
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    if isinstance(value, float) and math.isinf(value):
        return None
    return value


def _opt_int(value: Any) -> Optional[int]:
    value = _py(value)
    return None if value is None else int(value)


def _opt_str(value: Any) -> Optional[str]:
    value = _py(value)
    return None if value is None else str(value)


def _norm_key(rec: dict) -> Key:
    """The (proto, family, host_port, pod_ip, pod_port) of a record, with normalised types.

    proto is lower-cased ("tcp"), ports and family are ints, a missing pod side is None.
    """
    return (
        str(rec["proto"]).lower(),
        int(rec["family"]),
        int(rec["host_port"]),
        _opt_str(rec.get("pod_ip")),
        _opt_int(rec.get("pod_port")),
    )


def _round(value: Any, ndigits: int) -> Optional[float]:
    value = _py(value)
    return None if value is None else round(float(value), ndigits)


def _index_key(idx: Any) -> Key:
    """A groupby index entry (tuple over KEY) -> a normalised plain-Python key."""
    proto, family, host_port, pod_ip, pod_port = idx
    return (str(proto), int(family), int(host_port), _opt_str(pod_ip), _opt_int(pod_port))


def _frame(records: Iterable[dict], extra: Dict[str, Callable[[dict], Any]]) -> pd.DataFrame:
    """Records -> DataFrame with the normalised KEY columns (object dtype) plus `extra` columns."""
    rows = []
    for rec in records:
        row = dict(zip(KEY, _norm_key(rec)))
        for name, get in extra.items():
            row[name] = get(rec)
        rows.append(row)
    columns = list(KEY) + list(extra)
    df = pd.DataFrame(rows, columns=columns, dtype=object)
    return df


def _numeric(df: pd.DataFrame, column: str, fill: Optional[float] = None) -> pd.Series:
    s = pd.to_numeric(df[column], errors="coerce")
    return s.fillna(fill) if fill is not None else s


# --------------------------------------------------------------------------------------------
# summarize
# --------------------------------------------------------------------------------------------

def _flow_stats(flows: List[dict]) -> Dict[Key, dict]:
    """Per-key aggregates of the flow records."""
    if not flows:
        return {}
    df = _frame(flows, {
        "answered": lambda r: bool(r.get("answered")),
        "latency_us": lambda r: r.get("latency_us"),
        "packets": lambda r: r.get("packets"),
        "bytes": lambda r: r.get("bytes"),
        "pod_namespace": lambda r: r.get("pod_namespace"),
        "pod_name": lambda r: r.get("pod_name"),
        "port_name": lambda r: r.get("port_name"),
        "drop_reason": lambda r: _opt_str(r.get("drop_reason")),
    })
    df["answered"] = df["answered"].astype(bool)
    df["latency_us"] = _numeric(df, "latency_us")
    df["packets"] = _numeric(df, "packets", 0).astype("int64")
    df["bytes"] = _numeric(df, "bytes", 0).astype("int64")

    keys = list(KEY)
    grouped = df.groupby(keys, dropna=False, sort=False)
    agg = grouped.agg(
        flows=("answered", "size"),
        answered=("answered", "sum"),
        packets=("packets", "sum"),
        bytes=("bytes", "sum"),
        # GroupBy.first skips nulls: the first non-null value of each group, in input order.
        pod_namespace=("pod_namespace", "first"),
        pod_name=("pod_name", "first"),
        port_name=("port_name", "first"),
    )

    # Latency percentiles over answered flows that carry a latency.
    lat = df[df["answered"] & df["latency_us"].notna()]
    lat_stats: Dict[Key, dict] = {}
    if not lat.empty:
        lg = lat.groupby(keys, dropna=False, sort=False)["latency_us"]
        quant = lg.quantile([q for _, q in PERCENTILES], interpolation="linear").unstack()
        mx = lg.max()
        for idx, row in quant.iterrows():
            stats = {name: _round(row[q], 1) for name, q in PERCENTILES}
            stats["max"] = _round(mx.loc[idx], 1)
            lat_stats[_index_key(idx)] = stats

    # Drop reasons seen on flow records (only used when the kernel's drop list is not given).
    drop_stats: Dict[Key, Dict[str, int]] = {}
    dr = df[df["drop_reason"].notna()]
    if not dr.empty:
        for idx, count in dr.groupby(keys + ["drop_reason"], dropna=False).size().items():
            drop_stats.setdefault(_index_key(idx[:5]), {})[str(idx[5])] = int(count)

    out: Dict[Key, dict] = {}
    for idx, row in agg.iterrows():
        key = _index_key(idx)
        out[key] = {
            "flows": int(row["flows"]),
            "answered": int(row["answered"]),
            "packets": int(row["packets"]),
            "bytes": int(row["bytes"]),
            "pod_namespace": _opt_str(row["pod_namespace"]),
            "pod_name": _opt_str(row["pod_name"]),
            "port_name": _opt_str(row["port_name"]),
            "latency_us": lat_stats.get(key),
            "drops": drop_stats.get(key, {}),
        }
    return out


def _counter_stats(counters: List[dict]) -> Dict[Key, dict]:
    """Kernel per-mapping counters, summed per key (duplicates, e.g. per-CPU, add up)."""
    if not counters:
        return {}
    df = _frame(counters, {
        "flows": lambda r: r.get("flows"),
        "packets": lambda r: r.get("packets"),
        "bytes": lambda r: r.get("bytes"),
    })
    for col in ("flows", "packets", "bytes"):
        df[col] = _numeric(df, col, 0).astype("int64")
    agg = df.groupby(list(KEY), dropna=False, sort=False)[["flows", "packets", "bytes"]].sum()
    return {
        _index_key(idx): {col: int(row[col]) for col in ("flows", "packets", "bytes")}
        for idx, row in agg.iterrows()
    }


def _drop_stats(drops: List[dict]) -> Dict[Key, Dict[str, int]]:
    """Kernel drop counters -> {key: {reason: count}} (counts of the same reason add up)."""
    if not drops:
        return {}
    df = _frame(drops, {
        "reason": lambda r: str(r.get("reason") or "UNKNOWN"),
        "count": lambda r: r.get("count"),
    })
    df["count"] = _numeric(df, "count", 0).astype("int64")
    out: Dict[Key, Dict[str, int]] = {}
    sums = df.groupby(list(KEY) + ["reason"], dropna=False)["count"].sum()
    for idx, count in sums.items():
        if int(count) > 0:
            out.setdefault(_index_key(idx[:5]), {})[str(idx[5])] = int(count)
    return out


def _miss_stats(misses: List[dict]) -> Dict[Tuple[str, int], dict]:
    """Miss records -> {(proto, host_port): {"count": total, "families": sorted families}}."""
    if not misses:
        return {}
    df = pd.DataFrame(
        [
            {
                "proto": str(m["proto"]).lower(),
                "host_port": int(m["host_port"]),
                "family": _opt_int(m.get("family")),
                "count": m.get("count", 1),
            }
            for m in misses
        ],
        columns=["proto", "host_port", "family", "count"],
        dtype=object,
    )
    df["count"] = _numeric(df, "count", 0).astype("int64")
    out: Dict[Tuple[str, int], dict] = {}
    for (proto, host_port), g in df.groupby(["proto", "host_port"], sort=False):
        families = sorted({int(f) for f in g["family"] if _py(f) is not None})
        out[(str(proto), int(host_port))] = {"count": int(g["count"].sum()), "families": families}
    return out


def _ip_sort(ip: Optional[str]) -> tuple:
    if ip is None:
        return (0, 0, "")
    try:
        addr = ipaddress.ip_address(ip)
        return (1, addr.version, int(addr))
    except ValueError:
        return (2, 0, ip)


def _sort_key(m: dict) -> tuple:
    return (
        m["proto"],
        m["host_port"],
        _ip_sort(m["pod_ip"]),
        m["family"] if m["family"] is not None else 0,
        m["pod_port"] if m["pod_port"] is not None else -1,
    )


class FlowAggregate:
    """Flow records folded per mapping as they arrive, in O(mappings) memory.

    A long trace at tens of thousands of flows per second cannot keep every record: this keeps
    per mapping the counts, the first pod names, the drop reasons and the latencies (8 bytes
    each, for exact percentiles). `summarize` accepts it in place of the list of records.
    """

    def __init__(self) -> None:
        self.stats: Dict[Key, dict] = {}
        self.count = 0

    def add(self, r: dict) -> None:
        key = (r["proto"], r["family"], r["host_port"], r["pod_ip"], r["pod_port"])
        st = self.stats.get(key)
        if st is None:
            st = self.stats[key] = {"flows": 0, "answered": 0, "packets": 0, "bytes": 0,
                                    "pod_namespace": None, "pod_name": None, "port_name": None,
                                    "lat": array("d"), "drops": {}}
        self.count += 1
        st["flows"] += 1
        st["packets"] += r["packets"] or 0
        st["bytes"] += r["bytes"] or 0
        if r["answered"]:
            st["answered"] += 1
            lat = r["latency_us"]
            if lat is not None:
                st["lat"].append(lat)
        if st["pod_name"] is None or st["pod_namespace"] is None or st["port_name"] is None:
            for f in ("pod_namespace", "pod_name", "port_name"):
                if st[f] is None and r.get(f) is not None:
                    st[f] = r[f]
        reason = r["drop_reason"]
        if reason:
            st["drops"][reason] = st["drops"].get(reason, 0) + 1

    def __len__(self) -> int:
        return self.count

    def flow_stats(self) -> Dict[Key, dict]:
        out: Dict[Key, dict] = {}
        for key, st in self.stats.items():
            lat = None
            if len(st["lat"]):
                series = pd.Series(np.frombuffer(st["lat"], dtype="float64"))
                quant = series.quantile([q for _, q in PERCENTILES], interpolation="linear")
                lat = {name: _round(quant.loc[q], 1) for name, q in PERCENTILES}
                lat["max"] = _round(series.max(), 1)
            out[key] = {k: st[k] for k in ("flows", "answered", "packets", "bytes",
                                           "pod_namespace", "pod_name", "port_name")}
            out[key]["latency_us"] = lat
            out[key]["drops"] = dict(st["drops"])
        return out


def summarize(
    flows: List[dict],
    misses: List[dict],
    counters: Optional[List[dict]],
    drops: Optional[List[dict]],
    duration_s: float,
    lost_events: int,
    pod_names: Optional[Callable[[str, str, int], Optional[Tuple[Optional[str], Optional[str], Optional[str]]]]] = None,
) -> dict:
    """Build the "summary" record from flow and miss records and the kernel's counters.

    Mappings are grouped by (proto, family, host_port, pod_ip, pod_port):

    * flows/packets/bytes: from `counters` when they have that key (flows = max of the counter
      and the number of flow records), else from the flow records;
    * answered and latency percentiles: from the flow records (answered ones with a latency);
    * pod_namespace/pod_name/port_name: per field, the first non-null value from that key's
      flow records, else ``pod_names(proto, pod_ip, pod_port)`` -> (ns, name, port_name) | None;
    * misses: summed per (proto, host_port), attached to every mapping with that proto and
      host_port whatever its family; a (proto, host_port) with misses and no mapping gets its
      own row with pod_ip/pod_port None and flows 0 (hostNetwork pod or missing DNAT rule);
    * drops: from `drops` when it is not None, else counted from the flow records' drop_reason.

    The result only holds plain JSON-serialisable Python values (no numpy types, no NaN).
    """
    misses = list(misses or [])
    if isinstance(flows, FlowAggregate):
        flow_stats = flows.flow_stats()
    else:
        flow_stats = _flow_stats(list(flows or []))
    counter_stats = _counter_stats(list(counters)) if counters is not None else {}
    kernel_drops = _drop_stats(list(drops)) if drops is not None else None
    miss_stats = _miss_stats(misses)

    keys = set(flow_stats) | set(counter_stats)
    if kernel_drops is not None:
        keys |= set(kernel_drops)

    duration = round(float(duration_s or 0.0), 3)
    no_latency = {name: None for name, _ in PERCENTILES}
    no_latency["max"] = None

    def rate(n: int) -> Optional[float]:
        return round(n / float(duration_s), 3) if duration_s and duration_s > 0 else None

    mappings: List[dict] = []
    for key in keys:
        proto, family, host_port, pod_ip, pod_port = key
        fs = flow_stats.get(key)
        cs = counter_stats.get(key)
        record_flows = fs["flows"] if fs else 0
        if cs is not None:
            n_flows = max(cs["flows"], record_flows)
            packets, nbytes = cs["packets"], cs["bytes"]
        else:
            n_flows = record_flows
            packets = fs["packets"] if fs else 0
            nbytes = fs["bytes"] if fs else 0

        ns = fs["pod_namespace"] if fs else None
        name = fs["pod_name"] if fs else None
        port_name = fs["port_name"] if fs else None
        if pod_names is not None and pod_ip is not None and None in (ns, name, port_name):
            found = pod_names(proto, pod_ip, pod_port)
            if found:
                f_ns, f_name, f_port = (tuple(found) + (None, None, None))[:3]
                ns = ns if ns is not None else _opt_str(f_ns)
                name = name if name is not None else _opt_str(f_name)
                port_name = port_name if port_name is not None else _opt_str(f_port)

        if kernel_drops is not None:
            drop_counts = dict(kernel_drops.get(key, {}))
        else:
            drop_counts = dict(fs["drops"]) if fs else {}

        mappings.append({
            "proto": proto,
            "family": family,
            "host_port": host_port,
            "pod_ip": pod_ip,
            "pod_port": pod_port,
            "pod_namespace": ns,
            "pod_name": name,
            "port_name": port_name,
            "flows": int(n_flows),
            "answered": int(fs["answered"]) if fs else 0,
            "packets": int(packets),
            "bytes": int(nbytes),
            "misses": int(miss_stats.get((proto, host_port), {}).get("count", 0)),
            "drops": dict(sorted(drop_counts.items())),
            "latency_us": dict((fs and fs["latency_us"]) or no_latency),
            "flows_per_s": rate(int(n_flows)),
        })

    mapped_ports = {(m["proto"], m["host_port"]) for m in mappings}
    for (proto, host_port), ms in miss_stats.items():
        if (proto, host_port) in mapped_ports:
            continue
        families = ms["families"]
        mappings.append({
            "proto": proto,
            # Misses are family-agnostic; keep the family when they all agree.
            "family": families[0] if len(families) == 1 else None,
            "host_port": host_port,
            "pod_ip": None,
            "pod_port": None,
            "pod_namespace": None,
            "pod_name": None,
            "port_name": None,
            "flows": 0,
            "answered": 0,
            "packets": 0,
            "bytes": 0,
            "misses": int(ms["count"]),
            "drops": {},
            "latency_us": dict(no_latency),
            "flows_per_s": rate(0),
        })

    mappings.sort(key=_sort_key)
    return {
        "type": "summary",
        "duration_s": duration,
        "lost_events": int(lost_events or 0),
        "flows": int(sum(m["flows"] for m in mappings)),
        "mappings": mappings,
    }


# --------------------------------------------------------------------------------------------
# render_summary
# --------------------------------------------------------------------------------------------

def _fmt_num(value: float) -> str:
    """12.0 -> "12", 1.5 -> "1.5", 0.1234 -> "0.123"."""
    text = f"{float(value):.3f}".rstrip("0").rstrip(".")
    return text or "0"


def human_bytes(n: Optional[int]) -> str:
    """1234 -> "1.2 KiB"; below 1 KiB the exact count: "512 B"."""
    if n is None:
        return "-"
    n = int(n)
    if abs(n) < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024.0
        if abs(value) < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}"
    return f"{n} B"  # pragma: no cover


def _fmt_ms(us: Optional[float]) -> str:
    return "-" if us is None else f"{float(us) / 1000.0:.2f}"


def _endpoint(ip: Optional[str], port: Optional[int]) -> str:
    if ip is None:
        return "-"
    host = f"[{ip}]" if ":" in ip else ip
    return host if port is None else f"{host}:{port}"


def _mapping_cell(m: dict) -> str:
    return f"{m['proto']} :{m['host_port']} -> {_endpoint(m.get('pod_ip'), m.get('pod_port'))}"


def _pod_cell(m: dict) -> str:
    if m.get("pod_ip") is None:
        return "no DNAT"
    ns, name, port_name = m.get("pod_namespace"), m.get("pod_name"), m.get("port_name")
    if not name:
        return "-"
    text = f"{ns}/{name}" if ns else name
    return f"{text} ({port_name})" if port_name else text


def _drops_cell(drops: Optional[dict]) -> str:
    if not drops:
        return "-"
    return ", ".join(f"{reason}:{count}" for reason, count in sorted(drops.items()))


#: Table columns, in order.
COLUMNS = ("MAPPING", "POD", "FLOWS", "ANSWERED", "P50", "P90", "P99", "MAX", "MISSES",
           "DROPS", "PKTS", "BYTES", "RATE")
#: Text columns that may fold onto several lines, with the width they shrink to at most,
#: in the order they get back space (MAPPING first, DROPS last).
_FOLD_COLUMNS = {"MAPPING": 14, "POD": 16, "DROPS": 8}


def _table_row(m: dict) -> List[str]:
    lat = m.get("latency_us") or {}
    rate = m.get("flows_per_s")
    return [
        _mapping_cell(m),
        _pod_cell(m),
        str(int(m.get("flows") or 0)),
        str(int(m.get("answered") or 0)),
        _fmt_ms(lat.get("p50")),
        _fmt_ms(lat.get("p90")),
        _fmt_ms(lat.get("p99")),
        _fmt_ms(lat.get("max")),
        str(int(m.get("misses") or 0)),
        _drops_cell(m.get("drops")),
        str(int(m.get("packets") or 0)),
        human_bytes(m.get("bytes")),
        "-" if rate is None else f"{float(rate):.2f}/s",
    ]


def _column_widths(rows: List[List[str]], width: int) -> List[int]:
    """Column widths that fit `width` when possible.

    Numeric columns always get their full width.  The text columns start at their
    shrunk width (_FOLD_COLUMNS, or less when their content is narrower) and get the
    remaining space back in the order MAPPING, POD, DROPS, up to their full width.
    """
    from rich.cells import cell_len

    full = [max([cell_len(name)] + [cell_len(r[i]) for r in rows]) for i, name in enumerate(COLUMNS)]
    widths = list(full)
    for name, shrunk in _FOLD_COLUMNS.items():
        i = COLUMNS.index(name)
        widths[i] = max(cell_len(name), min(full[i], shrunk))
    spare = width - (sum(widths) + len(widths) - 1)
    for name in _FOLD_COLUMNS:
        if spare <= 0:
            break
        i = COLUMNS.index(name)
        grow = min(spare, full[i] - widths[i])
        widths[i] += grow
        spare -= grow
    return widths


def render_summary(summary: dict, width: int = 120) -> str:
    """The summary record as a human table, with a header line and notes.

    Latencies are shown in milliseconds (2 decimals), "-" when no answered flow.
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    mappings = summary.get("mappings") or []
    lost = int(summary.get("lost_events") or 0)
    duration = float(summary.get("duration_s") or 0.0)
    total = summary.get("flows")
    if total is None:
        total = sum(int(m.get("flows") or 0) for m in mappings)

    lines = [f"{int(total)} flows over {_fmt_num(duration)} s, {lost} lost events"]
    if lost > 0:
        lines.append(
            f"Warning: {lost} events were lost, so flow counts and latencies are incomplete; "
            "rerun with a bigger --flow-table and a bigger ring buffer to reduce losses."
        )

    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None, highlight=False,
                      emoji=False, markup=False, soft_wrap=False)
    if mappings:
        rows = [_table_row(m) for m in mappings]
        widths = _column_widths(rows, width)
        # No cell padding: the box's blank column separators are the only gap.
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 0),
                      highlight=False)
        for i, name in enumerate(COLUMNS):
            if name in _FOLD_COLUMNS:
                table.add_column(name, overflow="fold", width=widths[i])
            else:
                table.add_column(name, justify="right", no_wrap=True, width=widths[i])
        for row in rows:
            table.add_row(*row)
        # Never let rich squeeze or drop columns: if even the folded table is wider than
        # `width`, the lines get longer than `width` instead.
        console.width = max(width, sum(widths) + len(widths) - 1)
        console.print(table)
    else:
        console.print("No hostPort traffic seen.")

    notes = []
    for m in mappings:
        if m.get("pod_ip") is None and int(m.get("misses") or 0) > 0:
            notes.append(
                f"hostPort {m['host_port']}/{m['proto']}: {int(m['misses'])} connections reached "
                "the node without DNAT (hostNetwork pod or missing rule?)"
            )

    text = "\n".join(lines) + "\n" + out.getvalue()
    if notes:
        text += "\n".join(notes) + "\n"
    return text


# --------------------------------------------------------------------------------------------
# read_jsonl
# --------------------------------------------------------------------------------------------

def read_jsonl(
    path_or_lines: Union[str, "os.PathLike[str]", Iterable[Union[str, bytes]]],
    notes: Optional[List[str]] = None,
) -> Tuple[List[dict], List[dict], Optional[dict]]:
    """Read the tracer's JSON-lines output -> (flows, misses, last summary record or None).

    `path_or_lines` is a file path or an iterable of lines (an open file, a list of strings).
    Blank lines and records of other types are skipped; a line that is not a JSON object
    raises UserError naming the file and line number, except a cut last line (a capture killed
    mid-write), which is skipped with a sentence added to `notes` when a list is given.
    """
    if isinstance(path_or_lines, (str, bytes, os.PathLike)):
        name = os.fsdecode(path_or_lines)
        try:
            with open(name, "r", encoding="utf-8") as fh:
                return _read_lines(fh, name, notes)
        except FileNotFoundError:
            raise UserError(f"Cannot read {name}: no such file; check the path.") from None
        except IsADirectoryError:
            raise UserError(f"Cannot read {name}: it is a directory; give a JSON-lines file.") from None
        except PermissionError:
            raise UserError(f"Cannot read {name}: permission denied; check its permissions.") from None
        except UnicodeDecodeError:
            raise UserError(f"{name} is not UTF-8 text; give the tracer's JSON-lines output.") from None
    name = getattr(path_or_lines, "name", None)
    return _read_lines(path_or_lines, str(name) if isinstance(name, (str, bytes)) and name else "<input>",
                       notes)


def _read_lines(lines: Iterable[Union[str, bytes]], name: str, notes: Optional[List[str]] = None):
    flows: List[dict] = []
    misses: List[dict] = []
    summary: Optional[dict] = None
    for lineno, line in enumerate(lines, start=1):
        # A capture killed mid-write may end in a cut line: the only line without a newline.
        last_and_cut = isinstance(line, (str, bytes)) and not line.endswith("\n" if isinstance(line, str) else b"\n")
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(
                    f"{name} line {lineno} is not UTF-8 text; give the tracer's JSON-lines output."
                ) from None
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if last_and_cut and notes is not None:
                notes.append(f"{name} ends in a cut line {lineno} (the capture was interrupted); "
                             "it was skipped.")
                break
            raise UserError(
                f"{name} line {lineno} is not JSON; give the tracer's JSON-lines output "
                "or remove that line."
            ) from None
        if not isinstance(rec, dict):
            raise UserError(
                f"{name} line {lineno} is not a JSON object; give the tracer's JSON-lines output "
                "or remove that line."
            )
        kind = rec.get("type")
        if kind == "flow":
            flows.append(rec)
        elif kind == "miss":
            misses.append(rec)
        elif kind == "summary":
            summary = rec
    return flows, misses, summary
