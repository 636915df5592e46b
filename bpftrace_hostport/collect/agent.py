"""Agent mode: what runs on every node of a fleet (deploy/daemonset.yaml).

A session with metrics (and optionally a rotating recording) plus this sink, which runs
`check` every --check-interval seconds in a thread (findings become the
bpftrace_hostport_check_findings gauge) and logs one line per notable event on stderr:
started, new misses, new drops, lost events, findings that appear or clear, stopped.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, TextIO

from bpftrace_hostport.collect.sinks import Sink


@dataclass
class AgentOptions:
    check_interval: float = 60.0
    log_json: bool = False


class AgentSink(Sink):
    needs = "counters"        # the kernel's counters and the running summary, no record per flow
    tick_latency = False      # it logs misses, drops and losses only

    def __init__(self, aopts: AgentOptions, opts, index, metrics=None, err: TextIO = sys.stderr):
        self.aopts, self.opts, self.index, self.metrics, self.err = aopts, opts, index, metrics, err
        self.done = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self.last: Dict[str, int] = {"misses": 0, "drops": 0, "lost": 0}
        self.findings: set = set()

    def log(self, event: str, **fields) -> None:
        if self.aopts.log_json:
            line = json.dumps({"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "event": event, **fields}, sort_keys=False)
        else:
            line = f"{event}: " + ", ".join(f"{k}={v}" for k, v in fields.items())
        print(line, file=self.err, flush=True)

    def start(self, header: dict) -> None:
        self.log("started", node=header["node"], backend=header["backend"], kernel=header["kernel"])
        if self.metrics is not None:
            self.metrics.set_ready(True)
        self.thread = threading.Thread(target=self._checks, name="check", daemon=True)
        self.thread.start()

    def tick(self, summary: dict) -> None:
        maps = summary.get("mappings", [])
        now = {"misses": sum(m.get("misses") or 0 for m in maps if m["pod_ip"] is None),
               "drops": sum(sum(m.get("drops", {}).values()) for m in maps),
               "lost": summary.get("lost_events", 0)}
        for k, v in now.items():
            if v > self.last[k]:
                self.log(f"new_{k}", count=v - self.last[k], total=v)
        self.last = now

    def _checks(self) -> None:
        while not self.done.is_set():
            try:
                found = self.run_check()
            except Exception as e:          # a failing check must not stop the agent
                self.log("check_failed", error=str(e))
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
            self.log("finding", code=code, severity=sev, message=msg)
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
        self.log("stopped", flows=summary.get("flows", 0), lost_events=summary.get("lost_events", 0))
