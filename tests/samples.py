"""Sample records shared by tests and the hostile-input corpus generator."""

FLOW = {"type": "flow", "ts": "2026-01-01T00:00:01.123456Z", "proto": "tcp", "family": 4,
        "client_ip": "10.1.2.3", "client_port": 40000, "node_ip": "192.168.1.2", "host_port": 8000,
        "pod_ip": "10.22.0.5", "pod_port": 80, "hook": "prerouting", "answered": True,
        "outcome": "answered", "refusal": None, "refused_by": None, "icmp_type": None,
        "icmp_code": None, "latency_us": 123.4, "refusal_us": None, "midstream": False, "masqueraded": False, "snat_ip": None,
        "packets": 4, "bytes": 400, "pod_namespace": "default", "pod_name": "web-0",
        "port_name": "http", "drop_reason": None}


def flow(**kw) -> dict:
    """A valid flow record (schema 4), with the given fields changed (an `answered` given alone
    brings its outcome along)."""
    return outcomes({**FLOW, **kw}, kw)


def outcomes(rec: dict, given=None) -> dict:
    """`rec` with the schema 4 outcome fields, consistent with its `answered` unless given."""
    given = rec if given is None else given
    if "outcome" not in given:
        rec["outcome"] = "answered" if rec.get("answered") else "unanswered"
    for k in ("refusal", "refused_by", "icmp_type", "icmp_code", "refusal_us"):
        rec.setdefault(k, None)
    return rec
