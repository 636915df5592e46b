"""Shared pieces of the command line: the error boundary."""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import click

from .errors import UserError


class Fail(click.ClickException):
    exit_code = 2


def user_errors(fn):
    """Library errors (UserError) become `Error: <sentence>` and exit 2, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except UserError as e:
            raise Fail(str(e)) from None
    return wrapper


def lab_target(lab_name: str, netns: Optional[str]) -> Tuple[str, str, str]:
    """`--lab NAME`: the lab node's (network namespace, pod list file, node name)."""
    from .lab import LabState
    st = LabState.load(lab_name)
    if netns and netns != st.node_netns:
        raise Fail("--lab and --netns name different namespaces; give one of them.")
    return st.node_netns, str(st.pods_file), st.node_name
