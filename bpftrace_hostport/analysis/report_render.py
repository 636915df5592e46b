"""A report or a comparison (report.py) as text: table (rich), json, csv, markdown or html.

Every format but json and csv renders one document model (`_Doc`: a warning, summary
sentences, tables, notes), so the figures and their wording are the same everywhere.
The table never cuts a value: columns wrap at spaces only and are never narrower than their
longest word; when that cannot fit the width, each row becomes a "key  value" block (psql \\x).
Unknown figures (not measured by the backend) read "n/a", never 0.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import textwrap
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Set, Tuple, Union

from bpftrace_hostport.analysis.report import COMPARED, KEY, NAMES, plural

FORMATS = ("table", "json", "csv", "markdown", "html")
Cell = Union[str, List[str]]          # a list: items shown one per line
NA = "n/a"                            # not measured by the backend
NONE = "-"                            # measured, nothing there (no answered flow, no pod name)
GAP = 2                               # rich's column gap with collapse_padding


@dataclass
class _Table:
    title: str
    headers: List[str]
    rows: List[List[Cell]]
    right: Set[int] = field(default_factory=set)     # numeric columns, right-justified
    record: str = "row"                               # what one row is, in the vertical layout
    empty: str = "None."                              # said instead of an empty table


@dataclass
class _Doc:
    title: str
    warning: Optional[str]
    summary: List[str]
    tables: List[_Table]
    notes: List[str]


def render(report: dict, fmt: str, width: Optional[int] = None) -> str:
    """`report` (build_report or compare_reports) in `fmt`: table, json, csv, markdown, html.
    `width` is for the table: default the terminal's, no limit when not a terminal."""
    fmt = (fmt or "").lower()
    if fmt == "json":
        return json.dumps(report, indent=2, allow_nan=False) + "\n"
    comparison = report.get("kind") == "comparison"
    if fmt == "csv":
        return _comparison_csv(report) if comparison else _report_csv(report)
    if fmt not in FORMATS:
        raise ValueError(f"Unknown format {fmt!r}: give one of {', '.join(FORMATS)}.")
    doc = _comparison_doc(report) if comparison else _report_doc(report)
    if fmt == "table":
        return _text(doc, _terminal_width() if width is None else width)
    if fmt == "markdown":
        return _markdown(doc)
    from bpftrace_hostport.analysis.plots import charts     # matplotlib only when asked for
    return _html(doc, [] if comparison else charts(report))


def _terminal_width() -> Optional[int]:
    from rich.console import Console
    console = Console()
    return console.width if console.is_terminal else None


# --------------------------------------------------------------------------- cell formats

def _num(n: Optional[float]) -> str:
    return NA if n is None else f"{n:,}"


def _pct(share: Optional[float]) -> str:
    return NONE if share is None else f"{share * 100:.1f}%"


def _ms(us: Optional[float], measured: bool = True) -> str:
    if us is None:
        return NONE if measured else NA
    return f"{us / 1000:.2f}" if us >= 10 else f"{us / 1000:.3f}"


def human_bytes(n: Optional[int]) -> str:
    if n is None:
        return NA
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{int(n)} B" if unit == "B" else f"{value:.1f} {unit}"


def endpoint(ip: Optional[str], port: Optional[int]) -> str:
    """"10.0.0.1:80", "[fd00::1]:80": an IPv6 address is bracketed when a port follows."""
    if ip is None:
        return NONE
    host = f"[{ip}]" if ":" in ip and port is not None else ip
    return host if port is None else f"{host}:{port}"


def mapping_label(m: dict) -> str:
    if m["pod_ip"] is None:
        return f"{m['proto']} :{m['host_port']} (no DNAT)"
    return f"{m['proto']} :{m['host_port']} -> {endpoint(m['pod_ip'], m['pod_port'])}"


def pod_label(m: dict) -> str:
    if not m.get("pod_name"):
        return NONE
    text = f"{m['pod_namespace']}/{m['pod_name']}" if m.get("pod_namespace") else m["pod_name"]
    text = f"{text} ({m['port_name']})" if m.get("port_name") else text
    return f"hostNetwork {text}" if m["pod_ip"] is None else text


def _drops(drops: Optional[dict]) -> Cell:
    if drops is None:
        return NA
    return [f"{r}:{n:,}" for r, n in drops.items()] or NONE


def _answered(m: dict) -> str:
    return f"{m['answered']:,} ({_pct(m['answered_share'])})" if m["flows"] else "0"


