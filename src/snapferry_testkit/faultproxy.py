"""A thread-based loopback TCP proxy that cuts, stalls, corrupts or pauses a connection at a chosen byte (chaos runs)."""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

HOST = "127.0.0.1"
CHUNK = 64 * 1024


@dataclass
class Trigger:
    """One fault, fired at the `offset`-th client-to-server byte of a connection, counted from arming.

    action: `cut` closes both sides (with a TCP reset when `reset`), `stall` forwards nothing either
    way for `stall` seconds, `flip` xors the byte with `mask`, `call` runs `callback` while the
    connection waits (to kill a process exactly there).
    """

    offset: int
    action: str
    stall: float = 0.0
    mask: int = 1
    reset: bool = False
    callback: Callable[[], None] | None = None
    fired: threading.Event = field(default_factory=threading.Event)
    connection: int = -1
    error: str = ""
    baselines: dict[int, int] = field(default_factory=dict)


class _Conn:
    def __init__(self, number: int, client: socket.socket, server: socket.socket) -> None:
        self.number = number
        self.client = client
        self.server = server
        self.up = 0
        self.down = 0
        self.stall_until = 0.0
        self.closed = False
        self.lock = threading.Lock()
        self.pumps_left = 2

    def close(self, reset: bool = False) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for sock in (self.client, self.server):
            if reset:
                # SO_LINGER 0: close sends a RST, as a middlebox that drops the connection would.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                # SHUT_RD wakes our other pump's recv without sending a FIN first.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RD)
            else:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def wait_stall(self) -> None:
        while not self.closed and (left := self.stall_until - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))


class FaultProxy:
    """Listens on a free port of 127.0.0.1 and forwards every connection to `upstream_port`."""

    def __init__(self, upstream_port: int, host: str = HOST) -> None:
        self.upstream = (host, upstream_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(128)
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._trigger: Trigger | None = None
        self._conns: dict[int, _Conn] = {}
        self._numbers = itertools.count(1)
        self.up_bytes = 0
        self.down_bytes = 0
        self.connections = 0
        self._closing = False
        self._thread = threading.Thread(target=self._accept, name="faultproxy-accept", daemon=True)
        self._thread.start()

    # -- control -------------------------------------------------------------------------------

    def arm(self, trigger: Trigger) -> None:
        """Replace any armed trigger; connections already open count from the bytes they have now."""
        with self._lock:
            trigger.baselines = {number: conn.up for number, conn in self._conns.items()}
            self._trigger = trigger

    def disarm(self) -> Trigger | None:
        with self._lock:
            trigger, self._trigger = self._trigger, None
            return trigger

    def open_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            conns = list(self._conns.values())
        for conn in conns:
            conn.close()
        self._thread.join(5)

    # -- forwarding ----------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            conn = _Conn(next(self._numbers), client, server)
            with self._lock:
                self._conns[conn.number] = conn
                self.connections += 1
            threading.Thread(target=self._pump, args=(conn, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(conn, False), daemon=True).start()

    def _pump(self, conn: _Conn, up: bool) -> None:
        src, dst = (conn.client, conn.server) if up else (conn.server, conn.client)
        clean = False
        while True:
            try:
                data: bytes | None = src.recv(CHUNK)
            except OSError:
                break
            if not data:
                # Pass the half-close on, as TCP would; the other direction may still be draining.
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                clean = True
                break
            if up:
                data = self._fire_if_due(conn, data)
                if data is None:
                    break
            conn.wait_stall()
            try:
                dst.sendall(data)
            except OSError:
                break
            self._count(conn, up, len(data))
        with self._lock:
            conn.pumps_left -= 1
            last = conn.pumps_left == 0
            if last:
                self._conns.pop(conn.number, None)
        if last or not clean:
            # A broken direction ends both: the peers must learn it, not wait for data forever.
            conn.close()

    def _count(self, conn: _Conn, up: bool, size: int) -> None:
        with self._lock:
            if up:
                conn.up += size
                self.up_bytes += size
            else:
                conn.down += size
                self.down_bytes += size

    def _fire_if_due(self, conn: _Conn, data: bytes) -> bytes | None:
        """Apply the armed trigger if its byte is in `data`; returns what to forward (None: cut)."""
        with self._lock:
            trigger = self._trigger
            if trigger is None:
                return data
            at = trigger.offset - (conn.up - trigger.baselines.get(conn.number, 0))
            if not 0 <= at < len(data):
                return data
            self._trigger = None
        trigger.connection = conn.number
        before, rest = data[:at], data[at:]
        if before:
            try:
                conn.server.sendall(before)
            except OSError:
                trigger.error = "connection closed before the fault"
                trigger.fired.set()
                return None
            self._count(conn, True, len(before))
        try:
            if trigger.action == "cut":
                conn.close(reset=trigger.reset)
                return None
            if trigger.action == "flip":
                return bytes([rest[0] ^ trigger.mask]) + rest[1:]
            if trigger.action == "stall":
                conn.stall_until = time.monotonic() + trigger.stall
                return rest
            if trigger.action == "call":
                assert trigger.callback is not None
                try:
                    trigger.callback()
                except Exception as exc:  # noqa: BLE001 - reported to the runner, the proxy goes on
                    trigger.error = f"{type(exc).__name__}: {exc}"
                return rest
            raise ValueError(trigger.action)
        finally:
            trigger.fired.set()
