"""Short-budget fuzzing in CI of what bench/fuzz_cores.py fuzzes at length: nothing but the right error."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpnd.config import load_config
from cpnd.crypto import Role, generate_key
from cpnd.errors import ConfigError
from cpnd.session import Closed, Session, State

KEYS = {"a": generate_key(), "b": generate_key()}
VECTORS = json.loads((Path(__file__).resolve().parent.parent / "protocol-spec" / "vectors.json").read_text())
HELLO = bytes.fromhex(VECTORS["handshake"]["hello_frame"])


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=600), st.binary(max_size=64).map(lambda b: HELLO[:20] + b)))
def test_responder_survives_any_bytes(data: bytes) -> None:
    s = Session(Role.RESPONDER, "b", KEYS["b"], {"a": KEYS["a"].public_key()}, 0.0)
    s.receive_data(data, 0.0)
    events = []
    while (e := s.next_event()) is not None:
        events.append(e)
    if s.state is State.CLOSED:
        assert isinstance(events[-1], Closed)
        assert events[-1].code in ((0,) if data == b"" else (1, 7))  # b"" is the peer's EOF
    s.data_to_send()


toml_lines = st.sampled_from([
    "[gateway]", 'id = "g1"', 'listen = "127.0.0.1:7000"', 'key_file = "k.key"', "[[peers]]", 'id = "p"',
    'address = "127.0.0.1:7001"', 'public_key = "AAAA"', "hold_time_ms = 10", "[[services]]", 'path = "/x"',
    "[[services.instances]]", 'url = "http://h:1/"', "capacity = -1", "selection = 3", "= broken", 'id = "g1"',
])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(toml_lines, max_size=14), st.binary(max_size=20))
def test_config_errors_are_config_errors(tmp_path, lines: list[str], junk: bytes) -> None:
    path = tmp_path / "gw.toml"
    path.write_bytes("\n".join(lines).encode() + junk)
    try:
        load_config(path)
    except ConfigError as exc:
        assert "\n" not in str(exc)
