"""Sans-I/O NBD protocol core: bytes in, events out, bytes to send.

Theory of operation
-------------------
``connection.ServerConnection`` is the only object a driver needs; ``events`` is the contract with
``server/``. ``wire`` holds every constant and layout, ``handshake`` the option state machine,
``transmission`` request framing and reply encoding, ``limits`` every length a peer can push on
(:class:`Limits`, filled by the server from its configuration), ``errors`` the error kinds.
Nothing in this package does I/O or imports anything outside it.
"""

from .connection import ServerConnection
from .errors import OptionError, ProtocolError
from .events import (
    NEED_DATA,
    Command,
    ConnectionClosed,
    Event,
    ExportCatalog,
    ExportInfo,
    HandshakeComplete,
    Request,
    StartTLS,
)
from .limits import Limits

__all__ = [
    "NEED_DATA",
    "Command",
    "ConnectionClosed",
    "Event",
    "ExportCatalog",
    "ExportInfo",
    "HandshakeComplete",
    "Limits",
    "OptionError",
    "ProtocolError",
    "Request",
    "ServerConnection",
    "StartTLS",
]
