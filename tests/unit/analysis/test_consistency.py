"""One capture, one set of numbers: `summary`, `report`, `export` (read back by DuckDB and
pyarrow.dataset) agree, on a rotated run (all its files, one of them), on several nodes, and
under filters; bad files are refused with one sentence, never read as empty captures."""
import json
import os

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from click.testing import CliRunner

from bpftrace_hostport.cli import cli
from bpftrace_hostport.records.batch import FlowBatch, iso_to_ns, ns_to_iso
from bpftrace_hostport.records.recording import RecordingWriter
from bpftrace_hostport.records.schema import SCHEMA_VERSION
from tests.samples import flow

T0 = "2026-03-01T10:00:00.000000Z"


def header(node, session):
    return {"type": "capture", "schema": SCHEMA_VERSION, "tool": "bpftrace-hostport test",
            "session": session, "backend": "netfilter", "node": node, "kernel": "6.18",
            "netns": None, "started": T0, "options": {},
            "measures": {"latency": True, "packets": True, "misses": True, "drops": True}}


def flows(n, node_ip="192.168.1.2", seconds=60, seed=0):
    """n flows over `seconds`: answered, some refused (reset), some unanswered."""
    rng = np.random.default_rng(seed)
    t0 = iso_to_ns(T0)
    out = []
    for i in range(n):
        kind = i % 10
        rec = flow(ts=ns_to_iso(t0 + int(rng.integers(0, seconds * 10**9))), client_port=1024 + i,
                   client_ip=f"10.1.{i % 7}.{i % 200}", node_ip=node_ip, latency_us=float(rng.integers(10, 500)))
        if kind == 8:
            rec.update(answered=False, outcome="refused", refusal="reset", refused_by="pod",
                       latency_us=None, refusal_us=30.0)
        elif kind == 9:
            rec.update(answered=False, outcome="unanswered", latency_us=None)
        out.append(rec)
    return out


def summary_of(recs, lost=0):
    """What the tracer's summary says of these flows: the kernel counted 3 more (lost)."""
    return {"type": "summary", "duration_s": 60.0, "lost_events": lost, "flows": len(recs) + lost,
            "backend": "netfilter", "mappings": [dict(
                proto="tcp", family=4, host_port=8000, pod_ip="10.22.0.5", pod_port=80,
                pod_namespace="default", pod_name="web-0", port_name="http",
                flows=len(recs) + lost, packets=10 * len(recs), bytes=1000 * len(recs),
                drops={"NETFILTER_DROP": 2}, answered=0)]}


def rotated(directory, node="node-a", n=6000, session="run-a", lost=3):
    """A run recorded with rotation: several files, the summary in the last."""
    directory.mkdir(parents=True, exist_ok=True)
    recs = flows(n, seed=hash(node) % 100)
    w = RecordingWriter(str(directory), header(node, session), max_size=64 * 1024, max_files=100)
    for i in range(0, n, 500):
        w.write_flows(FlowBatch.from_records(recs[i:i + 500]))
    w.write_summary(summary_of(recs, lost))
    w.close()
    return sorted(str(directory / f) for f in os.listdir(directory)), recs


def run(*args):
    r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return r


