"""A CNI plugins build with the nftables portmap, for `lab up --portmap nftables`.

Debian 12 and 13 ship containernetworking-plugins 1.1.1, whose portmap ignores `"backend":
"nftables"`; Debian unstable has 1.9.1. The lab fetches that package with an apt configuration
of its own (APT_CONFIG: its own source list, lists, cache and dpkg status, nothing of the
system's apt state is read or written), downloads it with `apt-get download` and unpacks it with
`dpkg -x` into a directory of its own. Nothing is installed: the lab runs these plugins from
there, by path. The directory is a stable cache (BPFTRACE_HOSTPORT_CNI_CACHE, default
/var/cache/bpftrace-hostport-lab/cni-plugins): a second call finds it and does nothing.

    python -m bpftrace_hostport.lab.plugins        # fetch (or find) it and print the plugins' directory
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from bpftrace_hostport.errors import UserError

PACKAGE = "containernetworking-plugins"
VERSION = "1.9.1"                 # the build the lab's nftables fixtures and tests were made with
MIN_VERSION = (1, 9, 0)           # portmap's nftables prerouting jump checks `fib daddr type local` from 1.9.0
MIRROR = os.environ.get("BPFTRACE_HOSTPORT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
PLUGINS = ("bridge", "host-local", "portmap")


def cache_root() -> Path:
    return Path(os.environ.get("BPFTRACE_HOSTPORT_CNI_CACHE", "/var/cache/bpftrace-hostport-lab/cni-plugins"))


class PluginsError(UserError):
    pass


def _version_tuple(v: str):
    core = v.split(":")[-1].split("+")[0].split("-")[0]
    try:
        return tuple(int(x) for x in core.split(".")[:3])
    except ValueError:
        return ()


def _plugins_dir(root: Path) -> Optional[Path]:
    """The unpacked build's plugin directory, if a complete one is there."""
    done = root / "unpacked" / "READY"
    d = root / "unpacked" / "usr" / "lib" / "cni"
    if done.exists() and all(os.access(d / p, os.X_OK) for p in PLUGINS):
        return d
    return None


def _apt_config(root: Path) -> Path:
    apt = root / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "sources.list").write_text(f"deb [signed-by={KEYRING}] {MIRROR} unstable main\n")
    (apt / "status").touch()
    conf = apt / "apt.conf"
    conf.write_text("\n".join([
        f'Dir::Etc::SourceList "{apt / "sources.list"}";',
        f'Dir::Etc::SourceParts "{apt / "sources.list.d"}";',
        f'Dir::Etc::Preferences "{apt / "preferences"}";',
        f'Dir::Etc::PreferencesParts "{apt / "preferences.d"}";',
        f'Dir::State::Lists "{apt / "lists"}";',
        f'Dir::State::status "{apt / "status"}";',
        f'Dir::Cache "{apt / "cache"}";',
        'Acquire::Languages "none";',
        'APT::Sandbox::User "root";',        # the download goes into a root-owned directory
        "",
    ]))
    return conf


def _run(argv, env, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 124, "", f"no answer within {timeout} s")
    except OSError as e:
        return subprocess.CompletedProcess(argv, 127, "", e.strerror or str(e))


