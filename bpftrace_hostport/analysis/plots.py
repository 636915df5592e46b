"""The report's charts as PNG bytes, drawn from the report dict alone (report.py keeps the
few numbers each chart needs: per-mapping percentiles, rate series, misses/drops timeline).

Figures are made with the object-oriented API on the Agg canvas: no pyplot, so no GUI backend
is ever chosen and no global figure registry keeps them alive; each figure is garbage once its
PNG is written.
"""
from __future__ import annotations

import io
from typing import Callable, List, Optional, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure

from bpftrace_hostport.analysis.report import QUANTILES

MAX_SERIES = 8            # more lines than this is unreadable: the busiest mappings are drawn


def charts(report: dict) -> List[Tuple[str, bytes]]:
    """[(title, PNG)]: latency ECDF, flows over time, answered vs unanswered, misses and drops."""
    return [(title, _png(draw, report)) for title, draw in (
        ("Latency distribution per mapping (ECDF)", _latency),
        ("Flows per second per mapping", _flows),
        ("Answered and unanswered flows per mapping", _answered),
        ("Misses and drops over time", _misses_drops),
    )]


def _png(draw: Callable[[object, dict], Optional[str]], report: dict) -> bytes:
    fig = Figure(figsize=(8, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    empty = draw(ax, report)
    if empty:                  # say why instead of an empty frame
        ax.clear()
        ax.set_axis_off()
        ax.text(0.5, 0.5, empty, ha="center", va="center", wrap=True)
    out = io.BytesIO()
    # no Software metadata: it carries matplotlib's web address, and the report has no URL
    fig.savefig(out, format="png", metadata={"Software": None})
    return out.getvalue()


def _label(m: dict) -> str:
    # the endpoint tells a dual-stack pod's v4 and v6 mappings apart; the name says who it is
    pod = f" ({m['pod_namespace']}/{m['pod_name']})" if m.get("pod_name") else ""
    to = f"[{m['pod_ip']}]" if ":" in (m["pod_ip"] or "") else (m["pod_ip"] or "no DNAT")
    port = f":{m['pod_port']}" if m["pod_port"] is not None else ""
    node = f"{m['node']}: " if m.get("node") else ""
    return f"{node}{m['proto']} :{m['host_port']} -> {to}{port}{pod}"


def _busiest(report: dict, having: Callable[[dict], bool]) -> List[dict]:
    ms = [m for m in report["mappings"] if having(m)]
    return sorted(ms, key=lambda m: -m["flows"])[:MAX_SERIES]


def _steps(ax, report: dict, values: List[float], label: str) -> None:
    """A step line over the buckets; the last bucket gets its width too (its end is appended)."""
    tl = report["timeline"]
    times = np.array([t.rstrip("Z") for t in tl["times"]], dtype="datetime64[ms]")
    times = np.append(times, times[-1] + np.timedelta64(int(tl["bucket_s"] * 1000), "ms"))
    ax.plot(times, list(values) + list(values[-1:]), drawstyle="steps-post", label=label)


def _time_axis(ax) -> None:
    locator = AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    ax.set_xlabel("time (UTC)")


def _latency(ax, report: dict) -> Optional[str]:
    ms = _busiest(report, lambda m: m.get("latency_quantiles_us"))
    if not ms:
        return ("Latency not measured by this capture's backend" if not report["measures"]["latency"]
                else "No answered flow with a latency")
    for m in ms:
        ax.step(np.array(m["latency_quantiles_us"]) / 1000.0, QUANTILES, where="post", label=_label(m))
    low = min(m["latency_quantiles_us"][0] for m in ms)
    high = max(m["latency_quantiles_us"][-1] for m in ms)
    if low > 0 and high / low > 100:
        ax.set_xscale("log")
    ax.set_xlabel("first packet to first reply (ms)")
    ax.set_ylabel("share of answered flows")
    ax.legend(fontsize="small")
    return None


def _flows(ax, report: dict) -> Optional[str]:
    ms = _busiest(report, lambda m: m["flows"] > 0)
    if not ms:
        return "No flows"
    for m in ms:
        _steps(ax, report, [v for _, v in m["rate_series"]], _label(m))
    ax.set_ylabel(f"flows/s ({report['timeline']['bucket_s']:g} s buckets)")
    _time_axis(ax)
    ax.legend(fontsize="small")
    return None


def _answered(ax, report: dict) -> Optional[str]:
    ms = _busiest(report, lambda m: m["flows"] > 0)
    if not ms:
        return "No flows"
    labels = [_label(m) for m in ms][::-1]
    answered = np.array([m["answered"] for m in ms][::-1])
    # unanswered includes flows the kernel counted but the tracer lost (kernel counts)
    other = np.array([max(m["flows"] - m["answered"], 0) for m in ms][::-1])
    ax.barh(labels, answered, label="answered", color="tab:green")
    ax.barh(labels, other, left=answered, label="unanswered", color="tab:red")
    ax.set_xlabel("flows")
    ax.legend(fontsize="small")
    return None


def _misses_drops(ax, report: dict) -> Optional[str]:
    tl = report["timeline"]
    lines = [(f"misses {k}", v) for k, v in tl["misses"].items()] + \
            [(f"flows dropped: {k}", v) for k, v in tl["drops"].items()]
    if not lines:
        known = report["measures"]["misses"] or report["measures"]["drops"]
        return "No misses or drops" if known else "Misses and drops not measured by this backend"
    for label, values in lines[:MAX_SERIES]:
        _steps(ax, report, values, label)
    ax.set_ylabel(f"per {tl['bucket_s']:g} s bucket")
    _time_axis(ax)
    ax.legend(fontsize="small")
    return None
