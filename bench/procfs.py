"""What the kernel tells about CPU, memory, TCP and eBPF programs. Read-only: the eBPF run-time
statistics are switched on through a descriptor (bpf_run_time_stats), not a sysctl."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional

from bench.procs import nsexec, run

CLK_TCK = os.sysconf("SC_CLK_TCK")
BPF_STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq")     # guest time is inside user


# -- CPU -------------------------------------------------------------------------------------
def proc_cpu_s(pid: int) -> Optional[float]:
    """utime + stime of a live process, all its threads, in seconds (/proc/<pid>/stat 14, 15)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_runtime_s(pid: int) -> Optional[float]:
    """Time on a CPU of every live thread of pid, from schedstat (ns): no clock-tick rounding."""
    total, seen = 0, False
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int((task / "schedstat").read_text().split()[0])
                seen = True
    return total / 1e9 if seen else None


def system_cpu() -> List[int]:
    """The aggregate `cpu` line of /proc/stat, in clock ticks summed over the CPUs."""
    return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]


def cpu_share(before: List[int], after: List[int]) -> Dict[str, float]:
    d = [a - b for a, b in zip(after, before)]
    total = sum(d) or 1
    return {n: round(100.0 * v / total, 1) for n, v in zip(CPU_FIELDS, d)}


def busy_cpu_s(before: List[int], after: List[int]) -> float:
    """CPU seconds the whole machine spent busy (user, system, irq, softirq; not idle, iowait
    or steal) between two system_cpu() readings."""
    d = dict(zip(CPU_FIELDS, (a - b for a, b in zip(after, before))))
    return sum(d[k] for k in BUSY_FIELDS) / CLK_TCK


# -- memory ----------------------------------------------------------------------------------
def proc_mem_kb(pid: int) -> Dict[str, int]:
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "voluntary_ctxt_switches"):
                out[k] = int(v.split()[0])
    return out


def proc_tree(pid: int) -> List[int]:
    """pid and its descendants, alive now."""
    out = [pid]
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                for child in (task / "children").read_text().split():
                    out += proc_tree(int(child))
    return out


def tree_pss_kb(pid: int) -> int:
    """Proportional set size of pid and its descendants together: pages two of them share
    (a fork's copy-on-write pages, shared libraries) are counted once, not twice."""
    total = 0
    for p in proc_tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
    return total


# -- TCP and IP counters of a lab namespace -----------------------------------------------------------
def netns_snmp(ns: str, proto: str = "Tcp") -> Dict[str, int]:
    """Tcp (or Ip, Udp, ...) counters of a namespace (/proc/net/snmp read from inside it)."""
    p = run(nsexec(ns, "cat", "/proc/net/snmp"), timeout=10)
    lines = [line.split() for line in p.stdout.splitlines() if line.startswith(f"{proto}:")]
    if len(lines) < 2:
        return {}
    return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:])}


# -- eBPF program statistics -------------------------------------------------------------------
def prog_fd_stats(pid: int) -> Dict[int, dict]:
    """run_time_ns / run_cnt of every BPF program the process holds an fd of (fdinfo)."""
    out: Dict[int, dict] = {}
    with contextlib.suppress(OSError):
        for f in Path(f"/proc/{pid}/fdinfo").iterdir():
            try:
                text = f.read_text()
            except OSError:
                continue
            if "prog_tag:" not in text or "run_cnt:" not in text:
                continue        # maps, links (a link's fdinfo names its prog_id too), files
            kv = dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in text.splitlines()))
            out[int(kv["prog_id"])] = {"prog_type": int(kv.get("prog_type", -1)),
                                       "run_time_ns": int(kv.get("run_time_ns", 0)),
                                       "run_cnt": int(kv.get("run_cnt", 0))}
    return out


def perf_prog_ids(pid: int) -> List[int]:
    """Programs the process runs through perf events it holds (a tracepoint such as
    skb:kfree_skb): the process has no fd of the program itself, `bpftool perf show` links them."""
    if not shutil.which("bpftool"):
        return []
    p = run(["bpftool", "perf", "show", "-j"], timeout=10, check=False)
    try:
        entries = json.loads(p.stdout or "[]")
    except ValueError:
        return []
    return sorted({e["prog_id"] for e in entries if e.get("pid") == pid and "prog_id" in e})


def prog_id_stats(ids) -> Dict[int, dict]:
    """run_time_ns / run_cnt of programs by id (bpftool prog show)."""
    out: Dict[int, dict] = {}
    for i in ids:
        p = run(["bpftool", "prog", "show", "id", str(i), "-j"], timeout=10, check=False)
        with contextlib.suppress(ValueError, KeyError):
            d = json.loads(p.stdout)
            out[i] = {"prog_type": d.get("type", -1), "run_time_ns": int(d.get("run_time_ns", 0)),
                      "run_cnt": int(d.get("run_cnt", 0))}
    return out


# The tracer's programs. Loaded from the compile cache they carry no BTF, and the kernel keeps
# only the first 15 characters of a name (BPF_OBJ_NAME_LEN): the full name is restored here.
PROGRAMS = ("nf_prerouting_post_dnat", "nf_output_post_dnat", "tp_kfree_skb")


def full_prog_name(name: str) -> str:
    found = [p for p in PROGRAMS if p.startswith(name)] if len(name) == 15 else []
    return found[0] if len(found) == 1 else name


def prog_names(ids) -> Dict[int, str]:
    names = {}
    if shutil.which("bpftool"):
        for i in ids:
            p = run(["bpftool", "prog", "show", "id", str(i), "-j"], timeout=10, check=False)
            with contextlib.suppress(ValueError, KeyError):
                names[i] = full_prog_name(json.loads(p.stdout)["name"])
    return names


def prog_delta(before: Dict[int, dict], after: Dict[int, dict], names: Dict[int, str]) -> Dict[str, dict]:
    out = {}
    for prog_id, a in sorted(after.items()):
        b = before.get(prog_id, {"run_time_ns": 0, "run_cnt": 0})
        name = names.get(prog_id, f"prog{prog_id}_type{a['prog_type']}")
        out[name] = {"run_time_ns": a["run_time_ns"] - b["run_time_ns"],
                     "run_cnt": a["run_cnt"] - b["run_cnt"]}
    return out


BPF_ENABLE_STATS = 32          # bpf() command (Linux 5.8+)
BPF_STATS_RUN_TIME = 0


@contextlib.contextmanager
def bpf_run_time_stats():
    """Run-time statistics of every BPF program (run_time_ns, run_cnt) while the block runs.

    bpf(BPF_ENABLE_STATS) returns a descriptor that keeps the kernel timing each program run
    for as long as it is open: no sysctl is written (kernel.bpf_stats_enabled keeps its value),
    and the kernel turns the statistics off again when the descriptor closes, also if the
    bench is killed.
    """
    import ctypes
    from bpftrace_hostport.ebpf.bpfsys import sys_bpf
    attr = (ctypes.c_uint8 * 8)()             # union bpf_attr { struct { __u32 type; } enable_stats }
    ctypes.c_uint32.from_buffer(attr).value = BPF_STATS_RUN_TIME
    fd = sys_bpf(BPF_ENABLE_STATS, attr)
    try:
        yield
    finally:
        os.close(fd)
