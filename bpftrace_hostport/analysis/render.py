"""The text toolkit: one table engine and one set of cell formats for every human output (the
summary, the live view, the report, `rules` and `check`), and the summary and live frames.

A table fits the width it is given (None: no limit, for a pipe or a file) and never cuts a
value: text wraps at spaces only, and an address, a port, a name or a code never holds one, so
none is ever split (`[fd00:140:1::2]:80` and `cjweichen/nginx-hostport-6f9b9886b4-dndhf` stay
whole). Numbers never wrap. A column is never narrower than its longest word; when a grid
cannot fit, the caller's next, leaner layout is tried (the mapping's identity and the rarer
figures move to a detail line under its row), and at last every row becomes a block of
`KEY  value` lines (psql's ``\\x``). A command (a `backticked` span, or a line of its own) is
never wrapped: pasted, it runs as printed. No colour, no box characters: what is printed can be
pasted into a chat as it is.

What a cell says: a number; `n/a` for what is not measured or not known (the conntrack backend's
latency, packets of a partial capture); `-` only where there is nothing to show (no answered flow
to take a latency from, no pod known to own a port).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from bpftrace_hostport.addr import endpoint, hostport

Cell = Union[str, List[str]]          # a list: items, one per line
#: `width` default of render_summary: the terminal's width (COLUMNS, else rich's), none on a pipe
AUTO = "auto"
GAP = 2                               # spaces between two columns
ITEM_INDENT = "  "                    # continuation lines of a list item
NA = "n/a"                            # not measured, or not known
NONE = "-"                            # nothing to show

__all__ = ["endpoint", "hostport", "terminal_width", "plural", "wrap", "paragraph", "table_lines",
           "render_table", "render_summary", "render_live", "summary_table", "NA", "NONE"]


# --------------------------------------------------------------------------- width


def terminal_width(stream=None) -> Optional[int]:
    """The width to fit: $COLUMNS when set, else the terminal's (rich), None off a terminal."""
    cols = os.environ.get("COLUMNS", "").strip()
    if cols.isdigit() and int(cols) > 0:
        return int(cols)
    stream = sys.stdout if stream is None else stream
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    if not tty:
        return None
    from rich.console import Console
    return Console(file=stream).width


def _resolve(width) -> Optional[int]:
    if width == AUTO:
        return terminal_width()
    return None if width is None else max(int(width), 10)


def plural(n: int, one: str, many: Optional[str] = None) -> str:
    """plural(1, "flow") -> "1 flow", plural(2, "entry", "entries") -> "2 entries"."""
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


# --------------------------------------------------------------------------- wrapping


def words(text: str) -> List[str]:
    """The unbreakable words of a text: split at spaces, except inside a `backticked` span (a
    command), which is one word however many spaces it holds."""
    out: List[str] = []
    cur, quoted = "", False
    for ch in text:
        if ch == "`":
            quoted = not quoted
        if ch == " " and not quoted:
            if cur:
                out.append(cur)
            cur = ""
            continue
        cur += ch
    if cur:
        out.append(cur)
    return out


def wrap(text: str, width: Optional[int], indent: str = "") -> List[str]:
    """`text` as lines of at most `width` characters (None: one line), never losing a character
    and never breaking a word: lines break at spaces only, a word longer than a line stands on
    a line of its own (longer than `width`: the one case a line is wider). Continuation lines
    start with `indent`; a first-line indent stays."""
    if width is None or len(text) <= width:
        return [text]
    lead = text[:len(text) - len(text.lstrip(" "))]
    lines: List[str] = []
    cur = lead
    for word in words(text):
        if not cur.strip():
            cur = cur + word
        elif len(cur) + 1 + len(word) <= width:
            cur = f"{cur} {word}"
        else:
            lines.append(cur)
            cur = indent + word
    lines.append(cur)
    return [ln.rstrip() for ln in lines]


def paragraph(text: str, width: Optional[int], first: str = "", rest: str = "") -> List[str]:
    """A sentence wrapped to `width`, with a first-line prefix and a hanging indent."""
    if width is None:
        return [first + text]
    return wrap(first + text, width, rest)


