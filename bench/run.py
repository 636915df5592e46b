#!/usr/bin/env python3
"""The benchmark: what does tracing hostPort DNAT cost, per output, and does it lose flows?

    sudo .venv/bin/python -m bench.run            # full run, BENCHMARKS.md (from the repo root)
    sudo .venv/bin/python -m bench.run --quick    # 1 round, 1 s trials (the smoke test's size)
    sudo .venv/bin/python bench/run.py ...        # the same

One run builds its own lab (bench/bench-hostport.yaml: the nginx-hostport pod with hostPorts
8000->80 and 44300->443, plus an iperf pod with hostPort 5201->5201), then runs rounds; each
round runs every mode once, in an order that rotates by one every round:

    baseline    nothing watching
    record      `bpftrace-hostport trace --lab NAME --record FILE --format none`
    metrics     `bpftrace-hostport trace --lab NAME --metrics 127.0.0.1:PORT --format none`
    json        `bpftrace-hostport trace --lab NAME --format json` writing to a file
    conntrack   `ip netns exec NODE conntrack -E -o timestamp` writing to a file

and measures, per mode: new connections/s through hostPort 8000 (wrk from the lab's client
namespace, `Connection: close`, bounded in time and in count), the machine's busy CPU and the
watcher's CPU per connection, bulk throughput through hostPort 5201 (one iperf3 stream); for
the tracer: flows lost or unaccounted, RSS once attached and at its peak (with the compile
child), time to attached, and each eBPF program's run time (bpf(BPF_ENABLE_STATS) for the run).
Each round also runs the node's traffic that is not hostPort (wrk and iperf3 to the pods' own
addresses, routed through the node without DNAT) without and with the tracer, and an eBPF
comparison: the tracer's programs and the `floor` variant loaded by the bench in turn under
each load (bench/ebpf_sections.trial), ns per packet and per connection.
Ratios are taken within a round against that round's baseline, then summarised (bench/analysis.py).

Results: raw JSON in bench/out/ (or --out) and, for a full run, BENCHMARKS.md (the text below
its "<!-- analysis -->" line is kept). Everything happens inside the lab's network namespaces
and on loopback; every process and namespace the bench starts is removed in finally blocks,
also on Ctrl-C / SIGTERM.
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:
    # `python bench/run.py`: run as the module bench.run, with the repo root (not bench/) first
    # on the path, as `python -m bench.run` would from the root.
    import os
    import runpy
    import sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runpy.run_module("bench.run", run_name="__main__", alter_sys=True)
    raise SystemExit(0)

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

from bench.analysis import analyse
from bench.config import (BENCH_DIR, CLIENT_PORT_RANGE, EBPF_SOURCES, EBPF_TRAFFIC, MANIFEST, MARKDOWN, MODES,
                          OTHER_KINDS, OTHER_MODES, ROOT, TARGETS, TRACER_MODES, TUPLE_BUDGET)
from bench.lab import BenchLab
from bench.load import run_iperf, run_wrk
from bench.markdown import render, write_markdown
from bench.meta import machine, source_state
from bench.procfs import BPF_STATS_SYSCTL, bpf_run_time_stats
from bench.procs import Procs, log
from bench.trial import trial

DEFAULT_ROUNDS = 10


def parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run",
                                 description="bpftrace-hostport benchmarks (see BENCHMARKS.md)")
    ap.add_argument("--quick", action="store_true", help="one round of 1 s trials (smoke-test size)")
    ap.add_argument("--rounds", type=int, help=f"rounds (default {DEFAULT_ROUNDS}, quick 1)")
    ap.add_argument("--duration", type=float, help="seconds per conn/s trial (default 5, quick 1)")
    ap.add_argument("--iperf-duration", type=float, help="seconds per bulk trial (default 5, quick 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--max-rate", type=int, default=60000,
                    help="count bound of a conn/s trial, per second of its duration (default 60000)")
    ap.add_argument("--no-burst", action="store_true", help="skip the burst (no tuple reuse) trials")
    ap.add_argument("--no-bulk", action="store_true", help="skip the bulk (iperf3) trials")
    ap.add_argument("--no-other", action="store_true",
                    help="skip the trials of traffic that is not hostPort (the client to the pods' own addresses)")
    ap.add_argument("--no-ebpf", action="store_true",
                    help="skip the eBPF comparison (the tracer's programs against the floor, loaded by the bench)")
    ap.add_argument("--ebpf-duration", type=float, help="seconds per eBPF comparison trial (default 4, quick 1)")
    ap.add_argument("--py-spy", choices=TRACER_MODES, metavar="MODE",
                    help="add one extra trial of MODE (not in the medians) with py-spy attached to the "
                         "tracer, and report where its CPU goes")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "out", help="directory for the JSON (default bench/out)")
    ap.add_argument("--markdown", type=Path, help="write the markdown report here "
                    "(default: BENCHMARKS.md for a full run, none with --quick)")
    ap.add_argument("--lab-name", help="lab name (default bench-<random>)")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="run nothing: analyse the trials of a stored run again, rewrite its results and "
                         "the markdown (default BENCHMARKS.md)")
    return ap.parse_args(argv)


def plan(args) -> argparse.Namespace:
    """The run's sizes from the options."""
    p = argparse.Namespace()
    p.rounds = args.rounds or (1 if args.quick else DEFAULT_ROUNDS)
    p.duration = args.duration or (1.0 if args.quick else 5.0)
    p.iperf_duration = args.iperf_duration or (1.0 if args.quick else 5.0)
    p.max_requests = int(args.max_rate * p.duration)
    if args.quick:
        # A quick run stays below one client's distinct source tuples (TUPLE_BUDGET): no tuple
        # is reused inside one trace, so the smoke test's accounting does not depend on how the
        # tracer handles reuse; the full run's sustained trials go well past it.
        p.max_requests = min(p.max_requests, int(TUPLE_BUDGET * 0.75))
    p.burst_requests = int(TUPLE_BUDGET * 0.75)
    p.burst = not (args.quick or args.no_burst)
    p.kinds = ("conn",) if args.no_bulk else ("conn", "bulk")
    p.other_kinds = () if args.no_other else tuple(k for k in OTHER_KINDS if k == "other" or not args.no_bulk)
    p.ebpf = not args.no_ebpf
    p.ebpf_duration = args.ebpf_duration or (1.0 if args.quick else 4.0)
    p.settle = 0.3 if args.quick else 1.0
    p.markdown = args.markdown if args.markdown else (None if args.quick else MARKDOWN)
    return p


