"""bpftrace-hostport: watch Kubernetes hostPort DNAT translations in the kernel."""

__version__ = "0.2.0"
