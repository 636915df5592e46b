"""A report or a comparison (report.py) as text: table, json, csv, markdown or html.

Every format but json and csv renders one document model (`_Doc`: a warning, summary
sentences, tables, notes), so the figures and their wording are the same everywhere. The text
is analysis/render.py's toolkit, the one the summary and the live view use: the same table
engine (cells wrap at spaces only, so no address, port or name is ever split; a leaner layout
with a detail line under each row, then a "key  value" block per row where a grid cannot fit)
and the same cell formats. Unknown figures (not measured by the backend) read "n/a", never 0.
HTML tables fit a 1280 px page: the mappings come as two tables (outcomes; latency and
volume), and a table whose narrowest grid is still wider becomes a block per row.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Set, Tuple

from bpftrace_hostport.analysis import render as txt
from bpftrace_hostport.analysis.render import Cell, NA, NONE, human_bytes, mapping_cell, pod_cell
from bpftrace_hostport.analysis.report import COMPARED, KEY, NAMES, plural

FORMATS = ("table", "json", "csv", "markdown", "html")
#: kept for callers: the one way a mapping and its pod are written (analysis/render.py)
mapping_label, pod_label = mapping_cell, pod_cell


@dataclass
class _Table:
    title: str
    headers: List[str]
    rows: List[List[Cell]]
    right: Set[int] = field(default_factory=set)     # numeric columns, right-justified
    record: str = "row"                               # what one row is, in the vertical layout
    empty: str = "None."                              # said instead of an empty table
    text: Optional[Callable[[Optional[int]], List[str]]] = None   # its own text layout (mappings)
    html_only: bool = False                           # a second view of a table the text has whole
    text_only: bool = False


@dataclass
class _Doc:
    title: str
    warning: Optional[str]
    summary: List[str]
    tables: List[_Table]
    notes: List[str]


def render(report: dict, fmt: str, width: Optional[int] = None) -> str:
    """`report` (build_report or compare_reports) in `fmt`: table, json, csv, markdown, html.
    `width` is for the table: default $COLUMNS, else the terminal's, no limit on a pipe."""
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
        return _text(doc, txt.terminal_width() if width is None else width)
    if fmt == "markdown":
        return _markdown(doc)
    from bpftrace_hostport.analysis.plots import charts     # matplotlib only when asked for
    return _html(doc, [] if comparison else charts(report))


# --------------------------------------------------------------------------- cell formats

def _num(n: Optional[float]) -> str:
    return NA if n is None else f"{n:,}"


_pct = txt.pct
_ms = txt.ms


def _drops(drops: Optional[dict]) -> Cell:
    return txt.drops_cell(drops)


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
                [_finding_table(r)] + _mapping_tables(r) + ([_node_table(r)] if r.get("per_node") else [])
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


def _ctx(r: dict) -> txt.Context:
    return txt.Context(dict(r["measures"]))


