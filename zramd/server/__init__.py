"""The asyncio shell around the sans-I/O NBD core: listeners, sessions, dispatch, exports.

See ``listener.py`` (Server, serve, run), ``session.py`` (one connection), ``dispatch.py`` (request
validation and the NBD error table) and ``exports.py`` (the export registry).
"""
