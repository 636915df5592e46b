"""The recording writer (`trace --record`, `agent --record-dir`): an Arrow IPC stream.

Rows are schema.RECORDING_COLUMNS, built and written by records/arrowout.py (IPC messages laid
out from numpy buffers);
each write_* call is one record batch of one `record` kind. Every file starts with a `meta` row (the capture header plus `file_index`, and
`anonymized` when client addresses are pseudonyms), then the latest `pods` and `rules`
snapshots, so each file stands alone; it ends with an `end` row holding the file's own
counts ({"rows", "flows", "misses", "files", "rotated"}), so a file without one reads as cut.

File names:
  PATH a file:      PATH, then at each rotation <stem>.<n><ext>: rec.arrow, rec.1.arrow, ...
  PATH a directory: trace-<UTC creation time>.arrow inside it, e.g.
                    trace-20260129T080247.123456Z.arrow (names sort in time order). There
                    --max-files counts every trace-*.arrow of the directory, earlier runs too,
                    so an agent that restarts cannot fill the disk.
With max_size a file never grows past it: a batch that would take it past (with room kept
for its end row) goes to the next file, and a batch of flows too big for any file is split;
only a file's head (header and snapshots) bigger than max_size, or a single row, can pass it.
With max_files, the oldest files are deleted (one that cannot be deleted is left alone).

Crash safety: the file is unbuffered, so when write_* returns the batch is in the kernel and
survives kill -9; a kill mid-write leaves a torn last batch, which the reader drops. fsync
runs at rotation and close only (per batch it would cost more than tracing). A full disk
cuts the file back to its last complete batch and raises one UserError sentence.
"""
from __future__ import annotations

import errno
import os
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Dict, List, Optional

import numpy as np
import orjson

from bpftrace_hostport import proto as protomod
from bpftrace_hostport.records.batch import ADDR, FlowBatch, iso_to_ns, pack_addr
from bpftrace_hostport.errors import UserError
from bpftrace_hostport.records import arrowout as ao
from bpftrace_hostport.records import anonymize
from bpftrace_hostport.records.anonymize import Anonymizer

_FULL = (errno.ENOSPC, errno.EDQUOT)
_END_ROOM = 0                   # set below, once the row builders exist
SNAPSHOT_KINDS = ("pods", "rules")