def segments(parts: Sequence[str], width: Optional[int], indent: str = "  ", sep: str = "; ") -> List[str]:
    """Parts (each a few words that belong together: "p90 0.07 ms") joined by `sep` onto lines
    of `width`, a part going to the next line whole when it does not fit the rest of one; a
    part "\\n" ends the line."""
    lines: List[str] = []
    cur = ""
    for p in parts:
        if p == "\n":
            if cur:
                lines.append(cur)
            cur = ""
            continue
        if not p:
            continue
        cand = f"{cur}{sep}{p}" if cur else p
        if width is None or len(indent) + len(cand) + len(sep.rstrip()) <= width or not cur:
            cur = cand
        else:
            lines.append(cur + sep.rstrip())
            cur = p
    if cur:
        lines.append(cur)
    return [ln for line in lines for ln in wrap(indent + line, width, indent + "  ")]


def command_lines(cmd: str, indent: str = "  ") -> List[str]:
    """A command on a line of its own, whole whatever the width: pasted, it runs as printed."""
    return [indent + cmd]


def _items(cell: Cell) -> List[str]:
    if isinstance(cell, (list, tuple)):
        return [str(x) for x in cell] or [""]
    return str(cell).split("\n")


def _cell_lines(cell: Cell, width: Optional[int], numeric: bool) -> List[str]:
    items = _items(cell)
    if numeric:
        return items
    indent = ITEM_INDENT if len(items) > 1 else ""
    return [ln for it in items for ln in wrap(it, width, indent)]


def _natural(cell: Cell) -> int:
    return max(len(x) for x in _items(cell))


def _min_width(cell: Cell) -> int:
    """The narrowest a cell gets: its longest word (a list's continuation lines are indented)."""
    items = _items(cell)
    extra = len(ITEM_INDENT) if len(items) > 1 else 0
    return max((len(w) + (extra if j else 0) for it in items for j, w in enumerate(words(it))), default=0)


# --------------------------------------------------------------------------- tables


def _fit(natural: List[int], minimum: List[int], room: int, cheap: Optional[List[int]] = None) -> Optional[List[int]]:
    """Widths summing to at most `room`: first the columns whose header alone is wider than their
    cells wrap the header (`cheap`: one more header line, no row gets taller), then the widest
    column gives a character back first, none going under its minimum. None when the minimums
    do not fit."""
    if sum(minimum) > room:
        return None
    widths = list(natural)
    excess = sum(widths) - room
    for i in sorted(range(len(widths)), key=lambda i: natural[i] - (cheap or natural)[i], reverse=True):
        if excess <= 0:
            break
        give = min(excess, widths[i] - max((cheap or natural)[i], minimum[i]))
        if give > 0:
            widths[i] -= give
            excess -= give
    while excess > 0:
        i = max((i for i in range(len(widths)) if widths[i] > minimum[i]), key=lambda i: widths[i])
        widths[i] -= 1
        excess -= 1
    return widths


def _grid(headers: Sequence[str], rows: Sequence[Sequence[Cell]], widths: Sequence[Optional[int]],
          right: Iterable[int], details: Optional[Sequence[Sequence[str]]], width: Optional[int]) -> List[str]:
    right = set(right)
    heads = [wrap(h, w) for h, w in zip(headers, widths)]
    body = [[_cell_lines(c, w, i in right) for i, (c, w) in enumerate(zip(row, widths))] for row in rows]
    real = [max([len(x) for x in heads[i]] + [len(x) for r in body for x in r[i]])
            for i in range(len(headers))]

    def block(cells: List[List[str]], bottom: bool = False) -> List[str]:
        height = max(len(c) for c in cells)
        out = []
        for k in range(height):
            parts = []
            for i, c in enumerate(cells):
                j = k - (height - len(c)) if bottom else k
                text = c[j] if 0 <= j < len(c) else ""
                parts.append(text.rjust(real[i]) if i in right else text.ljust(real[i]))
            out.append((" " * GAP).join(parts).rstrip())
        return out

    lines = block(heads, bottom=True)
    lines.append((" " * GAP).join("-" * w for w in real))
    tall = not details and any(max(len(c) for c in r) > 1 for r in body)
    for n, r in enumerate(body):
        if tall and n:
            lines.append("")
        lines += block(r)
        if details and details[n]:
            lines += segments(details[n], width, "  ")
    return lines


