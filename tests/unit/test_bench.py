"""The bench package without a kernel: statistics, per-round ratios, accounting, the readers
of each tracer output, the markdown report, and both ways of starting it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import analysis, markdown, readers
from bench.config import ANALYSIS_MARK, MODES, TRACER_MODES

ROOT = Path(__file__).resolve().parents[2]


def test_spread_quartiles_and_relative_spread():
    s = analysis.spread([4.0, 1.0, 3.0, 2.0, 5.0, None])
    assert (s["n"], s["median"], s["min"], s["max"], s["q1"], s["q3"], s["iqr"]) == (5, 3.0, 1.0, 5.0, 2.0, 4.0, 2.0)
    assert s["rel_iqr"] == pytest.approx(2 / 3, abs=1e-4) and s["rel_range"] == pytest.approx(4 / 3, abs=1e-4)
    one = analysis.spread([7.0])
    assert one["q1"] == one["q3"] == 7.0 and one["iqr"] == 0.0
    assert analysis.spread([None])["median"] is None


def _summary(flows, lost=0):
    return {"http_delivered": flows, "http_counted": flows, "http_answered": flows, "lost_events": lost,
            "kernel": {"ringbuf_deferred": 0, "flow_insert_errors": 0, "flows_created": flows},
            "http_span_s": 5.0}


def _trial(kind, mode, r, rps, busy_s, watcher_s=None, flows=None):
    n = int(rps * 5)
    mon = {"mode": mode}
    if mode != "baseline":
        mon.update(cpu_load_s=watcher_s, runtime_load_s=watcher_s, cpu_load_pct_of_core=watcher_s * 20)
    if mode in TRACER_MODES:
        mon.update(summary=_summary(n if flows is None else flows), attach_s=1.0, cpu_at_ready_s=0.3,
                   wakeups_during_load=10, rss_at_ready_kb=70 * 1024, rss_anon_at_ready_kb=45 * 1024,
                   rss_file_at_ready_kb=25 * 1024, rss_end_of_load_kb=72 * 1024,
                   rss_anon_end_of_load_kb=47 * 1024, hwm_end_of_load_kb=72 * 1024, maxrss_kb=134 * 1024,
                   startup_tree_pss_peak_kb=180 * 1024, cpu_total_s=1.0, stop_s=0.2,
                   progs={"nf_prerouting_post_dnat": {"run_time_ns": n * 4000, "run_cnt": n * 10}},
                   code={"bpf": "b1", "python": "p1"})
    if mode == "conntrack":
        mon["conntrack"] = {"events": 3 * n, "http_new_events": n - 5, "enobufs_warnings": 1}
    t = {"kind": kind, "mode": mode, "round": r, "monitor": mon, "wall_s": 5.0, "machine_busy_cpu_s": busy_s,
         "system_cpu_pct": {"idle": 10.0, "softirq": 30.0, "steal": 0.0}, "labserver_cpu_s": 4.5,
         "pod_passive_opens": n, "client_active_opens": n}
    if kind == "bulk":
        t["iperf3"] = {"gbit_s": rps / 1000.0, "bytes": 10**9}
    else:
        t["wrk"] = {"rps": rps, "requests": n, "sent": n, "socket_errors": {"connect": 0}, "wrk_cpu_s": 3.0}
    return t


def _run(rounds=3):
    trials = []
    for r in range(rounds):
        base = 20000 + 500 * r
        for kind in ("conn", "bulk"):
            for i, mode in enumerate(MODES):
                rps = base * (1.0 - 0.05 * i)
                trials.append(_trial(kind, mode, r, rps, busy_s=9.0 - 0.1 * i, watcher_s=0.05 * (i + 1)))
    return trials


def test_ratios_are_within_a_round():
    ratios = analysis.round_ratios(_run())
    # json is mode 3: 0.85 x its own round's baseline in every round, whatever the drift
    assert ratios["json"]["ratio"] == pytest.approx([0.85] * 3)
    busy = lambda i, r: (9.0 - 0.1 * i) / int((20000 + 500 * r) * (1 - 0.05 * i) * 5)  # noqa: E731
    assert ratios["json"]["cpu_ratio"] == pytest.approx([busy(3, r) / busy(0, r) for r in range(3)])
    assert ratios["json"]["bulk_ratio"] == pytest.approx([0.85] * 3)


def _other_and_ebpf(rounds=3):
    """Trials of traffic that is not hostPort (record at 0.99 of baseline) and of the eBPF
    comparison (the tracer at 1.1 x the floor per packet, 3 x per hostPort connection)."""
    out = []
    for r in range(rounds):
        for kind in ("other", "other-bulk"):
            for mode, k in (("baseline", 1.0), ("record", 0.99)):
                t = _trial("bulk" if kind == "other-bulk" else "conn", mode, r, 20000 * k, busy_s=9.0, watcher_s=0.05)
                t["kind"] = kind
                if mode == "record":
                    t["monitor"]["summary"] = _summary(0)
                out.append(t)
        for traffic in ("hostport", "other", "other-bulk"):
            for mode, k in (("tracer", 1.1), ("floor", 1.0)):
                per_conn = 3.0 if (traffic == "hostport" and mode == "tracer") else 1.0
                out.append({"kind": "ebpf", "mode": mode, "traffic": traffic, "round": r, "packets": 1000,
                            "connections": 100, "run_time_ns": int(1000 * 100 * k * per_conn), "run_cnt": 1000,
                            "progs": {}, "rate": "1"})
    return out


def test_other_traffic_and_the_floor():
    res = analysis.analyse(_run() + _other_and_ebpf())
    assert res["other"]["other"]["ratio"]["median"] == pytest.approx(0.99)
    assert res["other"]["other-bulk"]["ratio"]["median"] == pytest.approx(0.99)
    assert res["other"]["other"]["tracer_flows"] == 0
    ck = res["checks"]
    assert ck["other_ratio"]["met"] is False and ck["other_bulk_ratio"]["met"] is False     # >= 0.995
    assert ck["ebpf_other_vs_floor"]["value"] == pytest.approx(1.1) and ck["ebpf_other_vs_floor"]["met"]
    assert res["ebpf"]["hostport"]["vs_floor_per_conn"]["median"] == pytest.approx(3.3)
    assert res["ebpf"]["other"]["tracer"]["ns_per_packet"]["median"] == pytest.approx(110.0)
    assert "cpu_ratio_record" in ck
    # the tables render with them; without them (an old run, --no-other --no-ebpf) they are left out
    meta = {"command": "x", "date": "d", "kernel": "k", "cpus": 2, "cpu_model": "m", "json": "j", "rounds": 3,
            "duration_s": 5.0, "iperf_duration_s": 5.0, "wall_s": 100.0,
            "wrk": {"threads": 2, "connections": 64, "max_requests": 1},
            "lab": {"name": "l"}, "source_at_start": {"commit": "c", "modified": []}, "source_at_end": {"commit": "c"}}
    text = markdown.render({"meta": meta, "results": res})
    assert "## Node traffic that is not hostPort" in text and "## eBPF run time against the floor" in text
    assert "x the floor" in text
    bare = markdown.render({"meta": meta, "results": analysis.analyse(_run())})
    assert "## Node traffic that is not hostPort" not in bare and "## eBPF run time against" not in bare


def test_accounting_counts_what_the_output_lacks():
    t = _trial("conn", "record", 0, 1000, 9.0, 0.1, flows=4990)
    a = analysis.accounting(t)
    assert (a["unaccounted"], a["lost_flows"]) == (10, 10)
    t["monitor"]["summary"] = dict(_summary(5000), lost_events=None, lost_events_exported=300, kernel={})
    a = analysis.accounting(t)
    assert (a["lost_flows"], a["lost_events_exported"]) == (0, 300)


def test_analyse_and_render_a_run(tmp_path):
    trials = _run()
    res = analysis.analyse(trials)
    assert res["checks"]["conn_ratio_json"]["value"] == pytest.approx(0.85)
    assert res["checks"]["conn_ratio_json"]["met"] is False         # target: > 0.859
    assert res["checks"]["lost_flows"]["met"] is True
    assert res["checks"]["peak_mb"]["value"] == 180.0 and not res["checks"]["peak_mb"]["met"]
    assert res["bpf_prog"]["all"]["ns_per_conn"] == pytest.approx(4000.0)
    assert "ebpf_ns_per_conn" not in res["checks"]        # retired: shown next to the floor instead
    meta = {"command": "x", "date": "d", "kernel": "k", "cpus": 2, "cpu_model": "m", "json": "j", "rounds": 3,
            "duration_s": 5.0, "iperf_duration_s": 5.0, "wall_s": 100.0,
            "wrk": {"threads": 2, "connections": 64, "max_requests": 1},
            "lab": {"name": "l"}, "source_at_start": {"commit": "c", "modified": []}, "source_at_end": {"commit": "c"}}
    text = markdown.render({"meta": meta, "results": res})
    assert "## Targets" in text and "trace --record FILE --format none" in text
    path = tmp_path / "B.md"
    path.write_text("old tables\n" + ANALYSIS_MARK + "\nhand-written\n")
    markdown.write_markdown(path, text)
    out = path.read_text()
    assert out.startswith("# Benchmarks") and out.endswith(ANALYSIS_MARK + "\nhand-written\n")
    assert "old tables" not in out


def test_readers_metrics_and_json_lines(tmp_path):
    text = ('bpftrace_hostport_flows_total{host_port="8000",node="n",proto="tcp"} 12.0\n'
            'bpftrace_hostport_answered_flows_total{host_port="8000",node="n",proto="tcp"} 11.0\n'
            'bpftrace_hostport_flows_total{host_port="5201",node="n",proto="tcp"} 2.0\n'
            'bpftrace_hostport_lost_events_total{node="n"} 3.0\n')
    m = readers.metrics(text)
    assert (m["http_counted"], m["http_delivered"], m["lost_events"], m["lost_events_exported"]) == (12, 11, None, 3)
    p = tmp_path / "c.jsonl"
    flows = [{"type": "flow", "ts": f"2026-01-01T00:00:0{i}.000000Z", "host_port": 8000} for i in range(3)]
    summary = {"type": "summary", "lost_events": 0, "flows": 3, "mappings": [{"host_port": 8000, "flows": 3, "answered": 3}]}
    p.write_text("".join(json.dumps(r) + "\n" for r in [{"type": "capture"}, *flows, summary]))
    j = readers.json_lines(p)
    assert (j["http_delivered"], j["http_counted"], j["http_span_s"]) == (3, 3, 2.0)


def test_reader_of_a_recording(tmp_path):
    pa = pytest.importorskip("pyarrow")
    from bpftrace_hostport.records.schema import recording_schema
    schema = recording_schema()

    def rows(kind, n, **cols):
        arrays = [pa.DictionaryArray.from_arrays(pa.array([0] * n, pa.int8()), pa.array([kind]))]
        for fld in list(schema)[1:]:
            arrays.append(pa.array(cols[fld.name], fld.type) if fld.name in cols else pa.nulls(n, fld.type))
        return pa.RecordBatch.from_arrays(arrays, schema=schema)

    summary = {"type": "summary", "lost_events": 0, "mappings": [{"host_port": 8000, "flows": 3, "answered": 3}]}
    path = tmp_path / "r.arrow"
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, schema) as w:
        w.write_batch(rows("flow", 3, host_port=[8000, 8000, 5201], ts=[0, 10**9, 5 * 10**9]))
        w.write_batch(rows("summary", 1, payload=[json.dumps(summary)]))
    r = readers.recording(path)
    assert (r["http_delivered"], r["http_counted"], r["http_span_s"]) == (2, 3, 1.0)


@pytest.mark.parametrize("cmd", [["-m", "bench.run"], ["bench/run.py"]])
def test_both_entry_points_start(cmd, tmp_path):
    p = subprocess.run([sys.executable, *cmd, "--help"], cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "--quick" in p.stdout
    # from elsewhere too: the script puts the repo root, not bench/, on the path
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--help"], cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_cached_programs_truncated_names_are_restored():
    from bench.procfs import PROGRAMS, full_prog_name
    from bpftrace_hostport.collect.netfilter.probe import ATTACH_POINTS
    assert {n for n, _, _ in ATTACH_POINTS} | {"tp_kfree_skb"} == set(PROGRAMS)
    assert full_prog_name("nf_prerouting_p") == "nf_prerouting_post_dnat"
    assert full_prog_name("nf_output_post_") == "nf_output_post_dnat"
    assert full_prog_name("tp_kfree_skb") == "tp_kfree_skb"
    assert full_prog_name("something_else1") == "something_else1"


def test_ebpf_sections_anchors_match_the_source():
    """bench/ebpf_sections.py instruments bpf/hostport.bpf.c by anchors: each is found once, and
    without its markers the instrumented source is the original."""
    from pathlib import Path
    from bench.ebpf_sections import HELPER, SECTIONS, instrument
    src = (Path(__file__).resolve().parents[2] / "bpf" / "hostport.bpf.c").read_text()
    out = instrument(src)
    for i, *_ in SECTIONS:
        assert out.count(f"prof_add({i}, &_t);") == 1, i
    lines = [ln for ln in out.replace(HELPER, "").splitlines()
             if "prof_add(" not in ln and ln.strip() != "u64 _t = bpf_ktime_get_ns();"]
    assert lines == src.splitlines()


def test_ebpf_variants_apply_to_the_source():
    """Each variant of bench/ebpf_variants.py rewrites bpf/hostport.bpf.c at anchors found
    exactly once; a source without them fails loudly rather than measuring something else."""
    from pathlib import Path
    import pytest
    from bench.ebpf_variants import VARIANTS
    src = (Path(__file__).resolve().parents[2] / "bpf" / "hostport.bpf.c").read_text()
    for name, rewrite in VARIANTS.items():
        out = rewrite(src)
        assert out != src, name
        assert "bench variant" in out, name
        with pytest.raises(SystemExit, match="anchor found 0 times"):
            rewrite("int nothing_here;\n")
    assert VARIANTS["clock"](src).count("bpf_ktime_get_ns();") == src.count("bpf_ktime_get_ns();") + 1


def test_pyspy_summary_counts_waits_as_idle(tmp_path):
    """A thread waiting for the GIL (pthread_cond_timedwait) or sleeping is not busy."""
    from bench.pyspy import pyspy_summary
    raw = tmp_path / "r.pyspy.txt"
    raw.write_text("main (a.py:1);decode (decode.py:9) 30\n"
                   "main (a.py:1);take_gil (ceval_gil.c);pthread_cond_timedwait (libc.so.6) 50\n"
                   "_run (backend.py:3);epoll_wait (libc.so.6) 20\n")
    s = pyspy_summary(raw)
    assert (s["samples"], s["idle_samples"], s["busy_samples"]) == (100, 70, 30)
    assert s["self"] == [{"function": "decode (decode.py)", "pct": 100.0}]