def _open_file(path: str):
    """A new file, 0600 whatever the umask, unbuffered: every write reaches the OS at once."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)          # an existing file keeps its mode through O_CREAT
        return open(fd, "wb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


class RecordingWriter:
    def __init__(self, path: str, header: dict, *, max_size: Optional[int] = None,
                 max_files: Optional[int] = None, anonymize_key: Optional[bytes] = None):
        self.directory = path if os.path.isdir(path) else None
        self.base = path
        self.max_size, self.max_files = max_size, max_files
        self.anonymizer = Anonymizer(anonymize_key) if anonymize_key is not None else None
        self.header = self._header(header)
        self.paths: List[str] = (sorted(_dir_files(path)) if self.directory else [])
        self.path = ""
        self.rows_written = self.flows_written = self.misses_written = self.files = 0
        self._snapshots: Dict[str, object] = {}       # kind -> its latest row
        self._file = self._stream = None
        self._closed = False
        self._open_next()

    # -- what the session writes --------------------------------------------------------------
    def write_flows(self, batch: FlowBatch) -> None:
        if self._closed or not len(batch):
            return
        batch = anonymize.batch(self.anonymizer, batch)   # a copy: the caller's batch feeds other sinks
        self._append_flows(batch)

    def write_misses(self, misses: List[dict]) -> None:
        if self._closed or not misses:
            return
        fam = np.array([m["family"] for m in misses], np.uint8)
        client = _addrs(m["client_ip"] for m in misses)
        if self.anonymizer is not None:
            client = self.anonymizer.map_column(client, fam)
        hooks = [protomod.hook_number(m.get("hook") or "prerouting") for m in misses]
        cols = {
            "ts": ao.column("ts", np.array([iso_to_ns(m["ts"]) for m in misses], np.int64)),
            "proto": ao.column("proto", np.array([protomod.number(m["proto"]) for m in misses], np.uint8)),
            "family": ao.column("family", fam), "hook": ao.column("hook", np.array(hooks, np.uint8)),
            "client_addr": ao.column("client_addr", client),
            "node_addr": ao.column("node_addr", _addrs(m["node_ip"] for m in misses)),
            "host_port": ao.column("host_port", np.array([m["host_port"] for m in misses], np.uint16)),
            "count": ao.column("count", np.array([m["count"] for m in misses], np.uint64)),
        }
        self._append(ao.batch("miss", len(misses), cols), misses=len(misses))

    def write_snapshot(self, kind: str, items: List[dict]) -> None:
        if kind not in SNAPSHOT_KINDS:
            raise ValueError(f"snapshot kind {kind!r} is not one of {SNAPSHOT_KINDS}")
        if self._closed:
            return
        self._snapshots[kind] = _payload_row(kind, {"items": items})     # repeated at rotation
        self._append(self._snapshots[kind], in_head=True)

    def write_summary(self, summary: dict) -> None:
        if not self._closed:
            self._append(_payload_row("summary", summary))

    def flush(self) -> None:
        if not self._closed:
            with self._guard():
                self._file.flush()

    def close(self) -> None:
        """The end row, fsync, close. A writer stopped by a full disk closes as a no-op."""
        if not self._closed:
            self._finish(rotated=False)
            self._closed = True

    # -- files --------------------------------------------------------------------------------
    def _header(self, header: dict) -> dict:
        return anonymize.header(self.anonymizer, dict(header))

    def _next_path(self) -> str:
        if self.directory:
            name = datetime.now(timezone.utc).strftime("trace-%Y%m%dT%H%M%S.%fZ.arrow")
            return os.path.join(self.directory, name)
        if self.files == 0:
            return self.base
        stem, ext = os.path.splitext(self.base)
        return f"{stem}.{self.files}{ext}"

    def _open_next(self) -> None:
        self.path = self._next_path()
        with self._guard("create"):
            self._file = _open_file(self.path)
            self._stream = ao.StreamWriter(self._file)
        self.paths.append(self.path)
        self.files += 1
        self._rows = self._flows = self._misses = 0
        self._good = 0                        # the offset after the last complete batch
        self._write(_payload_row("meta", dict(self.header, file_index=self.files - 1)))
        for rb in self._snapshots.values():
            self._write(rb)
        self._head = self._good               # what every file of the run starts with
        self._prune()

    def _finish(self, rotated: bool) -> None:
        self._write(_payload_row("end", {"rows": self._rows, "flows": self._flows,
                                         "misses": self._misses, "files": self.files,
                                         "rotated": rotated}))
        with self._guard():
            self._stream.close()              # the end-of-stream marker
            os.fsync(self._file.fileno())
            self._file.close()

    def _prune(self) -> None:
        while self.max_files and len(self.paths) > self.max_files:
            try:
                os.unlink(self.paths.pop(0))
            except OSError:
                pass                          # gone already, or not ours to delete

    # -- batches ------------------------------------------------------------------------------
    def _full(self, size: int) -> bool:
        """Whether a message of `size` bytes would take this file past max_size (room kept for
        the end row); a file holding only its head takes it anyway."""
        return bool(self.max_size) and self._good > self._head \
            and self._good + size + _END_ROOM > self.max_size

    def _append_flows(self, batch: FlowBatch) -> None:
        rb = batch.to_arrow()
        n = len(batch)
        if self.max_size and n > 1:
            size = ao.message_size(rb)
            if self._full(size):
                self._rotate()
            room = self.max_size - self._good - _END_ROOM
            if size > room:                   # too big for what is left even of a new file: split
                k = max(1, min(n - 1, n * max(room, 0) // size))
                self._append_flows(batch.select(slice(0, k)))
                self._append_flows(batch.select(slice(k, n)))
                return
        self._append(rb, flows=n)

    def _rotate(self) -> None:
        self._finish(rotated=True)
        self._open_next()

    def _append(self, rb, flows: int = 0, misses: int = 0, in_head: bool = False) -> None:
        if self.max_size and self._full(ao.message_size(rb)):
            self._rotate()
            if in_head:
                return                        # the new file's head holds it already
        self._write(rb)
        self._flows += flows
        self._misses += misses
        self.flows_written += flows
        self.misses_written += misses

    def _write(self, rb) -> None:
        with self._guard():
            self._stream.write(rb)
            self._file.flush()
            self._good = self._file.tell()
        self._rows += rb.length
        self.rows_written += rb.length

    @contextmanager
    def _guard(self, doing: str = "write"):
        """OSError -> the file cut back to its last complete batch, closed, one sentence."""
        try:
            yield
        except OSError as e:
            self._abandon()
            if e.errno in _FULL:
                raise UserError(f"The disk holding {self.path} is full: the recording stops here; "
                                "everything written before is readable. Free space or use "
                                "--max-size/--max-files.") from None
            raise UserError(f"Cannot {doing} the recording {self.path} ({e.strerror or e}); check "
                            "the path and its permissions.") from None

    def _abandon(self) -> None:
        self._closed = True
        if self._file is None or self._file.closed:
            return
        try:
            os.ftruncate(self._file.fileno(), self._good)
        except OSError:
            pass                              # the reader drops a torn last batch anyway
        self._file.close()


# -- row builders -----------------------------------------------------------------------------
def _end_room() -> int:
    """The bytes an end row and the end-of-stream marker take (counts of 20 digits: the most)."""
    big = 10 ** 19
    row = _payload_row("end", {"rows": big, "flows": big, "misses": big, "files": big, "rotated": False})
    return ao.message_size(row) + len(ao.EOS)



def _payload_row(kind: str, obj):
    text = orjson.dumps(obj, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    return ao.batch(kind, 1, {"ts": ao.column("ts", np.array([time.time_ns()], np.int64)),
                              "payload": ao.column("payload", *ao.strings(np.zeros(1), [text]))})


def _addrs(texts) -> np.ndarray:
    return np.array([np.void(pack_addr(t)) for t in texts], dtype=ADDR)


def _dir_files(directory: str) -> List[str]:
    return [os.path.join(directory, n) for n in os.listdir(directory)
            if n.startswith("trace-") and n.endswith(".arrow")]


_END_ROOM = _end_room()