def _records(headers: Sequence[str], rows: Sequence[Sequence[Cell]], width: int, record: str) -> List[str]:
    """One block per row, a "KEY  value" line per column (psql's expanded display)."""
    keyw = max(len(h) for h in headers) + GAP
    lines: List[str] = []
    for n, row in enumerate(rows, 1):
        lines.append(f"-[ {record} {n} ]".ljust(min(width, 40), "-"))
        for head, cell in zip(headers, row):
            items = _items(cell)
            indent = ITEM_INDENT if len(items) > 1 else ""
            # beside its key when its longest word fits there, else under it
            if width - keyw >= 20 and _min_width(cell) <= width - keyw:
                pieces = [p for it in items for p in wrap(it, width - keyw, indent)]
                lines += [((head if j == 0 else "").ljust(keyw) + p).rstrip() for j, p in enumerate(pieces)]
            else:           # too narrow for two columns: the key, then its value indented
                lines.append(head)
                lines += [("  " + p).rstrip() for it in items for p in wrap(it, width - 2, indent)]
    return lines


def table_lines(headers: Sequence[str], rows: Sequence[Sequence[Cell]], width: Optional[int], *,
                right: Iterable[int] = (), floors: Optional[Dict[int, int]] = None,
                keep: Iterable[int] = (), record: str = "row", records: bool = True,
                details: Optional[Sequence[Sequence[str]]] = None) -> Optional[List[str]]:
    """A table as lines that fit `width` (None: no limit), or a record per row when it cannot.

    `right`: numeric columns (right-justified, never wrapped). `floors`: column -> the width
    under which that column should not be squeezed (unless its content is narrower): a table
    that needs less goes vertical instead. `keep`: kept for callers (every word is kept whole
    now). `details`: per row, parts of a line under it (segments()), for what the grid leaves
    out. `records=False` returns None rather than records.
    """
    del keep
    right = set(right)
    floors = floors or {}
    n = len(headers)
    cols = [[headers[i]] + [r[i] for r in rows] for i in range(n)]
    natural = [max(_natural(c) for c in col) for col in cols]
    if width is None:
        return _grid(headers, rows, [None] * n, right, details, None)
    room = width - GAP * (n - 1)
    head_min = [max(len(w) for w in h.split()) if h.split() else 0 for h in headers]
    minimum = []
    for i, col in enumerate(cols):
        if i in right:
            m = max([head_min[i]] + [_natural(c) for c in col[1:]])
        else:
            m = max([head_min[i]] + [_min_width(c) for c in col[1:]])
            m = max(m, min(natural[i], floors.get(i, 0)))
        minimum.append(m)
    cells = [max([head_min[i]] + [_natural(c) for c in col[1:]]) for i, col in enumerate(cols)]
    widths = _fit(natural, minimum, room, cheap=cells)
    if widths is not None:
        lines = _grid(headers, rows, widths, right, details, width)
        if all(len(ln) <= width for ln in lines):
            return lines
    return _records(headers, rows, width, record) if records else None


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Cell]], width: Optional[int], **kw) -> str:
    return "\n".join(table_lines(headers, rows, width, **kw)) + "\n"


# --------------------------------------------------------------------------- cell formats


def number(value: float) -> str:
    """12.0 -> "12", 1.5 -> "1.5", 0.1234 -> "0.123"."""
    text = f"{float(value):.3f}".rstrip("0").rstrip(".")
    return text or "0"


def human_bytes(n: Optional[int]) -> str:
    """1234 -> "1.2 KiB"; below 1 KiB the exact count: "512 B"; None (not known) -> "n/a"."""
    if n is None:
        return NA
    n = int(n)
    if abs(n) < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024.0
        if abs(value) < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}"
    return f"{n} B"  # pragma: no cover


def ms(us: Optional[float], measured: bool = True) -> str:
    """Microseconds as milliseconds: "0.05", "0.007" below 10 µs; "-" none to measure; "n/a"."""
    if not measured:
        return NA
    if us is None:
        return NONE
    return f"{us / 1000:.2f}" if us >= 10 else f"{us / 1000:.3f}"


def count(v) -> str:
    """1234 -> "1,234"; None (not known) -> "n/a", never 0."""
    return NA if v is None else f"{int(v):,}"


def rate(v: Optional[float]) -> str:
    return NA if v is None else f"{float(v):.2f}"


def pct(share: Optional[float]) -> str:
    return NONE if share is None else f"{share * 100:.1f}%"


def mapping_key(m: dict) -> Tuple:
    return (m.get("proto"), m.get("family"), m.get("host_port"), m.get("pod_ip"), m.get("pod_port"))


def hostport_cell(m: dict) -> str:
    """ "8000/tcp": the hostPort a mapping is of."""
    return hostport(m["host_port"], m["proto"])


