"""Client address allow-list (``serve --allow ADDR/CIDR``, repeatable).

Theory of operation
-------------------
An :class:`AllowList` is a set of IPv4/IPv6 networks parsed once at configuration time by
:func:`zramd.config.parse_network` (a bare address means that single host). Admission
(``server/admission.py``) asks :meth:`AllowList.allows` with the peer address of every
accepted TCP connection and closes refused ones right away, with a log line, before any byte is
sent. An IPv4-mapped IPv6 peer (``::ffff:10.0.0.1`` on a dual-stack socket) is checked as the
IPv4 address. Unix-socket and
stdio peers are local and always allowed (their access is the socket file's mode). An empty list
(the default) allows everyone.

This module knows nothing about NBD, asyncio or sockets beyond the peer address tuple.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from zramd.config import Network, parse_network


class AllowList:
    """Networks whose TCP clients are served; empty = everyone."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.networks: list[Network] = [parse_network(e) for e in entries]

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __repr__(self) -> str:
        return f"AllowList({', '.join(str(n) for n in self.networks) or 'everyone'})"

    def allows(self, peer: Any) -> bool:
        """Whether a client at ``peer`` (a transport's ``peername``) may connect."""
        if not self.networks:
            return True
        if not isinstance(peer, tuple) or not peer:
            return True  # Unix socket ("" or a path), stdio: local by construction
        try:
            addr = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr.version == n.version and addr in n for n in self.networks)
