"""Reading today's JSON-lines captures (`trace --format json`)."""
from __future__ import annotations

import json
import os
from typing import Iterable, List, Optional, Tuple, Union

from bpftrace_hostport.errors import UserError
from bpftrace_hostport.files import read_text


def read_jsonl(
    path_or_lines: Union[str, "os.PathLike[str]", Iterable[Union[str, bytes]]],
    notes: Optional[List[str]] = None,
) -> Tuple[List[dict], List[dict], Optional[dict]]:
    """Read the tracer's JSON-lines output -> (flows, misses, last summary record or None).

    `path_or_lines` is a file path or an iterable of lines (an open file, a list of strings).
    Blank lines and records of other types are skipped; a line that is not a JSON object
    raises UserError naming the file and line number, except a cut last line (a capture killed
    mid-write), which is skipped with a sentence added to `notes` when a list is given.
    """
    if isinstance(path_or_lines, (str, bytes, os.PathLike)):
        name = os.fsdecode(path_or_lines)
        text = read_text(name, "the tracer's JSON-lines output")
        return _read_lines(text.splitlines(keepends=True), name, notes)
    name = getattr(path_or_lines, "name", None)
    return _read_lines(path_or_lines, str(name) if isinstance(name, (str, bytes)) and name else "<input>",
                       notes)


def _read_lines(lines: Iterable[Union[str, bytes]], name: str, notes: Optional[List[str]] = None):
    flows: List[dict] = []
    misses: List[dict] = []
    summary: Optional[dict] = None
    for lineno, line in enumerate(lines, start=1):
        # A capture killed mid-write may end in a cut line: the only line without a newline.
        last_and_cut = isinstance(line, (str, bytes)) and not line.endswith("\n" if isinstance(line, str) else b"\n")
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(
                    f"{name} line {lineno} is not UTF-8 text; give the tracer's JSON-lines output."
                ) from None
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if last_and_cut and notes is not None:
                notes.append(f"{name} ends in a cut line {lineno} (the capture was interrupted); "
                             "it was skipped.")
                break
            raise UserError(
                f"{name} line {lineno} is not JSON; give the tracer's JSON-lines output "
                "or remove that line."
            ) from None
        if not isinstance(rec, dict):
            raise UserError(
                f"{name} line {lineno} is not a JSON object; give the tracer's JSON-lines output "
                "or remove that line."
            )
        kind = rec.get("type")
        if kind == "flow":
            flows.append(rec)
        elif kind == "miss":
            misses.append(rec)
        elif kind == "summary":
            summary = rec
    return flows, misses, summary
