"""scripts/check-vagrant-vm.sh and its helpers (scripts/vagrant-vm/): the parts that can be
checked without booting a VM. The VM run itself takes minutes and is not in the suite (README,
"Checks outside the test suite").

- The shell scripts parse (bash -n / sh -n) and keep the rules the check is built on: every
  exit path tears down (trap), daemons enter the check's namespace with nsenter --net (never
  `ip netns exec`, which remounts /sys and hides the cgroups), nothing is put in the root
  namespace's network, the user's ~/.vagrant.d is left alone.
- vagrant/Vagrantfile stays the file users run with the public debian/trixie64 box: the check's
  site settings live in scripts/vagrant-vm/site.Vagrantfile, and its provisioners are named so
  that Vagrant adds them instead of replacing the project's.
- check_demo.py on a real `lab demo` output (captured on this machine; the same command and format
  as in the VM), and on that output with each
  failure planted.
- proxy.py for real on loopback: plain http in origin-form with keep-alive, a CONNECT tunnel,
  403 for what is not allowed.
"""
from __future__ import annotations

import http.server
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check-vagrant-vm.sh"
HELPERS = ROOT / "scripts" / "vagrant-vm"
FIXTURE = ROOT / "tests" / "fixtures" / "vagrant-vm" / "demo-output.txt"

sys.path.insert(0, str(HELPERS))
import check_demo  # noqa: E402


def code_of(path: Path) -> str:
    """The script without its comment lines."""
    return "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#"))


@pytest.mark.parametrize("shell, path", [("bash", SCRIPT), ("sh", HELPERS / "box-customize.sh"),
                                         ("sh", HELPERS / "site-provision.sh")])
def test_shell_scripts_parse(shell, path):
    res = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_python_helpers_compile():
    for name in ("proxy.py", "check_demo.py"):
        compile((HELPERS / name).read_text(), name, "exec")
    assert os.access(SCRIPT, os.X_OK)


def test_script_keeps_its_rules():
    code = code_of(SCRIPT)
    assert "trap on_exit EXIT" in code and "teardown" in code
    assert "ip netns exec" not in code
    for m in re.finditer(r"nsenter\b[^\n]*", code):
        assert "--net=" in m.group(0), m.group(0)
    # libvirt's state is private: a tmpfs /run and bind mounts in a private mount namespace.
    assert "unshare --mount --propagation private" in code
    for d in ("/etc/libvirt", "/var/lib/libvirt", "/var/log/libvirt"):
        assert f"mount --bind '$L/" in code and d in code
    # Nothing added to the root namespace's network; its state compared before and after.
    assert not re.search(r"\bip (-\S+ )*(link|addr|route|rule) (add|set|del)", code.replace('ip -n "$ns" link set lo up', ""))
    assert "iptables -A" not in code and "nft add" not in code and "sysctl -w" not in code
    for what in ("ip -d -o link show", "route show table all", "nft list ruleset", "sysctl -a"):
        assert what in code
    # Its own VAGRANT_HOME: a debian/trixie64 box the user has is neither used nor replaced.
    assert re.search(r'export VAGRANT_HOME="\$cache/', code)
    assert "~/.vagrant.d" not in code and "$HOME/.vagrant.d" not in code
    # The box is the project's box name, so vagrant/Vagrantfile runs unchanged.
    assert 'box_name=debian/trixie64' in code and "vagrant box add --force --name" in code
    assert "mmdebstrap --variant=minbase" in code and "mke2fs" in code and "-d " in code
    # The README's command, verbatim.
    assert "vagrant ssh -c 'sudo bpftrace-hostport lab demo'" in code


def test_project_vagrantfile_stays_the_users():
    vf = (ROOT / "vagrant" / "Vagrantfile").read_text()
    assert re.search(r'^\s*config\.vm\.box = "debian/trixie64"$', vf, re.M)
    assert "BHP_" not in vf and "proxy" not in vf.lower() and "libvirt_uri" not in vf
    assert "bash scripts/setup.sh" in vf


def test_site_vagrantfile_adds_named_provisioners():
    site = (HELPERS / "site.Vagrantfile").read_text()
    provs = re.findall(r'config\.vm\.provision "([^"]+)", type: "(\w+)"', site)
    # A provisioner given a name and a type is merged by name; the project's unnamed one is kept.
    assert provs == [("bhp-site-ca", "file"), ("bhp-site", "shell")]
    assert "lv.uri" in site and "lv.driver" in site
    assert "lv.serial" not in code_of_ruby(site)   # vagrant-libvirt 0.11.2 cannot merge it


def code_of_ruby(text: str) -> str:
    return "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))


# --------------------------------------------------------------------------- check_demo.py

@pytest.mark.parametrize("fixture", [FIXTURE, *sorted(FIXTURE.parent.glob("demo-output-local-*.txt"))],
                         ids=lambda p: p.name)
