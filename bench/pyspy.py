"""Where the tracer's CPU goes: py-spy's raw (collapsed) stacks, summarised (--py-spy MODE)."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import List, Optional

# Innermost frames of a thread that is waiting, not running: sleeps, and condition waits (a
# thread waiting for the GIL sits in pthread_cond_timedwait, as does threading.Event.wait).
IDLE_FRAMES = {"epoll_wait", "epoll_pwait", "clock_nanosleep", "nanosleep", "select", "pselect6",
               "poll", "ppoll", "pthread_cond_timedwait", "pthread_cond_wait"}
FRAME_RE = re.compile(r"(.+?) \((?:.*/)?([^/:]+?)(?::\d+)?\)$")


def _frames(stack: str) -> List[str]:
    """`fn (path/file.py:12);...` -> ["fn (file.py)", ...], unsymbolized native frames dropped."""
    names = []
    for fr in stack.split(";"):
        m = FRAME_RE.match(fr)
        name, where = (m.group(1), m.group(2)) if m else (fr, "")
        if not name.startswith("0x"):
            names.append(f"{name} ({where})" if where else name)
    return names


def pyspy_summary(path: Path, top: int = 20) -> Optional[dict]:
    """Where the tracer's busy samples go, self and inclusive.

    A sample whose innermost frame is a sleep or a wait (epoll_wait, clock_nanosleep, a thread
    waiting for the GIL, ...) is the tracer not running: counted as idle and left out of the
    percentages.
    """
    if not path.exists():
        return None
    incl: Counter = Counter()
    self_: Counter = Counter()
    total = idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        total += n
        names = _frames(stack)
        if not names:
            continue
        if names[-1].split(" (")[0] in IDLE_FRAMES:
            idle += n
            continue
        for name in set(names):
            incl[name] += n
        self_[names[-1]] += n
    busy = max(1, total - idle)
    pct = lambda c: [{"function": k, "pct": round(100.0 * v / busy, 1)} for k, v in c.most_common()]  # noqa: E731
    # Frames in every busy sample (the module, click, run_trace...) say nothing: leave them out.
    inclusive = [x for x in pct(incl) if x["pct"] < 97.0][:top]
    return {"samples": total, "idle_samples": idle, "busy_samples": total - idle,
            "self": pct(self_)[:top], "inclusive": inclusive}
