"""IGTLinkSource / IGTLinkServer over loopback: pyigtl peers, malformed streams, drops, reconnects."""
from __future__ import annotations

import socket
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from devices.base import Disconnected, Frame, SourceError, create_source
from devices.igtl import IGTLinkServer, IGTLinkSource, image_from_message, parse_address
from helpers_devices import (PyigtlServer, ScriptedServer, frame_number, igtl_bytes, image_message,
                             numbered_frames, transform_message, wait_until)

FRAMES = numbered_frames(12, 40, 56)
POSE = np.array([[0, -1, 0, 10.5], [1, 0, 0, -3.0], [0, 0, 1, 42.0], [0, 0, 0, 1]], dtype=np.float64)


def _read_some(src, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frame = src.read(timeout=0.1)
        if frame is not None:
            return frame
    raise AssertionError(f"no frame within {timeout} s (state {src.state}, skipped {dict(src.skipped_reasons)})")


def test_pyigtl_server_image_and_transform():
    import pyigtl
    with PyigtlServer() as server, create_source(f"igtl://127.0.0.1:{server.port}", connect_timeout_s=3) as src:
        assert wait_until(lambda: server.server.is_connected(), 3.0)
        spacing = np.diag([0.2, 0.3, 1.0, 1.0])
        server.send(pyigtl.TransformMessage(POSE, device_name="ProbeToReference"))
        server.send(pyigtl.ImageMessage(FRAMES[3][None], ijk_to_world_matrix=spacing, device_name="Image"))
        frame = _read_some(src)
        assert np.array_equal(frame.image, FRAMES[3])
        assert frame.spacing_mm == pytest.approx((0.3, 0.2))
        assert wait_until(lambda: src.pose is not None, 2.0)
        np.testing.assert_allclose(src.pose, POSE, atol=1e-5)
        assert src.state == "connected" and src.skipped == 0


def test_pyigtl_server_going_away_is_noticed():
    import pyigtl
    server = PyigtlServer()
    src = IGTLinkSource("127.0.0.1", server.port, backoff_s=(0.05, 0.1)).open()
    try:
        assert wait_until(lambda: src.state == "connected", 3.0)
        server.send(pyigtl.ImageMessage(FRAMES[2][None], device_name="Image"))
        assert frame_number(_read_some(src).image) == 2
        server.close()  # the scanner goes away mid-stream
        assert wait_until(lambda: src.state == "reconnecting", 3.0), src.state
        assert src.read(timeout=0.2) is None  # no exception: it keeps trying
    finally:
        src.close()


def test_newest_only_and_read_never_hangs():
    def script(conn: socket.socket, stopped) -> None:
        conn.sendall(b"".join(image_message(f) for f in FRAMES))
        stopped.wait(1.0)

    with ScriptedServer([script]) as server, IGTLinkSource("127.0.0.1", server.port) as src:
        assert wait_until(lambda: src.images_received == len(FRAMES), 3.0)
        frame = src.read(timeout=1.0)
        assert frame_number(frame.image) == len(FRAMES) - 1, "the newest image, not the oldest"
        assert src.dropped == len(FRAMES) - 1
        t0 = time.monotonic()
        assert src.read(timeout=0.2) is None
        assert time.monotonic() - t0 < 0.6


def test_drop_mid_message_then_reconnect():
    def first(conn: socket.socket, stopped) -> None:
        conn.sendall(image_message(FRAMES[1]) + transform_message(POSE))
        half = image_message(FRAMES[2])
        conn.sendall(half[: len(half) // 2])
        time.sleep(0.2)  # then the connection drops mid-message

    def second(conn: socket.socket, stopped) -> None:
        conn.sendall(image_message(FRAMES[7]))
        stopped.wait(2.0)

    with ScriptedServer([first, second]) as server, \
            IGTLinkSource("127.0.0.1", server.port, backoff_s=(0.05, 0.2)) as src:
        assert frame_number(_read_some(src).image) == 1
        frame = _read_some(src)
        assert frame_number(frame.image) == 7, "the half message was not taken for an image"
        assert src.connections == 2 and src.state == "connected"
        np.testing.assert_allclose(frame.pose, POSE, atol=1e-5)  # newest pose survives the reconnect


def test_malformed_and_unexpected_messages_are_skipped_and_counted():
    good = image_message(FRAMES[5])
    bad_crc = igtl_bytes("IMAGE", "Image", good[58:], crc=12345)
    short_body = igtl_bytes("IMAGE", "Image", good[58:100])
    empty = igtl_bytes("IMAGE", "Image", image_message(np.zeros((1, 0), np.uint8))[58:])
    nan = image_message(np.full((8, 8), np.nan, np.float32))
    inf_pose = transform_message(np.full((4, 4), np.inf))
    status = igtl_bytes("STATUS", "Tracker", b"\x00" * 30)
    other = image_message(FRAMES[9], name="Other")

    def script(conn: socket.socket, stopped) -> None:
        conn.sendall(bad_crc + short_body + empty + nan + inf_pose + status + other + good)
        stopped.wait(1.5)

    with ScriptedServer([script]) as server, IGTLinkSource("127.0.0.1", server.port, device="Image") as src:
        frame = _read_some(src)
        assert frame_number(frame.image) == 5 and frame.pose is None
        assert src.skipped == 7, dict(src.skipped_reasons)
        assert src.skipped_reasons["bad CRC"] == 1
        assert src.skipped_reasons["undecodable IMAGE"] == 1
        assert src.skipped_reasons["invalid image"] == 2  # empty, NaN
        assert src.skipped_reasons["invalid TRANSFORM"] == 1
        assert src.connections == 1, "skipping must not cost the connection"


def test_garbage_header_forces_a_reconnect():
    garbage = igtl_bytes("IMAGE", "Image", b"", body_size=2**40)

    def first(conn: socket.socket, stopped) -> None:
        conn.sendall(garbage + image_message(FRAMES[0]))
        stopped.wait(0.5)

    def second(conn: socket.socket, stopped) -> None:
        conn.sendall(image_message(FRAMES[4]))
        stopped.wait(1.5)

    with ScriptedServer([first, second]) as server, \
            IGTLinkSource("127.0.0.1", server.port, backoff_s=(0.05, 0.1)) as src:
        assert frame_number(_read_some(src).image) == 4
        assert src.skipped_reasons["bad header"] == 1 and src.connections >= 2


def test_never_connected_raises_disconnected_after_connect_timeout():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    src = IGTLinkSource("127.0.0.1", port, connect_timeout_s=0.4)
    t0 = time.monotonic()
    with pytest.raises(Disconnected, match=rf"127.0.0.1:{port}.*0.4 s"):
        with src:
            src.read(timeout=5.0)
    assert time.monotonic() - t0 < 2.0


def test_our_server_to_pyigtl_client_and_to_our_source():
    import pyigtl
    frame = Frame(image=FRAMES[6], t=0.0, index=0, spacing_mm=(0.25, 0.5), pose=POSE)
    with IGTLinkServer("127.0.0.1", 0, device_name="Image") as server:
        client = pyigtl.OpenIGTLinkClient("127.0.0.1", server.port)
        src = IGTLinkSource("127.0.0.1", server.port).open()
        try:
            assert wait_until(lambda: server.clients == 2, 3.0)
            server.send(frame)
            img = client.wait_for_message("Image", timeout=3)
            tfm = client.wait_for_message("ProbeToReference", timeout=3)
            assert img is not None and np.array_equal(img.image[0], FRAMES[6])
            np.testing.assert_allclose(tfm.matrix, POSE, atol=1e-5)
            got = _read_some(src)
            assert np.array_equal(got.image, FRAMES[6]) and got.spacing_mm == pytest.approx((0.25, 0.5))
            assert wait_until(lambda: src.pose is not None, 2.0)
            np.testing.assert_allclose(src.pose, POSE, atol=1e-5)
        finally:
            client.stop()
            src.close()


def test_server_port_in_use_is_a_clear_error():
    with IGTLinkServer("127.0.0.1", 0) as first:
        with pytest.raises(SourceError, match=rf"{first.port}.*--port"):
            IGTLinkServer("127.0.0.1", first.port).start()


def test_image_array_layouts():
    img = FRAMES[0]
    assert np.array_equal(image_from_message(img[None]), img)             # (1, rows, cols): PLUS
    assert np.array_equal(image_from_message(img[:, :, None]), img)       # pyigtl 2D packing
    rgb = np.repeat(img[None, :, :, None], 3, axis=3)                      # (1, rows, cols, 3)
    assert np.abs(image_from_message(rgb).astype(int) - img).max() <= 1
    with pytest.raises(SourceError, match="3D volume"):
        image_from_message(np.zeros((4, 8, 8), np.uint8))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["127.0.0.1", "localhost", "scanner.local", "10.1.2.3"]), st.integers(1, 65535))
def test_parse_address_property(host, port):
    assert parse_address(f"{host}:{port}") == (host, port)
    assert parse_address(host) == (host, 18944)
    assert parse_address(f"[::1]:{port}") == ("::1", port)


@pytest.mark.parametrize("bad", ["host:notaport", "host:0", "host:70000"])
def test_parse_address_rejects_bad_ports(bad):
    with pytest.raises(SourceError, match="port"):
        parse_address(bad)
