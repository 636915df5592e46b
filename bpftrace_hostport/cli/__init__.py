"""The command line: a thin click layer over the library. Errors become one sentence, exit 2.

One module per command family: trace.py (trace), offline.py (summary, report, export),
node.py (rules, check), lab.py (lab ...); options.py holds the shared option families.
"""
from __future__ import annotations

import signal
import sys

#: Ctrl-C or SIGTERM that came while `trace` or `agent` was still being imported, before it
#: set its own handlers (cli/trace.run): the trace then stops at once, cleanly, exit 0, instead
#: of a KeyboardInterrupt traceback out of an import.
EARLY_STOP: list = []


def _early_stop(signum, frame) -> None:
    EARLY_STOP.append(signum)


if sys.argv[1:2] in (["trace"], ["agent"]):
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, _early_stop)

import click  # noqa: E402

from bpftrace_hostport import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bpftrace-hostport")
def cli():
    """Watch Kubernetes hostPort DNAT translations in the kernel with eBPF.

    \b
    Examples:
      bpftrace-hostport lab demo                      # build a lab node, trace it, summarize
      bpftrace-hostport trace --pods pods.json        # live, on a real node
      bpftrace-hostport trace --lab demo --format json --duration 30 > capture.jsonl
      bpftrace-hostport summary capture.jsonl
    """


def _register() -> None:
    from bpftrace_hostport.cli import lab, node, offline, trace
    for mod in (trace, offline, node, lab):
        for cmd in mod.COMMANDS:
            cli.add_command(cmd)


_register()


def main(argv=None):
    cli.main(args=argv, prog_name="bpftrace-hostport")


if __name__ == "__main__":
    main()
