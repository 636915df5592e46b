"""The eBPF sources (hostport.bpf.c, events.h), shipped as package data of bpftrace_hostport.bpf."""
