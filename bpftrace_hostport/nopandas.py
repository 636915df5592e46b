"""Keeping pandas out of a process that does not need it.

pyarrow imports pandas when it is installed, on its first array (to know pandas' types): about
30 MB of RSS and 0.2 s of start, for nothing, in the tracer (which never needs it) and in the
streaming review (`report`, `summary`, `export` work on numpy and Arrow columns). Inside
`keep_pandas_out()`, `import pandas` fails, and pyarrow goes on without it.
"""
from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def keep_pandas_out():
    guard = _NoPandas() if "pandas" not in sys.modules else None
    if guard is not None:
        sys.meta_path.insert(0, guard)
    try:
        yield
    finally:
        if guard is not None:
            sys.meta_path.remove(guard)


class _NoPandas:
    """A meta path finder that answers `import pandas` with ImportError in this process."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("pandas is not loaded here (bpftrace_hostport.nopandas)")
        return None
