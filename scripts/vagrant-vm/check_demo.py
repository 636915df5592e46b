#!/usr/bin/env python3
"""Check the output of `bpftrace-hostport lab demo` as scripts/check-vagrant-vm.sh captures it.

    python3 scripts/vagrant-vm/check_demo.py DEMO_OUTPUT
prints one line: what the demo showed (exit 0), or every way it fell short (exit 1).

What a passing demo shows:
  - all seven steps, and the lab removed at the end;
  - every request, none failed; every request sent through a hostPort (all but the
    hostNetwork pod's port 9000, which has no DNAT) traced as one flow, 0 lost events;
  - the netfilter backend: no fall-back to conntrack, flows seen at prerouting and at output
    (DNAT in OUTPUT) with a latency, and the hostNetwork port's requests counted as misses
    (conntrack events measure neither latency nor misses);
  - the summary table with the hostPort mappings, each flow answered;
  - check's findings: hostnetwork-hostport, and the count line.
Standard library only (the machine's python3).
"""
from __future__ import annotations

import re
import sys

TRAFFIC = re.compile(r"^\s+(?P<label>.+?): sent (?P<sent>\d+), answered (?P<answered>\d+), "
                     r"failed (?P<failed>\d+)\s*$")
FLOWS = re.compile(r"^\[5/7\] (\d+) flows traced")
TOTALS = re.compile(r"^(\d+) flows over [\d.]+ s, (\d+) lost (?:events|flows)")
LATENCY = r"via {hook}, answered in [\d.]+ ms"              # matched with the line wraps undone
FINDINGS = re.compile(r"^\d+ findings?: .*")
REMOVED = re.compile(r"^lab \S+ removed; demo took ([\d.]+ s)")
HOSTNET_PORT = ":9000"


def table(lines: list[str]) -> list[dict]:
    """The summary table's mappings as {"proto", "port", "dnat", column: text}. A wide terminal
    (or a pipe) gives one grid row per mapping (MAPPING "tcp :8000 -> 10.0.1.2:80"); a narrow one
    a row per mapping under HOSTPORT ("8000/tcp") with its target on the line under it
    ("  -> 10.0.1.2:80 ..." or "  no DNAT; ...")."""
    for i, line in enumerate(lines):
        if re.match(r"^(MAPPING|HOSTPORT) ", line) and " FLOWS " in line:
            break
    else:
        return []
    header = lines[i]
    rule = lines[i + 1] if i + 1 < len(lines) else ""
    # Each column spans its run of dashes under the header.
    spans = [(m.start(), m.end()) for m in re.finditer(r"-+", rule)]
    names = [header[start:end].strip() for start, end in spans]
    rows: list[dict] = []
    for line in lines[i + 2:]:
        if not line.strip():
            break
        if line.startswith(" "):                     # a narrow table's detail line
            if rows and "dnat" not in rows[-1]:
                rows[-1]["dnat"] = line.strip().startswith("->")
            continue
        row = {name: line[start:end].strip() for (start, end), name in zip(spans, names)}
        m = re.match(r"^(\w+) :(\d+) (.*)$", row.get("MAPPING", ""))
        if m:
            row.update(proto=m.group(1), port=m.group(2), dnat="->" in m.group(3))
        else:
            m = re.match(r"^(\d+)/(\w+)$", row.get("HOSTPORT", ""))
            if not m:
                continue
            row.update(proto=m.group(2), port=m.group(1))
        rows.append(row)
    return rows


def unwrapped(lines: list[str]) -> list[str]:
    """The demo's own lines with their wraps undone: a step's line is indented 6 spaces, its
    continuation 8 (a narrow terminal wraps the traffic and flow lines at spaces)."""
    out: list[str] = []
    for ln in lines:
        if out and ln.startswith(" " * 8) and out[-1].startswith(" " * 6) and not out[-1].startswith(" " * 8):
            out[-1] += " " + ln.strip()
        else:
            out.append(ln)
    return out


def check(text: str) -> tuple[bool, str]:
    lines = text.replace("\r", "").splitlines()
    why = []
    for s in range(1, 8):
        if not any(ln.startswith(f"[{s}/7]") for ln in lines):
            why.append(f"no step [{s}/7]")
    traffic = [m.groupdict() for m in map(TRAFFIC.match, unwrapped(lines)) if m]
    if not traffic:
        why.append("no traffic lines")
    failed = [t["label"] for t in traffic if t["failed"] != "0"]
    if failed:
        why.append("requests failed: " + ", ".join(failed))
    dnat = sum(int(t["sent"]) for t in traffic if HOSTNET_PORT not in t["label"])
    hostnet = sum(int(t["sent"]) for t in traffic if HOSTNET_PORT in t["label"])
    flows = next((int(m.group(1)) for m in map(FLOWS.match, lines) if m), None)
    if flows != dnat:
        why.append(f"{flows} flows traced, {dnat} requests sent through hostPorts")
    totals = next((m for m in map(TOTALS.match, lines) if m), None)
    if not totals:
        why.append("no summary totals line")
    elif totals.group(2) != "0" or int(totals.group(1)) != dnat:
        why.append(f"summary: {totals.group(0)}")
    if "Falling back to conntrack" in text:
        why.append("the tracer fell back to conntrack events")
    flat = re.sub(r"\s+", " ", text)                  # a flow's line may wrap at spaces
    for hook in ("prerouting", "output"):
        if not re.search(LATENCY.format(hook=hook), flat):
            why.append(f"no flow via {hook} with a latency")
    rows = table(lines)
    if not rows:
        why.append("no summary table")
    mapped = [r for r in rows if r.get("dnat")]
    if not any(r["proto"] == "tcp" and r["port"] == "8000" for r in mapped):
        why.append("no tcp :8000 mapping in the summary")
    for r in mapped:
        if r.get("FLOWS") != r.get("ANSWERED") or r.get("FLOWS") in (None, "", "0"):
            why.append(f"{r['proto']} :{r['port']}: flows {r.get('FLOWS')}, answered {r.get('ANSWERED')}")
    nodnat = next((r for r in rows if r["proto"] == "tcp" and f":{r['port']}" == HOSTNET_PORT
                   and not r.get("dnat")), None)
    misses = nodnat.get("MISSES") if nodnat else None
    if misses != str(hostnet):
        why.append(f"misses on {HOSTNET_PORT}: {misses}, requests sent there: {hostnet}")
    # check's findings as a table ("info  hostnetwork-hostport ...") or, narrow, as blocks
    if not (any(re.match(r"^info\s+hostnetwork-hostport\s", ln) for ln in lines)
            or re.search(r"^SEVERITY\s+info\s*\nCODE\s+hostnetwork-hostport\s*$", "\n".join(lines), re.M)):
        why.append("check did not report hostnetwork-hostport")
    findings = next((m.group(0).strip() for m in map(FINDINGS.match, lines) if m), None)
    if not findings:
        why.append("no findings count from check")
    took = next((m.group(1) for m in map(REMOVED.match, lines) if m), None)
    if not took:
        why.append("the lab was not removed")
    if why:
        return False, "; ".join(why)
    return True, (f"{flows} flows traced (netfilter backend), 0 lost events, {misses} misses on "
                  f"{HOSTNET_PORT}; check: {findings}; demo took {took}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: check_demo.py DEMO_OUTPUT", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8", errors="replace") as f:
        ok, line = check(f.read())
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
