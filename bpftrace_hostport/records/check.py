"""Is this JSON record what the schema declares? One set of rules for every JSON reader.

Types per records/schema.py, plus what a type alone cannot say: ports within 0-65535,
counts within int64, addresses that parse, times with their zone, protocol, family and hook
among their values. A failure is a UserError naming where (file, line, field) and what the
value should be, on one line.
"""
from __future__ import annotations

import json
import socket
from typing import Optional, Sequence

from bpftrace_hostport import proto as protomod
from bpftrace_hostport.errors import UserError
from bpftrace_hostport.records import outcome as oc
from bpftrace_hostport.records.schema import MAPPING, SUMMARY, Field

FIX = "give the tracer's JSON-lines output or fix that line"
TIME = "an ISO 8601 time with its zone (years 1678 to 2261), such as 2026-01-01T00:00:00Z"

_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
          "object": (dict,), "array": (list,)}
_WORDS = {"string": "a string", "integer": "an integer", "number": "a number",
          "boolean": "true or false", "object": "an object", "array": "an array"}
_CHOICES = {"proto": protomod.ALL, "family": (4, 6), "hook": tuple(protomod.HOOKS.values()),
            "outcome": oc.OUTCOMES, "refusal": oc.REFUSALS[1:], "refused_by": oc.REFUSED_BY[1:]}
_PORTS = ("client_port", "host_port", "pod_port")
_BYTES = ("icmp_type", "icmp_code")
_ADDRS = ("client_ip", "node_ip", "pod_ip", "snat_ip")
_INT64 = 2 ** 63 - 1
V1_DEFAULTS = {"hook": "prerouting", "midstream": False, "masqueraded": False}   # not in schema 1 captures
_MISSING = object()


def v1_defaults(schema: int) -> dict:
    return V1_DEFAULTS if schema <= 1 else {}


def shown(value) -> str:
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
                raise UserError(f"{where}: field {f.name} is missing; {FIX}.")
        elif type(value) not in types or (test is not None and value is not None and not test(value)):
            raise UserError(f"{where}: field {f.name} should be {_problem(f, value)}, not {shown(value)}; "
                            f"{FIX}.")
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
            if f.name in _CHOICES and f.type != "object":     # a summary's refused_by is a tally
                test = _CHOICES[f.name].__contains__
            elif f.type in ("integer", "number"):
                top = 65535 if f.name in _PORTS else 255 if f.name in _BYTES else _INT64
                test = lambda v, top=top: 0 <= v <= top       # noqa: E731 - False for NaN too
            else:
                test = _is_addr if f.name in _ADDRS else is_time if f.name == "ts" else None
            got.append((f, types, test))
    return got


def _problem(f: Field, value) -> Optional[str]:
    """What `value` should be instead (the slow path: only for the message)."""
    if value is None or type(value) not in _TYPES[f.type]:    # type(): true is not an integer here
        return _WORDS[f.type] + (" or null" if f.nullable else "")
    if f.name in _CHOICES and f.type != "object":
        return "one of " + ", ".join(map(str, _CHOICES[f.name]))
    if f.type in ("integer", "number"):
        return f"{_WORDS[f.type]} " + ("from 0 to 65535" if f.name in _PORTS else
                                       "from 0 to 255" if f.name in _BYTES else "of 0 or more")
    if f.name in _ADDRS:
        return "an IP address" + (" or null" if f.nullable else "")
    return TIME


def _in_range(value, top: int) -> bool:
    """0 <= value <= top, and not NaN or infinite (Python's json reads NaN and Infinity)."""
    return 0 <= value <= top          # False for NaN; exact for ints of any size


def _is_addr(text: str) -> bool:
    """What records/batch.pack_addr accepts."""
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text.split("%")[0])
        return True
    except (OSError, ValueError):           # ValueError: an embedded NUL
        return False


def is_time(text: str) -> bool:
    from datetime import datetime
    from bpftrace_hostport.records.batch import iso_to_ns
    try:
        if datetime.fromisoformat(text.replace("Z", "+00:00")).tzinfo is None:
            return False             # naive and aware times cannot be compared
        return -2 ** 63 <= iso_to_ns(text) <= _INT64
    except (ValueError, OverflowError, OSError):
        return False


def check_summary(rec: dict, where: str) -> dict:
    """The summary record as `summary` prints it: present fields typed, each mapping checked."""
    check_record(SUMMARY, rec, where, required=())
    for i, m in enumerate(rec.get("mappings") or []):
        at = f"{where}, mappings[{i}]"
        if not isinstance(m, dict):
            raise UserError(f"{at} is not a JSON object; {FIX}.")
        check_record(MAPPING, m, at, required=("proto", "host_port"))
        for obj in ("drops", "latency_us", "refusals", "refused_by", "dropped_flows", "refusal_us"):
            timing = obj in ("latency_us", "refusal_us")
            for key, v in (m.get(obj) or {}).items():
                if v is None and timing:
                    continue
                if type(v) not in ((int, float) if timing else (int,)) or not _in_range(v, _INT64):
                    kind = "a number or null" if timing else "an integer"
                    raise UserError(f"{at}: field {obj}.{shown(key)[1:-1]} should be {kind} of 0 or more, "
                                    f"not {shown(v)}; {FIX}.")
    return rec


def check_columns(fields: Sequence[Field], recs: list, where, defaults: Optional[dict] = None,
                  skip: Sequence[str] = ("ts",)) -> dict:
    """Each field of `recs` as a list, checked as check_record would, but column by column: the
    types seen as a set, numbers by their range, addresses and choices by their distinct values
    (fast for a million records). `where(i)` names record i; fields in `skip` are the caller's
    (`ts` is parsed as a whole column)."""
    cols = {}
    for f, types, test in _checks(fields):
        default = (defaults or {}).get(f.name, None if f.nullable else _MISSING)
        col = [r.get(f.name, default) for r in recs]
        if _column_bad(f, col, types, test, skip):
            i = next(i for i, v in enumerate(col) if _value_bad(f, v, types, test, skip))
            raise UserError(f"{where(i)}: " + (f"field {f.name} is missing" if col[i] is _MISSING else
                            f"field {f.name} should be {_problem(f, col[i])}, not {shown(col[i])}")
                            + f"; {FIX}.")
        cols[f.name] = col
    return cols


def _column_bad(f: Field, col: list, types, test, skip) -> bool:
    if not set(map(type, col)) <= set(types):
        return True
    if test is None or f.name in skip:
        return False
    values = [v for v in col if v is not None]
    if not values:
        return False
    if f.name in _ADDRS or f.name in _CHOICES:
        return not all(map(test, set(values)))
    if any(v != v for v in values):                     # NaN
        return True
    return not (test(min(values)) and test(max(values)))


def _value_bad(f: Field, v, types, test, skip) -> bool:
    return (v is _MISSING or type(v) not in types or
            (test is not None and f.name not in skip and v is not None and not test(v)))
