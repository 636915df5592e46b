"""The recording writer: round trip, kill -9, torn tails, rotation, a full disk, anonymization."""
import errno
import glob
import hashlib
import math
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from bpftrace_hostport.records.batch import FlowBatch
from bpftrace_hostport.errors import UserError
from bpftrace_hostport.records import recording
from bpftrace_hostport.records.anonymize import Anonymizer
from bpftrace_hostport.records.reader import iter_flow_batches, load
from bpftrace_hostport.records.schema import recording_schema
from bpftrace_hostport.records.recording import RecordingWriter
from tests.samples import flow

REPO = Path(__file__).resolve().parents[3]
HEADER = {"type": "capture", "schema": 2, "tool": "bpftrace-hostport test", "backend": "netfilter",
          "node": "node-a", "kernel": "6.8.0", "netns": None, "started": "2026-01-01T00:00:00.000000Z",
          "options": {"host_ports": ["8000/tcp"], "protos": ["tcp"], "clients": ["10.1.0.0/16"],
                      "timeout_s": 5.0},
          "measures": {"latency": True, "packets": True, "misses": True, "drops": True}}


SAMPLE = [
    flow(),
    flow(ts="2026-01-01T00:00:02.000001Z", proto="udp", client_ip="10.1.2.77", client_port=5353,
         host_port=53, pod_port=53, hook="output", answered=False, latency_us=None,
         drop_reason="NETFILTER_DROP", port_name=None),
    flow(family=6, client_ip="2001:db8::7", node_ip="2001:db8::1", pod_ip="fd00::5",
         masqueraded=True, snat_ip="2001:db8::1", midstream=True, latency_us=None),
    flow(proto="sctp", masqueraded=True, snat_ip="192.168.1.2", packets=None, bytes=None,
         pod_namespace=None, pod_name=None, port_name=None),
]
MISS = {"type": "miss", "ts": "2026-01-01T00:00:03.000000Z", "proto": "tcp", "family": 4,
        "client_ip": "10.1.2.3", "node_ip": "192.168.1.2", "host_port": 9000, "hook": "prerouting",
        "count": 3}
SUMMARY = {"type": "summary", "duration_s": 3.5, "lost_events": 0, "flows": 4, "backend": "netfilter",
           "kernel": None, "mappings": []}


def records(df: pd.DataFrame, kind: str = "flow") -> list:
    """DataFrame rows back as JSON records (ts as ISO text, NaN/NA as None)."""
    out = []
    for row in df.drop(columns=["node", "source"]).to_dict("records"):
        row = {k: None if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) else v
               for k, v in row.items()}
        row["ts"] = row["ts"].strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        out.append({"type": kind, **row})
    return out


def write(path, batches=(), *, close=True, **kw) -> RecordingWriter:
    w = RecordingWriter(str(path), HEADER, **kw)
    w.write_snapshot("pods", [{"namespace": "default", "name": "web-0", "ip": "10.22.0.5"}])
    for b in batches:
        w.write_flows(b)
    if close:
        w.write_misses([MISS])
        w.write_summary(SUMMARY)
        w.close()
    return w


def many(n: int) -> FlowBatch:
    return FlowBatch.from_records([flow(client_port=1000 + i) for i in range(n)])


