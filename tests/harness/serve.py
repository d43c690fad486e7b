"""A web server on 127.0.0.1 that serves a folder (http.server in a thread) and fails the requests it is told to:
what the tests of remote shard sets read from. No address other than loopback is ever used."""

from __future__ import annotations

import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FolderServer(ThreadingHTTPServer):
    """Serves `folder`; `requests` counts the GETs of each file, `failures` holds what the next GETs of a file do."""

    daemon_threads = True

    def __init__(self, folder: Path) -> None:
        super().__init__(("127.0.0.1", 0), partial(_Handler, directory=str(folder)))
        self.requests: Counter[str] = Counter()
        self.failures: dict[str, list[str]] = {}
        self.always: dict[str, str] = {}
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        """The folder's URL, ending in /."""
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def fail(self, name: str, *how: str) -> None:
        """The next GETs of `name` go as `how` says, one each: "ok" (answered), "reset" (the connection is reset
        before any reply) or an HTTP error status ("503"); later ones are answered."""
        with self.lock:
            self.failures[name] = list(how)

    def fail_always(self, name: str, how: str) -> None:
        """Every GET of `name` from now on fails as `how` says ("reset" or an HTTP error status)."""
        with self.lock:
            self.always[name] = how

    def next_failure(self, name: str) -> str | None:
        with self.lock:
            self.requests[name] += 1
            if name in self.always:
                return self.always[name]
            pending = self.failures.get(name)
            how = pending.pop(0) if pending else None
            return None if how == "ok" else how


class _Handler(SimpleHTTPRequestHandler):
    server: FolderServer

    def do_GET(self) -> None:
        how = self.server.next_failure(self.path.lstrip("/"))
        if how == "reset":
            # Linger 0: closing sends a TCP reset, as a dropped connection does.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
        elif how is not None:
            self.send_error(int(how))
        else:
            super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the tests read `requests` instead."""


@contextmanager
def serving(folder: Path) -> Iterator[FolderServer]:
    """A FolderServer of `folder` on a free loopback port for the block's duration."""
    server = FolderServer(folder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