def target_cell(m: dict) -> str:
    """ "-> 10.140.1.2:80", or "no DNAT" for a misses-only row."""
    if m.get("pod_ip") is None:
        return "no DNAT"
    return f"-> {endpoint(m.get('pod_ip'), m.get('pod_port'))}"


def mapping_cell(m: dict) -> str:
    """ "tcp :8000 -> 10.140.1.2:80", "tcp :9000 (no DNAT)"."""
    if m.get("pod_ip") is None:
        return f"{m['proto']} :{m['host_port']} (no DNAT)"
    return f"{m['proto']} :{m['host_port']} -> {endpoint(m.get('pod_ip'), m.get('pod_port'))}"


def pod_name(m: dict) -> Optional[str]:
    """ "ns/name (port name)", or None when no pod is known."""
    ns, name, port_name = m.get("pod_namespace"), m.get("pod_name"), m.get("port_name")
    if not name:
        return None
    text = f"{ns}/{name}" if ns else name
    return f"{text} ({port_name})" if port_name else text


def pod_cell(m: dict) -> str:
    name = pod_name(m)
    if m.get("pod_ip") is None:
        return f"hostNetwork {name}" if name else NONE
    return name or NONE


def identity(m: dict) -> str:
    """A mapping in full, as its detail line says it: "8000/tcp -> 10.140.1.2:80 ns/pod (http)"."""
    pod = pod_name(m)
    if m.get("pod_ip") is None:
        return f"{hostport_cell(m)} no DNAT" + (f"; hostNetwork pod {pod}" if pod else "; no pod known")
    return f"{hostport_cell(m)} {target_cell(m)}" + (f" {pod}" if pod else "")


def drops_cell(drops: Optional[dict]) -> Cell:
    """Drop reasons with their counts ("NETFILTER_DROP:4"), "0" for none, "n/a" not measured."""
    if drops is None:
        return NA
    if not drops:
        return "0"
    return [f"{reason}:{int(n):,}" for reason, n in sorted(drops.items())]


def drops_total(drops: Optional[dict]) -> str:
    return NA if drops is None else f"{sum(int(v) for v in drops.values()):,}"


# --------------------------------------------------------------------------- mapping tables


@dataclass(frozen=True)
class Column:
    header: str
    numeric: bool
    cell: Callable[[dict, "Context"], Cell]


@dataclass
class Context:
    measures: Dict[str, bool]
    current: Optional[Dict[Tuple, float]] = None      # flows/s of the last seconds (live)

    def measured(self, what: str) -> bool:
        return self.measures.get(what, True)


def _lat(name: str):
    def cell(m, ctx):
        return ms((m.get("latency_us") or {}).get(name), ctx.measured("latency"))
    return cell


def _now(m, ctx) -> str:
    if ctx.current is None:
        return NONE                      # the first seconds: no rate yet
    return rate(ctx.current.get(mapping_key(m), 0.0))


def _answered(m, ctx) -> str:
    return count(m.get("answered") or 0)


def _answered_share(m, ctx) -> str:
    a = int(m.get("answered") or 0)
    return f"{a:,} ({pct(m.get('answered_share'))})" if m.get("flows") else "0"


def _refusals_detail(m, ctx) -> Optional[str]:
    kinds = m.get("refusals") or {}
    if not kinds:
        return None
    by = m.get("refused_by") or {}
    who = f" by the {'/'.join(sorted(by))}" if by else ""
    return "refused: " + ", ".join(f"{k} {n:,}" for k, n in sorted(kinds.items())) + who


def _drops_detail(m, ctx) -> Optional[str]:
    d = m.get("drops")
    if not d:
        return None
    return "dropped packets: " + ", ".join(f"{r} {int(n):,}" for r, n in sorted(d.items()))


def _dropped_flows_detail(m, ctx) -> Optional[str]:
    d = m.get("dropped_flows") or {}
    if not d:
        return None
    return "flows with a drop: " + ", ".join(f"{r} {int(n):,}" for r, n in sorted(d.items()))


def _waiting_detail(m, ctx) -> Optional[str]:
    parts = []
    if m.get("pending"):
        parts.append(f"pending {int(m['pending']):,}")
    if m.get("in_flight"):
        parts.append(f"in flight {int(m['in_flight']):,}")
    return ", ".join(parts) or None