def preflight() -> Optional[str]:
    if os.geteuid() != 0:
        return "the bench needs root (network namespaces, eBPF): run it with sudo."
    missing = [t for t in ("wrk", "iperf3", "conntrack", "ip") if not shutil.which(t)]
    if missing:
        return f"missing tools: {', '.join(missing)} (apt-get install {' '.join(missing)})"
    return None


def run_meta(args, p, argv, name: str, workdir: Path) -> dict:
    return {
        **machine(),
        "command": "sudo .venv/bin/python -m bench.run" + "".join(f" {a}" for a in argv),
        "quick": args.quick, "rounds": p.rounds, "modes": list(MODES),
        "duration_s": p.duration, "iperf_duration_s": p.iperf_duration,
        "other": {"kinds": list(p.other_kinds), "modes": list(OTHER_MODES)},
        "ebpf": {"traffic": list(EBPF_TRAFFIC), "sources": list(EBPF_SOURCES), "duration_s": p.ebpf_duration}
        if p.ebpf else None,
        "wrk": {"threads": args.threads, "connections": args.connections, "max_requests": p.max_requests,
                "burst_requests": p.burst_requests},
        "lab": {"name": name, "manifest": str(MANIFEST.relative_to(ROOT)),
                "client_port_range": list(CLIENT_PORT_RANGE), "tuple_budget": TUPLE_BUDGET},
        "targets": TARGETS, "workdir": str(workdir),
        "source_at_start": source_state(),
        "bpf_stats_enabled_before": BPF_STATS_SYSCTL.read_text().strip(),
    }


