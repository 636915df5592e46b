"""Why a hostPort does not work: findings from a NodeView, each with its evidence and its fix.

`findings(view)` is pure (no I/O), so every check runs on captured data in the unit tests.
Severities: "error" (hostPort traffic is lost or goes to the wrong place), "warning" (it breaks
for some clients or soon will), "info" (worth knowing, nothing broken). A healthy node gives no
finding at all. The codes, their titles, explanations and fix templates are declared once in
node/findings.py (REGISTRY); the checks are split by family in node/checks/.
"""
from __future__ import annotations

from typing import List

from bpftrace_hostport.node.checks import conntrack, forward, localhost, nat, pods
from bpftrace_hostport.node.findings import REGISTRY, SEVERITIES, Finding, codes, has_errors
from bpftrace_hostport.node.nodeview import NodeView, local_pods

__all__ = ["Finding", "findings", "CODES", "SEVERITIES", "has_errors", "codes"]

#: code -> title, for callers that only need the names (the registry has the rest).
CODES = {code: spec.title for code, spec in REGISTRY.items()}

_ORDER = {s: i for i, s in enumerate(SEVERITIES)}


def findings(view: NodeView) -> List[Finding]:
    """Every problem the view shows, errors first. A healthy node gives an empty list."""
    local = local_pods(view)
    out: List[Finding] = []
    out += forward.run(view)
    out += nat.run(view)
    out += pods.run(view, local)
    out += conntrack.run(view, local)
    out += localhost.run(view)
    return sorted(out, key=lambda f: _ORDER.get(f.severity, 9))