def test_round_trip_gives_back_every_field(tmp_path):
    w = write(tmp_path / "rec.arrow", [FlowBatch.from_records(SAMPLE), FlowBatch.empty()])
    assert (w.rows_written, w.flows_written) == (1 + 1 + 4 + 1 + 1 + 1, 4)
    cap = load([str(tmp_path / "rec.arrow")])
    assert records(cap.flows) == SAMPLE
    assert records(cap.misses, "miss") == [MISS]
    assert (cap.notes, cap.truncated) == ([], False)
    assert set(cap.flows["node"]) == {"node-a"} and set(cap.flows["source"]) == {str(tmp_path / "rec.arrow")}
    assert str(cap.flows["ts"].dtype) == "datetime64[ns, UTC]"
    assert str(cap.flows["packets"].dtype) == "Int64" and cap.flows["client_ip"].dtype == object
    assert cap.summaries == [dict(SUMMARY, node="node-a", source=str(tmp_path / "rec.arrow"))]
    assert cap.headers[0]["started"] == HEADER["started"] and cap.headers[0]["file_index"] == 0
    assert [(s["kind"], s["items"][0]["name"]) for s in cap.snapshots] == [("pods", "web-0")]
    assert sum(b.num_rows for b in iter_flow_batches(str(tmp_path / "rec.arrow"))) == 4


def test_schema_2_recordings_with_dictionary_strings_still_read(tmp_path):
    """Schema 2 (pyarrow's writer) stored the strings dictionary-encoded; they read the same."""
    new = tmp_path / "rec.arrow"
    write(new, [FlowBatch.from_records(SAMPLE), many(3)])
    old = tmp_path / "old.arrow"
    table = pa.ipc.open_stream(str(new)).read_all()
    schema = pa.schema([f.with_type(pa.dictionary(pa.int8() if f.name == "record" else pa.int32(), pa.string()))
                        if pa.types.is_string(f.type) and f.name != "payload" else f for f in table.schema],
                       metadata={"format": "bpftrace-hostport-recording", "schema": "2"})
    with pa.OSFile(str(old), "wb") as f, pa.ipc.new_stream(f, schema) as s:
        for rb in table.to_batches():
            s.write_batch(pa.RecordBatch.from_arrays(
                [c.dictionary_encode().cast(t.type) if pa.types.is_dictionary(t.type) else c
                 for c, t in zip(rb.columns, schema)], schema=schema))
    a, b = load([str(new)]), load([str(old)])
    assert records(b.flows) == records(a.flows) and records(b.misses, "miss") == [MISS]
    assert records(b.flows)[:len(SAMPLE)] == SAMPLE and (b.notes, b.truncated) == ([], False)
    assert b.summaries[0]["duration_s"] == SUMMARY["duration_s"]
    assert [rb.schema.field("pod_name").type for rb in iter_flow_batches(str(old))] == [pa.string()] * 2