def _mapping_tables(r: dict) -> List[_Table]:
    """The mappings: for the text, the toolkit's mapping table (render.REPORT_LAYOUTS: the
    richest layout that fits the width); for markdown and html, two tables that each fit a page:
    what came back (outcomes, misses, drops), then latency and volume."""
    multi = bool(r.get("per_node"))
    lead = ["NODE"] if multi else []
    ms = r["mappings"]

    def text(width: Optional[int]) -> List[str]:
        per_node = {n["node"]: n["measures"] for n in r.get("per_node") or []}
        if not per_node:
            return txt.mapping_table(ms, width, txt.REPORT_LAYOUTS, _ctx(r), lead=lead)
        # latency is measured per node: one Context per node would split the table; n/a cells
        # come from each row's own node
        rows = [dict(m, latency_us=m["latency_us"] if per_node.get(m.get("node"), {}).get("latency", True)
                     else {"p50": None, "p90": None, "p99": None, "max": None}) for m in ms]
        return txt.mapping_table(rows, width, txt.REPORT_LAYOUTS, txt.Context({}), lead=lead)

    ident = lambda m: ([m["node"]] if multi else []) + [mapping_label(m), pod_label(m)]     # noqa: E731
    n0 = len(lead) + 2
    pending = any(m.get("pending") or m.get("in_flight") for m in ms)     # a column only when there are some
    heads = lead + ["MAPPING", "POD", "FLOWS", "ANSWERED", "REFUSED", "NO ANSWER"] + (
        ["PENDING, IN FLIGHT"] if pending else []) + ["MISSES", "DROPPED PACKETS", "FLOWS WITH A DROP",
                                                      "RATE flows/s"]
    rows = [ident(m) + [_num(m["flows"]), _answered(m), _refused(m), _num(m["unanswered"])]
            + ([f"{m.get('pending') or 0:,}, {m.get('in_flight') or 0:,}"] if pending else [])
            + [_num(m["misses"]), txt.drops_total(m["drops"]),
               _num(sum((m.get("dropped_flows") or {}).values())),
               NA if m["flows_per_s"] is None else f"{m['flows_per_s']:g}"] for m in ms]
    outcomes = _Table("Mappings", heads, rows, set(range(n0, len(heads))), "mapping",
                      "No hostPort traffic seen.", text=text)
    heads2 = lead + ["MAPPING", "POD", "P50 ms", "P90 ms", "P99 ms", "MAX ms", "PACKETS", "BYTES", "MASQ"]
    rows2 = [ident(m) + [_ms(m["latency_us"][k], _measured(r, m, "latency")) for k in ("p50", "p90", "p99", "max")]
             + [_num(m["packets"]), human_bytes(m["bytes"]), _pct(m["masqueraded_share"])] for m in ms]
    volume = _Table("Latency and volume per mapping", heads2, rows2, set(range(n0, len(heads2))), "mapping",
                    "No hostPort traffic seen.", html_only=True)
    return [outcomes, volume]


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
    """Drops per mapping and reason, each counted for what it is: packets the kernel dropped
    (its counters; n/a where the capture cannot say) and flows that had a packet dropped (their
    records; a flow counts once, for its last drop) — the same two figures the charts show."""
    rows = []
    for m in r["mappings"]:
        packets, flows = m["drops"], m.get("dropped_flows") or {}
        for reason in sorted(set(packets or {}) | set(flows)):
            rows.append(_node_cols(r, m) + [mapping_label(m), pod_label(m), reason,
                                            NA if packets is None else _num(packets.get(reason, 0)),
                                            _num(flows.get(reason, 0))])
    heads = (["NODE"] if r.get("per_node") else []) + ["MAPPING", "POD", "REASON", "PACKETS", "FLOWS"]
    empty = "No drops." if r["measures"]["drops"] else \
        "No drops seen where measured; the backend of some files does not see drops (n/a)."
    return _Table("Drops (PACKETS: packets the kernel dropped; FLOWS: flows that had a packet dropped)",
                  heads, rows, {len(heads) - 2, len(heads) - 1}, "drop", empty)


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


def _csv_value(v):
    """Unknown is empty, booleans true/false (as the export's CSV writes them), lists joined."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return v


def _csv(heads: Sequence[str], rows: Sequence[Sequence]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(heads)
    w.writerows([[_csv_value(v) for v in row] for row in rows])
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


#: the measure a compared figure needs (a capture whose backend lacks it reads n/a)
_NEEDS = {"p50_us": "latency", "p99_us": "latency", "misses": "misses", "drops": "drops"}


def _change(name: str, c: dict, status: str = "both", measures=({}, {})) -> str:
    """"7 -> 9 (+2)": a side without the mapping, or with nothing to show (no answered flow
    for a latency), reads "-"; a figure its capture does not measure "n/a"."""
    _, fmt, delta = _FIGURES[name]

    def side(value, measured: dict) -> str:
        if value is not None:
            return fmt(value)
        return NA if not measured.get(_NEEDS.get(name, ""), True) else NONE
    text = f"{side(c['before'], measures[0])} -> {side(c['after'], measures[1])}"
    return text if c["delta"] is None else f"{text} ({delta(c['delta'])})"


def _comparison_doc(c: dict) -> _Doc:
    b, a = c["before"], c["after"]
    sides = (b.get("measures") or {}, a.get("measures") or {})
    summary = [f"Before: {', '.join(map(str, b['files']))} ({_dur(b['span']['duration_s'])}); "
               f"after: {', '.join(map(str, a['files']))} ({_dur(a['span']['duration_s'])}); "
               "times are UTC; each cell reads before -> after (change)."]
    totals = _Table("Totals", ["FIGURE", "BEFORE -> AFTER (CHANGE)"],
                    [[_FIGURES[k][0], _change(k, v, measures=sides)] for k, v in c["totals"].items()], set(),
                    "figure")
    multi = any("node" in m for m in c["mappings"])
    heads = (["NODE"] if multi else []) + ["MAPPING", "POD", "STATUS"] + [f[0] for f in _FIGURES.values()]
    rows = [([m["node"]] if multi else []) + [mapping_label(m), pod_label(m), m["status"]]
            + [_change(k, m[k], m["status"], sides) for k in COMPARED] for m in c["mappings"]]
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
    w = width if width and width > 0 else None        # not a terminal: no limit
    lines: List[str] = []
    if doc.warning:
        lines += txt.paragraph(doc.warning, w)
    lines += txt.paragraph(doc.title, w) + [""]
    for sentence in doc.summary:
        lines += txt.paragraph(sentence, w)
    for t in doc.tables:
        if t.html_only:
            continue
        lines += [""] + txt.paragraph(t.title, w)
        if not t.rows:
            lines += txt.paragraph(t.empty, w)
        elif t.text is not None:
            lines += t.text(w)
        else:
            lines += txt.table_lines(t.headers, t.rows, w, right=t.right, record=t.record)
    if doc.notes:
        lines += ["", "Notes:"]
        for note in doc.notes:
            lines += _note_lines(note, w)
    return "\n".join(lines) + "\n"


def _note_lines(note: str, width: Optional[int]) -> List[str]:
    """A note as a bullet; a command it ends with (after ": sudo ...") on a line of its own,
    whole: pasted, it runs as printed."""
    head, sep, cmd = note.partition(": sudo ")
    if sep and " " in cmd and not cmd.endswith("."):
        return txt.paragraph(head + ":", width, "- ", "  ") + txt.command_lines("sudo " + cmd, "    ")
    return txt.paragraph(note, width, "- ", "  ")


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
# web fonts, scripts or any other URL. Cells wrap at spaces only (keep-all, no overflow-wrap):
# an address, a port or a name is never split; numbers never wrap.
_CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em;color:#222;max-width:1216px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.5em}
table{border-collapse:collapse;margin:.5em 0;max-width:100%;font-size:.875em}
th,td{border:1px solid #ccc;padding:.2em .5em;vertical-align:top;word-break:keep-all;overflow-wrap:normal}
th{background:#f2f2f2;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.rec{margin:.2em 0 .8em}table.rec th{width:12em}.w{white-space:nowrap}
.warn{background:#fff3cd;border:1px solid #e0c36c;padding:.5em 1em}
figure{margin:0 0 1.5em 0}img{max-width:100%;height:auto}figcaption{font-size:.9em;color:#555}"""