def rounds(lab: BenchLab, procs: Procs, args, p, workdir: Path) -> List[dict]:
    """The round loop: every kind of trial in every mode, the order rotating by one each round."""
    trials: List[dict] = []

    def one(kind: str, mode: str, r: int, duration: float, requests: int = 0, profiler=None) -> None:
        time.sleep(p.settle)
        # Timing every program run costs the kernel two clock reads per run: the conn/s trials
        # (the throughput figures) run without it when burst trials are there to measure it.
        timed = kind != "conn" or not p.burst
        with (bpf_run_time_stats() if timed else contextlib.nullcontext()):
            trials.append(trial(kind, mode, r, lab, procs, args, workdir, duration, requests, profiler))

    for r in range(p.rounds):
        order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
        log(f"round {r + 1}/{p.rounds}: {' -> '.join(order)}")
        for kind in p.kinds:
            for mode in order:
                one(kind, mode, r, p.duration if kind == "conn" else p.iperf_duration, p.max_requests)
        if p.burst:
            for mode in (m for m in order if m in TRACER_MODES):
                one("burst", mode, r, p.duration, p.burst_requests)
        # Traffic that is not hostPort, without and with the tracer (untimed, like the conn/s
        # trials: the ratio is what a node pays).
        for kind in p.other_kinds:
            for mode in (OTHER_MODES if r % 2 == 0 else OTHER_MODES[::-1]):
                time.sleep(p.settle)
                trials.append(trial(kind, mode, r, lab, procs, args, workdir,
                                    p.duration if kind == "other" else p.iperf_duration, p.max_requests))
        if p.ebpf:
            trials.extend(ebpf_round(lab, r, p))
    if args.py_spy:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if os.access(spy, os.X_OK):
            one("profile", args.py_spy, p.rounds, p.duration, p.max_requests, profiler=spy)
        else:
            log("py-spy not found (pip install py-spy): no profile")
    return trials


def ebpf_round(lab: BenchLab, r: int, p) -> List[dict]:
    """The eBPF comparison of one round: the tracer's programs and the floor loaded by the bench
    itself (bench/ebpf_sections.trial, no tracer user space), in turn under each traffic, the
    order of the two alternating by round; run time from BPF_ENABLE_STATS."""
    from bench.ebpf_sections import trial as ebpf_trial
    from bench.ebpf_variants import VARIANTS
    text = (ROOT / "bpf" / "hostport.bpf.c").read_text()
    texts = {"tracer": text, "floor": VARIANTS["floor"](text)}
    out = []
    for traffic in EBPF_TRAFFIC:
        for source in (EBPF_SOURCES if r % 2 == 0 else EBPF_SOURCES[::-1]):
            time.sleep(p.settle)
            t = ebpf_trial(texts[source], ROOT / "bpf" / "events.h", True, lab, p.ebpf_duration, traffic)
            ns = sum(v[0] for v in t["runs"].values())
            runs = sum(v[1] for v in t["runs"].values())
            out.append({"kind": "ebpf", "mode": source, "traffic": traffic, "round": r, "rate": t["rate"],
                        "connections": t["conns"], "packets": t["packets"], "run_time_ns": ns, "run_cnt": runs,
                        "progs": {k: {"run_time_ns": v[0], "run_cnt": v[1]} for k, v in t["runs"].items()}})
            log(f"r{r}-ebpf-{traffic}-{source}: {ns / max(1, t['packets']):.1f} ns per packet, "
                f"{ns / max(1, t['conns']):.0f} ns per connection")
    return out


def results_of(trials: List[dict]) -> dict:
    res = analyse([t for t in trials if t["kind"] != "profile"])
    prof = [t for t in trials if t["kind"] == "profile"]
    res["profile"] = ({"mode": prof[0]["mode"], "conn_per_s": prof[0]["wrk"]["rps"], **(prof[0].get("profile") or {})}
                      if prof else None)
    return res


