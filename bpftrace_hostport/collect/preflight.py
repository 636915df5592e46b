"""Pre-flight checks of a trace: everything that can be known to fail is said before anything is
loaded or attached (cli/trace.run calls them before the programs are loaded), so a bad option
is one sentence with the fix and exit 2, not a banner, a capture header and then the error.

Imports nothing heavy: it runs before the compile (collect/outputs.load_probe).

The kernel side's own checks (headers, BTF, the netfilter link) are collect/netfilter/preflight.py.
"""
from __future__ import annotations

import errno
import os
from typing import Optional

from bpftrace_hostport.errors import UserError


# -- outputs: paths, permissions, anonymization --------------------------------------------

def _writable_dir(d: str, what: str, fix: str) -> None:
    """A file can be created in directory `d`: tried for real (a read-only filesystem, a full
    quota or a permission passes os.access as root), and removed at once."""
    if not os.path.isdir(d):
        raise UserError(f"Cannot write {what}: the directory {d} does not exist; {fix}.")
    probe = os.path.join(d, f".bpftrace-hostport-probe-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno == errno.EEXIST:
            return
        raise UserError(f"Cannot write {what} in {d} ({e.strerror or e}); {fix}.") from None
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass


def record_path(path: Optional[str]) -> None:
    """--record PATH / --record-dir DIR: a file that can be created, or a directory to create
    files in (--max-size's own bound is cli/options.parse_size's)."""
    if not path:
        return
    fix = "give a path in a directory that exists and that you can write"
    if os.path.isdir(path):
        _writable_dir(path, "the recording", "give a directory you can write")
        return
    if os.path.exists(path) and not os.path.isfile(path):
        raise UserError(f"{path} is not a regular file; give a file name or a directory for --record.")
    if os.path.isfile(path) and not os.access(path, os.W_OK):
        raise UserError(f"Cannot write the recording {path} (permission denied); {fix}.")
    _writable_dir(os.path.dirname(os.path.abspath(path)), f"the recording {path}", fix)


def ready_file(path: Optional[str]) -> None:
    """--ready-file: written once attached, so its directory must take it."""
    if path:
        _writable_dir(os.path.dirname(os.path.abspath(path)), f"the ready file {path}",
                      "give a path in a writable directory")


def anonymize(anonymized: bool, print_program: bool) -> None:
    """--anonymize applies to every output of a trace (the session replaces the clients before
    any sink sees them); the one output it cannot reach is the eBPF program --print-program
    shows, whose constants hold the real --client networks."""
    if anonymized and print_program:
        raise UserError("--print-program shows the real --client networks in the program's constants, "
                        "which --anonymize must not reveal; leave out one of the two.")


def outputs(*, record: Optional[str], ready: Optional[str], anonymized: bool,
            print_program: bool) -> None:
    """Every check of what a trace writes, in the order a user would fix them."""
    record_path(record)
    ready_file(ready)
    anonymize(anonymized, print_program)
