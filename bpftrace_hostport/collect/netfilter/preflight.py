"""Before a compile: what the machine must offer, each missing piece one sentence with the fix.

Privileges and capabilities (always); kernel symbols visible to bcc, bcc itself and the kernel
headers (only when the programs must be compiled, not on a start from the compile cache);
tracefs for the drop tracepoint, and the names the kernel gives its drop reasons (from BTF).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import List

from bpftrace_hostport.ebpf.btf import BTF, BTFError
from bpftrace_hostport.errors import UserError

TRACEFS = "/sys/kernel/tracing"
KFREE_SKB_FORMAT = TRACEFS + "/events/skb/kfree_skb/format"


def preflight() -> None:
    """Checks before anything is loaded; each failure is one sentence with the fix."""
    if os.geteuid() != 0:
        raise UserError("bpftrace-hostport needs root (CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN): "
                        "run it with sudo.")
    missing = missing_capabilities()
    if missing:
        raise UserError(f"This process lacks {', '.join(missing)}: run as root with all capabilities "
                        "(in a container: --privileged, or --cap-add BPF,PERFMON,NET_ADMIN,NET_RAW,SYSLOG).")


def preflight_compile() -> None:
    """What a compile needs on top (bcc and its inputs); a start from the compile cache does not."""
    if not kernel_symbols_visible():
        raise UserError("Kernel symbol addresses are hidden (/proc/kallsyms shows zeros), so bcc cannot "
                        "use bpf_probe_read_kernel: grant CAP_SYSLOG and keep kernel.kptr_restrict at 0 or 1.")
    if importlib.util.find_spec("bcc") is None:
        raise UserError("The bcc Python module is missing: install Debian's python3-bpfcc and run "
                        "from a virtualenv made with --system-site-packages (scripts/setup.sh does both).")
    kver = platform.release()
    build = Path("/lib/modules") / kver / "build"
    if not build.exists():
        raise UserError(f"No kernel headers for {kver} at {build}: install linux-headers-{kver} "
                        "(or run scripts/setup.sh, which links Debian's generic headers as a fallback).")


def kernel_symbols_visible(path: str = "/proc/kallsyms") -> bool:
    """bcc decides from /proc/kallsyms whether bpf_probe_read_kernel exists; with the addresses
    hidden (kptr_restrict=2, or no CAP_SYSLOG) it falls back to a helper netfilter programs may
    not call, and the load fails with a misleading EINVAL."""
    try:
        with open(path) as f:
            for line in f:
                if line.endswith(" bpf_probe_read_kernel\n"):
                    return int(line.split(" ", 1)[0], 16) != 0
    except (OSError, ValueError):
        return True            # cannot tell: let the compile say what it finds
    return True


# include/uapi/linux/capability.h
CAPS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}


def missing_capabilities(status_path: str = "/proc/self/status") -> List[str]:
    """CAP_NET_ADMIN, plus CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN, which implies both)."""
    try:
        eff = next(int(line.split()[1], 16) for line in Path(status_path).read_text().splitlines()
                   if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return []
    has = {name: bool(eff >> bit & 1) for name, bit in CAPS.items()}
    missing = [] if has["CAP_NET_ADMIN"] else ["CAP_NET_ADMIN"]
    if not has["CAP_SYS_ADMIN"]:
        missing += [c for c in ("CAP_BPF", "CAP_PERFMON") if not has[c]]
    return missing


def ensure_tracefs() -> bool:
    """skb:kfree_skb needs tracefs; mount it if it is missing (a mount, not a network change)."""
    if os.path.exists(KFREE_SKB_FORMAT):
        return True
    with contextlib.suppress(Exception):
        subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], capture_output=True, timeout=10)
    return os.path.exists(KFREE_SKB_FORMAT)


def tracepoint_field_offsets(fmt_path: str = KFREE_SKB_FORMAT) -> dict:
    """Offsets of skbaddr and reason in the skb:kfree_skb record, from its format file (stable ABI)."""
    text = Path(fmt_path).read_text()
    offs = {}
    for m in re.finditer(r"field:[^;]*?\b(\w+);\s*offset:(\d+);\s*size:(\d+);", text):
        offs[m.group(1)] = int(m.group(2))
    if "skbaddr" not in offs or "reason" not in offs:
        raise UserError(f"{fmt_path} has no skbaddr/reason fields: this kernel's skb:kfree_skb "
                        "lacks drop reasons (needs Linux >= 5.17); rerun with --no-drops.")
    return {"TP_SKBADDR": offs["skbaddr"], "TP_REASON": offs["reason"]}


def drop_reason_names(btf: BTF) -> dict:
    """enum skb_drop_reason from BTF: value -> short name (NETFILTER_DROP)."""
    try:
        values = btf.enum_values("skb_drop_reason")
    except BTFError:
        return {}
    names = {}
    for name, val in values.items():
        short = name
        for prefix in ("SKB_DROP_REASON_", "SKB_"):
            if short.startswith(prefix):
                short = short[len(prefix):]
                break
        names.setdefault(val, short)
    return names
