"""agent/node/keygen.py: keys and CSRs made in a real child process, checked by the control
plane's own CSR validation; a child that fails, answers garbage or hangs is a DabbaError."""

import asyncio
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.control import ca as camod
from agent.errors import DabbaError
from agent.node import keygen

URIS = ["spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/node/n1"]


def test_each_uri_gets_its_own_key_and_a_csr_the_control_plane_accepts():
    pairs = asyncio.run(keygen.csrs(URIS))
    assert len(pairs) == 2
    for uri, (key_pem, csr_pem) in zip(URIS, pairs, strict=True):
        csr = camod.validate_csr(csr_pem, uri)  # signature, P-256, exactly this SAN
        key = serialization.load_pem_private_key(key_pem, None)
        assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, as before
        assert csr.public_key().public_numbers() == key.public_key().public_numbers()
        assert csr.subject == x509.Name([])
    assert pairs[0][0] != pairs[1][0]  # never one key for two identities
    assert asyncio.run(keygen.csrs([])) == []  # nothing asked: no child


def _child(monkeypatch, code: str) -> None:
    monkeypatch.setattr(keygen, "_CMD", [sys.executable, "-c", code])


def test_a_child_that_fails_is_an_error_with_its_last_line(monkeypatch):
    _child(monkeypatch, "import sys; print('no entropy', file=sys.stderr); sys.exit(3)")
    with pytest.raises(DabbaError, match=r"failed \(exit 3\): no entropy"):
        asyncio.run(keygen.csrs(URIS))


@pytest.mark.parametrize(
    "answer",
    ["not json", "{}", "[1, 2]", '[{"key": "k"}, {"key": "k"}]', '[{"key": "k", "csr": "c"}]'],
)
def test_an_answer_that_is_not_one_pair_per_uri_is_an_error(monkeypatch, answer):
    _child(monkeypatch, f"import sys; sys.stdin.read(); print({answer!r})")
    with pytest.raises(DabbaError, match="not the expected JSON|1 answered for 2 asked"):
        asyncio.run(keygen.csrs(URIS))


def test_a_child_that_hangs_is_killed_after_the_timeout(monkeypatch):
    _child(monkeypatch, "import time; time.sleep(60)")
    with pytest.raises(DabbaError, match="longer than 1 s"):
        asyncio.run(keygen.csrs(URIS, timeout=1.0))
