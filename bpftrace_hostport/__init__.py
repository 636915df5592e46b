"""bpftrace-hostport: watch Kubernetes hostPort DNAT translations in the kernel."""

__version__ = "0.1.0"
