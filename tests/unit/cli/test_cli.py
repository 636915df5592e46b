"""The CLI: every command has help with an example and appears in the README; bad values exit 2."""
import socket
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from bpftrace_hostport.cli import cli

README = (Path(__file__).resolve().parents[3] / "README.md").read_text()


def all_commands(group=cli, prefix=()):
    for name, cmd in group.commands.items():
        path = prefix + (name,)
        if isinstance(cmd, click.Group):
            yield from all_commands(cmd, path)
        else:
            yield path, cmd


def test_every_command_has_help_with_example_and_is_in_readme():
    runner = CliRunner()
    paths = list(all_commands())
    assert len(paths) >= 7
    for path, cmd in paths:
        res = runner.invoke(cli, [*path, "--help"])
        assert res.exit_code == 0, path
        assert "Example" in res.output, f"{' '.join(path)} --help has no example"
        assert f"bpftrace-hostport {' '.join(path)}" in README, f"README lacks `bpftrace-hostport {' '.join(path)}`"


def test_bad_option_values_exit_2_with_one_sentence():
    runner = CliRunner()
    for args, text in ((["trace", "--host-port", "abc"], "not a port number"),
                       (["trace", "--host-port", "8000/icmp"], "tcp, udp or sctp"),
                       (["trace", "--client", "10.0.0.0/99"], "not an address or CIDR")):
        res = runner.invoke(cli, args)
        assert res.exit_code == 2 and text in res.output, res.output


def test_summary_of_a_capture(tmp_path):
    cap = tmp_path / "c.jsonl"
    cap.write_text('{"type":"flow","ts":"2026-01-01T00:00:00Z","proto":"tcp","family":4,"client_ip":"10.0.0.10",'
                   '"client_port":1,"node_ip":"10.0.0.1","host_port":8000,"pod_ip":"10.0.1.2","pod_port":80,'
                   '"hook":"prerouting","answered":true,"latency_us":100.0,"masqueraded":false,"snat_ip":null,'
                   '"packets":2,"bytes":120,"pod_namespace":null,"pod_name":null,"port_name":null,"drop_reason":null}\n')
    res = CliRunner().invoke(cli, ["summary", str(cap)])
    assert res.exit_code == 0 and "tcp :8000" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text("oops\n")
    res = CliRunner().invoke(cli, ["summary", str(bad)])
    assert res.exit_code == 2 and "neither a recording nor a JSON-lines capture" in res.output
    bad.write_text('{"type": "flow"}\noops\n')
    res = CliRunner().invoke(cli, ["summary", str(bad)])
    assert res.exit_code == 2 and "line 2" in res.output


@pytest.fixture(autouse=True)
def no_kernel_preflight(monkeypatch):
    """The netfilter pre-flight check attaches a program for real; here it is a stand-in that
    says the first priority is free (tests of its own replace it)."""
    from bpftrace_hostport.collect import preflight
    calls = []
    monkeypatch.setattr(preflight, "netfilter_priority", lambda netns: calls.append(netns) or (-99, ""))
    return calls


class _LoadedProbe:
    """What outputs.load_probe returns, without a kernel."""
    closed = False

    def close(self):
        self.closed = True


def test_auto_backend_falls_back_to_conntrack_after_one_warning(monkeypatch):
    from bpftrace_hostport.collect import outputs
    from bpftrace_hostport.errors import KernelFeatureMissing

    called = {}
    loaded = _LoadedProbe()

    def session(backend, opts, index, outs, probe=None, stop=None):
        if backend == "netfilter":
            assert probe is loaded           # the session attaches the probe loaded first
            raise KernelFeatureMissing("Could not create the netfilter BPF link (Invalid argument); "
                                       "it needs Linux >= 6.4.")
        called["ct"] = (opts, probe)

    monkeypatch.setattr(outputs, "load_probe", lambda opts: loaded)
    monkeypatch.setattr(outputs, "run_session", session)
    res = CliRunner().invoke(cli, ["trace", "--duration", "1", "--format", "json"])
    assert res.exit_code == 0, res.output
    assert res.output.count("warning: Could not create the netfilter BPF link") == 1 and "Falling back" in res.output
    assert called["ct"][0].duration == 1 and called["ct"][1] is None and loaded.closed
    res = CliRunner().invoke(cli, ["trace", "--duration", "1", "--backend", "netfilter"])
    assert res.exit_code == 2 and "Linux >= 6.4" in res.output


