"""Terminal text: the table layout every human table uses, the summary table and the live frame.

A table fits the width it is given (None: no limit, for a pipe or a file) and never cuts a
value: a long value wraps inside its cell, at spaces first, and a word longer than its cell
after one of ``/ - . : , _ = @`` (``nginx-`` | ``hostport-6f9b``, ``net.ipv4.conf.all.`` |
``route_localnet``). Numbers never wrap. When even the narrowest columns cannot fit, every row
becomes a block of ``KEY  value`` lines (psql's ``\\x``). No colour, no box characters: what
is printed can be pasted into a chat as it is.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

Cell = Union[str, List[str]]          # a list: items, one per line
#: `width` default of render_summary: the terminal's width (COLUMNS, else rich's), none on a pipe
AUTO = "auto"
GAP = 2                               # spaces between two columns
BREAKS = "/-.:,_=@"                   # a word longer than its cell breaks after one of these
ITEM_INDENT = "  "                    # continuation lines of a list item


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
    return f"{n} {one if n == 1 else (many or one + 's')}"


# --------------------------------------------------------------------------- wrapping


def _pieces(word: str) -> List[str]:
    """A word split after each break character: "nginx-hostport-6f9" -> "nginx-", "hostport-", "6f9"."""
    out, cur = [], ""
    for ch in word:
        cur += ch
        if ch in BREAKS:
            out.append(cur)
            cur = ""
    if cur:
        out.append(cur)
    return out or [""]


def wrap(text: str, width: Optional[int], indent: str = "") -> List[str]:
    """`text` as lines of at most `width` characters (None: one line), never losing a character.

    Lines break at spaces; a word longer than a line breaks after its last break character that
    fits, and only a run with none of them is cut. Continuation lines start with `indent`.
    """
    if width is None or len(text) <= width:
        return [text]
    width = max(width, len(indent) + 1)
    lines: List[str] = []
    cur = text[:len(text) - len(text.lstrip(" "))]      # a first-line indent stays
    for word in text.split():
        cand = f"{cur} {word}" if cur.strip() else cur + word
        if len(cand) <= width:
            cur = cand
            continue
        if cur.strip():
            lines.append(cur)
            cur = indent + word
        else:
            cur = cur + word
        while len(cur) > width:
            lead = len(cur) - len(cur.lstrip(" "))
            head = cur[:width]
            cut = max(head.rfind(ch) for ch in BREAKS) + 1
            if cut <= lead:
                cut = width
            lines.append(cur[:cut])
            cur = indent + cur[cut:]
    lines.append(cur)
    return [ln.rstrip() for ln in lines]


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


def _soft_min(cell: Cell) -> int:
    """The narrowest a cell gets when it wraps at spaces only."""
    items = _items(cell)
    extra = len(ITEM_INDENT) if len(items) > 1 else 0
    return max((len(w) + (extra if j else 0) for it in items for j, w in enumerate(it.split())), default=0)


def _hard_min(cell: Cell) -> int:
    """The narrowest a cell gets when words also break after / - . : , _ = @."""
    items = _items(cell)
    extra = len(ITEM_INDENT) if len(items) > 1 else 0
    return max((len(p) + extra for it in items for w in it.split() for p in _pieces(w)), default=0)


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
          right: Iterable[int]) -> List[str]:
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
    tall = any(max(len(c) for c in r) > 1 for r in body)
    for n, r in enumerate(body):
        if tall and n:
            lines.append("")
        lines += block(r)
    return lines


def _records(headers: Sequence[str], rows: Sequence[Sequence[Cell]], width: int, record: str) -> List[str]:
    """One block per row, a "KEY  value" line per column (psql's expanded display)."""
    keyw = max(len(h) for h in headers) + GAP
    two = width - keyw >= 20
    lines: List[str] = []
    for n, row in enumerate(rows, 1):
        lines.append(f"-[ {record} {n} ]".ljust(min(width, 40), "-"))
        for head, cell in zip(headers, row):
            items = _items(cell)
            indent = ITEM_INDENT if len(items) > 1 else ""
            if two:
                pieces = [p for it in items for p in wrap(it, width - keyw, indent)]
                lines += [((head if j == 0 else "").ljust(keyw) + p).rstrip() for j, p in enumerate(pieces)]
            else:           # too narrow for two columns: the key, then its value indented
                lines.append(head)
                lines += [("  " + p).rstrip() for it in items for p in wrap(it, width - 2, indent)]
    return lines


def table_lines(headers: Sequence[str], rows: Sequence[Sequence[Cell]], width: Optional[int], *,
                right: Iterable[int] = (), floors: Optional[Dict[int, int]] = None,
                keep: Iterable[int] = (), record: str = "row", records: bool = True) -> Optional[List[str]]:
    """A table as lines that fit `width` (None: no limit), or a record per row when it cannot.

    `right`: numeric columns (right-justified, never wrapped). `floors`: column -> the width
    under which that column should not be squeezed (unless its content is narrower): a table
    that needs less goes vertical instead. `keep`: columns whose words never break (codes).
    `records=False` returns None rather than records.
    """
    right, keep = set(right), set(keep)
    floors = floors or {}
    n = len(headers)
    cols = [[headers[i]] + [r[i] for r in rows] for i in range(n)]
    natural = [max(_natural(c) for c in col) for col in cols]
    if width is None:
        return _grid(headers, rows, [None] * n, right)
    room = width - GAP * (n - 1)
    head_min = [max(len(w) for w in h.split()) if h.split() else 0 for h in headers]
    for mins in (_soft_min, _hard_min):
        minimum = []
        for i, col in enumerate(cols):
            if i in right:
                m = max([head_min[i]] + [_natural(c) for c in col[1:]])
            else:
                m = max([head_min[i]] + [(_soft_min if i in keep else mins)(c) for c in col[1:]])
                m = max(m, min(natural[i], floors.get(i, 0)))
            minimum.append(m)
        cells = [max([head_min[i]] + [_natural(c) for c in col[1:]]) for i, col in enumerate(cols)]
        widths = _fit(natural, minimum, room, cheap=cells)
        if widths is not None:
            lines = _grid(headers, rows, widths, right)
            if all(len(ln) <= width for ln in lines):
                return lines
    return _records(headers, rows, width, record) if records else None


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Cell]], width: Optional[int], **kw) -> str:
    return "\n".join(table_lines(headers, rows, width, **kw)) + "\n"


