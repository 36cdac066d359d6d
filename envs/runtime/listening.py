"""A listening TCP socket bound to one address: how placer's processes serve a rendezvous
store on the address they were given and nowhere else.

``torch.distributed.TCPStore(host, port, is_master=True)`` binds every interface whatever
``host`` says (torch 2.13); a socket bound here is handed to it instead (``master_listen_fd``).
NCCL's bootstrap opens sockets of its own on the interface ``NCCL_SOCKET_IFNAME`` names, by
default the first that is not loopback: a job on loopback pins it there (:func:`nccl_environment`).
"""

from __future__ import annotations

import ipaddress
import os
import socket

__all__ = ["listening_socket", "nccl_environment"]


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


def nccl_environment(host: str) -> dict[str, str]:
    """Environment for the ranks of a job whose rendezvous is on ``host``: ``NCCL_SOCKET_IFNAME=lo``
    when ``host`` is a loopback address (NCCL's bootstrap then listens on loopback as the
    store and gloo do), nothing when it is not or when the user set ``NCCL_SOCKET_IFNAME``.

    >>> nccl_environment("192.0.2.7")  # not loopback: NCCL picks its interface as usual
    {}
    """
    if "NCCL_SOCKET_IFNAME" in os.environ:
        return {}
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return {}
    if addresses and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        return {"NCCL_SOCKET_IFNAME": "lo"}
    return {}