def test_programs_load_before_the_pods_and_a_refused_load_falls_back(monkeypatch):
    """The eBPF programs are loaded first (a compile child then runs beside a small tracer);
    with --backend auto a load the kernel refuses means conntrack, after one warning."""
    from bpftrace_hostport.collect import outputs
    from bpftrace_hostport.errors import KernelFeatureMissing
    from bpftrace_hostport.pods import sources

    order = []

    def refused(opts):
        order.append("load")
        raise KernelFeatureMissing("The kernel refused the netfilter BPF programs (Invalid argument); "
                                   "the full tracer needs Linux >= 6.4 (BPF_PROG_TYPE_NETFILTER).")

    real_resolve = sources.resolve_sources
    monkeypatch.setattr(sources, "resolve_sources", lambda *a, **kw: order.append("pods") or real_resolve(*a, **kw))
    monkeypatch.setattr(outputs, "load_probe", refused)
    monkeypatch.setattr(outputs, "run_session", lambda backend, opts, index, outs, probe=None, stop=None:
                        order.append((backend, probe)))
    res = CliRunner().invoke(cli, ["trace", "--duration", "1", "--format", "json", "--pods-from", "none"])
    assert res.exit_code == 0, res.output
    assert res.output.count("warning: The kernel refused the netfilter BPF programs") == 1
    assert order == ["load", "pods", ("conntrack", None)]
    order.clear()
    res = CliRunner().invoke(cli, ["trace", "--duration", "1", "--backend", "netfilter", "--pods-from", "none"])
    assert res.exit_code == 2 and "Linux >= 6.4" in res.output and order == ["load"]
    order.clear()
    res = CliRunner().invoke(cli, ["trace", "--duration", "1", "--backend", "conntrack", "--pods-from", "none"])
    assert res.exit_code == 0, res.output
    assert order == ["pods", ("conntrack", None)]


def test_summary_of_a_capture_cut_mid_line(tmp_path):
    line = ('{"type":"flow","ts":"2026-01-01T00:00:00Z","proto":"tcp","family":4,"client_ip":"10.0.0.10",'
            '"client_port":1,"node_ip":"10.0.0.1","host_port":8000,"pod_ip":"10.0.1.2","pod_port":80,'
            '"hook":"prerouting","answered":true,"latency_us":100.0,"masqueraded":false,"snat_ip":null,'
            '"packets":2,"bytes":120,"pod_namespace":null,"pod_name":null,"port_name":null,"drop_reason":null}')
    cap = tmp_path / "killed.jsonl"
    cap.write_text(line + "\n" + line + "\n" + line[:57])          # kill -9 mid-write
    res = CliRunner().invoke(cli, ["summary", str(cap), "--json"])
    assert res.exit_code == 0, res.output
    assert "cut line 3" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text(line + "\n" + line[:57] + "\n" + line + "\n")     # damage in the middle is an error
    res = CliRunner().invoke(cli, ["summary", str(bad)])
    assert res.exit_code == 2 and "line 2" in res.output


# Modules worth megabytes that the tracer loads for its session (pod sources, rules, sinks) and
# that must not be resident while a compile child (bcc and LLVM, about 130 MB) runs beside it.
HEAVY = ("numpy", "pyarrow", "pandas", "pyroute2.iproute", "pyroute2.netns", "bcc")


