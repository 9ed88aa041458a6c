"""An egress stops the instance call of a stream its peer abandons, real processes: x asks t's
black-hole instance (it reads nothing and never answers; the request carries no budget, so no
deadline would ever end the call), then sends RESET. t must close its connection to the instance
at once: an abandoned request holds no instance connection (and no egress task)."""

from __future__ import annotations

import socket
import struct
import time

from bench.hostile import Site, _open_frame
from cpnd.tunnel import ResetCode, reset_payload
from interop.wire import TUNNEL

SID = 1


def _until(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _closed_by_peer(conn: socket.socket, timeout: float) -> bool:
    """Read (and drop) what ``conn`` holds until its peer closes it (True), or ``timeout`` passes."""
    conn.settimeout(0.1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if conn.recv(65536) == b"":
                return True
        except (TimeoutError, socket.timeout):
            continue
        except OSError:  # reset by the peer: closed too
            return True
    return False


def test_an_abandoned_stream_ends_its_instance_call(tmp_path) -> None:
    site = Site(tmp_path)
    try:
        x = site.attacker(caps=["route-refresh", "tunnel", "tunnel-large-data"])
        try:
            x.send_msg(_open_frame(SID, "/sink", "t", "hole"), ctype=TUNNEL)
            x.send_msg(struct.pack(">IBB", SID, 2, 1) + b"GET /sink HTTP/1.1\r\nHost: x\r\n\r\n", ctype=TUNNEL)
            conn = _until(lambda: site.hole.conns[-1] if site.hole.conns else None, 10, "t to call its instance")
            assert not _closed_by_peer(conn, 0.5), "t gave up on the call before the stream was abandoned"
            x.send_msg(struct.pack(">IBB", SID, 4, 0) + reset_payload(ResetCode.CANCEL, False, "x gave up"), ctype=TUNNEL)
            assert _closed_by_peer(conn, 5), "the instance call went on after its stream was abandoned"
        finally:
            x.close()
    finally:
        site.close()
