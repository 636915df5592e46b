"""The packages are layers: a module imports only from its own package and the ones below it.

    base (proto, netns, files, errors, model, nopandas, addr)  <  records  <  ebpf  <  pods  <  node
    <  analysis  <  collect  <  lab  <  cli

records owns the flow data model (FlowBatch), so the offline side (records, analysis) never
needs the live tracer's package; collect (the tracer) uses analysis (the one roll-up), never the
reverse. Imports inside functions count too: a lazy import only hides a cycle.
"""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "bpftrace_hostport"
LAYERS = ["base", "records", "ebpf", "pods", "node", "analysis", "collect", "lab", "cli"]
BASE = {"proto", "netns", "files", "errors", "model", "nopandas", "addr", "__init__", "bpf"}


def _layer(parts):
    head = parts[0] if parts else "__init__"
    if head == "__main__":                    # `python -m bpftrace_hostport`: the CLI's entry
        return "cli"
    return "base" if head in BASE else head


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    rel = path.relative_to(PKG).with_suffix("").parts
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("bpftrace_hostport."):
                    yield node.lineno, a.name.split(".")[1:]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel[:-node.level]) if node.level <= len(rel) else []
                mod = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("bpftrace_hostport"):
                mod = node.module.split(".")[1:]
            else:
                continue
            if not mod:                       # from bpftrace_hostport import proto, netns
                for a in node.names:
                    yield node.lineno, [a.name]
            else:
                yield node.lineno, mod


def test_no_package_imports_one_above_it():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        mine = _layer(path.relative_to(PKG).with_suffix("").parts)
        if mine not in LAYERS:
            bad.append(f"{path.relative_to(PKG)}: package {mine!r} is not in LAYERS")
            continue
        for lineno, parts in _imports(path):
            theirs = _layer(parts)
            if theirs not in LAYERS:
                continue
            if LAYERS.index(theirs) > LAYERS.index(mine):
                bad.append(f"{path.relative_to(PKG)}:{lineno} ({mine}) imports "
                           f"bpftrace_hostport.{'.'.join(parts)} ({theirs})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)
