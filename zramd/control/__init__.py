"""The daemon's control socket: JSON lines over a Unix socket (server and client).

Theory of operation
-------------------
``protocol`` fixes the wire format (one JSON object per line each way) and limits;
``server`` is the asyncio side the daemon runs next to its NBD listeners, acting on
the export registry; ``client`` is the blocking side the CLI uses; ``reload``
applies a re-read configuration file to a live registry (SIGHUP). Nothing here
knows NBD bytes; the server side only calls the registry's and devices' public API.
"""

from zramd.config import DEFAULT_CONTROL_PATH
from zramd.control.protocol import ControlError

__all__ = ["DEFAULT_CONTROL_PATH", "ControlError"]
