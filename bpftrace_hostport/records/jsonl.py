"""Reading today's JSON-lines captures (`trace --format json`)."""
from __future__ import annotations

import json
import os
import socket
from typing import Iterable, List, Optional, Sequence, Tuple, Union

from bpftrace_hostport import proto as protomod
from bpftrace_hostport.errors import UserError
from bpftrace_hostport.files import read_text
from bpftrace_hostport.records.schema import (
    CAPTURE, FLOW, MAPPING, MISS, SCHEMA_VERSION, SUMMARY, Field)

_FIX = "give the tracer's JSON-lines output or fix that line"


def read_jsonl(
    path_or_lines: Union[str, "os.PathLike[str]", Iterable[Union[str, bytes]]],
    notes: Optional[List[str]] = None,
) -> Tuple[List[dict], List[dict], Optional[dict]]:
    """Read the tracer's JSON-lines output -> (flows, misses, last summary record or None).

    `path_or_lines` is a file path or an iterable of lines (an open file, a list of strings).
    Blank lines and records of other types are skipped; a line that is not a JSON object
    raises UserError naming the file and line number, except a cut last line (a capture killed
    mid-write), which is skipped with a sentence added to `notes` when a list is given.
    Flow, miss and summary records (and the capture header) are checked against
    records/schema.py: a field of the wrong type, out of range or missing is a UserError naming
    the file, the line and the field; a header with a newer schema is refused.
    """
    if isinstance(path_or_lines, (str, bytes, os.PathLike)):
        name = os.fsdecode(path_or_lines)
        text = read_text(name, "the tracer's JSON-lines output")
        # Only "\n" ends a record: str.splitlines would also cut at \x0c, \x1c, U+2028, ...
        lines = text.split("\n")
        return _read_lines([ln + "\n" for ln in lines[:-1]] + [lines[-1]], name, notes)
    name = getattr(path_or_lines, "name", None)
    return _read_lines(path_or_lines, str(name) if isinstance(name, (str, bytes)) and name else "<input>",
                       notes)


def _read_lines(lines: Iterable[Union[str, bytes]], name: str, notes: Optional[List[str]] = None):
    flows: List[dict] = []
    misses: List[dict] = []
    summary: Optional[dict] = None
    schema = 1
    seen_record = False
    cut: Optional[int] = None          # a line that failed to parse and had no newline
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
        if not isinstance(line, str):
            raise UserError(f"{name} line {lineno} is not text; give the tracer's JSON-lines output.")
        line = line.strip()
        if not line:
            continue
        if cut is not None:            # the unreadable line was not the last one after all
            raise UserError(f"{name} line {cut} is not JSON; {_FIX}.")
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if last_and_cut and notes is not None:
                cut = lineno
                continue
            raise UserError(
                f"{name} line {lineno} is not JSON; give the tracer's JSON-lines output "
                "or remove that line."
            ) from None
        except (ValueError, RecursionError):    # a number of > 4300 digits, nesting too deep
            raise UserError(f"{name} line {lineno} holds a number too long or nesting too deep for a "
                            f"record; {_FIX}.") from None
        if not isinstance(rec, dict):
            raise UserError(
                f"{name} line {lineno} is not a JSON object; give the tracer's JSON-lines output "
                "or remove that line."
            )
        kind = rec.get("type")
        where = f"{name} line {lineno}"
        if kind == "capture" and not seen_record:
            check_record(CAPTURE, rec, where, required=("schema",))
            schema = rec["schema"]
            if schema > SCHEMA_VERSION:
                raise UserError(f"{name} was written by a newer bpftrace-hostport (schema {schema}; this "
                                f"one reads up to {SCHEMA_VERSION}); upgrade to read it.")
        elif kind == "flow":
            flows.append(check_record(FLOW, rec, where, defaults=_v1_defaults(schema)))
        elif kind == "miss":
            misses.append(check_record(MISS, rec, where, defaults=_v1_defaults(schema)))
        elif kind == "summary":
            summary = _check_summary(rec, where)
        seen_record = True
    if cut is not None and notes is not None:
        notes.append(f"{name} ends in a cut line {cut} (the capture was interrupted); it was skipped.")
    return flows, misses, summary


# -------------------------------------------------------------------------- record checks

_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
          "object": (dict,), "array": (list,)}
_WORDS = {"string": "a string", "integer": "an integer", "number": "a number",
          "boolean": "true or false", "object": "an object", "array": "an array"}
_CHOICES = {"proto": protomod.ALL, "family": (4, 6), "hook": tuple(protomod.HOOKS.values())}
_PORTS = ("client_port", "host_port", "pod_port")
_ADDRS = ("client_ip", "node_ip", "pod_ip", "snat_ip")
_INT64 = 2 ** 63 - 1
_V1 = {"hook": "prerouting", "midstream": False, "masqueraded": False}   # not in schema 1 captures
_MISSING = object()


