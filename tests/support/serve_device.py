"""A zramd NBD server whose exports sit on a test device: ``python -m tests.support.serve_device``.

Theory of operation
-------------------
For tests that need a broken or special device in a separate process (the VM test's negative
scenario: a server whose reads are corrupted). It takes the listener and export flags of
``zramd serve`` it needs (``--bind``, ``--port``, ``--unix``, ``--export`` specs) plus
``--device NAME`` (:data:`tests.support.devices.DEVICES`), builds the configuration with zramd's
own merge (:func:`zramd.config.serve_config`), puts every export on a fresh device of that kind
with ``ExportRegistry.add(config, device=...)``, and runs zramd's :class:`Server` until SIGTERM or
SIGINT (exit 0). It logs like ``zramd serve`` (``listening on ...`` on stderr). No control
socket, configuration file or swap safety: those belong to ``zramd serve``. Run it from the
repository root (``tests`` must be importable).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from tests.support.devices import DEVICES
from zramd.config import ConfigError, ServeFlags, ServerConfig, serve_config
from zramd.server.exports import ExportRegistry
from zramd.server.listener import Server


async def serve(cfg: ServerConfig, device: str) -> int:
    registry = ExportRegistry(default=cfg.default_export)
    for e in cfg.exports:
        registry.add(e, device=DEVICES[device](e.size))
    server = Server(cfg, registry=registry)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_shutdown)
    await server.serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.support.serve_device", description=__doc__)
    ap.add_argument("--device", choices=sorted(DEVICES), required=True)
    ap.add_argument("--bind")
    ap.add_argument("--port", type=int)
    ap.add_argument("--unix")
    ap.add_argument("--export", dest="exports", action="append", default=[], metavar="SPEC")
    args = ap.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="zramd: %(message)s")
    flags = ServeFlags(bind=args.bind, port=args.port, unix=args.unix, exports=args.exports)
    try:
        cfg = serve_config(flags).server
    except ConfigError as e:
        print(f"serve_device: error: {e}", file=sys.stderr)
        return 2
    return asyncio.run(serve(cfg, args.device))


if __name__ == "__main__":
    sys.exit(main())