def paragraph(text: str, width: Optional[int], first: str = "", rest: str = "") -> List[str]:
    """A sentence wrapped to `width`, with a first-line prefix and a hanging indent."""
    if width is None:
        return [first + text]
    lines = wrap(first + text, width, rest)
    return lines


# --------------------------------------------------------------------------- cell formats


def _fmt_num(value: float) -> str:
    """12.0 -> "12", 1.5 -> "1.5", 0.1234 -> "0.123"."""
    text = f"{float(value):.3f}".rstrip("0").rstrip(".")
    return text or "0"


def human_bytes(n: Optional[int]) -> str:
    """1234 -> "1.2 KiB"; below 1 KiB the exact count: "512 B"; None (not known) -> "n/a"."""
    if n is None:
        return "n/a"
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


def endpoint(ip: Optional[str], port: Optional[int]) -> str:
    """"10.0.0.1:80", "[fd00::1]:80": an IPv6 address is bracketed when a port follows."""
    if ip is None:
        return "-"
    if port is None:
        return ip
    host = f"[{ip}]" if ":" in ip else ip
    return f"{host}:{port}"


def _mapping_cell(m: dict) -> str:
    if m.get("pod_ip") is None:
        return f"{m['proto']} :{m['host_port']} (no DNAT)"
    return f"{m['proto']} :{m['host_port']} -> {endpoint(m.get('pod_ip'), m.get('pod_port'))}"


def _pod_name(m: dict) -> Optional[str]:
    ns, name, port_name = m.get("pod_namespace"), m.get("pod_name"), m.get("port_name")
    if not name:
        return None
    text = f"{ns}/{name}" if ns else name
    return f"{text} ({port_name})" if port_name else text


def _pod_cell(m: dict) -> str:
    name = _pod_name(m)
    if m.get("pod_ip") is None:
        return f"hostNetwork {name}" if name else "-"
    return name or "-"


def _drops_cell(drops: Optional[dict]) -> Cell:
    if drops is None:
        return "n/a"
    if not drops:
        return "-"
    return [f"{reason}:{int(count)}" for reason, count in sorted(drops.items())]


def _count(v) -> str:
    return "n/a" if v is None else str(int(v))


