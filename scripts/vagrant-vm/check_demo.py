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
TOTALS = re.compile(r"^(\d+) flows over [\d.]+ s, (\d+) lost events")
LATENCY = r"via {hook}, answered in [\d.]+ ms"
FINDINGS = re.compile(r"^\d+ findings?: .*")
REMOVED = re.compile(r"^lab \S+ removed; demo took ([\d.]+ s)")
HOSTNET_PORT = ":9000"


def table(lines: list[str]) -> list[dict]:
    """The summary table: rows as {column: text}."""
    for i, line in enumerate(lines):
        if line.startswith("MAPPING ") and " FLOWS " in line:
            break
    else:
        return []
    header = lines[i]
    rule = lines[i + 1] if i + 1 < len(lines) else ""
    # Each column spans its run of dashes under the header.
    spans = [(m.start(), m.end()) for m in re.finditer(r"-+", rule)]
    names = [header[start:end].strip() for start, end in spans]
    rows = []
    for line in lines[i + 2:]:
        if not line.strip():
            break
        row = {}
        for (start, end), name in zip(spans, names):
            row[name] = line[start:end].strip()
        rows.append(row)
    return rows


def check(text: str) -> tuple[bool, str]:
    lines = text.replace("\r", "").splitlines()
    why = []
    for s in range(1, 8):
        if not any(ln.startswith(f"[{s}/7]") for ln in lines):
            why.append(f"no step [{s}/7]")
    traffic = [m.groupdict() for m in map(TRAFFIC.match, lines) if m]
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
    for hook in ("prerouting", "output"):
        if not re.search(LATENCY.format(hook=hook), text):
            why.append(f"no flow via {hook} with a latency")
    rows = table(lines)
    if not rows:
        why.append("no summary table")
    mapped = [r for r in rows if "->" in r.get("MAPPING", "")]
    if not any(r["MAPPING"].startswith("tcp :8000 ") for r in mapped):
        why.append("no tcp :8000 mapping in the summary")
    for r in mapped:
        if r.get("FLOWS") != r.get("ANSWERED") or r.get("FLOWS") in (None, "", "0"):
            why.append(f"{r['MAPPING']}: flows {r.get('FLOWS')}, answered {r.get('ANSWERED')}")
    nodnat = next((r for r in rows if r.get("MAPPING", "").startswith(f"tcp {HOSTNET_PORT} ")), None)
    misses = nodnat.get("MISSES") if nodnat else None
    if misses != str(hostnet):
        why.append(f"misses on {HOSTNET_PORT}: {misses}, requests sent there: {hostnet}")
    if not any(re.match(r"^info\s+hostnetwork-hostport\s", ln) for ln in lines):
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