def _measured(report: dict, m: dict, what: str) -> bool:
    nodes = {n["node"]: n["measures"] for n in report.get("per_node") or []}
    return nodes.get(m.get("node"), report["measures"])[what]


# ------------------------------------------------------------------------------ the report

def _report_doc(r: dict) -> _Doc:
    t = r["totals"]
    warning = ("This capture is truncated: the figures cover only what was read."
               if r["truncated"] else None)
    return _Doc("hostPort incident report", warning, _report_summary(r, t),
                [_finding_table(r), _mapping_table(r)] + ([_node_table(r)] if r.get("per_node") else [])
                + [_drop_table(r), _client_table(r)], r["notes"])


def _report_summary(r: dict, t: dict) -> List[str]:
    span, nodes = r["span"], r["nodes"]
    where = f"{plural(len(r['files']), 'file')} from {plural(len(nodes), 'node')} " \
            f"({', '.join(n or 'unnamed' for n in nodes)})"
    end = _when(span["end"] or "")
    if span["start"] and span["start"][:10] == (span["end"] or "")[:10]:
        end = end[11:]                     # same day: the end's time says it
    when = f"{_when(span['start'])} to {end} ({_dur(span['duration_s'])})" if span["start"] else "no traffic"
    refusals = ", ".join(f"{k} {n:,}" for k, n in (t.get("refusals") or {}).items())
    out = [f"{where}, {when}; times are UTC.",
           f"{plural(t['flows'], 'flow')}: {t['answered']:,} answered ({_pct(t['answered_share'])}), "
           f"{t['refused']:,} refused{' (' + refusals + ')' if refusals else ''}, "
           f"{t['unanswered']:,} unanswered" + (f", {t['pending']:,} pending" if t.get("pending") else "")
           + (f", {t['in_flight']:,} in flight" if t.get("in_flight") else "") + "; "
           f"{plural(t['misses'], 'miss')}, {plural(t['drops_total'], 'dropped packet')}, "
           f"{plural(r['lost_events'], 'lost flow')}."]
    lat = t["latency_us"]
    if not r["measures"]["latency"] and lat["p50"] is None:
        out.append("Latency: unknown (not measured).")
    elif lat["p50"] is None:
        out.append("Latency: no answered flow with a latency.")
    else:
        out.append("Latency " + ", ".join(f"{k} {_ms(lat[k])} ms" for k in ("p50", "p90", "p99", "max"))
                   + f" ({r.get('latency_method', 'exact')}).")
    source = {"kernel": "the kernel's counters", "records": "the flow records",
              "mixed": "the kernel's counters on some nodes, the flow records on others"}
    out.append(f"Counts come from {source[t['source_of_counts']]}.")
    active = {k: v for k, v in r["filters"].items() if v}
    if active:
        out.append("Filtered by " + "; ".join(
            f"{k.replace('_', ' ')} {', '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in active.items()) + ".")
    return out


def _when(iso: str) -> str:
    return iso.replace("T", " ").rstrip("Z")


def _dur(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:g} s"


def _node_cols(r: dict, m: dict) -> List[Cell]:
    return [m["node"]] if r.get("per_node") else []


def _finding_table(r: dict) -> _Table:
    multi = bool(r.get("per_node"))
    rows = [([f["node"] or "unnamed"] if multi else []) + [f["severity"], f["text"], f["check"] or NONE]
            for f in r.get("findings") or []]
    heads = (["NODE"] if multi else []) + ["SEVERITY", "WHAT THE FLOWS SAY", "CHECK"]
    return _Table("Findings", heads, rows, set(), "finding", "Nothing wrong or unusual.")


def _refused(m: dict) -> Cell:
    if not m.get("refused"):
        return "0"
    return [f"{m['refused']:,}"] + [f"{k}:{n:,}" for k, n in (m.get("refusals") or {}).items()]


def _mapping_table(r: dict) -> _Table:
    heads = (["NODE"] if r.get("per_node") else []) + [
        "MAPPING", "POD", "FLOWS", "ANSWERED", "REFUSED", "NO ANSWER", "P50 ms", "P90 ms", "P99 ms",
        "MAX ms", "MISSES", "DROPS", "PACKETS", "BYTES", "RATE /s", "MASQ"]
    rows = []
    for m in r["mappings"]:
        lat, measured = m["latency_us"], _measured(r, m, "latency")
        rows.append(_node_cols(r, m) + [
            mapping_label(m), pod_label(m), _num(m["flows"]), _answered(m), _refused(m),
            _num(m["unanswered"]), *(_ms(lat[k], measured) for k in ("p50", "p90", "p99", "max")),
            _num(m["misses"]), _drops(m["drops"]), _num(m["packets"]), human_bytes(m["bytes"]),
            NONE if m["flows_per_s"] is None else f"{m['flows_per_s']:g}", _pct(m["masqueraded_share"])])
    first = len(heads) - 14
    return _Table("Mappings", heads, rows, set(range(first, len(heads))) - {first + 9, first + 2},
                  "mapping", "No hostPort traffic seen.")


def _node_table(r: dict) -> _Table:
    heads = ["NODE", "BACKEND", "FILES", "FLOWS", "ANSWERED", "P50 ms", "P99 ms", "MISSES",
             "DROPS", "LOST", "COUNTS FROM"]
    rows = [[n["node"] or "unnamed", n["backend"], [str(f) for f in n["files"]], _num(n["flows"]),
             _answered(n), _ms(n["latency_us"]["p50"], n["measures"]["latency"]),
             _ms(n["latency_us"]["p99"], n["measures"]["latency"]), _num(n["misses"]),
             _drops(n["drops"]), _num(n["lost_events"]), n["source_of_counts"]]
            for n in r["per_node"]]
    return _Table("Per node", heads, rows, {3, 4, 5, 6, 7, 9}, "node")


def _drop_table(r: dict) -> _Table:
    rows = [_node_cols(r, m) + [mapping_label(m), pod_label(m), reason, _num(n)]
            for m in r["mappings"] for reason, n in (m["drops"] or {}).items()]
    heads = (["NODE"] if r.get("per_node") else []) + ["MAPPING", "POD", "REASON", "COUNT"]
    empty = "No drops." if r["measures"]["drops"] else \
        "No drops seen where measured; the backend of some files does not see drops (n/a)."
    return _Table("Drops", heads, rows, {len(heads) - 1}, "drop", empty)


def _client_table(r: dict) -> _Table:
    rows = [_node_cols(r, m) + [mapping_label(m), pod_label(m), client,
                                plural(n, "flow") if m["pod_ip"] else plural(n, "miss")]
            for m in r["mappings"] for client, n in m["top_clients"]]
    heads = (["NODE"] if r.get("per_node") else []) + ["MAPPING", "POD", "CLIENT", "COUNT"]
    return _Table("Top clients", heads, rows, {len(heads) - 1}, "client", "No clients seen.")


def _report_csv(r: dict) -> str:
    heads = ["node", *KEY, *NAMES, "flows", "answered", "answered_share", "refused", "refusals",
             "unanswered", "pending", "misses", "drops",
             "p50_us", "p90_us", "p99_us", "max_us", "packets", "bytes", "masqueraded_share",
             "flows_per_s", "top_clients", "source_of_counts"]
    rows = []
    for m in r["mappings"]:
        flat = dict(m, node=m.get("node", (r["nodes"] or [""])[0]),
                    drops=None if m["drops"] is None else ";".join(f"{k}:{v}" for k, v in m["drops"].items()),
                    refusals=";".join(f"{k}:{v}" for k, v in m["refusals"].items()),
                    top_clients=";".join(f"{ip}={n}" for ip, n in m["top_clients"]),
                    **{f"{k}_us": v for k, v in m["latency_us"].items()})
        rows.append([flat[h] for h in heads])
    return _csv(heads, rows)


def _csv(heads: Sequence[str], rows: Sequence[Sequence]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(heads)
    w.writerows([["" if v is None else v for v in row] for row in rows])     # unknown: empty
    return out.getvalue()


# -------------------------------------------------------------------------- the comparison

#: compared figure -> (header, how a value reads, how its change reads: in the header's unit,
#: shares in percentage points; no space inside, so a wrapped cell keeps the change whole)
_FIGURES = {
    "flows": ("FLOWS", _num, lambda d: f"{d:+,}"),
    "flows_per_s": ("RATE /s", _num, lambda d: f"{d:+g}"),
    "answered_share": ("ANSWERED", _pct, lambda d: f"{d * 100:+.1f}pp"),
    "p50_us": ("P50 ms", _ms, lambda d: f"{d / 1000:+.2f}"),
    "p99_us": ("P99 ms", _ms, lambda d: f"{d / 1000:+.2f}"),
    "misses": ("MISSES", _num, lambda d: f"{d:+,}"),
    "drops": ("DROPS", _num, lambda d: f"{d:+,}"),
}


def _change(name: str, c: dict, status: str = "both") -> str:
    """"7 -> 9 (+2)": a side without the mapping reads "-", a figure it lacks "n/a"."""
    _, fmt, delta = _FIGURES[name]

    def side(value, present: bool) -> str:
        return fmt(value) if value is not None else (NA if present else NONE)
    text = f"{side(c['before'], status != 'new')} -> {side(c['after'], status != 'gone')}"
    return text if c["delta"] is None else f"{text} ({delta(c['delta'])})"


def _comparison_doc(c: dict) -> _Doc:
    b, a = c["before"], c["after"]
    summary = [f"Before: {', '.join(map(str, b['files']))} ({_dur(b['span']['duration_s'])}); "
               f"after: {', '.join(map(str, a['files']))} ({_dur(a['span']['duration_s'])}); "
               "times are UTC; each cell reads before -> after (change)."]
    totals = _Table("Totals", ["FIGURE", "BEFORE -> AFTER (CHANGE)"],
                    [[_FIGURES[k][0], _change(k, v)] for k, v in c["totals"].items()], set(), "figure")
    multi = any("node" in m for m in c["mappings"])
    heads = (["NODE"] if multi else []) + ["MAPPING", "POD", "STATUS"] + [f[0] for f in _FIGURES.values()]
    rows = [([m["node"]] if multi else []) + [mapping_label(m), pod_label(m), m["status"]]
            + [_change(k, m[k], m["status"]) for k in COMPARED] for m in c["mappings"]]
    warning = ("A truncated capture is compared: its figures cover only what was read."
               if b["truncated"] or a["truncated"] else None)
    return _Doc("hostPort comparison", warning, summary,
                [totals, _Table("Mappings", heads, rows, set(), "mapping", "No mappings.")], c["notes"])


def _comparison_csv(c: dict) -> str:
    multi = any("node" in m for m in c["mappings"])
    heads = (["node"] if multi else []) + [*KEY, *NAMES, "status"] + [
        f"{k}_{side}" for k in COMPARED for side in ("before", "after", "delta")]
    rows = [([m["node"]] if multi else []) + [m[k] for k in (*KEY, *NAMES, "status")]
            + [m[k][side] for k in COMPARED for side in ("before", "after", "delta")]
            for m in c["mappings"]]
    return _csv(heads, rows)


# -------------------------------------------------------------------------------- the text

def _text(doc: _Doc, width: Optional[int]) -> str:
    w = width if width and width > 0 else 1 << 20        # not a terminal: no limit
    lines: List[str] = []
    if doc.warning:
        lines += _wrap(doc.warning, w)
    lines += _wrap(doc.title, w) + [""]
    for sentence in doc.summary:
        lines += _wrap(sentence, w)
    for t in doc.tables:
        lines += [""] + _wrap(t.title, w)
        lines += (_grid(t, w) or _records(t, w)) if t.rows else _wrap(t.empty, w)
    if doc.notes:
        lines += ["", "Notes:"]
        for note in doc.notes:
            lines += _wrap(note, w, "- ", "  ")
    return "\n".join(lines) + "\n"


def _cell_text(cell: Cell) -> str:
    return "\n".join(cell) if isinstance(cell, list) else cell


def _grid(t: _Table, width: int) -> Optional[List[str]]:
    """The table as a rich grid within `width`, or None when even its narrowest cannot fit."""
    from rich import box
    from rich.cells import cell_len
    from rich.console import Console
    from rich.table import Table

    cols = list(zip(t.headers, *[[_cell_text(c) for c in row] for row in t.rows]))
    natural = [max(cell_len(line) for text in col for line in text.split("\n")) for col in cols]
    narrow = [max(cell_len(word) for text in col for word in text.split()) for col in cols]
    widths = _fit(natural, narrow, width - GAP * (len(cols) - 1))
    if widths is None:
        return None
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1),
                  collapse_padding=True, header_style="", highlight=False)
    for i, (head, w) in enumerate(zip(t.headers, widths)):
        table.add_column(head, width=w, overflow="fold", justify="right" if i in t.right else "left")
    for row in t.rows:
        table.add_row(*(_cell_text(c) for c in row))
    out = io.StringIO()
    # markup off: "[fd00::1]:80" is an address, not a style; width roomy: rich must not squeeze
    Console(file=out, width=sum(widths) + GAP * len(widths) + 8, color_system=None, markup=False,
            highlight=False, emoji=False).print(table)
    lines = [line.rstrip() for line in out.getvalue().splitlines()]
    return lines if all(cell_len(line) <= width for line in lines) else None


def _fit(natural: List[int], narrow: List[int], room: int) -> Optional[List[int]]:
    """Column widths summing to at most `room`: the widest column gives a character back first,
    none goes under its longest word."""
    widths = list(natural)
    if sum(narrow) > room:
        return None
    while sum(widths) > room:
        i = max((i for i in range(len(widths)) if widths[i] > narrow[i]), key=lambda i: widths[i])
        widths[i] -= 1
    return widths


def _records(t: _Table, width: int) -> List[str]:
    """One block per row: "KEY  value", a list one item per line (psql's expanded display)."""
    keyw = max(len(h) for h in t.headers) + 2
    lines: List[str] = []
    for n, row in enumerate(t.rows, 1):
        lines.append(f"-[ {t.record} {n} ]".ljust(min(width, 40), "-"))
        for head, cell in zip(t.headers, row):
            items = (cell if isinstance(cell, list) else [cell]) or [""]
            if width - keyw >= 24:
                pieces = [p for item in items for p in _wrap(item, width - keyw)]
                lines += [((head if i == 0 else "").ljust(keyw) + p).rstrip() for i, p in enumerate(pieces)]
            else:       # too narrow for two columns: the key, then its values indented
                lines += [head] + [p for item in items for p in _wrap(item, width, "  ", "  ")]
    return lines


_BREAKS = "/-.:_,"


def _wrap(text: str, width: int, first: str = "", rest: str = "") -> List[str]:
    """Wrap at spaces; a word longer than the line breaks after / - . : _ , and only when it has
    none of those is it cut."""
    lines = textwrap.wrap(text, width, initial_indent=first, subsequent_indent=rest,
                          break_long_words=False, break_on_hyphens=False) or [first.rstrip()]
    out: List[str] = []
    for line in lines:
        while len(line) > width:
            cut = max((line.rfind(ch, len(rest), width - 1) + 1 for ch in _BREAKS), default=0)
            cut = cut if cut > len(rest) else width
            out.append(line[:cut])
            line = rest + line[cut:]
        out.append(line)
    return out


# ---------------------------------------------------------------------- markdown and html

def _md_cell(cell: Cell) -> str:
    text = ", ".join(cell) if isinstance(cell, list) else cell
    return text.replace("|", "\\|") or " "


def _markdown(doc: _Doc) -> str:
    out = [f"# {doc.title}", ""]
    if doc.warning:
        out += [f"> **Warning:** {doc.warning}", ""]
    out += [" ".join(doc.summary), ""]
    for t in doc.tables:
        out += [f"## {t.title}", ""]
        if not t.rows:
            out += [t.empty, ""]
            continue
        out.append("| " + " | ".join(t.headers) + " |")
        out.append("| " + " | ".join("---:" if i in t.right else "---" for i in range(len(t.headers))) + " |")
        out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
        out.append("")
    if doc.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in doc.notes] + [""]
    return "\n".join(out)