def _rate(v: Optional[float]) -> str:
    return "-" if v is None else f"{float(v):.2f}"


def mapping_key(m: dict) -> Tuple:
    return (m.get("proto"), m.get("family"), m.get("host_port"), m.get("pod_ip"), m.get("pod_port"))


#: The summary table's columns, in order; units in the headers.
COLUMNS = ("MAPPING", "POD", "FLOWS", "ANSWERED", "REFUSED", "NO ANSWER", "P50 ms", "P90 ms",
           "P99 ms", "MAX ms", "MISSES", "DROPS", "PACKETS", "BYTES", "AVG flows/s")
#: The live view's columns (a frame must fit 80 columns): NOW is the rate of the last seconds.
LIVE_COLUMNS = ("MAPPING", "POD", "FLOWS", "ANSWERED", "REFUSED", "NOW flows/s", "P50 ms", "MISSES",
                "DROPS n")
_LIVE_NARROW = ("MAPPING", "POD", "FLOWS", "ANSWERED", "REFUSED", "NOW flows/s")
_TEXT = {"MAPPING", "POD", "DROPS"}
_HEADERS = {"DROPS n": "DROPS"}          # the live view's DROPS: one number, the reasons at Ctrl-C
_FLOORS = {"MAPPING": 14, "POD": 16}


def _cells(m: dict, current: Optional[Dict[Tuple, float]] = None) -> Dict[str, Cell]:
    lat = m.get("latency_us") or {}
    now = (current or {}).get(mapping_key(m))
    return {
        "MAPPING": _mapping_cell(m), "POD": _pod_cell(m),
        "FLOWS": str(int(m.get("flows") or 0)), "ANSWERED": str(int(m.get("answered") or 0)),
        "REFUSED": str(int(m.get("refused") or 0)),
        "NO ANSWER": str(int(m.get("unanswered") or 0)),
        "P50 ms": _fmt_ms(lat.get("p50")), "P90 ms": _fmt_ms(lat.get("p90")),
        "P99 ms": _fmt_ms(lat.get("p99")), "MAX ms": _fmt_ms(lat.get("max")),
        "MISSES": _count(m.get("misses")), "DROPS": _drops_cell(m.get("drops")),
        "PACKETS": _count(m.get("packets")), "BYTES": human_bytes(m.get("bytes")),
        "AVG flows/s": _rate(m.get("flows_per_s")),
        "NOW flows/s": _rate(now) if current is not None else "-",
        "DROPS n": "n/a" if m.get("drops") is None else str(sum(int(v) for v in m["drops"].values())),
    }


def summary_table(summary: dict, width: Optional[int], columns: Sequence[str] = COLUMNS,
                  current: Optional[Dict[Tuple, float]] = None, records: bool = True) -> Optional[List[str]]:
    """The mappings of a summary record as table lines (see table_lines)."""
    rows = []
    for m in summary.get("mappings") or []:
        c = _cells(m, current)
        rows.append([c[k] for k in columns])
    right = {i for i, k in enumerate(columns) if k not in _TEXT}
    floors = {i: _FLOORS[k] for i, k in enumerate(columns) if k in _FLOORS}
    headers = [_HEADERS.get(k, k) for k in columns]
    keep = {i for i, k in enumerate(columns) if k == "DROPS"}       # reason names stay whole
    return table_lines(headers, rows, width, right=right, floors=floors, keep=keep, record="mapping",
                       records=records)


def headline(summary: dict) -> str:
    mappings = summary.get("mappings") or []
    total = summary.get("flows")
    if total is None:
        total = sum(int(m.get("flows") or 0) for m in mappings)
    lost = summary.get("lost_events")
    duration = float(summary.get("duration_s") or 0.0)
    lost_text = "lost flows unknown" if lost is None else plural(int(lost), "lost flow")
    return f"{plural(int(total), 'flow')} over {_fmt_num(duration)} s, {lost_text}"


# --------------------------------------------------------------------------- the diagnosis


def diagnosis(summary: dict, pods: Optional[Iterable] = None, problems_only: bool = False) -> List[str]:
    """What the figures say is wrong (or only unusual), one sentence per finding
    (analysis/diagnosis.py); problems_only leaves out what is expected."""
    from bpftrace_hostport.analysis.diagnosis import diagnose
    found = diagnose(summary.get("mappings") or [], pods,
                     lost_events=int(summary.get("lost_events") or 0))
    return [f.text for f in found if f.problem or not problems_only]


