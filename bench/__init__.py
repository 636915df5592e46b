"""The benchmark suite: what does tracing hostPort DNAT cost, and does it lose flows?

    sudo .venv/bin/python -m bench.run            # full run (BENCHMARKS.md), from the repo root
    sudo .venv/bin/python -m bench.run --quick    # one round of 1 s trials (the smoke test's size)

Modules, by job:
    config     constants: ports, modes, targets, paths
    procs      starting, waiting for and ending the processes a run starts; logging
    procfs     what the kernel says: CPU (/proc/stat, /proc/<pid>), memory, TCP counters,
               eBPF program statistics (bpf_stats)
    lab        the bench's lab: namespaces, the lab server, the iperf3 server
    load       the load generators: wrk (new connections/s) and iperf3 (bulk)
    monitors   what watches the traffic in each mode: nothing, the tracer (per output), conntrack -E
    readers    reading what each watcher wrote: JSON lines, a recording, a metrics scrape
    trial      one trial: a watcher, a load, the machine's counters around it
    analysis   per-round ratios, medians and spreads, accounting of flows, targets
    markdown   BENCHMARKS.md's tables (the hand-written analysis below them is kept)
    pyspy      where the tracer's CPU goes (optional py-spy trial)
    run        the command line and the round loop
    node_speed rules, check, trace's start and the agent's check on kube-proxy-sized labs
               (`python -m bench.node_speed`, a job of its own)
"""
