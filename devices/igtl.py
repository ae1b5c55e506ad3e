"""OpenIGTLink: a client source (images + probe pose from PLUS / 3D Slicer) and a small server.

Client spec: `igtl://host:port` (default port 18944). A background thread connects, receives
IMAGE and TRANSFORM messages and keeps only the newest image and the newest transform; `read`
returns the newest image not seen yet (None when nothing new within the timeout) with the newest
transform as `Frame.pose` (4x4). Messages are framed and checked here (58-byte header, body size
limit, CRC-64) and decoded with pyigtl's `ImageMessage` / `TransformMessage`; malformed messages
(bad CRC, undecodable body, empty or NaN image, non-finite matrix) and unexpected ones (other
types, other device names) are skipped and counted (`skipped`, `skipped_reasons`). A dropped
connection is re-established with exponential backoff; `state` is "connecting", "connected",
"reconnecting" or "closed". `read` raises `Disconnected` only when no connection was ever made
within `connect_timeout_s`.

pyigtl's own client is not used for the socket: it cannot tell a closed connection from a quiet
one (it never reconnects after the server goes away), and it drops a partly received header on a
10 ms timeout, which desynchronizes large image streams.

`IGTLinkServer` serves frames to any number of clients (Slicer's OpenIGTLinkIF, PLUS clients,
this module's source): IMAGE plus TRANSFORM when the frame has a pose. Each client gets only the
newest message set: a slow client skips frames instead of building a queue.
"""
from __future__ import annotations

import collections
import socket
import struct
import threading
import time
from typing import Any

import numpy as np

from devices.base import Disconnected, Frame, InvalidFrame, Source, SourceError, to_gray_uint8
from devices.video import Mailbox

DEFAULT_PORT = 18944
HEADER_SIZE = 58
MAX_BODY_BYTES = 256 * 2**20


class _FramingLost(Exception):
    """The byte stream no longer parses as OpenIGTLink: reconnect to resynchronize."""


class _Stopped(Exception):
    """close() was called while receiving."""


def parse_address(rest: str) -> tuple[str, int]:
    """`"host:port"` / `"host"` / `"[::1]:port"` -> (host, port). Raises SourceError on a bad port."""
    text = (rest or "").strip().rstrip("/")
    if not text:
        return "127.0.0.1", DEFAULT_PORT
    if text.startswith("["):
        host, _, tail = text[1:].partition("]")
        port_text = tail.lstrip(":")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    try:
        port = int(port_text) if port_text else DEFAULT_PORT
    except ValueError:
        raise SourceError(f"igtl://{rest}: port must be a number, e.g. igtl://127.0.0.1:18944") from None
    if not 0 < port < 65536:
        raise SourceError(f"igtl://{rest}: port {port} out of range 1-65535")
    return host or "127.0.0.1", port


def from_spec(rest: str, **options: Any) -> "IGTLinkSource":
    """Registry entry for `igtl://host:port`."""
    host, port = parse_address(rest)
    return IGTLinkSource(host, port, **options)


def image_from_message(image: np.ndarray, what: str = "IMAGE") -> np.ndarray:
    """pyigtl image array (k, j, i[, components]) of one slice -> gray uint8 [rows, cols].

    Raises:
        InvalidFrame: empty, a real 3D volume, or NaN/inf values.
    """
    a = np.asarray(image)
    if a.size == 0:
        raise InvalidFrame(f"{what}: empty image (shape {a.shape})")
    if a.ndim == 4:  # (k, j, i, components)
        if a.shape[0] != 1:
            raise InvalidFrame(f"{what}: a 3D volume ({a.shape[0]} slices), expected one 2D image")
        a = a[0]
    elif a.ndim == 3:
        if a.shape[0] == 1:      # (1, rows, cols): PLUS / Slicer 2D image
            a = a[0]
        elif a.shape[2] == 1:    # (rows, cols, 1): pyigtl's packing of a 2D numpy array
            a = a[..., 0]
        else:
            raise InvalidFrame(f"{what}: a 3D volume (shape {a.shape}), expected one 2D image")
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    return to_gray_uint8(a, what)