# Inline and self-contained: the file is attached to incident tickets and opened offline, so no
# web fonts, scripts or any other URL.
_CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.5em}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.2em .5em;vertical-align:top}
th{background:#f2f2f2;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
.warn{background:#fff3cd;border:1px solid #e0c36c;padding:.5em 1em}
figure{display:inline-block;margin:0 1em 1em 0}img{max-width:100%}figcaption{font-size:.9em;color:#555}"""


def _html_table(t: _Table) -> str:
    if not t.rows:
        return f"<p>{html.escape(t.empty)}</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.headers)
    body = "".join(
        "<tr>" + "".join(
            f"<td{' class=n' if i in t.right else ''}>"
            + "<br>".join(html.escape(x) for x in (c if isinstance(c, list) else [c])) + "</td>"
            for i, c in enumerate(row)) + "</tr>"
        for row in t.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(doc: _Doc, charts: List[Tuple[str, bytes]]) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(doc.title)}</title><style>{_CSS}</style></head><body>", f"<h1>{e(doc.title)}</h1>"]
    if doc.warning:
        parts.append(f'<p class="warn">{e(doc.warning)}</p>')
    parts.append(f"<p>{e(' '.join(doc.summary))}</p>")
    for t in doc.tables:
        parts += [f"<h2>{e(t.title)}</h2>", _html_table(t)]
    if charts:
        parts.append("<h2>Charts</h2>")
        parts += [f'<figure><img alt="{e(title)}" src="data:image/png;base64,'
                  f'{base64.b64encode(png).decode("ascii")}"><figcaption>{e(title)}</figcaption></figure>'
                  for title, png in charts]
    if doc.notes:
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{e(n)}</li>" for n in doc.notes] + ["</ul>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