def cleanup(lab: BenchLab, procs: Procs, name: str) -> dict:
    procs.stop_all()
    removed = []
    try:
        removed = lab.down()
    except Exception as e:   # noqa: BLE001 - reported in the JSON; what is left is listed below
        log(f"lab down failed: {e}")
    netns = "/var/run/netns"
    left = [ns for ns in os.listdir(netns) if ns.startswith(f"bhp-{name}-")] if os.path.isdir(netns) else []
    return {"namespaces_removed": removed, "namespaces_left": left,
            "processes_left": [p.pid for p in procs.live if p.poll() is None],
            "bpf_stats_enabled_after": BPF_STATS_SYSCTL.read_text().strip()}


def write_results(out: dict, args, stamp: str) -> Path:
    json_path = args.out / f"bench-{stamp}.json"
    out["meta"]["json"] = (str(json_path.resolve().relative_to(ROOT)) if json_path.resolve().is_relative_to(ROOT)
                           else str(json_path))
    text = json.dumps(out, indent=1, default=str)
    json_path.write_text(text)
    (args.out / "latest.json").write_text(text)
    log(f"wrote {json_path}")
    return json_path


def render_again(path: Path, md: Path) -> int:
    """--render: the analysis and the tables again, from a run's stored trials (no new trial)."""
    out = json.loads(path.read_text())
    if out.get("error"):
        print(f"{path}: that run failed ({out['error']}); nothing to render", file=sys.stderr)
        return 1
    out["results"] = results_of(out["trials"])
    out["meta"]["rendered_again"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    path.write_text(json.dumps(out, indent=1, default=str))
    write_markdown(md, render(out))
    log(f"rewrote the results of {path} and {md}")
    return 0


def _sigterm(*_):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    p = plan(args)
    if args.render:
        return render_again(args.render, args.markdown or MARKDOWN)
    problem = preflight()
    if problem:
        print(problem, file=sys.stderr)
        return 2
    name = args.lab_name or f"bench-{secrets.token_hex(2)}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bhp-bench-"))
    # The run's own compile cache (mkdtemp makes it 0700): its first tracer start compiles and
    # fills it, every later one loads from it, whatever the machine's cache holds.
    os.environ["BPFTRACE_HOSTPORT_CACHE_DIR"] = str(workdir / "compile-cache")
    procs = Procs()
    lab = BenchLab(name, procs, workdir)
    meta = run_meta(args, p, argv, name, workdir)
    trials: List[dict] = []
    result, error, t0 = {}, None, time.monotonic()
    old_term = signal.signal(signal.SIGTERM, _sigterm)
    try:
        lab.up()
        meta["lab"].update(lab.namespaces())
        # Warm-up (not recorded): caches, the server's first connections, the ARP entries.
        run_wrk(lab, procs, args, workdir, "warmup", 1.0, int(args.max_rate))
        run_iperf(lab, procs, workdir, "warmup", 1.0)
        trials = rounds(lab, procs, args, p, workdir)
        result = results_of(trials)
    except KeyboardInterrupt:
        error = "interrupted"
    except Exception as e:   # recorded in the JSON, reported below
        error = f"{type(e).__name__}: {e}"
    finally:
        meta["cleanup"] = cleanup(lab, procs, name)
        signal.signal(signal.SIGTERM, old_term)
        meta["source_at_end"] = source_state()
        meta["wall_s"] = round(time.monotonic() - t0, 1)
        shutil.rmtree(workdir, ignore_errors=True)
    out = {"meta": meta, "results": result, "trials": trials, **({"error": error} if error else {})}
    write_results(out, args, stamp)
    if error:
        print(f"bench failed: {error}", file=sys.stderr)
        return 1
    if p.markdown:
        write_markdown(p.markdown, render(out))
        log(f"wrote {p.markdown}")
    for k, v in result["checks"].items():
        log(f"{k}: {v['value']} (target {v['target']}): {'met' if v['met'] else 'MISSED'}")
    log(f"wall time {meta['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