def _spacing_from_matrix(m: np.ndarray, shape: tuple[int, ...]) -> tuple[float, float] | None:
    if len(shape) >= 3 and shape[0] == 1:
        col, row = float(np.linalg.norm(m[:3, 0])), float(np.linalg.norm(m[:3, 1]))
        if np.isfinite([row, col]).all() and row > 0 and col > 0:
            return row, col
    return None


class IGTLinkSource(Source):
    """Newest image (and probe transform) from an OpenIGTLink server such as PLUS or 3D Slicer.

    Args:
        host: server address.
        port: server port (PLUS default 18944).
        device: only IMAGE messages from this device name (default: any).
        pose_device: only TRANSFORM messages from this device name, e.g. "ProbeToReference"
            (default: any).
        connect_timeout_s: `read` raises Disconnected if no connection was made within this time.
        verify_crc: check each message's CRC-64 (skip the message on mismatch).
        max_body_bytes: larger messages are treated as a broken stream (reconnect).
        backoff_s: (first, longest) wait between reconnection attempts.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, device: str | None = None,
                 pose_device: str | None = None, connect_timeout_s: float = 5.0, verify_crc: bool = True,
                 max_body_bytes: int = MAX_BODY_BYTES, backoff_s: tuple[float, float] = (0.1, 2.0)) -> None:
        self.host, self.port = host, int(port)
        self.name = f"igtl://{host}:{self.port}"
        self.device, self.pose_device = device, pose_device
        self.connect_timeout_s = float(connect_timeout_s)
        self.verify_crc, self.max_body_bytes = bool(verify_crc), int(max_body_bytes)
        self.backoff_s = (float(backoff_s[0]), float(backoff_s[1]))
        self.fps = 0.0                 # measured rate of received images
        self.state = "closed"
        self.connections = 0           # successful connects (reconnects = connections - 1)
        self.images_received = 0
        self.skipped = 0
        self.skipped_reasons: collections.Counter[str] = collections.Counter()
        self.last_error = ""
        self._mailbox = Mailbox()
        self._pose: np.ndarray | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._opened_at = 0.0
        self._index = 0
        self._rate_t: collections.deque[float] = collections.deque(maxlen=30)

    @property
    def dropped(self) -> int:
        """Images replaced by a newer one before `read` took them."""
        return self._mailbox.dropped

    @property
    def pose(self) -> np.ndarray | None:
        """Newest probe transform (4x4) or None."""
        with self._lock:
            return self._pose

    def open(self) -> "IGTLinkSource":
        """Start the receiving thread (returns at once; `read` waits for the connection)."""
        if self._thread is None:
            self._stop.clear()
            self._mailbox = Mailbox()
            self._opened_at = time.monotonic()
            self.state = "connecting"
            self._thread = threading.Thread(target=self._run, name=f"igtl {self.host}:{self.port}", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread and close the connection."""
        self._stop.set()
        self._mailbox.close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        self.state = "closed"

    def read(self, timeout: float | None = None) -> Frame | None:
        """Newest image not returned yet, or None if none arrives within `timeout` seconds.

        Raises:
            Disconnected: no connection was ever made within `connect_timeout_s`.
        """
        if self._thread is None:
            self.open()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self.connections == 0:
                left = self._opened_at + self.connect_timeout_s - time.monotonic()
                if left <= 0:
                    raise Disconnected(f"no OpenIGTLink server at {self.host}:{self.port} after "
                                       f"{self.connect_timeout_s:g} s ({self.last_error or 'no answer'}): start the "
                                       "server (PLUS, 3D Slicer, `pocus stream`) or check the host and port")
                wait = left if wait is None else min(wait, left)
            item = self._mailbox.take(wait)
            if item is not None:
                break
            if self._stop.is_set() or (deadline is not None and time.monotonic() >= deadline):
                return None
        image, spacing, t = item
        frame = Frame(image=image, t=t, index=self._index, spacing_mm=spacing, pose=self.pose)
        self._index += 1
        return frame

    # ------------------------------------------------------------------ receiving thread
    def _skip(self, reason: str) -> None:
        self.skipped += 1
        self.skipped_reasons[reason] += 1

    def _run(self) -> None:
        backoff = self.backoff_s[0]
        while not self._stop.is_set():
            self.state = "connecting" if self.connections == 0 else "reconnecting"
            try:
                sock = socket.create_connection((self.host, self.port), timeout=1.0)
            except OSError as e:
                self.last_error = f"{type(e).__name__}: {e}"
                self._stop.wait(backoff)
                backoff = min(2 * backoff, self.backoff_s[1])
                continue
            self.connections += 1
            self.state = "connected"
            backoff = self.backoff_s[0]
            try:
                sock.settimeout(0.2)
                self._receive(sock)
            except _Stopped:
                pass
            except (OSError, ConnectionError, _FramingLost) as e:
                self.last_error = f"{type(e).__name__}: {e}"
            finally:
                sock.close()
            if not self._stop.is_set():
                self.state = "reconnecting"
                self._stop.wait(backoff)

    def _recv_exact(self, sock: socket.socket, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            if self._stop.is_set():
                raise _Stopped()
            try:
                k = sock.recv_into(view[got:], n - got)
            except socket.timeout:
                continue
            if k == 0:
                raise ConnectionError("connection closed by the server")
            got += k
        return buf

    def _receive(self, sock: socket.socket) -> None:
        from pyigtl.messages import CRC64, ImageMessage, MessageBase, TransformMessage
        while True:
            header = bytes(self._recv_exact(sock, HEADER_SIZE))
            try:
                fields = MessageBase.parse_header(header)
            except (struct.error, UnicodeDecodeError) as e:
                self._skip("bad header")
                raise _FramingLost(f"unreadable message header ({e})") from e
            size = fields["body_size"]
            if fields["header_version"] not in (1, 2, 3) or size > self.max_body_bytes:
                self._skip("bad header")
                raise _FramingLost(f"implausible header (version {fields['header_version']}, body {size} bytes)")
            body = bytes(self._recv_exact(sock, size)) if size else b""
            mtype, name = fields["message_type"], fields["device_name"]
            if self.verify_crc and CRC64(body) != struct.unpack(">Q", header[50:58])[0]:
                self._skip("bad CRC")
                continue
            if mtype == "IMAGE" and self.device in (None, name):
                self._on_image(ImageMessage, fields, body)
            elif mtype == "TRANSFORM" and self.pose_device in (None, name):
                self._on_transform(TransformMessage, fields, body)
            else:
                self._skip(f"unexpected {mtype or '?'} from '{name}'")

    def _on_image(self, cls: type, fields: dict, body: bytes) -> None:
        msg = cls()
        try:
            msg.unpack(fields, body)
            image = image_from_message(msg.image, f"IMAGE '{fields['device_name']}'")
        except InvalidFrame:
            self._skip("invalid image")
            return
        except Exception:  # noqa: BLE001 - remote bytes can break pyigtl's parser in any way
            self._skip("undecodable IMAGE")
            return
        now = time.monotonic()
        self._rate_t.append(now)
        if len(self._rate_t) >= 2 and self._rate_t[-1] > self._rate_t[0]:
            self.fps = (len(self._rate_t) - 1) / (self._rate_t[-1] - self._rate_t[0])
        self.images_received += 1
        self._mailbox.put((image, _spacing_from_matrix(msg.ijk_to_world_matrix, msg.image.shape), now))

    def _on_transform(self, cls: type, fields: dict, body: bytes) -> None:
        msg = cls()
        try:
            msg.unpack(fields, body)
            matrix = np.asarray(msg.matrix, dtype=np.float64)
        except Exception:  # noqa: BLE001 - remote bytes can break pyigtl's parser in any way
            self._skip("undecodable TRANSFORM")
            return
        if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
            self._skip("invalid TRANSFORM")
            return
        matrix.flags.writeable = False
        with self._lock:
            self._pose = matrix


# ---------------------------------------------------------------------------------- server
def pack_frame(frame: Frame, device_name: str = "Image", pose_name: str = "ProbeToReference",
               timestamp: float | None = None) -> bytes:
    """OpenIGTLink bytes for a frame: IMAGE (2D slice, spacing in the matrix) then TRANSFORM if posed."""
    from pyigtl.messages import ImageMessage, TransformMessage
    ts = time.time() if timestamp is None else timestamp
    matrix = np.eye(4)
    if frame.spacing_mm is not None:
        matrix[1, 1], matrix[0, 0] = frame.spacing_mm  # j (rows), i (columns)
    out = ImageMessage(frame.image[None], ijk_to_world_matrix=matrix, timestamp=ts, device_name=device_name).pack()
    if frame.pose is not None:
        out += TransformMessage(frame.pose, timestamp=ts, device_name=pose_name).pack()
    return out


class IGTLinkServer:
    """Serve frames over OpenIGTLink to every connected client, newest message set only.

    Args:
        host: interface to bind (127.0.0.1: this machine only; 0.0.0.0: every interface).
        port: TCP port; 0 picks a free one (see `port` after `start`).
        device_name: IMAGE device name (PLUS usually sends "Image_Reference").
        pose_name: TRANSFORM device name.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, device_name: str = "Image",
                 pose_name: str = "ProbeToReference") -> None:
        self.host, self.port = host, int(port)
        self.device_name, self.pose_name = device_name, pose_name
        self.sent = 0
        self._sock: socket.socket | None = None
        self._clients: dict[int, Mailbox] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def clients(self) -> int:
        """Number of connected clients."""
        with self._lock:
            return len(self._clients)

    def start(self) -> "IGTLinkServer":
        """Bind, listen and accept clients in a background thread.

        Raises:
            SourceError: the port is taken or the address cannot be bound.
        """
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError as e:
            raise SourceError(f"cannot serve OpenIGTLink on {self.host}:{self.port}: {e.strerror or e} "
                              "(port in use? pick another with --port)") from e
        sock.listen(8)
        sock.settimeout(0.2)
        self._sock, self.port = sock, sock.getsockname()[1]
        self._spawn(self._accept_loop, "igtl accept")
        return self

    def __enter__(self) -> "IGTLinkServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, target, name: str, *args: Any) -> None:
        th = threading.Thread(target=target, args=args, name=name, daemon=True)
        th.start()
        self._threads.append(th)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            box = Mailbox()
            with self._lock:
                self._clients[id(box)] = box
            self._spawn(self._client_loop, "igtl client", conn, box)

    def _client_loop(self, conn: socket.socket, box: Mailbox) -> None:
        import select
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while not self._stop.is_set():
                data = box.take(0.2)
                readable, _, _ = select.select([conn], [], [], 0)
                if readable and not conn.recv(65536):  # drain what clients send; b"" = they left
                    return
                if data is not None:
                    conn.sendall(data)
        except OSError:
            return
        finally:
            with self._lock:
                self._clients.pop(id(box), None)
            conn.close()

    def send(self, frame: Frame, timestamp: float | None = None) -> int:
        """Queue a frame for every client (replacing any frame they have not received yet).

        Returns:
            The number of clients it was queued for.
        """
        with self._lock:
            boxes = list(self._clients.values())
        data = pack_frame(frame, self.device_name, self.pose_name, timestamp) if boxes else b""
        for box in boxes:
            box.put(data)
        self.sent += 1
        return len(boxes)

    def close(self) -> None:
        """Disconnect every client and stop listening."""
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for th in self._threads:
            th.join(timeout=2.0)
        self._threads.clear()
