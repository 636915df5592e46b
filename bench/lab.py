"""The bench's lab: bench/bench-hostport.yaml on a lab node, two client namespaces tuned for
many short connections (one for the hostPort loads, one for the loads to the pods' own
addresses), and iperf3 serving in the iperf pod."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import List, Optional

from bench.config import CLIENT_PORT_RANGE, HTTP_HOST_PORT, IPERF_PORT, MANIFEST
from bench.procs import BenchError, Procs, log, nsexec, run


class BenchLab:
    def __init__(self, name: str, procs: Procs, workdir: Path):
        self.name = name
        self.procs = procs
        self.workdir = workdir
        self.st = None
        self.iperf_server: Optional[subprocess.Popen] = None

    def up(self) -> None:
        from bpftrace_hostport.lab import build as lab
        log(f"lab up {self.name} ({MANIFEST.name})")
        self.st = st = lab.up([str(MANIFEST)], name=self.name, ipv6=False, clients=2)
        self.node_ns = st.node_netns
        self.node_ip = st.node_ip
        self.client_ns = st.clients[0]["netns"]
        # The loads to the pods' own addresses come from a client of their own. From the same
        # address, a connection client:port -> pod:80 has the reply tuple of an earlier hostPort
        # connection client:port -> node:8000 DNATed to pod:80 still in the node's conntrack
        # table (TIME_WAIT, 120 s): its SYN is dropped as a clash and retransmitted a second
        # later, and each kind of trial slowed the next one down (measured: 12,000 conn/s, then
        # 7,700 with 1,947 SYN retransmissions after the other kind's trial).
        self.other_client_ns = st.clients[1]["netns"]
        self.http_pod = self._pod(HTTP_HOST_PORT)
        self.iperf_pod = self._pod(IPERF_PORT)
        lo, hi = CLIENT_PORT_RANGE
        for ns in (self.client_ns, self.other_client_ns):
            run(nsexec(ns, "sysctl", "-qw", f"net.ipv4.ip_local_port_range={lo} {hi}"))
            run(nsexec(ns, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"))
        self._start_iperf_server()

    def _pod(self, host_port: int):
        return next(p for p in self.st.pods if any(m.get("host_port") == host_port for m in p.ports))

    def _start_iperf_server(self) -> None:
        """The iperf pod's lab server holds containerPort 5201: iperf3 takes its place."""
        if self.iperf_pod.server_pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.iperf_pod.server_pid, signal.SIGTERM)
            for _ in range(100):
                try:
                    os.kill(self.iperf_pod.server_pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
        self.iperf_server = self.procs.start(
            nsexec(self.iperf_pod.netns, "iperf3", "-s", "-p", str(IPERF_PORT)),
            stdout=open(self.workdir / "iperf3-server.log", "wb"), stderr=subprocess.STDOUT)
        for _ in range(100):
            p = run(nsexec(self.iperf_pod.netns, "ss", "-Hltn", f"sport = :{IPERF_PORT}"), check=False)
            if p.stdout.strip():
                return
            if self.iperf_server.poll() is not None:
                raise BenchError("iperf3 -s exited at once: see iperf3-server.log")
            time.sleep(0.05)
        raise BenchError("iperf3 -s did not listen within 5 s")

    def url(self) -> str:
        return f"http://{self.node_ip}:{HTTP_HOST_PORT}/"

    def pod_url(self) -> str:
        """The http pod's own address and containerPort: routed through the node, not DNATed."""
        port = next(m["container_port"] for m in self.http_pod.ports if m.get("host_port") == HTTP_HOST_PORT)
        return f"http://{self.http_pod.ips[0]}:{port}/"

    def client_for(self, kind: str) -> str:
        """The client namespace a trial kind's load comes from."""
        return self.other_client_ns if kind.startswith("other") else self.client_ns

    def target(self, kind: str):
        """(wrk URL, iperf3 host) of a trial kind: the node's hostPorts, or the pods' own addresses."""
        if kind.startswith("other"):
            return self.pod_url(), self.iperf_pod.ips[0]
        return self.url(), self.node_ip

    def namespaces(self) -> dict:
        return {"node_netns": self.node_ns, "node_ip": self.node_ip, "client_netns": self.client_ns,
                "other_client_netns": self.other_client_ns,
                "http_pod_netns": self.http_pod.netns, "iperf_pod_netns": self.iperf_pod.netns}

    def down(self) -> List[str]:
        from bpftrace_hostport.lab import build as lab
        if self.iperf_server is not None:
            self.procs.stop(self.iperf_server)
        log(f"lab down {self.name}")
        return lab.down(self.name)
