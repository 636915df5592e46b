"""records/arrowout.py: columns built from numpy buffers read back, through pyarrow, as given."""
import numpy as np
import pyarrow as pa
from hypothesis import given, settings, strategies as st

from bpftrace_hostport.records import arrowout as ao
from bpftrace_hostport.records.schema import recording_schema


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.text(max_size=12), min_size=0, max_size=6), data=st.data())
def test_string_columns_are_the_values_by_code(values, data):
    codes = np.array(data.draw(st.lists(st.integers(-1, len(values) - 1), max_size=40)), dtype=np.int32)
    col = pa.array(ao.column("pod_name", *ao.strings(codes, values)))
    col.validate(full=True)
    assert col.to_pylist() == [values[c] if c >= 0 else None for c in codes.tolist()]


@settings(max_examples=100, deadline=None)
@given(flags=st.lists(st.tuples(st.booleans(), st.booleans(), st.floats(allow_nan=False)), max_size=70))
def test_bools_and_masked_numbers(flags):
    n = len(flags)
    vals = np.array([f[0] for f in flags], dtype=bool)
    valid = np.array([f[1] for f in flags], dtype=bool)
    nums = np.array([f[2] for f in flags], dtype=np.float64)
    rb = pa.record_batch(ao.batch("flow", n, {"answered": ao.column("answered", vals),
                                             "latency_us": ao.column("latency_us", nums, valid)}))
    rb.validate(full=True)
    assert rb.schema.equals(recording_schema(), check_metadata=True)
    assert rb.column("answered").to_pylist() == vals.tolist()
    assert rb.column("latency_us").to_pylist() == [x if ok else None for x, ok in zip(nums.tolist(), valid.tolist())]
    assert rb.column("record").to_pylist() == ["flow"] * n and rb.column("payload").null_count == n


def _stream(*batches) -> bytes:
    import io
    out = io.BytesIO()
    w = ao.StreamWriter(out)
    for b in batches:
        w.write(b)
    w.close()
    return out.getvalue()


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 2**64 - 1), st.booleans(), st.integers(-1, 2),
                               st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                               st.binary(min_size=16, max_size=16)), max_size=80),
       names=st.lists(st.text(max_size=9), min_size=3, max_size=3), batches=st.integers(1, 3))
def test_messages_written_directly_read_back_as_the_batches(rows, names, batches):
    """The IPC messages StreamWriter lays out itself are a stream pyarrow reads, with full
    validation, into exactly the batches pyarrow gets from the same columns through nanoarrow."""
    n = len(rows)
    cols = {
        "ts": ao.column("ts", np.array([r[0] >> 1 for r in rows], np.int64)),
        "packets": ao.column("packets", np.array([r[0] for r in rows], np.uint64),
                             np.array([r[1] for r in rows], bool)),
        "pod_name": ao.column("pod_name", *ao.strings(np.array([r[2] for r in rows], np.int32), names)),
        "latency_us": ao.column("latency_us", np.array([r[3] for r in rows]), np.array([r[4] for r in rows], bool)),
        "answered": ao.column("answered", np.array([r[1] for r in rows], bool)),
        "client_addr": ao.column("client_addr", np.frombuffer(b"".join(r[5] for r in rows), "V16")),
        "host_port": ao.column("host_port", np.array([r[0] & 0xFFFF for r in rows], np.uint16)),
    }
    made = [ao.batch("flow", n, cols) for _ in range(batches)] + [ao.batch("miss", 1, {})]
    got = list(pa.ipc.open_stream(_stream(*made)))
    assert len(got) == len(made)
    for rb, b in zip(got, made):
        rb.validate(full=True)
        assert rb.schema.equals(recording_schema(), check_metadata=True)
        assert rb.equals(pa.record_batch(b))
        assert rb.num_rows == b.length


def test_an_empty_stream_is_the_schema_and_the_end_marker():
    data = _stream()
    assert data.endswith(ao.EOS) and data[:-8] == ao.schema_message()
    reader = pa.ipc.open_stream(data)
    assert reader.schema.equals(recording_schema(), check_metadata=True) and list(reader) == []
