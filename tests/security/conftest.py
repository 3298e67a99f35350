"""The `pki` fixture: a CA, server and client certificates and token files, made at test time
(tests/security/security_pki.py)."""

from __future__ import annotations

import pytest

from security_pki import CONTROL_TOKEN, INGEST_TOKEN, READ_TOKEN, TOKENS, Issuer, Pki


@pytest.fixture
def pki(tmp_path) -> Pki:
    d = tmp_path / "pki"
    d.mkdir()
    p = Pki(str(d), Issuer.ca("tensortrace-test-ca"), Issuer.ca("some-other-ca"))
    p.write("ca.crt", p.ca.pem)
    p.write("other-ca.crt", p.other_ca.pem)
    p.write("tokens", TOKENS)
    for name, tok in (("read.token", READ_TOKEN), ("control.token", CONTROL_TOKEN), ("ingest.token", INGEST_TOKEN)):
        p.write(name, tok + "\n")
    p.server()
    return p