def check_command(check_hint: Optional[str] = None) -> str:
    return check_hint or "sudo bpftrace-hostport check"


# --------------------------------------------------------------------------- the summary


def render_summary(summary: dict, width=AUTO, check_hint: Optional[str] = None,
                   pods: Optional[Iterable] = None) -> str:
    """The summary record as text: a headline, the table per mapping, then what looks wrong.

    `width`: the columns to fit (default: the terminal's, or $COLUMNS; None: no limit).
    Latencies are milliseconds (2 decimals), "-" when no flow was answered; "n/a" is a figure
    the backend does not measure. `check_hint` is the `check` command line suggested when
    something looks wrong (default `sudo bpftrace-hostport check`); `pods` (PodInfo-like, or a
    callable returning them) lets the notes name a declared hostPort without a rule and tell
    dead pod IPs for sure.
    """
    width = _resolve(width)
    mappings = summary.get("mappings") or []
    lines = paragraph(headline(summary), width)
    if mappings:
        lines += summary_table(summary, width)
    else:
        lines.append("No hostPort traffic seen.")
    notes = diagnosis(summary, pods)
    if notes:
        lines.append("")
        for n in notes:
            lines += paragraph(n, width, "- ", "  ")
        lines += [""] + paragraph("For the diagnosis and the exact fix, run on the node:", width)
        lines.append("  " + check_command(check_hint))        # never wrapped: it is copied
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the live view


def render_live(summary: dict, width: int, height: int, events: Sequence[str],
                current: Optional[Dict[Tuple, float]] = None, check_hint: Optional[str] = None,
                pods: Optional[Iterable] = None) -> str:
    """One frame of the live view, at most `width` x (`height` - 1): the headline with the
    current rate, the mappings (as many as fit), a hint line, and the latest events that fit."""
    width = max(int(width or 80), 20)
    budget = max(int(height or 24) - 1, 6)
    now_total = sum((current or {}).values()) if current is not None else None
    head = headline(summary) + (f", now {now_total:.2f} flows/s" if now_total is not None else "")
    top = paragraph(head + "; Ctrl-C ends", width)
    mappings = summary.get("mappings") or []
    hint: List[str] = []
    notes = diagnosis(summary, pods, problems_only=True)
    if notes:
        hint = paragraph(notes[0] + (f" (+{len(notes) - 1} more at Ctrl-C)" if len(notes) > 1 else ""), width)
        hint += ["  " + check_command(check_hint)]         # never wrapped: it is pasted
    ev_head = ["", "latest events (times UTC):"]
    # The table gets what the events leave them: at least 4 lines for the events when there are any.
    max_table = budget - len(top) - len(hint) - (len(ev_head) + 4 if events else 0)
    table = _live_table(summary, mappings, width, max(max_table, 3), current)
    lines = top + table + hint
    room = budget - len(lines) - len(ev_head)
    if events and room > 0:
        tail = _latest(list(events), width, room)
        if tail:
            lines += ev_head + tail
    return "\n".join(lines[:budget])


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


def _live_table(summary: dict, mappings: List[dict], width: int, max_lines: int,
                current: Optional[Dict[Tuple, float]]) -> List[str]:
    """The first mappings that fit `max_lines`, then a line saying how many more there are."""
    if not mappings:
        return ["waiting for hostPort traffic..."]
    for k in range(len(mappings), 0, -1):
        part = dict(summary, mappings=mappings[:k])
        table = None
        for cols in (LIVE_COLUMNS, _LIVE_NARROW):
            table = summary_table(part, width, cols, current if current is not None else {}, records=False)
            if table is not None:
                break
        if table is None:
            table = [ln for m in mappings[:k] for ln in paragraph(
                f"{_mapping_cell(m)} {_pod_cell(m)}: {plural(int(m.get('flows') or 0), 'flow')}",
                width, "", "  ")]
        more = len(mappings) - k
        if more:
            table = table + [f"... {plural(more, 'more mapping')} in the summary at Ctrl-C"]
        if len(table) <= max_lines or k == 1:
            return table[:max_lines] if k == 1 and len(table) > max_lines else table
    return []  # pragma: no cover