#: What the page's tables must fit (a 1280 px window, less the body's margins), and how wide a
#: character of a header (bold) and of a cell, and a cell's padding and border, are taken to be
#: (system-ui at 14 px, measured in Chromium, with some room).
_PAGE_PX, _HEAD_PX, _CHAR_PX, _CELL_PX = 1216, 10.0, 8.0, 18


def _narrowest_px(t: _Table) -> float:
    """How wide the table's grid gets at the least: each column as wide as its longest word."""
    cols = list(zip(*t.rows))
    px = 0.0
    for i, (head, col) in enumerate(zip(t.headers, cols)):
        items = [x for c in col for x in (c if isinstance(c, list) else [c])]
        cells = (max((len(x) for x in items), default=0) if i in t.right else
                 max((len(w) for x in items for w in txt.words(str(x))), default=0))
        px += max(cells * _CHAR_PX, max(len(w) for w in head.split()) * _HEAD_PX) + _CELL_PX
    return px


def _html_cell(c: Cell) -> str:
    """Items one per line; each word in a span that never breaks (a browser would break a name
    at its hyphens: node-a, nginx-hostport-6f9b), the line breaking at spaces only."""
    return "<br>".join(" ".join(f'<span class="w">{html.escape(w)}</span>' if any(ch in w for ch in "-/")
                                else html.escape(w) for w in txt.words(str(x)))
                       for x in (c if isinstance(c, list) else [c]))


def _html_table(t: _Table) -> str:
    """A grid, or where even its narrowest grid is wider than the page, a block per row (a
    small two-column table: the header, then the value)."""
    if not t.rows:
        return f"<p>{html.escape(t.empty)}</p>"
    if _narrowest_px(t) > _PAGE_PX:
        return "".join(
            '<table class="rec"><tbody>' + "".join(
                f"<tr><th>{html.escape(h)}</th><td{' class=n' if i in t.right else ''}>{_html_cell(c)}</td></tr>"
                for i, (h, c) in enumerate(zip(t.headers, row))) + "</tbody></table>"
            for row in t.rows)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.headers)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=n' if i in t.right else ''}>{_html_cell(c)}</td>"
                         for i, c in enumerate(row)) + "</tr>"
        for row in t.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(doc: _Doc, charts: List[Tuple[str, bytes]]) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(doc.title)}</title><style>{_CSS}</style></head><body>", f"<h1>{e(doc.title)}</h1>"]
    if doc.warning:
        parts.append(f'<p class="warn">{e(doc.warning)}</p>')
    parts += [f"<p>{e(sentence)}</p>" for sentence in doc.summary]
    for t in doc.tables:
        if t.text_only:
            continue
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