COLUMNS: Dict[str, Column] = {
    "MAPPING": Column("MAPPING", False, lambda m, c: mapping_cell(m)),
    "POD": Column("POD", False, lambda m, c: pod_cell(m)),
    "HOSTPORT": Column("HOSTPORT", False, lambda m, c: hostport_cell(m)),
    "NODE": Column("NODE", False, lambda m, c: m.get("node") or "unnamed"),
    "FLOWS": Column("FLOWS", True, lambda m, c: count(m.get("flows") or 0)),
    "ANSWERED": Column("ANSWERED", True, _answered),
    "ANSWERED %": Column("ANSWERED", True, _answered_share),
    "REFUSED": Column("REFUSED", True, lambda m, c: count(m.get("refused") or 0)),
    "NO ANSWER": Column("NO ANSWER", True, lambda m, c: count(m.get("unanswered") or 0)),
    "NOW": Column("NOW flows/s", True, _now),
    "P50": Column("P50 ms", True, _lat("p50")),
    "P90": Column("P90 ms", True, _lat("p90")),
    "P99": Column("P99 ms", True, _lat("p99")),
    "MAX": Column("MAX ms", True, _lat("max")),
    "MISSES": Column("MISSES", True, lambda m, c: count(m.get("misses"))),
    "DROPS": Column("DROPS packets", False, lambda m, c: drops_cell(m.get("drops"))),
    "DROPS n": Column("DROPS packets", True, lambda m, c: drops_total(m.get("drops"))),
    "PACKETS": Column("PACKETS", True, lambda m, c: count(m.get("packets"))),
    "BYTES": Column("BYTES", True, lambda m, c: human_bytes(m.get("bytes"))),
    "AVG": Column("AVG flows/s", True, lambda m, c: rate(m.get("flows_per_s"))),
    "RATE": Column("RATE flows/s", True, lambda m, c: rate(m.get("flows_per_s"))),
    "MASQ": Column("MASQ", True, lambda m, c: pct(m.get("masqueraded_share"))),
}

_ALL_SUMMARY = ("MAPPING", "POD", "FLOWS", "ANSWERED", "REFUSED", "NO ANSWER", "P50", "P90", "P99", "MAX",
                "MISSES", "DROPS", "PACKETS", "BYTES", "AVG")
#: The summary's layouts, richest first: the first that fits the width is used; what a layout
#: leaves out of its grid goes to the detail line under each row.
SUMMARY_LAYOUTS = (
    _ALL_SUMMARY,
    ("HOSTPORT", "FLOWS", "ANSWERED", "REFUSED", "NO ANSWER", "P50", "P90", "P99", "MAX", "MISSES",
     "DROPS n", "PACKETS", "BYTES", "AVG"),
    ("HOSTPORT", "FLOWS", "ANSWERED", "REFUSED", "NO ANSWER", "P50", "P99", "MISSES", "DROPS n", "AVG"),
    ("HOSTPORT", "FLOWS", "ANSWERED", "REFUSED", "NO ANSWER", "P50", "MISSES", "DROPS n"),
)
_ALL_REPORT = ("MAPPING", "POD", "FLOWS", "ANSWERED %", "REFUSED", "NO ANSWER", "P50", "P90", "P99", "MAX",
               "MISSES", "DROPS", "PACKETS", "BYTES", "RATE", "MASQ")
REPORT_LAYOUTS = (
    _ALL_REPORT,
    ("HOSTPORT", "FLOWS", "ANSWERED %", "REFUSED", "NO ANSWER", "P50", "P90", "P99", "MAX", "MISSES",
     "DROPS n", "PACKETS", "BYTES", "RATE", "MASQ"),
    ("HOSTPORT", "FLOWS", "ANSWERED %", "REFUSED", "NO ANSWER", "P50", "P99", "MISSES", "DROPS n", "RATE"),
    ("HOSTPORT", "FLOWS", "ANSWERED %", "REFUSED", "NO ANSWER", "P50", "MISSES", "DROPS n"),
)
#: The live view's layouts (a frame must fit 80 columns): NOW is the rate of the last seconds.
LIVE_LAYOUTS = (
    ("MAPPING", "POD", "FLOWS", "ANSWERED", "REFUSED", "NO ANSWER", "NOW", "P50", "MISSES", "DROPS n"),
    ("HOSTPORT", "FLOWS", "ANSWERED", "REFUSED", "NO ANSWER", "NOW", "P50", "MISSES", "DROPS n"),
    ("HOSTPORT", "FLOWS", "ANSWERED", "REFUSED", "NO ANSWER", "NOW"),
    ("HOSTPORT", "FLOWS", "ANSWERED", "REFUSED"),
)


