"""The container images of a containerd lab, built here from Debian's own files: no registry.

* pause: the sandbox's first process, a few lines of C linked with `gcc -static` (it only waits
  for a signal and reaps orphans, as Kubernetes' own pause does).
* server: a root file system of Debian's `busybox-static` (a shell and the usual tools) with empty
  mount points for /usr and the lab's server; the lab's containers run the project's own
  lab/servers.py with the node's Python, both bind-mounted read-only (lab/containerd.py says why).

Each image is a Docker archive (manifest.json, the config, one layer), written byte for byte the
same for the same inputs (sorted entries, mtime 0, root-owned), so its digest is a function of
its content. Each lab builds its archives in its own directory (gcc takes about 0.2 s; nothing
outlives the lab) and imports them into its containerd with `ctr -n k8s.io images import`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

from bpftrace_hostport.errors import UserError

BUSYBOX = "/bin/busybox"
PAUSE_C = r"""
/* The pod sandbox's first process (lab/images.py): wait for a signal, reap orphans. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void quit(int s) { (void)s; _exit(0); }
static void reap(int s) { (void)s; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
  signal(SIGINT, quit);
  signal(SIGTERM, quit);
  signal(SIGCHLD, reap);
  for (;;) pause();
}
"""
# The busybox applets a container gets as links (a shell to look around with `ctr task exec`).
APPLETS = ("sh", "ls", "cat", "ps", "sleep", "ip", "netstat", "nc", "wget", "env")


class ImageError(UserError):
    pass


@dataclass(frozen=True)
class Image:
    ref: str          # e.g. localhost/bhp-pause:1a2b3c4d5e6f
    archive: Path     # the Docker archive to import


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tar(entries: List[Tuple[str, str, bytes]]) -> bytes:
    """A deterministic tar: (path, kind 'dir'|'file'|'exe'|'link', data or link target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for path, kind, data in sorted(entries):
            info = tarfile.TarInfo(path)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            elif kind == "link":
                info.type, info.mode, info.linkname = tarfile.SYMTYPE, 0o777, data.decode()
                tf.addfile(info)
            else:
                info.mode = 0o755 if kind == "exe" else 0o644
                if path == "tmp":
                    info.mode = 0o1777
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _archive(ref: str, layer: bytes, entrypoint: List[str]) -> bytes:
    """A Docker archive (what `docker save` writes) of one layer."""
    diff_id = "sha256:" + _sha(layer)
    config = json.dumps({
        "architecture": _arch_name(),
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
                   "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "bpftrace-hostport lab/images.py"}],
    }, sort_keys=True).encode()
    config_name = _sha(config) + ".json"
    layer_name = _sha(layer) + "/layer.tar"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [ref], "Layers": [layer_name]}]).encode()
    return _tar([("manifest.json", "file", manifest), (config_name, "file", config),
                 (layer_name.split("/")[0], "dir", b""), (layer_name, "file", layer)])


def _arch_name() -> str:
    m = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)


def _build_pause(workdir: Path) -> bytes:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise ImageError("gcc is missing, and the lab builds its pause image with it: "
                         "apt-get install gcc libc6-dev (scripts/setup.sh does).")
    src = workdir / "pause.c"
    src.write_text(PAUSE_C)
    out = workdir / "pause"
    p = subprocess.run([gcc, "-static", "-Os", "-s", "-o", str(out), str(src)],
                       capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise ImageError("gcc could not link the lab's static pause program "
                         f"({(p.stderr.strip().splitlines() or ['no output'])[-1]}): "
                         "apt-get install libc6-dev.")
    return out.read_bytes()


def _dirs(*names: str) -> List[Tuple[str, str, bytes]]:
    return [(n, "dir", b"") for n in names]


def images(cache_dir: Path) -> Dict[str, Image]:
    """The lab's images {"pause": ..., "server": ...}, built into cache_dir unless already there."""
    if not os.access(BUSYBOX, os.X_OK):
        raise ImageError(f"{BUSYBOX} is missing, and the lab's server image is made of it: "
                         "apt-get install busybox-static (scripts/setup.sh does).")
    busybox = Path(BUSYBOX).read_bytes()
    base_dirs = _dirs("dev", "proc", "sys", "etc", "tmp", "run", "var", "usr", "opt", "opt/bhp")
    etc = [("etc/passwd", "file", b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n"),
           ("etc/group", "file", b"root:x:0:\nnogroup:x:65534:\n"),
           ("etc/hosts", "file", b"127.0.0.1 localhost\n::1 localhost\n")]
    out: Dict[str, Image] = {}
    cache_dir.mkdir(parents=True, exist_ok=True)
    # The server image: busybox in /bin; /usr is a mount point for the node's (Python), and the
    # merged-/usr links make /lib, /lib64 and /sbin point into it as on the node.
    server_layer_entries = base_dirs + etc + [
        ("bin", "dir", b""), ("bin/busybox", "exe", busybox),
        ("lib", "link", b"usr/lib"), ("lib64", "link", b"usr/lib64"), ("sbin", "link", b"usr/sbin"),
    ] + [(f"bin/{a}", "link", b"busybox") for a in APPLETS]
    key = _sha(PAUSE_C.encode() + _sha(busybox).encode() + b"images-v1")[:12]
    for name in ("pause", "server"):
        ref = f"localhost/bhp-{name}:{key}"
        path = cache_dir / f"bhp-{name}-{key}.tar"
        out[name] = Image(ref, path)
        if path.exists():
            continue
        with tempfile.TemporaryDirectory(prefix="bhp-image-", dir=cache_dir) as tmp:
            if name == "pause":
                layer = _tar(base_dirs + [("pause", "exe", _build_pause(Path(tmp)))])
                data = _archive(ref, layer, ["/pause"])
            else:
                data = _archive(ref, _tar(server_layer_entries), ["/bin/sh"])
            part = Path(tmp) / "image.tar"
            part.write_bytes(data)
            os.replace(part, path)
    return out
