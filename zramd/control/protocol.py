"""Control protocol: one JSON object per line in each direction.

Theory of operation
-------------------
A request is ``{"op": OP, ...arguments}``; the answer is ``{"ok": true, "result": ...}``
or ``{"ok": false, "error": "one clear line"}``. A connection may carry several
requests, answered in order. Lines are capped at :data:`MAX_LINE` bytes in both
directions so a peer cannot make the daemon buffer without bound, which is why ``pages`` and
``recompress`` answer for a bounded part of their range and the ``next`` page to ask from.
Sizes are bytes (integers); the CLI parses suffixes before sending.
"""

from __future__ import annotations

import json
from typing import Any

#: Longest request or reply line, newline included.
MAX_LINE = 1 << 20
#: Simultaneous control connections the daemon accepts.
MAX_CONTROL_CONNECTIONS = 16
#: Seconds the client waits for an answer (compaction of a big export can be slow).
CLIENT_TIMEOUT = 300.0
#: Permission bits of the control socket: root only.
CONTROL_SOCKET_MODE = 0o600

OPS = (
    "ping",
    "create",
    "destroy",
    "reset",
    "compact",
    "set",
    "list",
    "stat",
    "reload",
    "idle",
    "pages",
    "recompress",
)


class ControlError(Exception):
    """A failed control request or an unreachable daemon: the message is one line."""


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ControlError(f"malformed control message: {e}") from None
    if not isinstance(obj, dict):
        raise ControlError("malformed control message: not a JSON object")
    return obj