def _details(m: dict, ctx: Context, shown: Sequence[str], live: bool) -> List[str]:
    """What the grid of a layout leaves out, as parts of the detail line under the row: the
    mapping in full (its own line), then the figures that have no column, then what has no
    column in any layout (refusals by kind, flows waiting, flows with a drop)."""
    out: List[str] = []
    dnat = m.get("pod_ip") is not None
    if "MAPPING" not in shown:
        pod = pod_name(m)
        if dnat:
            out.append(f"{target_cell(m)} {pod}" if pod and "POD" not in shown else target_cell(m))
        else:
            out.append("no DNAT; " + (f"hostNetwork pod {pod}" if pod else "no pod known"))
        out.append("\n")
    if live or not dnat:
        return out if any(p != "\n" for p in out) else []
    lat = [k for k, c in (("p50", "P50"), ("p90", "P90"), ("p99", "P99"), ("max", "MAX")) if c not in shown]
    if lat and lat != ["p50", "p90", "p99", "max"][:0]:
        if not ctx.measured("latency"):
            out.append(f"latency {NA}")
        elif (m.get("latency_us") or {}).get("p50") is not None:
            vals = ", ".join(f"{k} {ms((m.get('latency_us') or {}).get(k))}" for k in lat)
            out.append(f"{vals} ms")
    if "PACKETS" not in shown or "BYTES" not in shown:
        out.append(f"packets {NA}" if m.get("packets") is None and m.get("bytes") is None else
                   f"{count(m.get('packets'))} packets, {human_bytes(m.get('bytes'))}")
    if "AVG" not in shown and "RATE" not in shown:
        out.append(f"{rate(m.get('flows_per_s'))} flows/s")
    if "DROPS" not in shown:
        out.append(_drops_detail(m, ctx))
    if "MASQ" in _ALL_REPORT and "MASQ" not in shown and "ANSWERED %" in shown \
            and m.get("masqueraded_share") is not None:
        out.append(f"masqueraded {pct(m['masqueraded_share'])}")
    for extra in (_refusals_detail, _waiting_detail, _dropped_flows_detail):
        out.append(extra(m, ctx))
    return [p for p in out if p] if any(p and p != "\n" for p in out) else []


def mapping_table(mappings: Sequence[dict], width: Optional[int], layouts: Sequence[Sequence[str]],
                  ctx: Context, *, records: bool = True, live: bool = False,
                  lead: Sequence[str] = ()) -> Optional[List[str]]:
    """Mappings as the first of `layouts` that fits `width` (None: the first, on one line per
    mapping), the rest of each mapping's figures on a detail line under it; else records of
    the first layout (records=False: None). `lead`: columns put before every layout (NODE)."""
    layouts = [tuple(lead) + tuple(l) for l in layouts]
    for k, cols in enumerate(layouts if width is not None else layouts[:1]):
        rows = [[COLUMNS[c].cell(m, ctx) for c in cols] for m in mappings]
        right = {i for i, c in enumerate(cols) if COLUMNS[c].numeric}
        floors = {i: f for i, c in enumerate(cols) for f in [{"MAPPING": 14, "POD": 16}.get(c, 0)] if f}
        details = [_details(m, ctx, cols, live) for m in mappings]
        details = details if any(details) else None
        lines = table_lines([COLUMNS[c].header for c in cols], rows, width, right=right, floors=floors,
                            records=False, details=details)
        if lines is not None:
            return lines
    if not records:
        return None
    cols = layouts[0]
    rows = [[COLUMNS[c].cell(m, ctx) for c in cols] for m in mappings]
    lines = _records([COLUMNS[c].header for c in cols], rows, width or 80, "mapping")
    extra = [[t for t in (f(m, ctx) for f in (_refusals_detail, _waiting_detail, _dropped_flows_detail))
              if t] for m in mappings]
    if any(extra):            # records carry every column; the extras go under each block
        out, n = [], 0
        for ln in lines:
            if ln.startswith("-[ mapping ") and n:
                out += segments(extra[n - 1], width, "  ")
            if ln.startswith("-[ mapping "):
                n += 1
            out.append(ln)
        out += segments(extra[n - 1], width, "  ")
        lines = out
    return lines


