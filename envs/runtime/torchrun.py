"""``torchrun`` whose rendezvous store listens only where it was told to.

``python -m envs.runtime.torchrun ARGS`` takes ``torchrun``'s arguments with the static
rendezvous (``--master-addr``/``--master-port``, torchrun's default) and runs torch's elastic
launcher (``torch.distributed.run``) with two differences:

* **The agent's store listens on ``--master-addr`` only.** torch 2.13's ``TCPStore`` server
  binds every interface whatever host it is given (``*:PORT`` in ``ss -ltn``; the static
  rendezvous creates it in ``elastic/rendezvous/static_tcp_rendezvous.py``), so ``torchrun
  --master-addr=127.0.0.1`` exposes the job's store to the network. Here the server's socket
  is bound by us, to the address the user gave (``127.0.0.1`` is torchrun's default), and
  handed to the store (``master_listen_fd``), as
  :func:`envs.runtime.distributed.worker._rendezvous_store` does for placer's own launcher.
  ``--standalone`` and ``--rdzv-backend c10d`` are refused in one line: their rendezvous also
  starts stores of its own for the workers (``dynamic_rendezvous.py``) on every interface, which
  cannot be bound from here.
* **A port in use is one line and exit status 2** on the node that serves the store
  (node rank 0 of the static rendezvous), before any worker starts; torchrun prints a
  traceback from deep in the agent instead.

Everything else (restarts, the workers' environment, the failure report) is torchrun's.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

from envs.runtime.listening import listening_socket

__all__ = ["main"]

#: Listening sockets handed to stores; kept open as long as this process lives.
_SOCKETS: list[socket.socket] = []


def _bound_store(original: Callable[..., Any], ready: dict[tuple[str, int], socket.socket]) -> Callable[..., Any]:
    """``TCPStore`` whose server (``is_master``) listens on its host only: on the socket bound
    beforehand for that address (``ready``), else one bound here."""

    def make(host_name: str, port: int, world_size: int | None = None, is_master: bool = False,
             *args: Any, **kwargs: Any) -> Any:
        if is_master and "master_listen_fd" not in kwargs:
            sock = ready.pop((host_name, int(port)), None) or listening_socket(host_name, int(port))
            _SOCKETS.append(sock)
            kwargs.update(master_listen_fd=sock.fileno(), use_libuv=True)
        return original(host_name, port, world_size, is_master, *args, **kwargs)

    return make


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``torchrun`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    import torch.distributed.elastic.rendezvous.static_tcp_rendezvous as static_backend
    import torch.distributed.run as torchrun

    argv = list(sys.argv[1:] if argv is None else argv)
    args = torchrun.get_args_parser().parse_args(argv)
    if args.standalone or args.rdzv_backend != "static":
        used = "--standalone" if args.standalone else f"--rdzv-backend {args.rdzv_backend}"
        print(f"torchrun: {used} starts rendezvous stores that listen on every interface; expected the static "
              "rendezvous (--master-addr, --master-port), whose store this launcher binds to --master-addr, "
              "or plain torchrun", file=sys.stderr)
        return 2
    bad = _bad_argument(args)
    if bad:
        print(f"torchrun: {bad}", file=sys.stderr)
        return 2
    ready: dict[tuple[str, int], socket.socket] = {}
    if int(args.node_rank) == 0:
        host, port = args.master_addr, int(args.master_port)
        try:
            ready[(host, port)] = listening_socket(host, port)
        except OSError as exc:
            print(f"torchrun: cannot serve the rendezvous store on {host}:{port}: {exc.strerror}; expected a free "
                  "port on an address of this machine (--master-port, --master-addr)", file=sys.stderr)
            return 2
    static_backend.TCPStore = _bound_store(static_backend.TCPStore, ready)  # type: ignore[attr-defined]
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun.main(argv)
    except SignalException as exc:  # Ctrl-C or SIGTERM: the agent has stopped the workers
        print(f"torchrun: stopped by {exc.sigval.name}; its workers were stopped", file=sys.stderr)
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        print(f"torchrun: worker rank {rank} failed with exit code {failure.exitcode} (its output is above)",
              file=sys.stderr)
        return 1
    return 0


def _bad_argument(args: Any) -> str:
    """What is wrong with torchrun's arguments that torch would report with a traceback ("" if nothing)."""
    port = str(args.master_port)
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"--master-port {port!r} is not a port; expected an integer from 1 to 65535"
    nproc = str(args.nproc_per_node)
    if nproc not in ("auto", "cpu", "gpu", "xpu") and not (nproc.isdigit() and int(nproc) >= 1):
        return f"--nproc-per-node {nproc!r} is not a process count; expected an integer of 1 or more, or auto, cpu, gpu"
    return ""


if __name__ == "__main__":
    sys.exit(main())
