"""The CLI: every command has help with an example and appears in the README; bad values exit 2."""
from pathlib import Path

import click
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


def test_auto_backend_falls_back_to_conntrack_after_one_warning(monkeypatch):
    from bpftrace_hostport.collect import outputs
    from bpftrace_hostport.errors import KernelFeatureMissing

    called = {}

    def session(backend, opts, index, outs):
        if backend == "netfilter":
            raise KernelFeatureMissing("Could not create the netfilter BPF link (Invalid argument); "
                                       "it needs Linux >= 6.4.")
        called["ct"] = opts

    monkeypatch.setattr(outputs, "run_session", session)
    res = CliRunner().invoke(cli, ["trace", "--duration", "1", "--format", "json"])
    assert res.exit_code == 0, res.output
    assert "warning: Could not create the netfilter BPF link" in res.output and "Falling back" in res.output
    assert called["ct"].duration == 1
    res = CliRunner().invoke(cli, ["trace", "--duration", "1", "--backend", "netfilter"])
    assert res.exit_code == 2 and "Linux >= 6.4" in res.output


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
