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