def summary_table(summary: dict, width: Optional[int], measures: Optional[Dict[str, bool]] = None) -> List[str]:
    """The mappings of a summary record as table lines (see mapping_table)."""
    return mapping_table(summary.get("mappings") or [], width, SUMMARY_LAYOUTS, Context(measures or {}))


def headline(summary: dict) -> str:
    mappings = summary.get("mappings") or []
    total = summary.get("flows")
    if total is None:
        total = sum(int(m.get("flows") or 0) for m in mappings)
    lost = summary.get("lost_events")
    duration = float(summary.get("duration_s") or 0.0)
    lost_text = "lost flows unknown" if lost is None else plural(int(lost), "lost flow")
    return f"{plural(int(total), 'flow')} over {number(duration)} s, {lost_text}"


# --------------------------------------------------------------------------- the diagnosis


def findings(summary: dict, pods: Optional[Iterable] = None):
    """The diagnosis of a summary record (analysis/diagnosis.py): problems first."""
    from bpftrace_hostport.analysis.diagnosis import diagnose
    return diagnose(summary.get("mappings") or [], pods, lost_events=int(summary.get("lost_events") or 0))


def diagnosis(summary: dict, pods: Optional[Iterable] = None, problems_only: bool = False) -> List[str]:
    """What the figures say is wrong (or only unusual), one sentence per finding
    (analysis/diagnosis.py); problems_only leaves out what is expected."""
    return [f.text for f in findings(summary, pods) if f.problem or not problems_only]


def check_command(check_hint: Optional[str] = None) -> str:
    return check_hint or "sudo bpftrace-hostport check"


# --------------------------------------------------------------------------- the summary


def render_summary(summary: dict, width=AUTO, check_hint: Optional[str] = None,
                   pods: Optional[Iterable] = None, measures: Optional[Dict[str, bool]] = None) -> str:
    """The summary record as text: a headline, the table per mapping, then what looks wrong.

    `width`: the columns to fit (default: the terminal's, or $COLUMNS; None: no limit).
    Latencies are milliseconds; "-" when no flow was answered; "n/a" is a figure the backend
    does not measure (`measures`: the capture header's). `check_hint` is the `check` command
    line suggested when something looks wrong (default `sudo bpftrace-hostport check`); `pods`
    (PodInfo-like, or a callable returning them) lets the notes name a declared hostPort
    without a rule and tell dead pod IPs for sure.
    """
    width = _resolve(width)
    mappings = summary.get("mappings") or []
    lines = paragraph(headline(summary), width)
    if mappings:
        lines += summary_table(summary, width, measures)
    else:
        lines.append("No hostPort traffic seen.")
    found = findings(summary, pods)
    if found:
        lines.append("")
        for f in found:
            lines += paragraph(f.text, width, f"- {f.severity}: ", "  ")
    if any(f.problem for f in found):
        lines += [""] + paragraph("For the diagnosis and the exact fix, run on the node:", width)
        lines += command_lines(check_command(check_hint))       # never wrapped: it is copied
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the live view


@dataclass
class Frame:
    text: str
    page: int          # the page of mappings shown (0-based)
    pages: int


def live_findings(found, width: int, room: int) -> List[str]:
    """The diagnosis while tracing: a line per finding (its brief form, most severe first), as
    many as `room` lines allow, then how many more the summary at Ctrl-C says."""
    out: List[str] = []
    for i, f in enumerate(found):
        lines = paragraph(f.brief or f.text, width, f"{f.severity}: ", "  ")
        left = len(found) - i - 1
        if out and len(out) + len(lines) + (1 if left else 0) > room:
            out.append(f"(+{left + 1} more in the summary at Ctrl-C)")
            break
        out += lines
    return out


