"""The on-call screen on a real lab: the live view in tmux at 80x24 through a failing hostPort,
Ctrl-C at any moment, pre-flight checks before anything attaches, `--format none`'s last line,
and an anonymized run whose every output is searched for the real client addresses.

The lab: a pod serving TCP 8000 -> 80 and UDP 5353 -> 53 (dual-stack), and a hostNetwork pod
owning hostPort 9000 (misses). Its server is stopped halfway (nothing listens: TCP resets from
the pod), as tests/kernel/test_outcomes.py does. tmux runs on a socket of its own (-L), killed
at the end with everything in it.
"""
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bpftrace_hostport.lab import build as lab
from tests.kernel.helpers import PY, WEB_TCP_UDP as MANIFEST, cli, own_lab, tracing

REPO = str(Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def slab():
    with own_lab("scr", manifest_text=MANIFEST, scenario="hostnetwork") as st:
        yield st


@pytest.fixture
def broken_lab():
    """A lab of its own whose pod's server the test stops (the other tests want it serving)."""
    with own_lab("scb", manifest_text=MANIFEST, scenario="hostnetwork") as st:
        yield st


def web(st):
    return next(p for p in st.pods if p.name == "web")


class Tmux:
    """A tmux server of our own (its own socket), one session of a given size."""

    def __init__(self, width=80, height=24):
        if not shutil.which("tmux"):
            if os.environ.get("CI") == "true":
                pytest.fail("CI=true and tmux is missing (scripts/test.sh installs it)")
            pytest.skip("tmux is not installed")
        self.sock = f"bhp-{os.getpid()}-{time.monotonic_ns() % 100000}"
        self.size = (width, height)

    def __call__(self, *args, check=True):
        return subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True, text=True, check=check,
                              timeout=30)

    def start(self, command: str):
        w, h = self.size
        self("new-session", "-d", "-s", "t", "-x", str(w), "-y", str(h), "-c", REPO,
             f"{command}; echo EXIT=$?; sleep 300")
        self("set-option", "-t", "t", "remain-on-exit", "on")
        return self

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "t").stdout

    def history(self) -> str:
        return self("capture-pane", "-p", "-S", "-", "-t", "t").stdout

    def wait_for(self, pattern: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if re.search(pattern, text, re.M):
                return text
            if time.monotonic() > deadline:
                size = self("display", "-p", "-t", "t", "#{pane_width}x#{pane_height}", check=False).stdout
                raise AssertionError(f"{pattern!r} never appeared; the screen ({size.strip()}):\n{text}")
            time.sleep(0.2)

    def close(self):
        self("kill-server", check=False)
        path = self("display", "-p", "#{socket_path}", check=False).stdout.strip() or \
            os.path.join(os.environ.get("TMUX_TMPDIR", "/tmp"), f"tmux-{os.getuid()}", self.sock)
        try:
            os.unlink(path)                     # the server is gone; its socket file too
        except OSError:
            pass


@pytest.fixture
def tmux():
    t = Tmux()
    try:
        yield t
    finally:
        t.close()


def traffic(st, **kw):
    return lab.traffic(st.name, **kw)


def test_live_view_names_the_refused_mapping_before_ctrl_c(broken_lab, tmux, tmp_path):
    st = broken_lab
    rec = tmp_path / "rec.arrow"
    tmux.start(f"{PY} -m bpftrace_hostport trace --lab {st.name} --record {rec}")
    tmux.wait_for(r"Ctrl-C\s+to\s+end\.")
    assert traffic(st, to=8000, count=6)["answered"] == 6
    assert traffic(st, to=9000, count=3)["answered"] == 3             # the hostNetwork pod: misses
    screen = tmux.wait_for(r"^expected: 9000/tcp: 3 connections not DNATed, served by hostNetwork pod")
    assert not re.search(r"^(error|warning):", screen, re.M)         # nothing wrong yet
    os.kill(web(st).server_pid, signal.SIGKILL)                       # nothing listens any more
    got = traffic(st, to=8000, count=10, port_base=30000)
    assert set(dict(got["flows"]).values()) == {"refused"}
    pod_ip = next(ip for ip in web(st).ips if ":" not in ip)
    screen = tmux.wait_for(rf"^error: 8000/tcp -> {re.escape(pod_ip)}:80: 10 of 16 refused \(reset, by the pod\)$")
    lines = screen.rstrip("\n").splitlines()
    assert all(len(ln) <= 80 for ln in lines), screen
    head = next(i for i, ln in enumerate(lines) if ln.startswith("HOSTPORT"))
    assert all(c in lines[head - 1] + lines[head] for c in ("FLOWS", "ANSWERED", "REFUSED", "ANSWER"))
    row = next(ln for ln in lines if ln.startswith("8000/tcp") and " 16 " in ln)
    assert row.split()[1:5] == ["16", "6", "10", "0"], row             # flows, answered, refused, no answer
    assert f"  sudo bpftrace-hostport check --lab {st.name}" in lines  # whole, on its own line
    tmux("send-keys", "-t", "t", "C-c")
    tmux.wait_for(r"^EXIT=0$", timeout=30)
    text = tmux.history().rstrip("\n").splitlines()
    text = [ln for ln in text if ln.strip()]
    exit_at = text.index("EXIT=0")
    assert text[exit_at - 1] == f"  sudo bpftrace-hostport check --lab {st.name}"     # the summary is last
    events = max(i for i, ln in enumerate(text) if ln == "latest events (times UTC):")
    summary = max(i for i, ln in enumerate(text) if re.match(r"^\d+ flows over [\d.]+ s, 0 lost flows$", ln))
    assert events < summary < exit_at
    assert any("error: hostPort 8000/tcp" in ln for ln in text[summary:])
    recorded = json.loads(cli("summary", str(rec), "--json").stdout)
    tcp4 = next(m for m in recorded["mappings"] if m["proto"] == "tcp" and m["family"] == 4 and m["pod_ip"])
    assert (tcp4["answered"], tcp4["refused"]) == (6, 10)


def test_live_view_pages_the_mappings_that_do_not_fit_with_a_key(slab):
    """On 80x16 four mappings do not fit with the diagnosis: a page at a time, n turns it."""
    st = slab
    small = Tmux(80, 16)
    try:
        small.start(f"{PY} -m bpftrace_hostport trace --lab {st.name}")
        small.wait_for(r"Ctrl-C\s+to\s+end\.")
        traffic(st, to=8000, count=2)
        traffic(st, to=8000, count=2, family=6)
        traffic(st, to=5353, count=2, proto="udp")
        traffic(st, to=9000, count=2)
        first = small.wait_for(r"^mappings 1-\d of 4 \(page 1/\d; n: next page, p: previous\)$")
        assert all(len(ln) <= 80 for ln in first.splitlines()) and len(first.rstrip("\n").splitlines()) <= 16
        small("send-keys", "-t", "t", "n")
        second = small.wait_for(r"^mappings \d-\d of 4 \(page 2/\d", timeout=5)    # at once, not at a tick
        rows = lambda text: {ln.strip() for ln in text.splitlines()                          # noqa: E731
                             if ln.startswith(("  -> ", "  no DNAT"))}                # a mapping's own line
        assert rows(first) and rows(second) and not rows(first) & rows(second)
        small("send-keys", "-t", "t", "p")
        small.wait_for(r"page 1/\d", timeout=5)
        small("send-keys", "-t", "t", "C-c")
        small.wait_for(r"^EXIT=0$", timeout=30)
    finally:
        small.close()


def test_preflight_refuses_before_anything_attaches(slab, tmp_path):
    for args, says in (
        (["--record", "/nonexistent/dir/x.arrow"], "the directory /nonexistent/dir does not exist"),
        (["--ready-file", "/nonexistent/dir/ready"], "the directory /nonexistent/dir does not exist"),
        (["--record", "/sys/x.arrow"], "Cannot write the recording /sys/x.arrow in /sys (Permission denied)"),
        (["--anonymize", "--print-program"], "--print-program shows the real --client networks"),
    ):
        t0 = time.monotonic()
        p = cli("trace", "--lab", slab.name, "--format", "json", "--duration", "5", *args, check=False, timeout=60)
        assert p.returncode == 2, (args, p.stderr)
        assert says in p.stderr, (args, p.stderr)
        assert "Tracing hostPort" not in p.stderr and p.stdout == "", (args, p.stdout, p.stderr)
        assert time.monotonic() - t0 < 20                       # refused before any compile or attach


def test_format_none_ends_with_flows_lost_and_where_the_recording_is(slab, tmp_path):
    rec = tmp_path / "quiet.arrow"
    p = subprocess.Popen([PY, "-m", "bpftrace_hostport", "trace", "--lab", slab.name, "--format", "none",
                          "--record", str(rec), "--ready-file", str(tmp_path / "ready")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready").exists():
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()
            time.sleep(0.05)
        traffic(slab, to=8000, count=4, proto="tcp", source="node")
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert out == ""
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"\d+ flows?, 0 lost flows; recording: {re.escape(str(rec))} \([\d.]+ (B|KiB)\)\.", last), err
    assert int(last.split()[0]) >= 4


def _signals_at(args, at, times=3, cache="off", ready=None):
    """Runs trace, sends SIGINT `times` times quickly `at` seconds after it started (or once the
    ready file exists when at is None) -> (returncode, stdout, stderr)."""
    env = dict(os.environ, BPFTRACE_HOSTPORT_CACHE_DIR=cache)
    p = subprocess.Popen([PY, "-m", "bpftrace_hostport", "trace", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        if at is None:
            deadline = time.monotonic() + 60
            while not os.path.exists(ready):
                assert p.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
        else:
            time.sleep(at)
        for _ in range(times):
            p.send_signal(signal.SIGINT)
            time.sleep(0.03)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, out, err


@pytest.mark.parametrize("at", [0.1, 0.4, 1.0, None])
def test_ctrl_c_at_any_moment_exits_0_and_a_recording_gets_its_end(slab, tmp_path, at):
    """Ctrl-C (three times, quickly) while Python starts, while the programs compile (no cache),
    and just after attaching: exit 0, never click's "Aborted!", and a recording that was begun
    reads back whole (its end row, its summary)."""
    rec = tmp_path / "r.arrow"
    ready = tmp_path / "ready"
    code, out, err = _signals_at(["--lab", slab.name, "--format", "json", "--record", str(rec),
                                  "--ready-file", str(ready)], at, ready=str(ready))
    assert code == 0, err
    assert "Aborted" not in err and "Traceback" not in err, err
    if not rec.exists():
        assert "stopped before tracing started: nothing was traced." in err, err
        return
    lines = [json.loads(ln) for ln in out.splitlines()]
    assert lines and lines[0]["type"] == "capture" and lines[-1]["type"] == "summary"
    p = cli("summary", str(rec))
    assert "cut short" not in p.stderr and "torn" not in p.stderr, p.stderr


def test_an_anonymized_run_holds_no_real_client_address_in_any_output(slab, tmp_path, tmux):
    """--anonymize-key-file on every output a run writes (JSON lines, text, the live view, the
    recording) and on everything made from the recording later (report in every format, export
    to every format): no real client address appears anywhere, as text or as packed bytes."""
    st = slab
    key = tmp_path / "key"
    key.write_text("the lab's anonymization secret, longer than 16 bytes\n")
    clients = [st.clients[0]["ip"]] + ([st.clients[0]["ip6"]] if st.clients[0].get("ip6") else [])
    outputs = {}

    def send():
        traffic(st, to=8000, count=3)
        traffic(st, to=8000, count=2, family=6)
        traffic(st, to=5353, count=2, proto="udp")
        traffic(st, to=9000, count=2)                            # misses carry the client too
        time.sleep(1.2)

    rec = tmp_path / "anon.arrow"
    nets = [str(ipaddress.ip_network(f"{c}/{24 if ':' not in c else 64}", strict=False)) for c in clients]
    with tracing("--lab", st.name, "--record", str(rec), "--anonymize-key-file", str(key),
                 *[a for n in nets for a in ("--client", n)]) as t:
        send()
    outputs["json lines"] = Path(t.run.out_path).read_text()
    outputs["trace stderr"] = t.stderr
    assert any(r["type"] == "flow" for r in t.records) and any(r["type"] == "miss" for r in t.records)
    assert t.records[0].get("anonymized") is True
    assert not set(t.records[0]["options"]["clients"]) & set(nets)      # the --client networks too
    from bpftrace_hostport.lab.harness import TraceRun
    run = TraceRun(["--lab", st.name, "--format", "table", "--anonymize-key-file", str(key)])
    with run:
        send()
    outputs["text"] = Path(run.out_path).read_text() + run.stderr
    assert "flows over" in outputs["text"]
    tmux.start(f"{PY} -m bpftrace_hostport trace --lab {st.name} --anonymize-key-file {key}")
    tmux.wait_for(r"Ctrl-C\s+to\s+end\.")
    send()
    tmux.wait_for(r"latest events")
    live = tmux.screen()
    tmux("send-keys", "-t", "t", "C-c")
    tmux.wait_for(r"^EXIT=0$", timeout=30)
    outputs["live view"] = live + tmux.history()
    outputs["recording"] = rec.read_bytes().decode("latin-1")
    for fmt in ("table", "json", "csv", "markdown"):
        outputs[f"report {fmt}"] = cli("report", str(rec), "--format", fmt).stdout
    cli("report", str(rec), "--format", "html", "-o", str(tmp_path / "r.html"))
    outputs["report html"] = (tmp_path / "r.html").read_text()
    outputs["summary"] = cli("summary", str(rec)).stdout + cli("summary", str(rec), "--json").stdout
    for to in ("csv", "jsonl", "pcapng", "parquet", "recording"):
        out = tmp_path / f"export.{to}"
        cli("export", str(rec), "--to", to, "-o", str(out))
        outputs[f"export {to}"] = out.read_bytes().decode("latin-1")
    packed = {c: ipaddress.ip_address(c).packed.decode("latin-1") for c in clients}
    for name, text in outputs.items():
        assert text, name
        for c in clients:
            assert not re.search(rf"(?<![\d.:a-f]){re.escape(c)}(?![\d.:a-f])", text), (name, c)
            if name in ("recording", "export pcapng", "export parquet", "export recording"):
                assert packed[c] not in text, (name, c, "packed")
    # the pseudonyms are there instead, the same in every output (one key)
    pseud = {r["client_ip"] for r in (json.loads(ln) for ln in outputs["json lines"].splitlines() if ln.strip())
             if r["type"] == "flow"}
    assert pseud and all(p in outputs["export jsonl"] for p in pseud)


def test_lab_traffic_status_and_errors_say_it_plainly(slab):
    st = slab
    p = cli("lab", "traffic", "--name", st.name, "--count", "2", "--ipv6")
    assert re.match(rf"client -> \[{re.escape(st.node_ip6)}\]:8000/tcp: sent 2, answered 2", p.stdout), p.stdout
    p = cli("lab", "traffic", "--name", st.name, "--count", "1", "--target", "localhost", check=False)
    assert p.returncode == 2
    assert "Only the node itself can reach a hostPort on localhost: add --from node." in p.stderr
    p = cli("lab", "traffic", "--name", st.name, "--to", "1234", check=False)
    assert p.returncode == 2 and "give --to with one of 5353/udp, 8000/tcp, 9000/tcp" in p.stderr, p.stderr
    p = cli("lab", "status")
    row = next(ln for ln in p.stdout.splitlines() if ln.startswith(st.name + " "))
    assert row.split()[1:3] == ["hostnetwork", "direct"] and st.node_ip in row and row.endswith("up"), row
