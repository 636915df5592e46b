"""The sink registry: every output declares what it needs from the kernel, and a session asks
the kernel for per-flow records exactly when one of its sinks needs them."""
import dataclasses

import pytest

from bpftrace_hostport.collect import outputs as out
from bpftrace_hostport.collect.agent import AgentOptions
from bpftrace_hostport.collect.options import TraceOptions
from bpftrace_hostport.collect.sinks import Sink


class Index:
    pods = []

    def names(self, *a):
        return None


CASES = [
    (dict(fmt="json"), ["format"], True),
    (dict(fmt="table"), ["format"], True),
    (dict(fmt="none", record_path="REC"), ["recording", "end-line"], True),
    (dict(fmt="none", metrics="127.0.0.1:0"), ["metrics", "end-line"], False),
    (dict(fmt="none", metrics="127.0.0.1:0", agent=AgentOptions()), ["metrics", "agent"], False),
    (dict(fmt="json", metrics="127.0.0.1:0"), ["format", "metrics"], True),
]


@pytest.mark.parametrize("kw, names, records", CASES)
def test_records_are_asked_for_exactly_when_a_sink_needs_them(tmp_path, kw, names, records):
    kw = {k: (str(tmp_path / "rec.arrow") if v == "REC" else v) for k, v in kw.items()}
    o = out.Outputs(**kw)
    sinks = out.make_sinks(o, TraceOptions(), Index())
    assert [e.name for e in out.SINKS if e.wanted(o)] == names
    assert out.flow_records(sinks) is records
    assert all(type(s).needs in out.NEEDS for s in sinks)


def test_every_sink_class_declares_its_needs():
    import bpftrace_hostport.collect.agent, bpftrace_hostport.collect.metrics  # noqa: E401,F401

    def subclasses(c):
        for s in c.__subclasses__():
            yield s
            yield from subclasses(s)
    found = [c for c in subclasses(Sink) if c.__module__.startswith("bpftrace_hostport")]
    assert len(found) >= 6
    for c in found:
        assert getattr(c, "needs", None) in out.NEEDS, c


def test_a_sink_without_needs_is_refused(monkeypatch):
    class Quiet(Sink):
        pass
    entry = out.SinkEntry("quiet", lambda o: True, lambda o, opts, index, made: Quiet())
    monkeypatch.setattr(out, "SINKS", (entry,))
    with pytest.raises(TypeError, match="does not declare what it needs"):
        out.make_sinks(out.Outputs(), TraceOptions(), Index())


def test_the_session_is_run_with_what_the_sinks_need(monkeypatch):
    seen = {}

    class Session:
        def __init__(self, opts, index, backend, sinks, watch, **kw):
            seen["records"] = opts.flow_records

        def run(self):
            return {}
    from bpftrace_hostport.collect import session
    monkeypatch.setattr(session, "Session", Session)
    monkeypatch.setattr(session, "watch_list", lambda opts, index: ([], []))
    monkeypatch.setattr(out, "make_backend", lambda *a, **kw: None)
    for o, want in ((out.Outputs(fmt="none", metrics="127.0.0.1:0"), False), (out.Outputs(fmt="json"), True)):
        out.run_session("netfilter", dataclasses.replace(TraceOptions(), flow_records=not want), Index(), o)
        assert seen["records"] is want