def render_live(summary: dict, width: int, height: int, events: Sequence[str],
                current: Optional[Dict[Tuple, float]] = None, check_hint: Optional[str] = None,
                pods: Optional[Iterable] = None, page: int = 0, measures: Optional[Dict[str, bool]] = None,
                keys: bool = True) -> Frame:
    """One frame of the live view, at most `width` x (`height` - 1): the headline with the
    current rate, what looks wrong (a line per finding, expected states as expected), the check
    command when something is wrong and it fits, the mappings (page `page` of those that fit:
    the last line says how to page: `keys` n/p, else that pages turn by themselves), and the
    latest events that fit.

    The lines go first to the headline, the first finding, one mapping and a few events; what
    is left to the other findings (up to 6 lines), then to every mapping, then to the events."""
    width = max(int(width or 80), 20)
    budget = max(int(height or 24) - 1, 6)
    now_total = sum((current or {}).values()) if current is not None else None
    head = headline(summary) + (f", now {now_total:.2f} flows/s" if now_total is not None else "")
    top = paragraph(head + "; Ctrl-C ends", width)
    mappings = summary.get("mappings") or []
    found = findings(summary, pods)
    ctx = Context(measures or {}, current)
    cmd = check_command(check_hint)
    hint = ((command_lines(cmd) if len(cmd) + 2 <= width else
             paragraph("(the check command is in the summary at Ctrl-C)", width))
            if any(f.problem for f in found) else [])
    ev_head = ["", "latest events (times UTC):"]
    all_notes = live_findings(found, width, 10 ** 6)
    first_note = live_findings(found, width, 2) if found else []
    full_table = len(_live_rows(mappings, width, ctx)) if mappings else 1
    table_min = min(full_table, 6)
    events_min = len(ev_head) + 2 if events else 0
    free = budget - len(top) - len(hint) - len(first_note) - table_min - events_min
    notes_room = len(first_note) + max(0, min(free, 6 - len(first_note), len(all_notes) - len(first_note)))
    notes = live_findings(found, width, max(notes_room, len(first_note))) if found else []
    free = budget - len(top) - len(hint) - len(notes) - events_min
    table, page, pages = _live_table(mappings, width, max(min(free, full_table), table_min), ctx, page, keys)
    lines = top + notes + hint + table
    left = budget - len(lines) - len(ev_head)
    if events and left > 0:
        tail = _latest(list(events), width, left)
        if tail:
            lines += ev_head + tail
    return Frame("\n".join(lines[:budget]), page, pages)


def _latest(events: List[str], width: int, room: int) -> List[str]:
    """The latest events whose wrapped lines fit `room`, in time order; the latest two misses
    ("HH:MM:SS.mmm MISS ...") are kept whatever the flows after them."""
    wrapped = [wrap(ev, width, "    ") for ev in events]
    misses = [i for i, ev in enumerate(events) if ev[12:18] == " MISS "][-2:]
    chosen, used = set(), 0
    for i in list(reversed(misses)) + [i for i in reversed(range(len(events))) if i not in misses]:
        if used + len(wrapped[i]) > room:
            if i in misses:
                continue
            break
        chosen.add(i)
        used += len(wrapped[i])
    return [ln for i in sorted(chosen) for ln in wrapped[i]]


def _live_rows(mappings: Sequence[dict], width: int, ctx: Context) -> List[str]:
    lines = mapping_table(mappings, width, LIVE_LAYOUTS, ctx, records=False, live=True)
    if lines is not None:
        return lines
    # narrower than any grid: a sentence per mapping
    return [ln for m in mappings for ln in paragraph(
        f"{identity(m)}: {plural(int(m.get('flows') or 0), 'flow')}, {int(m.get('answered') or 0):,} "
        f"answered, {int(m.get('refused') or 0):,} refused, {int(m.get('unanswered') or 0):,} unanswered",
        width, "", "  ")]


def _live_table(mappings: List[dict], width: int, max_lines: int, ctx: Context, page: int,
                keys: bool) -> Tuple[List[str], int, int]:
    """The mappings of page `page` that fit `max_lines` with a line saying which page this is
    and how to turn it; every mapping on one page when they all fit."""
    if not mappings:
        return ["waiting for hostPort traffic..."], 0, 1
    full = _live_rows(mappings, width, ctx)
    if len(full) <= max_lines:
        return full, 0, 1
    # pages of as many mappings as fit with the page line
    per = 1
    for k in range(len(mappings), 0, -1):
        if len(_live_rows(mappings[:k], width, ctx)) + 1 <= max_lines:
            per = k
            break
    pages = -(-len(mappings) // per)
    page %= pages
    part = mappings[page * per:(page + 1) * per]
    how = "n: next page, p: previous" if keys else "the next one in a few seconds"
    rows = _live_rows(part, width, ctx)[:max(max_lines - 1, 1)]
    first = page * per + 1
    return rows + paragraph(f"mappings {first}-{first + len(part) - 1} of {len(mappings)} (page {page + 1}/"
                            f"{pages}; {how})", width), page, pages
