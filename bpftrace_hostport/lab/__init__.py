"""The lab: a Kubernetes-like node in network namespaces, built with Debian's real CNI plugins."""

#: The lab's scenarios (lab/build.py builds them; the CLI offers them).
SCENARIOS = ("basic", "hostnetwork", "conflict", "stale-udp", "blackhole", "forward-drop", "hairpin",
             "localhost")
