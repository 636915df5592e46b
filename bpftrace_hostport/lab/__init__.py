"""The lab: a Kubernetes-like node in network namespaces, built with Debian's real CNI plugins."""

from bpftrace_hostport.lab.scenarios import NAMES as SCENARIOS   # noqa: F401  (lab/build.py builds them; the CLI offers them)

#: The portmap plugin's backends the lab can run (`lab up --portmap`).
PORTMAP_BACKENDS = ("iptables", "nftables")