def report_json(*paths, **kw):
    args = ["report", *paths, "--format", "json"] + [x for k, v in kw.items() for x in (f"--{k}", v)]
    r = run(*args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_a_rotated_run_is_one_session_whatever_its_files(tmp_path):
    files, recs = rotated(tmp_path / "rec")
    assert len(files) > 3
    whole = report_json(str(tmp_path / "rec"))
    m = whole["mappings"][0]
    assert (m["flows"], m["packets"], m["drops"]) == (6003, 60000, {"NETFILTER_DROP": 2})
    assert (m["answered"], m["refused"], m["unanswered"]) == (4800, 600, 600)
    assert whole["lost_events"] == 3 and m["source_of_counts"] == "kernel"
    s = json.loads(run("summary", str(tmp_path / "rec"), "--json").stdout)
    sm = s["mappings"][0]
    for k in ("flows", "answered", "refused", "unanswered", "packets", "bytes", "drops", "latency_us"):
        assert sm[k] == m[k], k
    # one file of the run: its own flows, never the run's kernel totals against them
    one = report_json(files[1])
    om = one["mappings"][0]
    assert om["flows"] < 6000 and om["answered"] + om["refused"] + om["unanswered"] == om["flows"]
    assert om["packets"] is None and om["drops"] is None and one["lost_events"] is None
    assert any("is file 2 of" in n for n in one["notes"])
    # every file but the last: the same flows as their records, a note, no invented failure
    part = report_json(*files[:-1])
    pm = part["mappings"][0]
    assert pm["answered_share"] == pytest.approx(0.8, abs=0.02)


def test_nodes_keep_their_own_rates_and_the_export_agrees_with_duckdb(tmp_path):
    a, ra = rotated(tmp_path / "a", "node-a", 3000, "run-a", lost=0)
    b, rb = rotated(tmp_path / "b", "node-b", 1000, "run-b", lost=0)
    r = report_json(str(tmp_path / "a"), str(tmp_path / "b"))
    per = {n["node"]: n for n in r["per_node"]}
    assert per["node-a"]["flows"] == 3000 and per["node-b"]["flows"] == 1000
    assert per["node-a"]["flows_per_s"] == 50.0 and per["node-b"]["flows_per_s"] == pytest.approx(16.667, abs=0.01)
    out = tmp_path / "fleet"
    res = run("export", str(tmp_path / "a"), str(tmp_path / "b"), "--to", "parquet", "--partition", "-o", str(out))
    assert res.exit_code == 0, res.output
    assert sorted(os.listdir(out)) == ["node=node-a", "node=node-b"]
    con = duckdb.connect()
    got = dict(con.execute(
        f"SELECT node, count(*) FROM read_parquet('{out}/**/*.parquet', hive_partitioning=true) "
        "GROUP BY node").fetchall())
    assert got == {"node-a": 3000, "node-b": 1000}
    outcomes = dict(con.execute(
        f"SELECT outcome, count(*) FROM read_parquet('{out}/**/*.parquet', hive_partitioning=true) "
        "WHERE node = 'node-a' GROUP BY outcome").fetchall())
    m = next(x for x in r["mappings"] if x["node"] == "node-a")
    assert outcomes == {"answered": m["answered"], "refused": m["refused"], "unanswered": m["unanswered"]}
    table = ds.dataset(str(out), format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 4000
    # the report reads the dataset back: the same records' figures (no kernel totals in an export)
    again = report_json(str(out))
    am = {x["node"]: x for x in again["mappings"]}
    assert am["node-a"]["answered"] == m["answered"] and am["node-a"]["flows"] == 3000


def test_exports_of_two_captures_read_as_one_table(tmp_path):
    """Column types never depend on the data: a capture with no SNAT and no drop, and one with
    them, export to files pyarrow and pandas read as one dataset."""
    one = tmp_path / "one.jsonl"
    two = tmp_path / "two.jsonl"
    one.write_text("\n".join(json.dumps(x) for x in [header("n1", "s1"), flow()]) + "\n")
    two.write_text("\n".join(json.dumps(x) for x in [header("n2", "s2"), flow(
        masqueraded=True, snat_ip="192.168.1.2", drop_reason="NETFILTER_DROP")]) + "\n")
    (tmp_path / "ex").mkdir()
    for src in (one, two):
        assert run("export", str(src), "--to", "parquet", "-o", str(tmp_path / "ex" / (src.stem + ".parquet"))).exit_code == 0
    t = ds.dataset(str(tmp_path / "ex"), format="parquet").to_table()
    assert t.num_rows == 2 and t.schema.field("snat_ip").type == pa.string()
    assert t.schema.metadata[b"schema"] == str(SCHEMA_VERSION).encode()
    import pandas as pd
    assert len(pd.read_parquet(str(tmp_path / "ex"))) == 2


def test_a_time_filter_gives_records_figures_everywhere(tmp_path):
    rotated(tmp_path / "rec", n=2000)
    since, until = "2026-03-01T10:00:10Z", "2026-03-01T10:00:30Z"
    r = report_json(str(tmp_path / "rec"), since=since, until=until)
    m = r["mappings"][0]
    assert m["packets"] is None and m["source_of_counts"] == "records"
    out = tmp_path / "f.parquet"
    assert run("export", str(tmp_path / "rec"), "--to", "parquet", "-o", str(out), "--since", since,
               "--until", until).exit_code == 0
    n = duckdb.connect().execute(f"SELECT count(*) FROM '{out}'").fetchone()[0]
    assert n == m["flows"]
    assert oct(os.stat(out).st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("content, says", [
    (b"", "is empty"),
    (b'{"foo": 1}\n', "is not a bpftrace-hostport record"),
    (b"\xff\xff\xff\xff" + os.urandom(200), "its schema cannot be read"),
    (b"hello world\n", "is neither a recording nor a JSON-lines capture"),
])
def test_bad_files_are_one_sentence_and_a_non_zero_exit(tmp_path, content, says):
    path = tmp_path / "capture.arrow"
    path.write_bytes(content)
    for cmd in (["report", str(path)], ["summary", str(path)],
                ["export", str(path), "--to", "csv", "-o", str(tmp_path / "x.csv")]):
        r = run(*cmd)
        assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output, (cmd, r.output)


def test_a_recording_damaged_in_its_schema_is_refused(tmp_path):
    files, _ = rotated(tmp_path / "rec", n=200)
    data = bytearray(open(files[0], "rb").read())
    data[8:40] = os.urandom(32)
    bad = tmp_path / "bad.arrow"
    bad.write_bytes(bytes(data))
    r = run("report", str(bad))
    assert r.exit_code == 2 and "cannot be read" in r.output