def _why(p: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (p.stdout + "\n" + p.stderr).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("Err:"):                  # "Err:1 URL" and, on the next line, why
            return (ln + (": " + lines[i + 1] if i + 1 < len(lines) else ""))[:240]
    errors = [ln for ln in lines if ln.startswith("E:")]
    return (errors or lines or [f"exit status {p.returncode}"])[-1][:240]


def nftables_plugins(fetch: bool = True) -> Path:
    """The directory of a plugins build whose portmap has the nftables backend: the cached one, or
    fetched now. Raises PluginsError (one sentence) when it cannot be had."""
    override = os.environ.get("BPFTRACE_HOSTPORT_CNI_NFT")
    if override:
        d = Path(override)
        if not all(os.access(d / p, os.X_OK) for p in PLUGINS):
            raise PluginsError(f"BPFTRACE_HOSTPORT_CNI_NFT={override} has no executable {', '.join(PLUGINS)}: "
                               "point it at the plugins' directory of a containernetworking-plugins build "
                               ">= 1.9.0.")
        return d
    root = cache_root()
    found = _plugins_dir(root)
    if found or not fetch:
        if found:
            return found
        raise PluginsError(f"No CNI plugins with the nftables portmap in {root}: run "
                           "`python -m bpftrace_hostport.lab.plugins` to fetch them.")
    if os.geteuid() != 0:
        raise PluginsError("Fetching the CNI plugins for the nftables portmap needs root (it unpacks them "
                           f"into {root}): run it with sudo.")
    for tool in ("apt-get", "dpkg", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise PluginsError(f"`{tool}` is missing, so the CNI plugins with the nftables portmap cannot be "
                               f"fetched from Debian: put a build >= 1.9.0 somewhere and set "
                               "BPFTRACE_HOSTPORT_CNI_NFT to its plugins' directory.")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # two labs (or test runs) at once fetch it once
        found = _plugins_dir(root)
        if found:
            return found
        return _fetch(root)


def _fetch(root: Path) -> Path:
    conf = _apt_config(root)
    env = dict(os.environ, APT_CONFIG=str(conf), DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
    hint = (f"check that {MIRROR} can be reached (or set BPFTRACE_HOSTPORT_DEBIAN_MIRROR), or put a "
            "plugins build >= 1.9.0 somewhere and set BPFTRACE_HOSTPORT_CNI_NFT to its directory")
    p = _run(["apt-get", "-q", "update"], env)
    if p.returncode != 0 or "Err:" in p.stdout:
        raise PluginsError(f"Could not fetch the CNI plugins with the nftables portmap: `apt-get update` "
                           f"for Debian unstable failed ({_why(p)}); {hint}.")
    debs = root / "debs"
    shutil.rmtree(debs, ignore_errors=True)
    debs.mkdir()
    p = _run(["apt-get", "-q", "download", f"{PACKAGE}={VERSION}*"], env, cwd=debs)
    if p.returncode != 0:
        # Debian unstable moved on: any build with the fixed nftables portmap will do.
        p = _run(["apt-get", "-q", "download", PACKAGE], env, cwd=debs)
    files = sorted(debs.glob("*.deb"))
    if p.returncode != 0 or not files:
        raise PluginsError(f"Could not fetch the CNI plugins with the nftables portmap: `apt-get download "
                           f"{PACKAGE}` failed ({_why(p)}); {hint}.")
    deb = files[-1]
    got = _run(["dpkg-deb", "-f", str(deb), "Version"], env).stdout.strip()
    if _version_tuple(got) < MIN_VERSION:
        raise PluginsError(f"Debian unstable has {PACKAGE} {got or '?'}, older than 1.9.0 (the first with a "
                           f"correct nftables portmap); {hint}.")
    out = root / "unpacked"
    shutil.rmtree(out, ignore_errors=True)
    p = _run(["dpkg", "-x", str(deb), str(out)], env)
    if p.returncode != 0:
        raise PluginsError(f"Could not unpack {deb.name} ({_why(p)}); remove {root} and try again.")
    (out / "VERSION").write_text(got + "\n")
    (out / "READY").write_text(deb.name + "\n")
    found = _plugins_dir(root)
    if not found:
        raise PluginsError(f"{deb.name} has no {', '.join(PLUGINS)} under usr/lib/cni; remove {root} and try again.")
    # The unpacked tree is the cache: the package, the lists and apt's cache are not needed again.
    for junk in (debs, root / "apt" / "lists", root / "apt" / "cache"):
        shutil.rmtree(junk, ignore_errors=True)
    return found


def version(plugins_dir: Path) -> Optional[str]:
    v = plugins_dir.parents[2] / "VERSION" if len(plugins_dir.parents) > 2 else None
    with contextlib.suppress(OSError):
        if v is not None:
            return v.read_text().strip()
    return None


def main(argv=None) -> int:
    try:
        d = nftables_plugins()
    except UserError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    print(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
