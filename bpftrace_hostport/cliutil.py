"""Shared pieces of the command line: the error boundary."""
from __future__ import annotations

import functools

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
