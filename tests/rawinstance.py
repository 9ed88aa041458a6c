"""A threaded raw instance for the attack tests: accepts on loopback, one thread per connection,
each served by the subclass's ``_serve``; ``close`` stops and reaps them all."""

from __future__ import annotations

import contextlib
import socket
import threading


class ThreadedInstance:
    """Listening on an OS-chosen loopback port from construction; ``_serve(conn)`` per connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self._stop = False
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _serve(self, c: socket.socket) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            self._conns.append(c)
            t = threading.Thread(target=self._serve, args=(c,), daemon=True)
            self._threads.append(t)
            t.start()

    def close(self) -> None:
        self._stop = True
        self._accepting.join()
        self.sock.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(5)
