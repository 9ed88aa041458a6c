"""Coverage-guided, in-process fuzzing of the sans-IO cores with atheris (libFuzzer).

    pip install atheris
    python bench/fuzz_cores.py TARGET [-runs=N] [-max_total_time=S] [libFuzzer options...]

TARGET is one of: message, handshake, tunnel, session, config. Any exception other than
the protocol error the input deserves is a crash: libFuzzer stops and writes the input
to crash-*; turn it into a regression vector in protocol-spec/vectors.json or a test.
Seeds come from protocol-spec/vectors.json. The CI runs the same targets for a short
budget with hypothesis (tests/test_wire.py, test_tunnel.py, test_fuzz_cores.py).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import atheris  # noqa: E402

with atheris.instrument_imports():
    from cpnd.config import load_config  # noqa: E402
    from cpnd.crypto import Role, generate_key  # noqa: E402
    from cpnd.errors import ConfigError, ProtocolError  # noqa: E402
    from cpnd.session import Session  # noqa: E402
    from cpnd.tunnel import ExtHeader, FrameType, decode_frame  # noqa: E402
    from cpnd.wire import decode_handshake, decode_message  # noqa: E402

KEYS = {"a": generate_key(), "b": generate_key()}
CONFIG_DIR = Path(tempfile.mkdtemp(prefix="cpn-fuzz-"))


def t_message(data: bytes) -> None:
    try:
        decode_message(data)
    except ProtocolError:
        pass


def t_handshake(data: bytes) -> None:
    try:
        decode_handshake(data)
    except ProtocolError:
        pass


def t_tunnel(data: bytes) -> None:
    try:
        f = decode_frame(data)
        if f.type is FrameType.OPEN:
            ExtHeader.decode(f.payload)
    except ProtocolError:
        pass


def t_session(data: bytes) -> None:
    """Bytes arriving at a responder before and during the handshake: never an exception."""
    s = Session(Role.RESPONDER, "b", KEYS["b"], {"a": KEYS["a"].public_key()}, 0.0)
    s.receive_data(data, 0.0)
    while s.next_event() is not None:
        pass
    s.data_to_send()


def t_config(data: bytes) -> None:
    path = CONFIG_DIR / "gw.toml"
    path.write_bytes(data)
    try:
        load_config(path)
    except ConfigError:
        pass


TARGETS = {"message": t_message, "handshake": t_handshake, "tunnel": t_tunnel, "session": t_session, "config": t_config}


def seeds(target: str) -> list[bytes]:
    v = json.loads((ROOT / "protocol-spec" / "vectors.json").read_text())
    if target == "message":
        return [bytes.fromhex(m["hex"]) for m in v["messages"]]
    if target == "tunnel":
        return [bytes.fromhex(m["hex"]) for m in v["tunnel"]]
    if target in ("handshake", "session"):
        return [bytes.fromhex(v["handshake"][k]) for k in ("hello_frame", "hello_ack_frame", "finish_frame")]
    return [b'[gateway]\nid = "g"\nlisten = "127.0.0.1:1"\nkey_file = "k"\n']


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = sys.argv[1]
    corpus = Path(tempfile.mkdtemp(prefix=f"cpn-corpus-{target}-"))
    for i, s in enumerate(seeds(target)):
        (corpus / f"seed{i}").write_bytes(s)
    atheris.Setup([sys.argv[0], *sys.argv[2:], str(corpus)], TARGETS[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
