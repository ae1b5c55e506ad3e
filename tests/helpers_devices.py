"""Test helpers for the devices sources: loopback OpenIGTLink peers and small utilities."""
from __future__ import annotations

import signal
import socket
import struct
import threading
import time
from typing import Callable

import numpy as np


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, step: float = 0.01) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def numbered_frames(n: int, height: int = 48, width: int = 64) -> np.ndarray:
    """uint8 [n, H, W] frames whose mean gray level encodes the frame number (10 + 8*i), smooth."""
    yy, xx = np.mgrid[0:height, 0:width]
    ramp = ((xx + yy) % 16).astype(np.int16) - 8  # zero-mean texture, survives codecs
    return np.stack([np.clip(10 + 8 * i + ramp, 0, 255) for i in range(n)]).astype(np.uint8)


def frame_number(image: np.ndarray) -> int:
    """Inverse of numbered_frames (robust to lossy codecs)."""
    return int(round((float(image.mean()) - 10) / 8))


# ------------------------------------------------------------------------------- OpenIGTLink
def igtl_bytes(message_type: str, device_name: str, body: bytes, crc: int | None = None,
               version: int = 1, body_size: int | None = None) -> bytes:
    """Raw OpenIGTLink message with a hand-made header (to build malformed ones)."""
    from pyigtl.messages import CRC64
    crc = CRC64(body) if crc is None else crc
    size = len(body) if body_size is None else body_size
    header = struct.pack("> H 12s 20s II Q Q", version, message_type.encode(), device_name.encode(), 0, 0, size, crc)
    return header + body


def image_message(image: np.ndarray, name: str = "Image", spacing_rc: tuple[float, float] = (1.0, 1.0)) -> bytes:
    """pyigtl IMAGE message bytes for one 2D image (sent as one slice, like PLUS)."""
    from pyigtl.messages import ImageMessage
    m = np.eye(4)
    m[0, 0], m[1, 1] = spacing_rc[1], spacing_rc[0]
    return ImageMessage(np.asarray(image)[None], ijk_to_world_matrix=m, device_name=name).pack()


def transform_message(matrix: np.ndarray, name: str = "ProbeToReference") -> bytes:
    """pyigtl TRANSFORM message bytes."""
    from pyigtl.messages import TransformMessage
    return TransformMessage(np.asarray(matrix), device_name=name).pack()


class ScriptedServer:
    """Loopback TCP server; connection k runs scripts[k](conn, stopped) (the last script repeats).

    `stopped` is a threading.Event set by close(): scripts wait on it to hold a connection open.

    Used for byte-exact streams: malformed messages, a connection dropped mid-message, reconnects.
    """

    def __init__(self, scripts: list[Callable[[socket.socket, threading.Event], None]]) -> None:
        self.scripts = scripts
        self.accepted = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            script = self.scripts[min(self.accepted, len(self.scripts) - 1)]
            self.accepted += 1
            try:
                script(conn, self._stop)
            except OSError:
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()

    def __enter__(self) -> "ScriptedServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PyigtlServer:
    """pyigtl's own OpenIGTLinkServer on a free loopback port (the third-party peer)."""

    def __init__(self) -> None:
        import pyigtl
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        self.server = pyigtl.OpenIGTLinkServer(port=0, local_server=True)
        for s, h in handlers.items():  # pyigtl installs its own; keep pytest's
            signal.signal(s, h)
        self.port = self.server.server_address[1]

    def send(self, message) -> None:
        self.server.send_message(message, wait=False)

    def close(self) -> None:
        self.server.stop()

    def __enter__(self) -> "PyigtlServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
