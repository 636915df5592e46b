"""Sample records shared by tests and the hostile-input corpus generator."""

FLOW = {"type": "flow", "ts": "2026-01-01T00:00:01.123456Z", "proto": "tcp", "family": 4,
        "client_ip": "10.1.2.3", "client_port": 40000, "node_ip": "192.168.1.2", "host_port": 8000,
        "pod_ip": "10.22.0.5", "pod_port": 80, "hook": "prerouting", "answered": True,
        "latency_us": 123.4, "midstream": False, "masqueraded": False, "snat_ip": None,
        "packets": 4, "bytes": 400, "pod_namespace": "default", "pod_name": "web-0",
        "port_name": "http", "drop_reason": None}


def flow(**kw) -> dict:
    """A valid flow record (schema 2), with the given fields changed."""
    return {**FLOW, **kw}
