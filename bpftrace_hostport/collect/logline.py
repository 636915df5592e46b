"""The tracer's lines for the operator on stderr: plain text, or, with the agent's --log-json,
one JSON object per line and nothing else (a log pipeline parses every line).

JSON is chosen once for the process (use_json, by the agent command); every line the tracer
prints on stderr goes through emit(): the start-up banner, notes, the fallback warning, the
agent's events, the error that ends it, and what Python's logging says (the pod sources).
A JSON line is {"ts", "level", "event", ...fields}; "message" is the plain text's sentence.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Optional, TextIO

_json = False


def use_json(on: bool = True) -> None:
    """JSON lines from now on; Python's logging (its warnings: a pod watch that failed) too."""
    global _json
    _json = bool(on)
    root = logging.getLogger()
    mine = [h for h in root.handlers if isinstance(h, _JsonHandler)]
    if _json and not mine:
        root.addHandler(_JsonHandler(logging.INFO))
    elif not _json:
        for h in mine:
            root.removeHandler(h)


def json_lines() -> bool:
    return _json


def emit(event: str, text: Optional[str] = None, *, level: str = "info",
         err: Optional[TextIO] = None, **fields) -> None:
    """One line: `text` as it is in plain mode (or `event: k=v, ...` without text); in JSON
    mode the event, the fields and the text as "message"."""
    out = err or sys.stderr
    if _json:
        rec = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "level": level, "event": event}
        if text is not None:
            rec["message"] = text
        rec.update(fields)
        line = json.dumps(rec, default=str)
    else:
        line = text if text is not None else f"{event}: " + ", ".join(f"{k}={v}" for k, v in fields.items())
    print(line, file=out, flush=True)


def note(text: str, err: Optional[TextIO] = None, **fields) -> None:
    """`note: TEXT` (plain) or {"event": "note", "message": TEXT}."""
    if _json:
        emit("note", text, err=err, **fields)
    else:
        print(f"note: {text}", file=err or sys.stderr, flush=True)


def warning(text: str, err: Optional[TextIO] = None, **fields) -> None:
    if _json:
        emit("warning", text, level="warning", err=err, **fields)
    else:
        print(f"warning: {text}", file=err or sys.stderr, flush=True)


class _JsonHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:     # noqa: A003 (logging's name)
        try:
            emit("log", record.getMessage(), level=record.levelname.lower(), logger=record.name)
        except Exception:                                    # logging must never raise
            self.handleError(record)
