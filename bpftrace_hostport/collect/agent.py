"""Agent mode: what runs on every node of a fleet (deploy/daemonset.yaml).

A session with metrics (and optionally a rotating recording) plus this sink, which runs
`check` every --check-interval seconds in a thread (findings become the
bpftrace_hostport_check_findings gauge) and logs one line per notable event on stderr
(collect/logline.py: JSON lines with --log-json): started, new misses, drops, refused or
unanswered flows (each naming its hostPort and pod), lost flows, findings that appear or clear,
stopped. A mapping's events come at most once per --check-interval, each with everything since
the last one; at the end whatever was held back is logged, so nothing is silent. The stop line's
lost_events is the one the metrics export.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, TextIO, Tuple

from bpftrace_hostport.collect import logline
from bpftrace_hostport.collect.sinks import Sink

_LEVELS = {"error": "error", "warning": "warning", "info": "info"}


@dataclass
class AgentOptions:
    check_interval: float = 60.0
    log_json: bool = False


def _pod(ns: Optional[str], name: Optional[str]) -> Optional[str]:
    return None if not name else (f"{ns}/{name}" if ns else name)


def _mapping_fields(m: dict) -> dict:
    """What names a mapping in a log line: its hostPort, its target and the pod there."""
    return {"proto": m["proto"], "host_port": m["host_port"], "pod_ip": m["pod_ip"],
            "pod_port": m.get("pod_port"), "pod": _pod(m.get("pod_namespace"), m.get("pod_name"))}


class AgentSink(Sink):
    needs = "counters"        # the kernel's counters and the running summary, no record per flow
    tick_latency = False      # it logs misses, drops, outcomes and losses only

    def __init__(self, aopts: AgentOptions, opts, index, metrics=None, err: Optional[TextIO] = None,
                 clock=time.monotonic):
        self.aopts, self.opts, self.index, self.metrics = aopts, opts, index, metrics
        self.err, self.clock = err, clock
        self.done = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self.logged: Dict[Tuple, int] = {}       # (event, mapping) -> the total last logged
        self.next_at: Dict[Tuple, float] = {}    # (event, mapping) -> when it may log again
        self.findings: set = set()

    def log(self, event: str, level: str = "info", **fields) -> None:
        logline.emit(event, level=level, err=self.err or sys.stderr, **fields)

    def start(self, header: dict) -> None:
        self.log("started", node=header["node"], backend=header["backend"], kernel=header["kernel"])
        if self.metrics is not None:
            self.metrics.set_ready(True)
        self.thread = threading.Thread(target=self._checks, name="check", daemon=True)
        self.thread.start()

    # -- events from the running summary ------------------------------------------------------
    def tick(self, summary: dict, force: bool = False) -> None:
        now = self.clock()
        misses: Dict[Tuple[str, int], dict] = {}
        for m in summary.get("mappings", []):
            port = (m["proto"], m["host_port"])
            if m.get("misses"):
                e = misses.setdefault(port, {"total": int(m["misses"]), "owner": None})
                if m.get("pod_ip") is None:       # a port without DNAT: its owner, if a hostNetwork pod
                    e["owner"] = _pod(m.get("pod_namespace"), m.get("pod_name"))
            if m.get("pod_ip") is None:
                continue
            where = _mapping_fields(m)
            key = (m["proto"], m["host_port"], m["pod_ip"], m.get("pod_port"))
            drops = m.get("drops") or {}
            self._grew("new_drops", key, sum(drops.values()), now, force, "warning",
                       reasons=dict(drops), **where)
            self._grew("new_refused", key, int(m.get("refused") or 0), now, force, "warning",
                       refusals=dict(m.get("refusals") or {}), refused_by=dict(m.get("refused_by") or {}),
                       **where)
            self._grew("new_unanswered", key, int(m.get("unanswered") or 0), now, force, "warning", **where)
        for (proto, host_port), e in misses.items():
            # A hostNetwork pod's port gets misses by design: its own socket serves it (expected).
            expected = e["owner"] is not None
            self._grew("new_misses", (proto, host_port, e["owner"]), e["total"], now, force,
                       "info" if expected else "warning", proto=proto, host_port=host_port,
                       owner=e["owner"], expected=expected)
        self._grew("new_lost", ("node",), int(summary.get("lost_events") or 0), now, force, "warning",
                   cause="the kernel's flow table was full: raise --flow-table")

    def _grew(self, event: str, key: tuple, total: int, now: float, force: bool, level: str,
              **fields) -> None:
        """Logs `event` for `key` when its total grew, at most once per --check-interval (with
        everything since the last line), or now when forced (the end)."""
        k = (event, key)
        last = self.logged.get(k, 0)
        if total <= last or (not force and now < self.next_at.get(k, 0.0)):
            return
        self.log(event, level, count=total - last, total=total, **fields)
        self.logged[k] = total
        self.next_at[k] = now + self.aopts.check_interval

    # -- check findings ----------------------------------------------------------------------
    def _checks(self) -> None:
        while not self.done.is_set():
            try:
                found = self.run_check()
            except Exception as e:          # a failing check must not stop the agent
                self.log("check_failed", "warning", error=str(e))
            else:
                self._report(found)
            self.done.wait(self.aopts.check_interval)

    def run_check(self) -> List[dict]:
        from bpftrace_hostport.node.check import findings
        from bpftrace_hostport.node.gather import gather
        view = gather(self.opts.netns, self.index, node_name=self.opts.node_name, pods_known=True,
                      notes=[])
        return [f.to_dict() for f in findings(view)]

    def _report(self, found: List[dict]) -> None:
        keys = {(f["code"], f["severity"], f["message"]) for f in found}
        for code, sev, msg in sorted(keys - self.findings):
            self.log("finding", _LEVELS.get(sev, "info"), code=code, severity=sev, message=msg)
        for code, sev, msg in sorted(self.findings - keys):
            self.log("finding_cleared", code=code, severity=sev)
        self.findings = keys
        if self.metrics is not None:
            self.metrics.set_findings(found)

    def close(self, summary: dict) -> None:
        self.done.set()
        if self.thread is not None:
            self.thread.join(10)
        if self.metrics is not None:
            self.metrics.set_ready(False)
        self.tick(summary, force=True)        # what the interval held back
        # The metrics sink closed first (outputs.SINKS order) with this summary: its exported
        # lost_events is the figure to state, so the log and the metrics say the same.
        lost = self.metrics.lost if self.metrics is not None else int(summary.get("lost_events") or 0)
        self.log("stopped", flows=summary.get("flows", 0), lost_events=lost)