def test_file_is_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        path = tmp_path / "rec.arrow"
        path.write_bytes(b"old")
        os.chmod(path, 0o666)
        write(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


CHILD = textwrap.dedent("""
    import sys, time
    from bpftrace_hostport.records.batch import FlowBatch
    from bpftrace_hostport.records.recording import RecordingWriter
    w = RecordingWriter(sys.argv[1], {"type": "capture", "node": "killed"})
    batch = FlowBatch.empty(100)
    n, stop = 0, int(sys.argv[2])
    while True:
        w.write_flows(batch)
        n += 1
        print(n, flush=True)
        if n == stop:
            time.sleep(60)
""")


def run_and_kill(path, kill_at: int, stop: int) -> int:
    """A child writing 100-flow batches, SIGKILLed once it reported kill_at; -> batches reported."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(stop)], stdout=subprocess.PIPE,
                             text=True, env=env)
    flushed = 0
    while flushed < kill_at:
        flushed = int(child.stdout.readline())
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stdout.close()
    return flushed


def test_kill_9_between_batches_keeps_every_flushed_batch(tmp_path):
    path = tmp_path / "rec.arrow"
    assert run_and_kill(path, kill_at=5, stop=5) == 5
    cap = load([str(path)])
    assert len(cap.flows) == 500 and cap.truncated
    assert len(cap.notes) == 1 and "has no end marker" in cap.notes[0]


def test_kill_9_while_writing_keeps_every_flushed_batch(tmp_path):
    path = tmp_path / "rec.arrow"
    flushed = run_and_kill(path, kill_at=30, stop=0)           # killed at full speed
    cap = load([str(path)])
    assert len(cap.flows) >= flushed * 100 and len(cap.flows) % 100 == 0 and cap.truncated
    assert len(cap.notes) == 1 and ("no end marker" in cap.notes[0] or "torn batch" in cap.notes[0])


def sizes_after_two_batches(path):
    w = write(path, close=False)
    w.write_flows(many(50))
    first = os.path.getsize(path)
    w.write_flows(many(70))
    return first, os.path.getsize(path)


def test_torn_last_batch_keeps_the_earlier_rows(tmp_path):
    path = tmp_path / "rec.arrow"
    first, second = sizes_after_two_batches(path)
    with open(path, "r+b") as f:
        f.truncate((first + second) // 2)
    cap = load([str(path)])
    assert len(cap.flows) == 50 and cap.truncated
    assert cap.notes == [f"{path} ends in a torn or damaged batch after 52 rows (the tracer was "
                         "killed, the disk filled, or the file was changed); the figures cover what "
                         "was written before it."]
    notes = []
    assert sum(b.num_rows for b in iter_flow_batches(str(path), notes)) == 50 and len(notes) == 1


def test_zero_bytes_after_the_last_batch_read_as_cut(tmp_path):
    path = tmp_path / "rec.arrow"
    first, second = sizes_after_two_batches(path)
    with open(path, "ab") as f:
        f.write(bytes(4096))                 # what a filesystem may leave after a crash
    cap = load([str(path)])
    assert len(cap.flows) == 120 and cap.truncated and "no end marker" in cap.notes[0]


def test_end_counts_that_disagree_are_a_note(tmp_path):
    path = tmp_path / "rec.arrow"
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, recording_schema()) as s:
        s.write_batch(pa.record_batch(recording._payload_row("meta", HEADER)))
        s.write_batch(pa.record_batch(many(3).to_arrow()))
        s.write_batch(pa.record_batch(recording._payload_row("end", {"rows": 9, "flows": 9, "misses": 0})))
    cap = load([str(path)])
    assert len(cap.flows) == 3 and cap.truncated and "says it holds 9 rows (9 flows)" in cap.notes[0]


def test_rotation_keeps_max_files_each_standing_alone(tmp_path):
    path = tmp_path / "rec.arrow"
    w = write(path, [many(100) for _ in range(20)], max_size=40_000, max_files=3)
    files = sorted(glob.glob(str(tmp_path / "*.arrow")))
    assert len(files) == 3 and files == sorted(w.paths)
    assert not path.exists() and Path(w.path).name == f"rec.{w.files - 1}.arrow"
    total = 0
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
        cap = load([f])
        assert cap.notes == [] and cap.headers[0]["node"] == "node-a"
        assert [s["kind"] for s in cap.snapshots] == ["pods"]      # repeated in every file
        total += len(cap.flows)
    cap = load([str(tmp_path)])
    assert len(cap.flows) == total and len(cap.headers) == 3 and len(cap.summaries) == 1
    assert len(cap.misses) == 1 and not cap.truncated


@pytest.mark.parametrize("batch", [50, 700, 5000])
def test_max_size_is_a_bound_every_file_keeps(tmp_path, batch):
    """--max-size 64KiB leaves no file bigger than 64 KiB: a batch that would pass it goes to
    the next file, one too big for any file is split; no flow is lost on the way."""
    path = tmp_path / "rec.arrow"
    limit = 64 * 1024
    w = write(path, [many(batch) for _ in range(12)], max_size=limit)
    files = sorted(glob.glob(str(tmp_path / "*.arrow")))
    assert len(files) > 1 and files == sorted(w.paths)
    assert max(os.path.getsize(f) for f in files) <= limit, [os.path.getsize(f) for f in files]
    cap = load([str(tmp_path)])
    assert len(cap.flows) == 12 * batch and not cap.truncated and cap.notes == []
    assert len(cap.summaries) == 1 and len(cap.misses) == 1
    for f in files:                          # each file stands alone: its header and snapshots
        one = load([f])
        assert one.headers and [s["kind"] for s in one.snapshots] == ["pods"]


def test_directory_mode_names_files_by_time_and_bounds_them_across_runs(tmp_path):
    for _ in range(2):
        write(tmp_path, [many(100) for _ in range(8)], max_size=40_000, max_files=4)
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 4 and all(n.startswith("trace-") and n.endswith("Z.arrow") for n in files)
    cap = load([str(tmp_path)])
    assert not cap.truncated and len(cap.summaries) == 1


class FullDisk:
    """A file that takes `room` bytes, then fails as a full disk does (a short write, ENOSPC)."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        left = self.room - self.f.tell()
        if len(data) > left:
            self.f.write(bytes(memoryview(data)[:max(left, 0)]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_full_disk_is_one_sentence_and_the_file_stays_readable(tmp_path, monkeypatch):
    real = recording._open_file
    monkeypatch.setattr(recording, "_open_file", lambda p: FullDisk(real(p), 60_000))
    path = tmp_path / "rec.arrow"
    w = write(path, close=False)
    written = 0
    with pytest.raises(UserError) as e:
        while True:
            w.write_flows(many(40))
            written += 1
    assert str(e.value) == (f"The disk holding {path} is full: the recording stops here; everything "
                            "written before is readable. Free space or use --max-size/--max-files.")
    w.write_summary(SUMMARY)             # the session still closes its sinks: no second error
    w.close()
    cap = load([str(path)])
    assert written > 0 and len(cap.flows) == written * 40
    assert cap.truncated and "no end marker" in cap.notes[0]


def test_anonymized_recording_holds_no_client_address_and_no_key(tmp_path):
    key = b"a secret of the incident team"
    path = tmp_path / "rec.arrow"
    write(path, [FlowBatch.from_records(SAMPLE)], anonymize_key=key)
    data = path.read_bytes()
    for ip in ("10.1.2.3", "10.1.2.77", "10.1.0.0/16", "2001:db8::7"):
        assert ip.encode() not in data
    for raw in (socket.inet_aton("10.1.2.3"), socket.inet_aton("10.1.2.77"),
                socket.inet_pton(socket.AF_INET6, "2001:db8::7")):
        assert raw not in data
    assert key not in data and hashlib.sha256(key).digest() not in data
    cap = load([str(path)])
    anon = Anonymizer(key)
    assert list(cap.flows["client_ip"]) == [anon.map_text(r["client_ip"]) for r in SAMPLE]
    assert list(cap.misses["client_ip"]) == [anon.map_text(MISS["client_ip"])]
    assert list(cap.flows["node_ip"]) == [r["node_ip"] for r in SAMPLE]      # only clients change
    assert cap.headers[0]["anonymized"] is True
    assert cap.headers[0]["options"]["clients"] == [anon.map_cidr("10.1.0.0/16")]


def test_anonymizer_is_stable_per_key_and_prefix_preserving():
    a, b = Anonymizer(b"key one"), Anonymizer(b"key two")
    x, y = a.map_text("10.1.2.3"), a.map_text("10.1.2.77")
    assert x == Anonymizer(b"key one").map_text("10.1.2.3") != b.map_text("10.1.2.3")
    assert x.rsplit(".", 1)[0] == y.rsplit(".", 1)[0] and x != y         # same /24 out
    assert a.map_text("10.9.2.3").split(".")[0] == x.split(".")[0]        # same /8 out
    v6a, v6b = a.map_text("2001:db8:1::1"), a.map_text("2001:db8:1::2")
    from ipaddress import ip_network
    assert ip_network(f"{v6a}/64", strict=False) == ip_network(f"{v6b}/64", strict=False)
    assert a.map_cidr("10.1.0.0/16") == str(ip_network(f"{a.map_text('10.1.0.0')}/16", strict=False))
