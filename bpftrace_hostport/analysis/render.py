"""The summary record as a human table (rich, no colour)."""
from __future__ import annotations

import io
from typing import List, Optional


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
