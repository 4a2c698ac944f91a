"""Serving an app with uvicorn: bind first (a taken port fails before the model loads), drain on exit.

Ctrl-C or SIGTERM stops accepting connections, lets running streams finish for up to ``drain_s``
seconds (uvicorn's graceful shutdown), cancels what is left (which frees the rows), and returns 0.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import sys

from ..service import BackendError

DRAIN_S = 5.0
# The event loop shares the GIL with the decoding thread. Each time the loop waits on its sockets, the decoding
# thread takes the GIL, and CPython asks for it back only after the switch interval (5 ms by default), so a new
# request, which needs a few loop turns, waits that long for each. At 64 streams on the H200, 0.5 ms took the
# p99 time to first token from 903 to 710 ms and the p50 from 248 to 171 ms, with more tokens/s, not fewer
# (bench/NOTES.md, run 13). GLMCHAT_GIL_SWITCH_MS overrides it, for measuring.
GIL_SWITCH_MS = 0.5


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one sentence saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio turns Nagle's algorithm off only on sockets that say TCP, and with it on,
    # every response after the first on a kept-alive connection waited ~40 ms for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted connections too
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise BackendError(f"cannot listen on {host}:{port} ({err.strerror or err}); pick another --port or --host.") from None
    sock.set_inheritable(True)
    return sock


def _drained(signum, frame) -> None:
    """uvicorn raises the stopping signal again once it has drained; by then there is nothing left to do."""


def run(app, sock: socket.socket, drain_s: float = DRAIN_S, log_level: str = "info") -> int:
    import uvicorn

    config = uvicorn.Config(app, timeout_graceful_shutdown=drain_s, log_level=log_level, lifespan="off")
    server = uvicorn.Server(config)
    previous = signal.signal(signal.SIGTERM, _drained)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(float(os.environ.get("GLMCHAT_GIL_SWITCH_MS", GIL_SWITCH_MS)) / 1e3)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C, raised again by uvicorn after the drain
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.setswitchinterval(switch)
    return 0
