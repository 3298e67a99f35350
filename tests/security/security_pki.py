"""Certificates and token files made at test time (Python `cryptography`): a CA, a server
certificate for 127.0.0.1/localhost, a client certificate from the same CA, and a second CA with a
client certificate of its own (the "wrong CA")."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

READ_TOKEN = "read-token-0123456789abcdef"
CONTROL_TOKEN = "control-token-0123456789abcdef"
INGEST_TOKEN = "ingest-token-0123456789abcdef"
TOKENS = f"""# identity  roles  token
alice   read      {READ_TOKEN}
ops     control   {CONTROL_TOKEN}
engine  ingest    {INGEST_TOKEN}
"""


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tensortrace-test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class Issuer:
    key: object
    cert: x509.Certificate

    @classmethod
    def ca(cls, cn: str) -> "Issuer":
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    def issue(self, cn: str, server: bool, expired: bool = False) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for `cn`: a server certificate for 127.0.0.1 and localhost,
        or a client certificate; `expired`: valid from two days ago until yesterday."""
        import ipaddress

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = ((now - datetime.timedelta(days=2), now - datetime.timedelta(days=1)) if expired
                      else (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)))
        b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(start).not_valid_after(end)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                   else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Pki:
    dir: str
    ca: Issuer
    other_ca: Issuer

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def write(self, name: str, data: bytes | str) -> str:
        """Replace `name` atomically (as a Secret update does: readers never see half a file)."""
        p = self.path(name)
        tmp = p + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, p)
        return p

    def server(self, cn: str = "tensortrace-server", prefix: str = "server", expired: bool = False) -> tuple[str, str]:
        cert, key = self.ca.issue(cn, server=True, expired=expired)
        return self.write(f"{prefix}.crt", cert), self.write(f"{prefix}.key", key)

    def client(self, cn: str, issuer: Issuer | None = None) -> tuple[str, str]:
        cert, key = (issuer or self.ca).issue(cn, server=False)
        return self.write(f"{cn}.crt", cert), self.write(f"{cn}.key", key)