def _v1_defaults(schema: int) -> dict:
    return _V1 if schema <= 1 else {}


def _shown(value) -> str:
    """A value in a message: JSON, on one line (U+2028 and the like escaped too), cut short."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except ValueError:                           # an int too long to print
        text = "a very long number"
    text = text if len(text) <= 40 else text[:37] + "..."
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def check_record(fields: Sequence[Field], rec: dict, where: str, defaults: Optional[dict] = None,
                 required: Optional[Sequence[str]] = None) -> dict:
    """`rec` unchanged when every field of `fields` has its declared type (a number in range,
    a valid address, port or time); else a UserError naming `where` and the field.

    A missing field is an error when it is not nullable (or is named in `required`, when given),
    unless `defaults` has it (schema 1 captures lack a few)."""
    for f, types, test in _checks(fields):
        value = rec.get(f.name, _MISSING)
        if value is _MISSING:
            must = f.name in required if required is not None else not f.nullable
            if must and f.name not in (defaults or ()):
                raise UserError(f"{where}: field {f.name} is missing; {_FIX}.")
        elif type(value) not in types or (test is not None and value is not None and not test(value)):
            raise UserError(f"{where}: field {f.name} should be {_problem(f, value)}, not {_shown(value)}; "
                            f"{_FIX}.")
    return rec


_CHECKS: dict = {}


def _checks(fields: Sequence[Field]) -> list:
    """Per field: (field, the Python types it may have, a test of its value or None), once."""
    got = _CHECKS.get(fields)
    if got is None:
        got = _CHECKS[fields] = []
        for f in fields:
            if f.name == "type":
                continue
            types = _TYPES[f.type] + ((type(None),) if f.nullable else ())
            if f.name in _CHOICES:
                test = _CHOICES[f.name].__contains__
            elif f.type in ("integer", "number"):
                top = 65535 if f.name in _PORTS else _INT64
                test = lambda v, top=top: 0 <= v <= top       # noqa: E731 - False for NaN too
            else:
                test = _is_addr if f.name in _ADDRS else _is_time if f.name == "ts" else None
            got.append((f, types, test))
    return got


def _problem(f: Field, value) -> Optional[str]:
    """What `value` should be instead (the slow path: only for the message)."""
    if value is None or type(value) not in _TYPES[f.type]:    # type(): true is not an integer here
        return _WORDS[f.type] + (" or null" if f.nullable else "")
    if f.name in _CHOICES:
        return "one of " + ", ".join(map(str, _CHOICES[f.name]))
    if f.type in ("integer", "number"):
        return f"{_WORDS[f.type]} " + ("from 0 to 65535" if f.name in _PORTS else "of 0 or more")
    if f.name in _ADDRS:
        return "an IP address" + (" or null" if f.nullable else "")
    return "an ISO 8601 time with its zone (years 1678 to 2261), such as 2026-01-01T00:00:00Z"


def _in_range(value, top: int) -> bool:
    """0 <= value <= top, and not NaN or infinite (Python's json reads NaN and Infinity)."""
    return 0 <= value <= top          # False for NaN; exact for ints of any size


def _is_addr(text: str) -> bool:
    """What collect/batch.pack_addr accepts."""
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text.split("%")[0])
        return True
    except (OSError, ValueError):           # ValueError: an embedded NUL
        return False


def _is_time(text: str) -> bool:
    from datetime import datetime
    from bpftrace_hostport.collect.batch import iso_to_ns
    try:
        if datetime.fromisoformat(text.replace("Z", "+00:00")).tzinfo is None:
            return False             # naive and aware times cannot be compared
        return -2 ** 63 <= iso_to_ns(text) <= _INT64
    except (ValueError, OverflowError, OSError):
        return False


def _check_summary(rec: dict, where: str) -> dict:
    """The summary record as `summary` prints it: present fields typed, each mapping checked."""
    check_record(SUMMARY, rec, where, required=())
    for i, m in enumerate(rec.get("mappings") or []):
        at = f"{where}, mappings[{i}]"
        if not isinstance(m, dict):
            raise UserError(f"{at} is not a JSON object; {_FIX}.")
        check_record(MAPPING, m, at, required=("proto", "host_port"))
        for obj in ("drops", "latency_us"):
            for key, v in (m.get(obj) or {}).items():
                if v is None and obj == "latency_us":
                    continue
                if type(v) not in ((int,) if obj == "drops" else (int, float)) or not _in_range(v, _INT64):
                    kind = "an integer" if obj == "drops" else "a number or null"
                    raise UserError(f"{at}: field {obj}.{_shown(key)[1:-1]} should be {kind} of 0 or more, "
                                    f"not {_shown(v)}; {_FIX}.")
    return rec