def test_check_demo_passes_a_real_demo(fixture):
    """The VM's demo, and this machine's at 80 columns and on a pipe (the summary and check
    wrap differently)."""
    ok, line = check_demo.check(fixture.read_text())
    assert ok, line
    assert re.match(r"\d+ flows traced \(netfilter backend\), 0 lost events, 5 misses on :9000; "
                    r"check: 1 finding: 1 info\.; demo took [\d.]+ s$", line), line


@pytest.mark.parametrize("plant, reason", [
    (lambda t: t.replace("[4/7]", "[4/8]"), "no step [4/7]"),
    (lambda t: re.sub(r"(client -> node:44300: sent 10, answered )10, failed 0", r"\g<1>9, failed 1", t),
     "requests failed: client -> node:44300"),
    (lambda t: re.sub(r"^\[5/7\] \d+ flows", "[5/7] 59 flows", t, flags=re.M), "59 flows traced, 60 requests"),
    (lambda t: re.sub(r", 0 lost events", ", 3 lost events", t), "summary: "),
    (lambda t: t.replace("[2/7]", "warning: no BTF. Falling back to conntrack events (no latency, misses or "
                         "drops).\n[2/7]"), "fell back to conntrack"),
    (lambda t: t.replace("via output, answered", "via output, unanswered"), "no flow via output"),
    (lambda t: re.sub(r"^(tcp :9000 \(no DNAT\).*?)\s+5(\s+-\s+0)", r"\1     0\2", t, flags=re.M),
     "misses on :9000: 0, requests sent there: 5"),
    (lambda t: t.replace("hostnetwork-hostport  Pod", "hostnetwork-hostpor_  Pod"),
     "check did not report hostnetwork-hostport"),
    (lambda t: re.sub(r"^lab \S+ removed.*$", "", t, flags=re.M), "the lab was not removed"),
])
def test_check_demo_catches_each_planted_failure(plant, reason):
    text = FIXTURE.read_text()
    planted = plant(text)
    assert planted != text
    ok, line = check_demo.check(planted)
    assert not ok and reason in line, line


# --------------------------------------------------------------------------- proxy.py

class _Origin(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    paths: list = []

    def do_GET(self):
        _Origin.paths.append(self.path)
        body = f"you asked for {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_response(f) -> tuple[str, bytes]:
    status = f.readline().decode()
    length = 0
    while True:
        line = f.readline()
        if line in (b"\r\n", b""):
            break
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return status.strip(), f.read(length)


@pytest.fixture
def proxy(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("setns() into a network namespace needs root")
    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Origin)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    port = _free_port()
    ready = tmp_path / "ready"
    # The test's own namespace stands in for the libvirt one: setns into it is a no-op move.
    p = subprocess.Popen([sys.executable, str(HELPERS / "proxy.py"), "--netns", "/proc/self/ns/net",
                          "--port", str(port), "--allow", "127.0.0.1",
                          "--ports", str(origin.server_address[1]), "--log", str(tmp_path / "log"),
                          "--ready-file", str(ready)])
    try:
        for _ in range(100):
            if ready.exists() and ready.read_text():
                break
            time.sleep(0.05)
        assert ready.exists(), "the proxy did not start"
        _Origin.paths = []
        yield port, origin.server_address[1], tmp_path / "log"
    finally:
        p.terminate()
        p.wait(timeout=10)
        origin.shutdown()


def test_proxy_forwards_plain_http_in_origin_form_with_keep_alive(proxy):
    port, oport, log = proxy
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")
        for path in ("/debian/dists/trixie/InRelease", "/simple/click/"):
            s.sendall(f"GET http://127.0.0.1:{oport}{path} HTTP/1.1\r\nHost: 127.0.0.1:{oport}\r\n"
                      f"Proxy-Connection: keep-alive\r\n\r\n".encode())
            status, body = _read_response(f)
            assert status.startswith("HTTP/1.1 200"), status
            assert body == f"you asked for {path}".encode()
    assert _Origin.paths == ["/debian/dists/trixie/InRelease", "/simple/click/"]


def test_proxy_tunnels_connect_and_refuses_the_rest(proxy):
    port, oport, log = proxy
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")
        s.sendall(f"CONNECT 127.0.0.1:{oport} HTTP/1.1\r\nHost: 127.0.0.1:{oport}\r\n\r\n".encode())
        assert f.readline().startswith(b"HTTP/1.1 200")
        assert f.readline() == b"\r\n"
        s.sendall(b"GET /through/the/tunnel HTTP/1.1\r\nHost: x\r\n\r\n")
        status, body = _read_response(f)
        assert body == b"you asked for /through/the/tunnel"
    for request in (f"CONNECT example.org:{oport} HTTP/1.1\r\n\r\n",       # host not allowed
                    "CONNECT 127.0.0.1:22 HTTP/1.1\r\n\r\n",                # port not allowed
                    f"GET http://example.org:{oport}/ HTTP/1.1\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(request.encode())
            assert s.makefile("rb").readline().startswith(b"HTTP/1.1 403"), request
    text = log.read_text()
    assert "CONNECT example.org" in text and "denied" in text
