"""Shared fixtures: deterministic keys and the spec's test vectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpnd.crypto import generate_key

ROOT = Path(__file__).resolve().parent.parent
VECTORS = json.loads((ROOT / "protocol-spec" / "vectors.json").read_text())


@pytest.fixture(scope="session")
def vectors() -> dict:
    return VECTORS


@pytest.fixture
def keys():
    """Three fresh identity keys, by gateway id."""
    return {name: generate_key() for name in ("a", "b", "c")}
