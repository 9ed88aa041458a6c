"""Protocol error codes and the exception hierarchy that carries them.

Every protocol error maps 1:1 to a NOTIFICATION (protocol-spec/errors.md); the
session boundary turns a raised ``ProtocolError`` into teardown with that code.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """NOTIFICATION error codes (protocol-spec/errors.md)."""

    MESSAGE = 1
    OPEN = 2
    UPDATE = 3
    HOLD_TIMER_EXPIRED = 4
    FSM = 5
    CEASE = 6
    HANDSHAKE = 7
    RECORD = 8
    TUNNEL = 9


class MessageSub(enum.IntEnum):
    FRAME_TOO_LONG = 1
    BAD_TYPE = 2
    MALFORMED = 3
    BAD_FIELD = 4


class OpenSub(enum.IntEnum):
    UNSUPPORTED_VERSION = 1
    BAD_PEER_ID = 2
    BAD_HOLD_TIME = 3
    BAD_CAPABILITY = 4


class UpdateSub(enum.IntEnum):
    MALFORMED_ROUTE = 1
    BAD_PATH = 2
    BAD_ATTRIBUTE = 3
    LABEL_MISMATCH = 4
    TOO_MANY_ENTRIES = 5


class FsmSub(enum.IntEnum):
    UNEXPECTED_IN_OPEN_SENT = 1
    UNEXPECTED_IN_OPEN_CONFIRM = 2
    UNEXPECTED_IN_ESTABLISHED = 3


class CeaseSub(enum.IntEnum):
    MAX_ROUTES = 1
    ADMIN_SHUTDOWN = 2
    PEER_DECONFIGURED = 3
    ADMIN_RESET = 4
    CONNECTION_REJECTED = 5
    CONFIG_CHANGE = 6
    COLLISION = 7
    OUT_OF_RESOURCES = 8
    RESTARTING = 9  # graceful restart: keep my routes for the window my OPEN announced


class HandshakeSub(enum.IntEnum):
    UNSUPPORTED_VERSION = 1
    UNKNOWN_PEER = 2
    BAD_SIGNATURE = 3
    WRONG_PEER = 4
    BAD_KEY_SHARE = 5
    MALFORMED = 6
    TIMEOUT = 7


class RecordSub(enum.IntEnum):
    DECRYPT_FAILED = 1
    TOO_LONG = 2
    COUNTER_EXHAUSTED = 3
    BAD_CONTENT_TYPE = 4


class TunnelSub(enum.IntEnum):
    MALFORMED_FRAME = 1
    BAD_STREAM_ID = 2
    NOT_NEGOTIATED = 3
    MALFORMED_BATCH = 4


SUBCODES: dict[Code, type[enum.IntEnum] | None] = {
    Code.MESSAGE: MessageSub,
    Code.OPEN: OpenSub,
    Code.UPDATE: UpdateSub,
    Code.HOLD_TIMER_EXPIRED: None,
    Code.FSM: FsmSub,
    Code.CEASE: CeaseSub,
    Code.HANDSHAKE: HandshakeSub,
    Code.RECORD: RecordSub,
    Code.TUNNEL: TunnelSub,
}


def describe(code: int, subcode: int) -> str:
    """Human name of a code/subcode pair, e.g. ``update/bad-path``; unknown ones stay numeric."""
    try:
        c = Code(code)
    except ValueError:
        return f"{code}/{subcode}"
    sub_enum = SUBCODES[c]
    name = c.name.lower().replace("_", "-")
    if sub_enum is None:
        return name
    try:
        return f"{name}/{sub_enum(subcode).name.lower().replace('_', '-')}"
    except ValueError:
        return f"{name}/{subcode}"


class CpnError(Exception):
    """Base of every error cpn raises on purpose."""


class ProtocolError(CpnError):
    """A violation of protocol-spec; carries the NOTIFICATION it deserves."""

    def __init__(self, code: int, subcode: int, detail: str = "") -> None:
        super().__init__(f"{describe(code, subcode)}: {detail}" if detail else describe(code, subcode))
        self.code = int(code)
        self.subcode = int(subcode)
        self.detail = detail


class ConfigError(CpnError):
    """An invalid configuration; the message is one line naming file, line and key."""


class HttpError(CpnError):
    """A gateway-made error response: status and the contract's JSON body (README, "Errors")."""

    def __init__(self, status: int, error: str, detail: str, *, close: bool = False) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.close = close  # the request's framing cannot be trusted: end the connection after this
        self.service = ""  # for metrics, once known
        self.headers: list[tuple[bytes, bytes]] = []  # more for the response: Retry-After, WWW-Authenticate
