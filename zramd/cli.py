"""The ``zramd`` command line.

Theory of operation
-------------------
A click group :func:`main` with global options (``--version``, ``-v/--verbose``) and one command per
task. Commands only build a :class:`~zramd.config.ServerConfig` (or call the control client) and
hand over; no protocol or device logic lives here. Logs go to stderr (stdout carries the NBD stream
in ``--stdio`` mode). A configuration error is printed as one line (``zramd: error: ...``) and the
exit status is 2; a start failure (address in use) exits 1; SIGTERM/SIGINT exit 0.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from zramd import __version__
from zramd.cli_ops import apply_swap_safety, operator_hooks, serve_operator_options
from zramd.cli_ops import register as register_operator_commands
from zramd.config import DEFAULT_BIND, DEFAULT_PORT, ConfigError, ServeFlags, serve_config
from zramd.configfile import load_serve_file

log = logging.getLogger("zramd")

#: Exit status for a bad command line or configuration.
EXIT_CONFIG = 2


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose >= 1 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("zramd: %(message)s"))
    root = logging.getLogger("zramd")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _fail(message: str) -> None:
    click.echo(f"zramd: error: {message}", err=True)
    sys.exit(EXIT_CONFIG)


class _Group(click.Group):
    """A click group whose usage errors are one line (``zramd: error: ...``, exit 2)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare ``zramd``: show the help
                click.echo(e.format_message())
                sys.exit(0)
            _fail(e.format_message())
        except click.ClickException as e:
            click.echo(f"zramd: error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("zramd: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="zramd")
@click.option("-v", "--verbose", count=True, help="Debug logging.")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """zramd: compressed RAM block devices served over NBD."""
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    _setup_logging(verbose)


@main.command()
@click.option("--bind", metavar="ADDR", default=None, help=f"TCP address [{DEFAULT_BIND}].")
@click.option("--port", type=int, default=None, help=f"TCP port [{DEFAULT_PORT}].")
@click.option(
    "--unix",
    "unix",
    metavar="PATH",
    default=None,
    help="Unix socket path; alone, the only listener (add --bind/--port for TCP).",
)
@click.option(
    "--export",
    "exports",
    metavar="SPEC",
    multiple=True,
    help="NAME=SIZE[,algorithm=ALG][,level=N][,mem-limit=SIZE][,read-only]"
    "[,description=TEXT]; repeatable. Default: zram0 of min(RAM/2, 4G), lz4.",
)
@click.option("--stdio", is_flag=True, help="Serve one connection on stdin/stdout.")
@click.option("--max-connections", type=int, default=None, help="Connection cap [100].")
@click.option(
    "--handshake-timeout",
    type=float,
    default=None,
    metavar="S",
    help="Seconds to finish the handshake [10].",
)
@click.option(
    "--max-payload", metavar="SIZE", default=None, help="Largest READ/WRITE accepted [64M]."
)
@click.option("--unix-mode", metavar="OCTAL", default=None, help="Unix socket mode [0600].")
@click.option(
    "--poll-us",
    type=int,
    default=None,
    metavar="US",
    help="Busy-poll a lone connection this long for its next request (lower QD1 latency, "
    "some CPU); 0 disables [50].",
)
@click.option(
    "--tls",
    "tls",
    type=click.Choice(["off", "on", "require"]),
    default=None,
    help="STARTTLS: off, on (optional) or require (every option but STARTTLS refused) [off].",
)
@click.option(
    "--tls-certificates",
    "tls_certificates",
    metavar="DIR",
    default=None,
    help="Directory with ca-cert.pem, server-cert.pem, server-key.pem (nbdkit layout).",
)
@click.option(
    "--tls-verify-peer",
    "tls_verify_peer",
    is_flag=True,
    default=None,
    help="Require client certificates signed by ca-cert.pem.",
)
@click.option(
    "--allow",
    "allow",
    metavar="ADDR[/PREFIX]",
    multiple=True,
    help="Serve only TCP clients from these networks; repeatable [everyone].",
)
@serve_operator_options
def serve(
    bind: str | None,
    port: int | None,
    unix: str | None,
    exports: tuple[str, ...],
    stdio: bool,
    max_connections: int | None,
    handshake_timeout: float | None,
    max_payload: str | None,
    unix_mode: str | None,
    poll_us: int | None = None,
    tls: str | None = None,
    tls_certificates: str | None = None,
    tls_verify_peer: bool | None = None,
    allow: tuple[str, ...] = (),
    config_path: str | None = None,
    swap: str | None = None,
    control: str | None = None,
    metrics: str | None = None,
) -> None:
    """Serve exports over NBD until SIGTERM.

    Listeners: --unix PATH alone (or the file's unix key) serves only that socket; TCP is
    added when --bind or --port (or the file's bind or port) asks for it. With no listener
    given anywhere: TCP on 127.0.0.1:10809. --bind '' turns TCP off."""
    flags = ServeFlags(
        bind=bind,
        port=port,
        unix=unix,
        unix_mode=unix_mode,
        stdio=stdio,
        exports=exports,
        max_connections=max_connections,
        handshake_timeout=handshake_timeout,
        max_payload=max_payload,
        poll_us=poll_us,
        tls=tls,
        tls_certificates=tls_certificates,
        tls_verify_peer=tls_verify_peer,
        allow=allow,
        swap=swap,
        control=control,
        metrics=metrics,
    )
    try:
        cfg = serve_config(flags, load_serve_file(config_path))
        apply_swap_safety(cfg.swap)
    except ConfigError as e:
        _fail(str(e))
        return
    if cfg.file is not None:
        for name in cfg.file.disabled:
            log.info("export %s disabled in %s (size 0)", name, cfg.file.path)
    from zramd.server.listener import run

    sys.exit(run(cfg.server, hooks=operator_hooks(cfg)))


register_operator_commands(main)


if __name__ == "__main__":  # pragma: no cover
    main()
