"""Throw-away TLS material for the local Kafka broker, made with the JDK's `keytool`.

    tls = make_dev_tls("/tmp/x/tls")   # ~1.5 s: three rounds of keytool JVMs
    tls.keystore, tls.password, tls.ca_pem   # broker keystore signed by a fresh CA; the CA in PEM

- `ca.p12`: the CA's EC key pair (PKCS12), CN "TensorTrace dev CA", basicConstraints CA:true.
- `broker.p12`: the brokers' EC key (PKCS12) with the chain broker <- CA; SAN ip:127.0.0.1, dns:localhost
  (every broker of a local cluster listens on 127.0.0.1, so they share it).
- `ca.pem`: the CA certificate in PEM (`keytool -exportcert -rfc`), what Python clients need as
  `ssl_cafile` (kafka-python does not read PKCS12).

Valid for `validity_days` (default 30). For tests and development only: the keystore password is
random and stored next to it in the returned object, never reused.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass

_KEYTOOL_TIMEOUT_S = 60
# keytool is a JVM: start it small and without the C2 compiler, it does a few milliseconds of work.
_KEYTOOL_JVM = ["-J-XX:TieredStopAtLevel=1", "-J-XX:+UseSerialGC", "-J-Xmx64m", "-J-XX:-UsePerfData"]


class DevTLSError(RuntimeError):
    """keytool is missing or failed; the message is one line."""


@dataclass(frozen=True)
class DevTLS:
    directory: str
    keystore: str      # broker.p12: the brokers' key and certificate chain
    password: str      # of both keystores and their keys
    ca_pem: str        # the CA certificate, PEM: clients' ssl_cafile
    ca_keystore: str   # ca.p12 (to sign more certificates, e.g. a client's for mTLS)
    hosts: tuple[str, ...]


def find_keytool(java: str = "java") -> str:
    """keytool next to the `java` that runs the broker, else the one on PATH."""
    j = shutil.which(java)
    if j:
        candidate = os.path.join(os.path.dirname(os.path.realpath(j)), "keytool")
        if os.access(candidate, os.X_OK):
            return candidate
    k = shutil.which("keytool")
    if k is None:
        raise DevTLSError("keytool not found (it comes with the JDK that runs the broker; need Java 17+)")
    return k


def _san(hosts: tuple[str, ...]) -> str:
    parts = []
    for h in hosts:
        kind = "ip" if h.replace(".", "").isdigit() or ":" in h else "dns"
        parts.append(f"{kind}:{h}")
    return "SAN=" + ",".join(parts)


def plan_dev_tls(directory: str, password: str | None = None,
                 hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> DevTLS:
    """The paths and password make_dev_tls(directory, password=...) will use, without making
    anything yet: a broker's configuration can be written (and its data dir formatted) meanwhile."""
    return DevTLS(directory=directory, keystore=os.path.join(directory, "broker.p12"),
                  password=password or secrets.token_urlsafe(18), ca_pem=os.path.join(directory, "ca.pem"),
                  ca_keystore=os.path.join(directory, "ca.p12"), hosts=tuple(hosts))


def make_dev_tls(directory: str, java: str = "java", hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                 validity_days: int = 30, password: str | None = None) -> DevTLS:
    """Create the CA, the broker keystore and the PEM CA file in `directory` (created, 0700)."""
    keytool = find_keytool(java)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    plan = plan_dev_tls(directory, password, hosts)
    password = plan.password
    ca_p12, broker_p12, ca_pem = plan.ca_keystore, plan.keystore, plan.ca_pem
    signed = os.path.join(directory, "broker-chain.pem")
    for p in (ca_p12, broker_p12, signed, ca_pem):
        if os.path.exists(p):
            os.unlink(p)
    store = lambda path: ["-keystore", path, "-storetype", "PKCS12", "-storepass", password]  # noqa: E731
    san = _san(hosts)
    validity = ["-validity", str(validity_days)]
    key = ["-keyalg", "EC", "-groupname", "secp256r1"]  # EC: key generation takes ms, RSA 2048 ~1 s

    def run(*args: str, stdin=None, stdout=None) -> subprocess.Popen:
        return subprocess.Popen([keytool, *_KEYTOOL_JVM, *args], stdin=stdin or subprocess.DEVNULL,
                                stdout=stdout or subprocess.PIPE, stderr=subprocess.PIPE, cwd=directory)

    def wait(*procs: tuple[str, subprocess.Popen]) -> None:
        deadline = time.monotonic() + _KEYTOOL_TIMEOUT_S
        for what, proc in procs:
            try:
                _, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for _, p in procs:
                    p.kill()
                raise DevTLSError(f"keytool {what} took over {_KEYTOOL_TIMEOUT_S}s") from None
            if proc.returncode != 0:
                out = " ".join((err or b"").decode(errors="replace").split()).replace(password, "***")
                raise DevTLSError(f"keytool {what} failed (exit {proc.returncode}): {out[:300]}")

    # Three rounds of JVMs running side by side (keytool is a JVM: ~0.3 s each on a small machine).
    wait(("-genkeypair (CA)", run("-genkeypair", "-alias", "ca", "-dname", "CN=TensorTrace dev CA", *key,
                                  "-ext", "bc:c", *validity, *store(ca_p12), "-keypass", password)),
         ("-genkeypair (broker)", run("-genkeypair", "-alias", "broker", "-dname", "CN=localhost, O=TensorTrace dev",
                                      *key, "-ext", san, *validity, *store(broker_p12), "-keypass", password)))
    # certreq | gencert (the CA signs the broker's key with the SAN), and the CA certificate in PEM.
    with open(signed, "wb") as out:
        req = run("-certreq", "-alias", "broker", *store(broker_p12))
        gen = run("-gencert", "-alias", "ca", "-rfc", "-ext", san, "-ext", "KU=digitalSignature",
                  "-ext", "EKU=serverAuth", *validity, *store(ca_p12), stdin=req.stdout, stdout=out)
        req.stdout.close()
        pem = run("-exportcert", "-rfc", "-alias", "ca", "-file", ca_pem, *store(ca_p12))
        wait(("-certreq", req), ("-gencert", gen), ("-exportcert", pem))
    # The reply is the chain broker <- CA (keytool installs it over the self-signed certificate).
    with open(signed, "ab") as out, open(ca_pem, "rb") as ca:
        out.write(ca.read())
    wait(("-importcert", run("-importcert", "-noprompt", "-alias", "broker", "-file", signed, *store(broker_p12))))
    os.unlink(signed)
    return plan