def test_trace_loads_its_programs_before_importing_heavy_modules():
    """`trace` loads the eBPF programs (a cold start compiles them in a child process) while the
    tracer is still small: what it has imported by then, in a fresh interpreter."""
    import json
    import subprocess
    import sys
    code = f"""
import json, os, sys
os.geteuid = lambda: 0                      # not root here: only the order of the steps matters
from bpftrace_hostport.collect import outputs
def load_probe(opts):
    print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), flush=True)
    os._exit(0)
outputs.load_probe = load_probe
from bpftrace_hostport.cli import main
main(["trace", "--format", "json", "--duration", "1", "--pods-from", "none"])
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip(), p.stderr
    assert json.loads(p.stdout) == [], p.stdout


def test_a_busy_metrics_port_is_refused_before_anything_is_loaded(monkeypatch, no_kernel_preflight):
    from bpftrace_hostport.collect import outputs
    order = []
    monkeypatch.setattr(outputs, "load_probe", lambda opts: order.append("load"))
    monkeypatch.setattr(outputs, "run_session", lambda *a, **kw: order.append("session"))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        for cmd in (["trace", "--format", "none", "--duration", "1"], ["agent"]):
            res = CliRunner().invoke(cli, [*cmd, "--metrics", str(port)])
            assert res.exit_code == 2, res.output
            assert f"Cannot listen on 127.0.0.1:{port}: address in use; choose another --metrics port." in res.output
    assert order == [] and no_kernel_preflight == []


def test_the_metrics_socket_is_held_from_the_check_to_the_sink(monkeypatch):
    """The pre-flight's socket is the one the sink serves from, and is closed at the end."""
    from bpftrace_hostport.collect import outputs
    seen = {}

    def session(backend, opts, index, outs, probe=None, stop=None):
        seen["sock"] = outs.metrics_socket
        seen["listening"] = outs.metrics_socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    monkeypatch.setattr(outputs, "load_probe", lambda opts: _LoadedProbe())
    monkeypatch.setattr(outputs, "run_session", session)
    res = CliRunner().invoke(cli, ["trace", "--format", "none", "--metrics", "127.0.0.1:0", "--duration", "1",
                                   "--pods-from", "none"])
    assert res.exit_code == 0, res.output
    assert seen["listening"] == 1 and seen["sock"].fileno() == -1


def test_a_kernel_without_netfilter_links_falls_back_before_the_compile(monkeypatch):
    from bpftrace_hostport.collect import outputs, preflight
    from bpftrace_hostport.errors import KernelFeatureMissing, UserError
    order = []

    def refused(netns):
        raise KernelFeatureMissing("The kernel refused a netfilter BPF program (Invalid argument); the full "
                                   "tracer needs Linux >= 6.4 (BPF_PROG_TYPE_NETFILTER).")
    monkeypatch.setattr(preflight, "netfilter_priority", refused)
    monkeypatch.setattr(outputs, "load_probe", lambda opts: order.append("load"))
    monkeypatch.setattr(outputs, "run_session", lambda backend, opts, index, outs, probe=None, stop=None:
                        order.append((backend, probe)))
    res = CliRunner().invoke(cli, ["trace", "--duration", "1", "--format", "json", "--pods-from", "none"])
    assert res.exit_code == 0, res.output
    assert res.output.count("warning: The kernel refused a netfilter BPF program") == 1
    assert order == [("conntrack", None)]

    def busy(netns):
        raise UserError("Every netfilter priority from -99 to -1 at PRE_ROUTING is taken (...); stop one "
                        "of the tracers there.")
    monkeypatch.setattr(preflight, "netfilter_priority", busy)
    order.clear()
    res = CliRunner().invoke(cli, ["trace", "--duration", "1", "--format", "json", "--pods-from", "none"])
    assert res.exit_code == 2 and "stop one of the tracers there" in res.output and "Falling back" not in res.output
    assert order == []
