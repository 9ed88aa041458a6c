"""TLS keys in the config: certificates made here with ``cryptography``; every problem one line naming file:line: key."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cpnd.config import load_config
from cpnd.crypto import generate_key, write_private_key
from cpnd.errors import ConfigError
from tlscerts import CertAuthority

BASE = """\
[gateway]
id = "gw1"
listen = "127.0.0.1:7101"
http_listen = "127.0.0.1:8101"
https_listen = "127.0.0.1:8443"
tls_cert_file = "pki/gw.crt"
tls_key_file = "pki/gw.key"
key_file = "gw1.key"

[[services]]
path = "/v1"
[[services.instances]]
id = "model"
url = "https://127.0.0.1:9443/v1"
capacity = 50
tls_ca_file = "pki/cpn-test-CA.pem"
tls_server_name = "model.internal"
"""


@pytest.fixture
def site(tmp_path):
    write_private_key(tmp_path / "gw1.key", generate_key(), force=True)
    ca = CertAuthority.create(tmp_path / "pki")
    ca.issue(tmp_path / "pki", "gw", ["localhost"])
    return tmp_path


def load(site, text: str):
    (site / "gw1.toml").write_text(text)
    return load_config(site / "gw1.toml")


def test_good_tls_config(site) -> None:
    cfg = load(site, BASE)
    assert cfg.gateway.https_listen is not None and cfg.gateway.https_listen.port == 8443
    assert cfg.tls is not None and cfg.tls.subject == "CN=localhost"
    inst = cfg.services[0].instances[0]
    assert inst.tls is not None and inst.tls.server_name == "model.internal"
    assert inst.tls_ca_file == site / "pki" / "cpn-test-CA.pem"
    # No tls_ca_file: the system's CAs; no tls_server_name: the URL's host.
    plain = load(site, BASE.replace('tls_ca_file = "pki/cpn-test-CA.pem"\ntls_server_name = "model.internal"\n', ""))
    assert plain.services[0].instances[0].tls.server_name == "127.0.0.1"
    assert plain.services[0].instances[0].tls.ca_file is None


def _encrypted_key(site) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    (site / "pki" / "enc.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")))


@pytest.mark.parametrize(("old", "new", "expected"), [
    ('tls_cert_file = "pki/gw.crt"', 'tls_cert_file = "pki/gw.key"',
     r"gw1.toml:6: gateway.tls_cert_file: .*gw.key: no PEM certificate in it"),
    ('tls_cert_file = "pki/gw.crt"', 'tls_cert_file = "pki/absent.crt"',
     r"gw1.toml:6: gateway.tls_cert_file: cannot read .*absent.crt: No such file or directory"),
    ('tls_key_file = "pki/gw.key"', 'tls_key_file = "pki/gw.crt"',
     r"gw1.toml:7: gateway.tls_key_file: .*gw.crt: no PEM private key in it"),
    ('tls_key_file = "pki/gw.key"', 'tls_key_file = "pki/other.key"',
     r"gw1.toml:7: gateway.tls_key_file: .*other.key: does not match the certificate in tls_cert_file"),
    ('tls_key_file = "pki/gw.key"', 'tls_key_file = "pki/enc.key"',
     r"gw1.toml:7: gateway.tls_key_file: .*enc.key: the key is encrypted"),
    ('tls_key_file = "pki/gw.key"\n', "", r"gw1.toml:1: gateway.tls_key_file: missing \(required with https_listen\)"),
    ('https_listen = "127.0.0.1:8443"\n', "", r"gw1.toml:5: gateway.tls_cert_file: set without https_listen"),
    ('https_listen = "127.0.0.1:8443"', 'https_listen = "127.0.0.1:8101"',
     r"gw1.toml:5: gateway.https_listen: is http_listen's address too"),
    ('tls_ca_file = "pki/cpn-test-CA.pem"', 'tls_ca_file = "pki/gw.key"',
     r"gw1.toml:16: services\[0\].instances\[0\].tls_ca_file: .*gw.key: no PEM certificate in it"),
    ('tls_server_name = "model.internal"', 'tls_server_name = "bad name"',
     r"gw1.toml:17: services\[0\].instances\[0\].tls_server_name: must be a DNS name"),
    ('url = "https://127.0.0.1:9443/v1"', 'url = "http://127.0.0.1:9443/v1"',
     r"gw1.toml:16: services\[0\].instances\[0\].tls_ca_file: only for an https:// url"),
])
def test_tls_errors_name_file_line_and_key(site, old: str, new: str, expected: str) -> None:
    _encrypted_key(site)
    CertAuthority.create(site / "other").issue(site / "pki", "other", ["localhost"])  # a key of another certificate
    (site / "pki" / "other.crt").unlink()
    assert old in BASE
    with pytest.raises(ConfigError, match=expected) as err:
        load(site, BASE.replace(old, new))
    assert "\n" not in str(err.value)


def test_cpnd_with_a_bad_certificate_file_is_one_line(site) -> None:
    (site / "pki" / "gw.crt").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    (site / "gw1.toml").write_text(BASE)
    r = subprocess.run([sys.executable, "-m", "cpnd", "--config", str(site / "gw1.toml"), "--check"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("cpnd: gw1.toml:6: gateway.tls_cert_file: ") and "no PEM certificate" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_the_readme_tls_example_is_valid(tmp_path) -> None:
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (toml,) = re.findall(r"<!-- example:tls-toml -->\n```toml\n(.*?)```", readme, re.S)
    write_private_key(tmp_path / "gw1.key", generate_key(), force=True)
    ca = CertAuthority.create(tmp_path / "tls", "site CA")
    (tmp_path / "tls" / "site-CA.pem").rename(tmp_path / "tls" / "site-ca.pem")
    ca.issue(tmp_path / "tls", "gw1", ["gw1.example.net"])
    (tmp_path / "gw1.toml").write_text(toml)
    cfg = load_config(tmp_path / "gw1.toml")
    assert cfg.tls is not None and cfg.tls.subject == "CN=gw1.example.net"
    a, cloud = cfg.services[0].instances
    assert a.tls is not None and a.tls.server_name == "llm-a.site.internal" and a.tls.ca_file == tmp_path / "tls" / "site-ca.pem"
    assert cloud.tls is not None and cloud.tls.server_name == "api.example-llm.com" and cloud.tls.ca_file is None


def test_an_expired_certificate_loads_and_says_so(site) -> None:
    import datetime

    ca = CertAuthority.create(site / "old")
    cert, key = ca.issue(site / "pki", "gw", ["localhost"], expired=True)
    cfg = load(site, BASE)
    now = datetime.datetime.now(datetime.timezone.utc)
    assert cfg.tls is not None and cfg.tls.expiring(now) and "EXPIRED 1 days ago" in cfg.tls.describe(now)
    ca.issue(site / "pki", "gw", ["localhost"], days=60)
    fresh = load(site, BASE).tls
    # Certificates keep whole seconds: 60 days from issuance is 59 or 60 whole days from ``now``.
    assert fresh is not None and not fresh.expiring(now)
    assert "expires in 59 days" in fresh.describe(now) or "expires in 60 days" in fresh.describe(now)


def test_an_https_instance_made_without_a_context_verifies_with_the_system_cas() -> None:
    # An instance not read from the config file (a registered one, say) has no InstanceTls of its own.
    from cpnd.config import InstanceConfig
    from cpnd.tlsstream import instance_tls

    plain = InstanceConfig("p", "http://10.0.0.1:80/", 1, 0, 0)
    assert instance_tls(plain) is None
    tls = instance_tls(InstanceConfig("s", "https://api.example.com/v1", 1, 0, 0))
    assert tls is not None and tls.server_name == "api.example.com" and tls.ca_file is None
    assert tls.context.verify_mode.name == "CERT_REQUIRED" and tls.context.check_hostname
