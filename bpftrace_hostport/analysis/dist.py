"""Mergeable summaries the roll-up keeps per mapping, in memory that does not grow with flows.

* Dist: a distribution of positive values (latencies in µs). Exact while it holds at most
  EXACT_MAX values (numpy's "linear" percentiles); beyond, a log histogram of 64 buckets per
  octave, whose percentiles are the geometric middle of their bucket: within REL_ERROR of the
  true value (2 ** (1/128) - 1 = 0.54 %), whatever the number of values. Two Dists merge.
* TopCounts: counts per client address, exact while at most `cap` distinct addresses; beyond,
  a Misra-Gries summary: the `cap` heaviest are kept, every count kept is at most `error` below
  the truth and every address dropped had at most `error` flows (error <= total / (cap + 1)).
* Ladder time grids: counts per time bucket, coarsened by whole steps of a ladder (1 s, 5 s,
  10 s ... 1 d, each a multiple of the one before) so a grid never exceeds MAX_BUCKETS and any
  step of the ladder at least as coarse can be shown exactly.

numpy only: the live tracer uses them too.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np

from bpftrace_hostport.records.batch import ADDR, group_rows

EXACT_MAX = 65_536
BUCKETS_PER_OCTAVE = 64
REL_ERROR = 2 ** (1 / (2 * BUCKETS_PER_OCTAVE)) - 1
_LOG_MIN = -4.0                     # 2**-4 µs: the smallest bucket's lower edge
_N_BUCKETS = int((40 - _LOG_MIN) * BUCKETS_PER_OCTAVE)


def _bucket(values: np.ndarray) -> np.ndarray:
    logs = np.log2(np.maximum(values, 2 ** _LOG_MIN))
    return np.clip(((logs - _LOG_MIN) * BUCKETS_PER_OCTAVE).astype(np.int64), 0, _N_BUCKETS - 1)


class Dist:
    """A distribution of values >= 0, exact while small, a log histogram beyond (see above)."""

    __slots__ = ("exact", "n_exact", "hist", "count", "total", "max", "min")

    def __init__(self) -> None:
        self.exact: List[np.ndarray] = []
        self.n_exact = 0
        self.hist: Optional[np.ndarray] = None
        self.count = 0
        self.total = 0.0
        self.max = 0.0
        self.min = math.inf

    def __len__(self) -> int:
        return self.count

    @property
    def is_exact(self) -> bool:
        return self.hist is None

    def add(self, values: np.ndarray) -> None:
        if not len(values):
            return
        values = np.asarray(values, dtype=np.float64)
        self.count += len(values)
        self.total += float(values.sum())
        self.max = max(self.max, float(values.max()))
        self.min = min(self.min, float(values.min()))
        if self.hist is None:
            self.exact.append(values)
            self.n_exact += len(values)
            if self.n_exact <= EXACT_MAX:
                return
            values, self.exact, self.n_exact = np.concatenate(self.exact), [], 0
            self.hist = np.zeros(_N_BUCKETS, np.int64)
        self.hist += np.bincount(_bucket(values), minlength=_N_BUCKETS)

    def merge(self, other: "Dist") -> None:
        if not other.count:
            return
        if other.hist is None:
            for part in other.exact:
                self.add(part)
            return
        if self.hist is None:
            mine = np.concatenate(self.exact) if self.exact else np.zeros(0)
            self.exact, self.n_exact = [], 0
            self.hist = np.bincount(_bucket(mine), minlength=_N_BUCKETS).astype(np.int64)
        self.hist += other.hist
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)
        self.min = min(self.min, other.min)

    def quantiles(self, qs: Sequence[float]) -> List[float]:
        """Values at quantiles qs (0..1); [] when empty."""
        if not self.count:
            return []
        if self.hist is None:
            values = np.concatenate(self.exact) if len(self.exact) > 1 else self.exact[0]
            self.exact = [values]               # one array from now on: later adds append
            return [float(v) for v in np.quantile(values, list(qs))]
        cum = np.cumsum(self.hist)
        out = []
        for q in qs:
            if q <= 0:
                out.append(self.min)
                continue
            if q >= 1:
                out.append(self.max)
                continue
            i = int(np.searchsorted(cum, max(1, int(math.ceil(q * cum[-1])))))
            mid = 2 ** (_LOG_MIN + (i + 0.5) / BUCKETS_PER_OCTAVE)
            out.append(min(max(mid, self.min), self.max))
        return out

    def counts_le(self, bounds: np.ndarray) -> np.ndarray:
        """How many values are <= each bound (exact, or by whole buckets beyond EXACT_MAX)."""
        if not self.count:
            return np.zeros(len(bounds), np.int64)
        if self.hist is None:
            values = np.sort(np.concatenate(self.exact))
            self.exact = [values]
            return np.searchsorted(values, bounds, side="right").astype(np.int64)
        edges = 2 ** (_LOG_MIN + (np.arange(_N_BUCKETS) + 1) / BUCKETS_PER_OCTAVE)   # upper edges
        cum = np.cumsum(self.hist)
        idx = np.searchsorted(edges, bounds, side="right") - 1
        return np.where(idx >= 0, cum[np.clip(idx, 0, None)], 0).astype(np.int64)


class TopCounts:
    """Flows per client address (16 bytes and family), bounded: see the module's doc.

    What is added waits in `pending` and is merged in one go once it holds about 4 x cap rows
    (or when asked for counts): merging is a sort of everything, and doing it batch by batch
    cost a report a third of its time."""

    __slots__ = ("cap", "addr", "fam", "counts", "error", "total", "pending", "n_pending")

    def __init__(self, cap: int = 4096) -> None:
        self.cap = cap
        self.addr = np.zeros(0, ADDR)
        self.fam = np.zeros(0, np.uint8)
        self.counts = np.zeros(0, np.int64)
        self.error = 0                 # every kept count is at most this far below the truth
        self.total = 0
        self.pending: List[tuple] = []
        self.n_pending = 0

    def __len__(self) -> int:
        self._merge()
        return len(self.counts)

    def add(self, addr: np.ndarray, fam: np.ndarray, counts: Optional[np.ndarray] = None) -> None:
        if not len(addr):
            return
        counts = np.ones(len(addr), np.int64) if counts is None else np.asarray(counts, np.int64)
        self.total += int(counts.sum())
        self.pending.append((addr, np.asarray(fam, np.uint8), counts))
        self.n_pending += len(addr)
        if self.n_pending > min(4 * self.cap + 4096, 1 << 18):
            self._merge()

    def _merge(self) -> None:
        if not self.pending:
            return
        addr = np.concatenate([self.addr] + [p[0] for p in self.pending])
        fam = np.concatenate([self.fam] + [p[1] for p in self.pending])
        counts = np.concatenate([self.counts] + [p[2] for p in self.pending])
        self.pending, self.n_pending = [], 0
        first, inv = group_rows(addr, fam)
        self.addr, self.fam = addr[first], fam[first]
        self.counts = np.bincount(inv, weights=counts, minlength=len(first)).astype(np.int64)
        self._bound()

    def merge(self, other: "TopCounts") -> None:
        """Merged Misra-Gries summaries: their errors add up, plus what the merge cuts."""
        other._merge()
        total = self.total + other.total
        self.error += other.error
        self.add(other.addr, other.fam, other.counts)
        self._merge()
        self.total = total

    def _bound(self) -> None:
        if len(self.counts) <= self.cap:
            return
        # Misra-Gries: take the (cap+1)-th largest count off every count, keep what stays positive
        cut = int(np.partition(self.counts, len(self.counts) - self.cap - 1)[len(self.counts) - self.cap - 1])
        keep = self.counts > cut
        self.addr, self.fam, self.counts = self.addr[keep], self.fam[keep], self.counts[keep] - cut
        self.error += cut

    def top(self, n: int) -> List[Tuple[bytes, int, int]]:
        """The n heaviest as (16 address bytes, family, count), heaviest first, ties by address."""
        self._merge()
        if not len(self.counts) or n <= 0:
            return []
        words = np.ascontiguousarray(self.addr).view(">u8").reshape(-1, 2)     # byte order = address order
        order = np.lexsort((words[:, 1], words[:, 0], self.fam, -self.counts))[:n]
        return [(self.addr[i].tobytes(), int(self.fam[i]), int(self.counts[i])) for i in order.tolist()]


# -------------------------------------------------------------------------------- time grids

LADDER_S = (1, 5, 10, 30, 60, 300, 600, 1800, 3600, 10800, 21600, 43200, 86400)
MAX_BUCKETS = 2048
NS = 1_000_000_000


def ladder_step_ns(span_ns: int, max_buckets: int = MAX_BUCKETS) -> int:
    """The finest ladder step that covers span_ns in at most max_buckets buckets."""
    for s in LADDER_S:
        if span_ns // (s * NS) + 2 <= max_buckets:
            return s * NS
    days = LADDER_S[-1]
    k = 1
    while span_ns // (days * k * NS) + 2 > max_buckets:
        k *= 2
    return days * k * NS


def coarser_ok(fine_ns: int, coarse_ns: int) -> bool:
    return coarse_ns >= fine_ns and coarse_ns % fine_ns == 0


class Grid:
    """The roll-up's time buckets: `step` ns wide from t0 (a multiple of step), n of them.
    Series made on an older (t0, step) are moved onto this one with rebin()."""

    __slots__ = ("t0", "step", "n", "version")

    def __init__(self) -> None:
        self.t0 = self.step = self.n = 0
        self.version = 0

    def cover(self, lo: int, hi: int) -> None:
        """Grows (and coarsens along the ladder) until [lo, hi] ns is inside."""
        if self.n and self.t0 <= lo and hi < self.t0 + self.n * self.step:
            return
        start = min(lo, self.t0) if self.n else lo
        end = max(hi, self.t0 + self.n * self.step - 1) if self.n else hi
        step = max(self.step, ladder_step_ns(end - start))
        if self.step and not coarser_ok(self.step, step):         # beyond the ladder's days
            while not coarser_ok(self.step, step):
                step += self.step - step % self.step
        self.t0 = start // step * step
        self.n = int((end - self.t0) // step) + 1
        self.step = step
        self.version += 1

    def index(self, ts: np.ndarray) -> np.ndarray:
        return np.clip((ts - self.t0) // self.step, 0, max(self.n - 1, 0)).astype(np.int64)

    def shape(self) -> Tuple[int, int, int]:
        return self.t0, self.step, self.n


def rebin(counts: np.ndarray, old: Tuple[int, int, int], new: Tuple[int, int, int]) -> np.ndarray:
    """Counts (rows x old buckets) on grid `old` (t0, step, n) moved onto grid `new`."""
    t0, step, n = old
    nt0, nstep, nn = new
    if (t0, step, n) == (nt0, nstep, nn):
        return counts
    out = np.zeros(counts.shape[:-1] + (nn,), counts.dtype)
    if n == 0 or not counts.size:
        return out
    idx = np.clip((t0 + np.arange(n) * step - nt0) // nstep, 0, nn - 1)
    for row in np.ndindex(*counts.shape[:-1]):
        out[row] = np.bincount(idx, weights=counts[row], minlength=nn)
    return out


def rebin_to_step(counts: np.ndarray, grid: Tuple[int, int, int], step_ns: int) -> Tuple[np.ndarray, int, int]:
    """Counts on `grid` shown at a coarser step (a multiple of the grid's): (counts, t0, n)."""
    t0, step, n = grid
    nt0 = t0 // step_ns * step_ns
    nn = max(1, int((t0 + n * step - 1 - nt0) // step_ns) + 1) if n else 1
    return rebin(counts, grid, (nt0, step_ns, nn)), nt0, nn
