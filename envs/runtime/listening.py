"""A listening TCP socket bound to one address: how placer's processes serve a rendezvous
store on the address they were given and nowhere else.

``torch.distributed.TCPStore(host, port, is_master=True)`` binds every interface whatever
``host`` says (torch 2.13); a socket bound here is handed to it instead (``master_listen_fd``).
"""

from __future__ import annotations

import socket

__all__ = ["listening_socket"]


def listening_socket(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A TCP socket bound to ``host:port`` (that address only) and listening.

    Raises:
        OSError: the address cannot be bound (in use, or not this machine's); the socket is closed.
    """
    family, kind, proto, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(where)
    except OSError:
        sock.close()
        raise
    sock.listen(backlog)
    return sock
