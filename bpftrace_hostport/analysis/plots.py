"""The report's charts as PNG bytes, drawn from the report dict alone (report.py keeps the
few numbers each chart needs: per-mapping percentiles, rate and outcome series per time bucket,
misses per bucket, drops per reason).

Figures are made with the object-oriented API on the Agg canvas: no pyplot, so no GUI backend
is ever chosen and no global figure registry keeps them alive; each figure is garbage once its
PNG is written. Every chart is 1200 px wide (the report's page fits 1280 px), its legend below
the axes (never over the data), its time axis in full times of day with the date (UTC) in the
axis label, and every count axis in whole numbers. Drops are counted as the tables count them,
and each for what it is: packets the kernel dropped, flows that had a packet dropped.

matplotlib wants a writable configuration and cache directory; a user without a home (a
service account, `sudo -u nobody`) gets a private temporary one, removed at exit, instead of
matplotlib's two-line warning.
"""
from __future__ import annotations

import atexit
import io
import os
import shutil
import tempfile
from typing import Callable, List, Optional, Tuple


def _writable(path: str) -> bool:
    """`path` is a directory we may write, or could be made under one that is."""
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def _config_dir() -> None:
    if os.environ.get("MPLCONFIGDIR"):
        return
    home = os.path.expanduser("~")
    config = os.path.join(os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config"), "matplotlib")
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache"), "matplotlib")
    if home not in ("", "~", "/") and os.path.isdir(home) and _writable(config) and _writable(cache):
        return
    tmp = tempfile.mkdtemp(prefix="bpftrace-hostport-mpl-")
    atexit.register(shutil.rmtree, tmp, True)
    os.environ["MPLCONFIGDIR"] = tmp


_config_dir()

import numpy as np                                                      # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg            # noqa: E402
from matplotlib.dates import AutoDateLocator, DateFormatter            # noqa: E402
from matplotlib.figure import Figure                                   # noqa: E402
from matplotlib.ticker import MaxNLocator                               # noqa: E402

from bpftrace_hostport.analysis.render import identity                 # noqa: E402
from bpftrace_hostport.analysis.report import QUANTILES                # noqa: E402

MAX_SERIES = 8            # more lines than this is unreadable: the busiest mappings are drawn
WIDTH_IN, DPI = 12.0, 100  # 1200 px
OUTCOME_COLORS = (("answered", "tab:green"), ("refused", "tab:orange"), ("unanswered", "tab:red"))


def charts(report: dict) -> List[Tuple[str, bytes]]:
    """[(title, PNG)]: latency ECDF, flows over time, outcomes over time per mapping, outcomes per
    mapping, misses over time, drops per mapping."""
    return [(title, _png(draw, report, height)) for title, draw, height in (
        ("Latency distribution per mapping (ECDF)", _latency, 4.5),
        ("Flows per second per mapping", _flows, 4.5),
        ("Outcomes over time per mapping: answered, refused, unanswered flows per time bucket",
         _outcomes_over_time, None),
        ("Outcomes per mapping", _outcomes, None),
        ("Misses over time: connections to a hostPort that got no DNAT", _misses, 3.5),
        ("Drops per mapping: packets the kernel dropped, and flows that had a packet dropped", _drops, None),
    )]


def _png(draw: Callable[[Figure, dict], Optional[str]], report: dict, height: Optional[float]) -> bytes:
    fig = Figure(figsize=(WIDTH_IN, height or _height(draw, report)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    empty = draw(fig, report)
    if empty:                  # say why instead of an empty frame
        fig.clear()
        fig.set_size_inches(WIDTH_IN, 1.2)
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.text(0.5, 0.5, empty, ha="center", va="center", wrap=True)
    out = io.BytesIO()
    # no Software metadata: it carries matplotlib's web address, and the report has no URL
    fig.savefig(out, format="png", metadata={"Software": None})
    return out.getvalue()


def _height(draw, report: dict) -> float:
    """Inches: a panel per mapping over time, a bar per mapping (or per drop reason) otherwise."""
    if draw is _drops:
        n = len(_drop_rows(report))
    else:
        n = len([m for m in report["mappings"] if m["flows"] > 0])
    n = max(1, min(n, MAX_SERIES))
    if draw is _outcomes_over_time:
        return 1.0 + 1.5 * n
    return 1.6 + 0.45 * n


def _label(m: dict) -> str:
    # the endpoint tells a dual-stack pod's v4 and v6 mappings apart; the name says who it is
    node = f"{m['node']}: " if m.get("node") else ""
    return node + identity(m)


def _busiest(report: dict, having: Callable[[dict], bool]) -> List[dict]:
    ms = [m for m in report["mappings"] if having(m)]
    return sorted(ms, key=lambda m: -m["flows"])[:MAX_SERIES]


def _times(report: dict) -> np.ndarray:
    """The buckets' starts, and the end of the last (a step or a bar needs its width)."""
    tl = report["timeline"]
    times = np.array([t.rstrip("Z") for t in tl["times"]], dtype="datetime64[ms]")
    return np.append(times, times[-1] + np.timedelta64(int(tl["bucket_s"] * 1000), "ms"))


def _steps(ax, report: dict, values: List[float], label: str) -> None:
    """A step line over the buckets; the last bucket gets its width too (its end is appended)."""
    ax.plot(_times(report), list(values) + list(values[-1:]), drawstyle="steps-post", label=label)


def _time_axis(ax, report: dict, label: bool = True) -> None:
    """Full times of day on every tick, the date (UTC) once in the label; dates on the ticks
    too when the span crosses midnight."""
    times = report["timeline"]["times"]
    days = sorted({t[:10] for t in times})
    locator = AutoDateLocator(minticks=4, maxticks=10)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(DateFormatter("%H:%M:%S" if len(days) == 1 else "%Y-%m-%d %H:%M"))
    for t in ax.get_xticklabels():
        t.set_rotation(0)
    if label:
        ax.set_xlabel(f"time (UTC) on {days[0]}" if len(days) == 1 else f"time (UTC), {days[0]} to {days[-1]}")


def _legend_below(fig_or_ax, handles=None, labels=None, ncols: int = 2) -> None:
    """The legend under the plot, outside the data."""
    fig = fig_or_ax if isinstance(fig_or_ax, Figure) else fig_or_ax.figure
    if handles is None:
        handles, labels = fig_or_ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(ncols, len(handles)),
                   fontsize="small", frameon=False)


def _counts(axis) -> None:
    axis.set_major_locator(MaxNLocator(integer=True))


def _latency(fig, report: dict) -> Optional[str]:
    ms = _busiest(report, lambda m: m.get("latency_quantiles_us"))
    if not ms:
        return ("Latency not measured by this capture's backend" if not report["measures"]["latency"]
                else "No answered flow with a latency")
    ax = fig.add_subplot()
    for m in ms:
        ax.step(np.array(m["latency_quantiles_us"]) / 1000.0, QUANTILES, where="post", label=_label(m))
    low = min(m["latency_quantiles_us"][0] for m in ms)
    high = max(m["latency_quantiles_us"][-1] for m in ms)
    if low > 0 and high / low > 100:
        ax.set_xscale("log")
    ax.set_xlabel("first packet to first reply (ms)")
    ax.set_ylabel("share of answered flows")
    _legend_below(ax)
    return None


def _flows(fig, report: dict) -> Optional[str]:
    ms = _busiest(report, lambda m: m["flows"] > 0)
    if not ms:
        return "No flows"
    ax = fig.add_subplot()
    for m in ms:
        _steps(ax, report, [v for _, v in m["rate_series"]], _label(m))
    ax.set_ylabel(f"flows/s ({report['timeline']['bucket_s']:g} s buckets)")
    ax.set_ylim(bottom=0)
    _time_axis(ax, report)
    _legend_below(ax)
    return None


def _outcomes_over_time(fig, report: dict) -> Optional[str]:
    """One panel per mapping: its flows per bucket, stacked by outcome: when it broke, when it
    recovered."""
    ms = _busiest(report, lambda m: m["flows"] > 0 and m.get("outcome_series"))
    if not ms:
        return "No flows"
    times = _times(report)
    width = (times[1:] - times[:-1]).astype("timedelta64[ms]").astype(float) / 86_400_000.0   # days
    axes = fig.subplots(len(ms), 1, sharex=True, squeeze=False)[:, 0]
    handles = None
    for ax, m in zip(axes, ms):
        series = m["outcome_series"]
        bottom = np.zeros(len(times) - 1)
        for name, color in OUTCOME_COLORS:
            values = np.array(series.get(name) or [0] * len(bottom), dtype=float)
            ax.bar(times[:-1], values, width=width, bottom=bottom, align="edge", color=color, label=name,
                   linewidth=0)
            bottom += values
        ax.set_title(_label(m), fontsize="small", loc="left")
        ax.set_ylabel("flows")
        ax.set_ylim(bottom=0, top=max(1.0, float(bottom.max()) * 1.1))
        _counts(ax.yaxis)
        handles = ax.get_legend_handles_labels()
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)
    _time_axis(axes[-1], report)
    _legend_below(fig, *handles, ncols=3)
    return None


def _outcomes(fig, report: dict) -> Optional[str]:
    ms = _busiest(report, lambda m: m["flows"] > 0)
    if not ms:
        return "No flows"
    ax = fig.add_subplot()
    labels = [_label(m) for m in ms][::-1]
    left = np.zeros(len(ms))
    parts = list(OUTCOME_COLORS) + [("pending", "tab:gray"), ("in flight", "tab:purple")]
    for name, color in parts:
        key = name.replace(" ", "_")
        values = np.array([m.get(key) or 0 for m in ms][::-1], dtype=float)
        if name in ("pending", "in flight") and not values.any():
            continue
        ax.barh(labels, values, left=left, label=name, color=color)
        left += values
    ax.set_xlabel("flows")
    _counts(ax.xaxis)
    ax.tick_params(axis="y", labelsize="small")
    _legend_below(ax, ncols=5)
    return None


def _misses(fig, report: dict) -> Optional[str]:
    tl = report["timeline"]
    lines = list(tl["misses"].items())[:MAX_SERIES]
    if not lines:
        return "No misses" if report["measures"]["misses"] else "Misses not measured by this backend"
    ax = fig.add_subplot()
    for key, values in lines:                     # report.py's key: "tcp/9090"
        proto, _, port = key.partition("/")
        _steps(ax, report, values, f"hostPort {port}/{proto}")
    ax.set_ylabel(f"connections per {tl['bucket_s']:g} s")
    ax.set_ylim(bottom=0)
    _counts(ax.yaxis)
    _time_axis(ax, report)
    _legend_below(ax, ncols=4)
    return None


def _drop_rows(report: dict) -> List[tuple]:
    rows = []
    for m in report["mappings"]:
        packets, flows = m.get("drops"), m.get("dropped_flows") or {}
        for reason in sorted(set(packets or {}) | set(flows)):
            rows.append((f"{_label(m)}: {reason}", None if packets is None else packets.get(reason, 0),
                         flows.get(reason, 0)))
    return rows


def _drops(fig, report: dict) -> Optional[str]:
    """Per mapping and reason, two bars side by side: the packets the kernel dropped (as the
    Drops table's PACKETS; none where the capture cannot say) and the flows with a drop (FLOWS)."""
    rows = _drop_rows(report)
    if not rows:
        return "No drops" if report["measures"]["drops"] else "Drops not measured by this backend"
    rows = rows[:MAX_SERIES][::-1]
    ax = fig.add_subplot()
    y = np.arange(len(rows))
    ax.barh(y + 0.2, [r[1] or 0 for r in rows], height=0.4, color="tab:red",
            label="packets the kernel dropped")
    ax.barh(y - 0.2, [r[2] for r in rows], height=0.4, color="tab:blue", label="flows that had a packet dropped")
    ax.set_yticks(y, [r[0] for r in rows], fontsize="small")
    ax.set_xlabel("count")
    _counts(ax.xaxis)
    _legend_below(ax)
    return None
