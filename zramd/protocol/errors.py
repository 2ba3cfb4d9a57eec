"""Protocol error types.

Theory of operation
-------------------
Two kinds of trouble exist in NBD (nbd.md 1.10, 5 "Habits"):

* a **framing violation** (bad magic, client flags we did not offer, impossible lengths): the byte
  stream can no longer be trusted, so the connection is hard-disconnected. Inside the core this is a
  :class:`ProtocolError`; the driver never sees the exception, it sees
  ``ConnectionClosed(reason, error=True)``.
* a **request error** (out of range, read-only, unknown command or flag): answered with an NBD error
  code and the connection goes on. Those are decided by ``server/dispatch.py``, not here; the core
  only encodes the reply (``ServerConnection.reply_error``).

During the handshake, option-level trouble (malformed option data, unknown export) is answered with
an ``NBD_REP_ERR_*`` reply by the handshake state machine; see :class:`OptionError`.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """The peer broke the framing; the only safe answer is to disconnect."""


class OptionError(Exception):
    """An option could not be honoured; answered with ``NBD_REP_ERR_*`` and negotiation goes on."""

    def __init__(self, reply_type: int, message: str) -> None:
        super().__init__(message)
        self.reply_type = reply_type
        self.message = message
