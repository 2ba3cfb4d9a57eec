"""Options and error handling shared by the ``zramd`` commands.

Theory of operation
-------------------
Every operator error reaches the user as one line on stderr (``zramd: error: ...``) and a
non-zero exit: :data:`EXIT_FAILURE` for a failed operation, :data:`EXIT_CONFIG` for a bad
command line or configuration. :func:`errors_one_line` turns the errors of the layers below
(ConfigError, ControlError, AttachError) into that line; :func:`control_option` is the
``--control`` option of the control-socket commands. :func:`setup_logging` configures the
``zramd`` loggers on stderr: ``-v`` (before or after the command) for debug, and a timestamp on
each line unless the process runs under systemd, whose journal stamps lines itself
(:func:`under_systemd`: ``JOURNAL_STREAM`` or ``INVOCATION_ID`` in the environment). Knows
nothing of what a command does.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from functools import wraps
from typing import Any, NoReturn, TypeVar

import click

from zramd.config import CONTROL_ENV, DEFAULT_CONTROL_PATH, ConfigError
from zramd.control.attach import AttachError
from zramd.control.protocol import ControlError

#: Exit status of a failed operation.
EXIT_FAILURE = 1
#: Exit status for a bad command line or configuration.
EXIT_CONFIG = 2

F = TypeVar("F", bound=Callable[..., Any])

#: Log line prefix without systemd: local time to the millisecond.
TIMESTAMP_FORMAT = "%(asctime)s.%(msecs)03d "
TIMESTAMP_DATEFMT = "%Y-%m-%d %H:%M:%S"


def under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    """True when systemd started us (its journal adds a timestamp to every line)."""
    env = os.environ if environ is None else environ
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))


def setup_logging(verbose: int, environ: Mapping[str, str] | None = None) -> None:
    """``zramd: message`` lines on stderr, timestamped unless under systemd; debug with -v."""
    stamp = "" if under_systemd(environ) else TIMESTAMP_FORMAT
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(stamp + "zramd: %(message)s", TIMESTAMP_DATEFMT))
    root = logging.getLogger("zramd")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose >= 1 else logging.INFO)
    root.propagate = False


def verbose_option(fn: F) -> F:
    return click.option("-v", "--verbose", count=True, help="Debug logging.")(fn)


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    click.echo(f"zramd: error: {message}", err=True)
    sys.exit(code)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n"))


def errors_one_line(fn: F) -> F:
    """Turn the operator errors into one line and a non-zero exit."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ControlError, ConfigError, AttachError) as e:
            fail(_one_line(e))

    return wrapper  # type: ignore[return-value]


def control_option(fn: F) -> F:
    return click.option(
        "--control",
        "control",
        metavar="PATH",
        envvar=CONTROL_ENV,
        default=DEFAULT_CONTROL_PATH,
        show_default=True,
        help=f"The daemon's control socket (env {CONTROL_ENV}).",
    )(fn)
