"""``zramd serve``: its flags, and the start of the daemon.

Theory of operation
-------------------
The command collects its flags into a :class:`~zramd.config.ServeFlags`, has the configuration
file read (``configfile.load_serve_file``: ``--config FILE``, else the default file when it
exists) and merged under the flags (``config.serve_config``: one merge, one validation), applies
swap safety (``--swap``), and runs the server (``server/listener.run``) with the operator hooks
(control socket, SIGHUP reload, metrics: ``control/daemon.py``). It decides no configuration
value itself. A configuration error is one line and exit 2; a start failure (address in use,
an export whose page table cannot be reserved) exit 1; SIGTERM/SIGINT exit 0. Logs go to
stderr (stdout carries NBD in ``--stdio`` mode).
"""

from __future__ import annotations

import logging
import sys

import click

from zramd.cli.options import EXIT_CONFIG, F, fail, setup_logging, verbose_option
from zramd.config import (
    CONTROL_ENV,
    DEFAULT_BIND,
    DEFAULT_CONTROL_PATH,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_POLL_US,
    DEFAULT_PORT,
    DEFAULT_TLS,
    DEFAULT_UNIX_MODE,
    SIZE_SYNTAX,
    TLS_MODES,
    ConfigError,
    ServeConfig,
    ServeFlags,
    format_size,
    serve_config,
)
from zramd.configfile import DEFAULT_CONFIG_PATH, load_serve_file
from zramd.control.daemon import OperatorHooks
from zramd.system import SWAP_MODES, SwapSafetyError, apply_swap_safety

log = logging.getLogger("zramd")


def operator_options(fn: F) -> F:
    """The operator options of ``serve``: --config, --swap[=on|require|off], --control,
    --metrics."""
    fn = click.option(
        "--metrics",
        "metrics",
        metavar="ADDR:PORT",
        default=None,
        help="Serve Prometheus metrics over HTTP, e.g. 127.0.0.1:9109 ('' disables).",
    )(fn)
    fn = click.option(
        "--control",
        "control",
        metavar="PATH",
        envvar=CONTROL_ENV,
        default=None,
        help=f"Control socket [{DEFAULT_CONTROL_PATH}]; '' disables it.",
    )(fn)
    fn = click.option(
        "--swap",
        "swap",
        type=click.Choice(SWAP_MODES),
        is_flag=False,
        flag_value="on",
        default=None,
        help="Swap safety: mlockall, PR_SET_IO_FLUSHER, oom_score_adj -1000 "
        "(--swap=require: refuse to start without them).",
    )(fn)
    fn = click.option(
        "--config",
        "config_path",
        metavar="FILE",
        default=None,
        help=f"TOML configuration file [{DEFAULT_CONFIG_PATH} when present]; SIGHUP reloads it.",
    )(fn)
    return fn


@click.command()
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
    f"[,description=TEXT]; repeatable. SIZE: {SIZE_SYNTAX} (quote it; the commas inside "
    "parentheses stay in the size). Default: zram0 of min(ram / 2, 4096).",
)
@click.option("--stdio", is_flag=True, help="Serve one connection on stdin/stdout.")
@click.option(
    "--max-connections",
    type=int,
    default=None,
    help=f"Connection cap [{DEFAULT_MAX_CONNECTIONS}].",
)
@click.option(
    "--handshake-timeout",
    type=float,
    default=None,
    metavar="S",
    help=f"Seconds to finish the handshake [{DEFAULT_HANDSHAKE_TIMEOUT:g}].",
)
@click.option(
    "--max-payload",
    metavar="SIZE",
    default=None,
    help=f"Largest READ/WRITE accepted; a bare number is MiB [{format_size(DEFAULT_MAX_PAYLOAD)}].",
)
@click.option(
    "--unix-mode",
    metavar="OCTAL",
    default=None,
    help=f"Unix socket mode [{DEFAULT_UNIX_MODE:04o}].",
)
@click.option(
    "--poll-us",
    type=int,
    default=None,
    metavar="US",
    help="Busy-poll a lone connection this long for its next request (lower QD1 latency, "
    f"some CPU); 0 disables [{DEFAULT_POLL_US}].",
)
@click.option(
    "--tls",
    "tls",
    type=click.Choice(TLS_MODES),
    default=None,
    help="STARTTLS: off, on (optional) or require (every option but STARTTLS refused) "
    f"[{DEFAULT_TLS}].",
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
@click.option(
    "--discard-snapshot",
    "discard_snapshot",
    is_flag=True,
    help="This start only: an export whose persist file is damaged, of another size or "
    "format version starts empty; the file is renamed to PATH.bad-TIME, not deleted.",
)
@operator_options
@verbose_option
@click.pass_context
def serve(
    ctx: click.Context,
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
    discard_snapshot: bool = False,
    config_path: str | None = None,
    swap: str | None = None,
    control: str | None = None,
    metrics: str | None = None,
    verbose: int = 0,
) -> None:
    """Serve exports over NBD until SIGTERM.

    Listeners: --unix PATH alone (or the file's unix key) serves only that socket; TCP is
    added when --bind or --port (or the file's bind or port) asks for it. With no listener
    given anywhere: TCP on 127.0.0.1:10809. --bind '' turns TCP off.

    Log lines go to stderr, timestamped unless under systemd (the journal stamps them)."""
    if verbose:
        setup_logging(verbose + (ctx.obj or {}).get("verbose", 0))
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
        discard_snapshot=discard_snapshot,
        swap=swap,
        control=control,
        metrics=metrics,
    )
    try:
        cfg = serve_config(flags, load_serve_file(config_path))
        swap_safety(cfg.swap)
    except ConfigError as e:
        fail(str(e), EXIT_CONFIG)
    if cfg.file is not None:
        for name in cfg.file.disabled:
            log.info("export %s disabled in %s (size 0)", name, cfg.file.path)
    from zramd.server.listener import run

    try:
        code = run(cfg.server, hooks=operator_hooks(cfg))
    except ConfigError as e:  # an export's device could not be built
        fail(str(e))
    sys.exit(code)


def swap_safety(mode: str) -> None:
    """``--swap``: mlockall, PR_SET_IO_FLUSHER, oom_score_adj. Raises ConfigError (require)."""
    try:
        apply_swap_safety(mode)
    except SwapSafetyError as e:
        raise ConfigError(str(e)) from None


def operator_hooks(cfg: ServeConfig) -> OperatorHooks:
    """The control socket, SIGHUP reload and metrics the daemon runs next to its listeners."""
    return OperatorHooks(
        control_path=cfg.control,
        control_required=cfg.control_required,
        file=cfg.file,
        flag_exports=cfg.flag_exports,
        metrics=cfg.metrics,
    )
