"""One Kafka client configuration for every service: the exporter (producer), the consumers
(loader, bridge, probes) and the demo.

    kc = KafkaConfig(bootstrap_servers="kafka-0:9093,kafka-1:9093", security_protocol="SASL_SSL",
                     sasl_mechanism="SCRAM-SHA-512", sasl_username="tensortrace",
                     sasl_password_file="/var/run/secrets/kafka/password", ssl_cafile="/etc/kafka/ca.pem")
    KafkaConsumer(**kc.client_kwargs(), group_id="g")      # kafka-python: KafkaProducer, KafkaAdminClient
    Consumer({**kc.rdkafka_conf(), "group.id": "g"})       # confluent-kafka (librdkafka): the consumer core

No production Kafka is open, so SASL (PLAIN, SCRAM-SHA-256/512) and TLS (server CA, client
certificate for mTLS) are first-class. Secrets never come from the command line (they would show
in `ps` and in the pod spec): the password is read from `sasl_password_file` or, when that is
empty, from the environment variable named by `sasl_password_env` (a Kubernetes Secret mounted as a
file or injected as env).

Before its first client, a service calls `kc.check_connection(timeout_s)` (= `probe(kc, timeout_s)`):
it connects once and turns what kafka-python reports as a bare "Unable to bootstrap" timeout into
one clear exception, `KafkaAuthError` (wrong password or unknown user, SASL mechanism not enabled,
TLS certificate verify / handshake failure, a listener of another protocol) or `KafkaUnavailable`
(unreachable, no answer), whose message starts with `kc.describe()` and never holds the password:

    SASL_SSL listener k0:9093 as 'tensortrace' (SCRAM-SHA-512): authentication failed: wrong password
    or unknown user (k0:9093 said: Authentication failed during authentication due to invalid ...)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import ssl
import struct
import time
from dataclasses import dataclass

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
DEFAULT_PASSWORD_ENV = "TENSORTRACE_KAFKA_SASL_PASSWORD"


@dataclass
class KafkaConfig:
    bootstrap_servers: str = "127.0.0.1:9092"   # host:port[,host:port...]
    client_id: str = ""                          # "" : the service picks its own
    security_protocol: str = "PLAINTEXT"         # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    sasl_mechanism: str = ""                     # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512 (SASL_* only)
    sasl_username: str = ""
    sasl_password_file: str = ""                 # the password, read at connect time
    sasl_password_env: str = DEFAULT_PASSWORD_ENV  # used when sasl_password_file is empty
    ssl_cafile: str = ""                         # CA bundle that signed the brokers' certificates
    ssl_certfile: str = ""                       # client certificate (mTLS), PEM
    ssl_keyfile: str = ""                        # its key, PEM
    ssl_check_hostname: bool = True

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def problems(self) -> list[str]:
        """Every problem with this configuration, each naming the field (empty: usable)."""
        out = []
        servers = [s for s in self.bootstrap_servers.split(",") if s.strip()]
        if not servers:
            out.append("bootstrap_servers: empty; give host:port[,host:port...]")
        for s in servers:
            host, _, port = s.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                out.append(f"bootstrap_servers: {s!r} is not host:port")
        if self.security_protocol not in SECURITY_PROTOCOLS:
            out.append(f"security_protocol: {self.security_protocol!r} is not one of {', '.join(SECURITY_PROTOCOLS)}")
        if self.sasl:
            if self.sasl_mechanism not in SASL_MECHANISMS:
                out.append(f"sasl_mechanism: {self.sasl_mechanism!r} is not one of {', '.join(SASL_MECHANISMS)} "
                           f"(needed by {self.security_protocol})")
            if not self.sasl_username:
                out.append(f"sasl_username: empty (needed by {self.security_protocol})")
            if self.sasl_password_file:
                if not os.path.isfile(self.sasl_password_file) or not os.access(self.sasl_password_file, os.R_OK):
                    out.append(f"sasl_password_file: {self.sasl_password_file} is not a readable file")
            elif not os.environ.get(self.sasl_password_env or ""):
                out.append(f"sasl_password_file: empty and the environment variable {self.sasl_password_env or '(none)'} "
                           "is not set; the password comes from one of them, never from the command line")
        elif self.sasl_mechanism or self.sasl_username:
            out.append(f"sasl_mechanism/sasl_username: set, but security_protocol {self.security_protocol} uses no SASL")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path and not self.tls:
                out.append(f"{name}: set, but security_protocol {self.security_protocol} uses no TLS")
            elif path and not os.path.isfile(path):
                out.append(f"{name}: {path} is not a readable file")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            out.append("ssl_certfile/ssl_keyfile: give both (mutual TLS) or neither")
        return out

    def password(self) -> str:
        if self.sasl_password_file:
            with open(self.sasl_password_file, encoding="utf-8") as f:
                return f.read().strip()
        return os.environ.get(self.sasl_password_env or "", "")

    def client_kwargs(self, client_id: str = "") -> dict:
        """Keyword arguments for kafka-python's KafkaProducer, KafkaConsumer and KafkaAdminClient."""
        kw: dict = {"bootstrap_servers": [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()],
                    "security_protocol": self.security_protocol}
        cid = self.client_id or client_id
        if cid:
            kw["client_id"] = cid
        if self.sasl:
            kw.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                      sasl_plain_password=self.password())
        if self.tls:
            kw["ssl_check_hostname"] = self.ssl_check_hostname
            if self.ssl_cafile:
                kw["ssl_cafile"] = self.ssl_cafile
            if self.ssl_certfile:
                kw.update(ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile)
        return kw

    def rdkafka_conf(self, client_id: str = "") -> dict:
        """The same settings as librdkafka properties, for confluent-kafka's Consumer and Producer
        (the consumer core reads with librdkafka: docs/consumers.md "The Kafka client")."""
        conf: dict = {"bootstrap.servers": ",".join(s.strip() for s in self.bootstrap_servers.split(",") if s.strip()),
                      "security.protocol": self.security_protocol}
        cid = self.client_id or client_id
        if cid:
            conf["client.id"] = cid
        if self.sasl:
            conf.update({"sasl.mechanisms": self.sasl_mechanism, "sasl.username": self.sasl_username,
                         "sasl.password": self.password()})
        if self.tls:
            conf["ssl.endpoint.identification.algorithm"] = "https" if self.ssl_check_hostname else "none"
            if self.ssl_cafile:
                conf["ssl.ca.location"] = self.ssl_cafile
            if self.ssl_certfile:
                conf.update({"ssl.certificate.location": self.ssl_certfile, "ssl.key.location": self.ssl_keyfile})
        return conf

    def describe(self) -> str:
        """Where and how this client connects, for error messages (never the password)."""
        who = f" as {self.sasl_username!r} ({self.sasl_mechanism})" if self.sasl else ""
        return f"{self.security_protocol} listener {self.bootstrap_servers}{who}"

    def cli_args(self, prefix: str = "--kafka-") -> list[str]:
        """The command-line flags that give a service this configuration (the flags generated from
        this dataclass: `--kafka-bootstrap-servers`, ...); only fields that differ from the defaults.
        Carries the password *file*, never the password."""
        out: list[str] = []
        default = KafkaConfig()
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if value == getattr(default, name):
                continue
            flag = prefix + name.replace("_", "-")
            if isinstance(value, bool):
                out.append(flag if value else "--no-" + flag[2:])
            else:
                out += [flag, str(value)]
        return out

    def check_connection(self, timeout_s: float = 10.0) -> "ProbeResult":
        """Connect once and raise KafkaAuthError / KafkaUnavailable with a clear message; see probe()."""
        return probe(self, timeout_s)


# -- probing a listener -----------------------------------------------------------------------
#
# kafka-python turns every failure to connect (refused, wrong TLS trust, wrong password, a
# plaintext client on a TLS port) into the same "KafkaTimeoutError: Unable to bootstrap" after
# its full bootstrap timeout. probe() does the first steps itself, on a plain socket, so the
# cause is known and named: TCP connect -> TLS handshake (the same SSLContext kafka-python builds)
# -> ApiVersions -> SaslHandshake + SaslAuthenticate (PLAIN, SCRAM-SHA-256/512, RFC 5802) ->
# then a real kafka-python bootstrap (metadata) with the same client_kwargs().


class KafkaUnavailable(RuntimeError):
    """Kafka cannot be used with this configuration right now (unreachable, not answering).
    The message names the listener (KafkaConfig.describe()) and the cause, never the password.
    Services log it and retry."""


class KafkaAuthError(KafkaUnavailable):
    """The listener refused us: authentication failed, TLS trust or handshake failed, or the
    security settings do not match the listener. Retrying will not help until the configuration
    (password, CA, protocol) changes, but services keep retrying: the secret may be rotated."""


@dataclass
class ProbeResult:
    server: str              # the bootstrap server that answered
    brokers: int             # brokers in its metadata
    elapsed_s: float


_METADATA, _API_VERSIONS, _SASL_HANDSHAKE, _SASL_AUTHENTICATE = 3, 18, 17, 36
_ERR_UNSUPPORTED_SASL_MECHANISM, _ERR_ILLEGAL_SASL_STATE, _ERR_SASL_AUTHENTICATION_FAILED = 33, 34, 58


class _Wire:
    """Just enough of the Kafka protocol (non-flexible request header v1) for the probe."""

    def __init__(self, sock, deadline: float, server: str):
        self.sock, self.deadline, self.server, self.corr = sock, deadline, server, 0

    def _timeout(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout()
        return left

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            self.sock.settimeout(self._timeout())
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionResetError("the server closed the connection")
            buf += chunk
        return bytes(buf)

    def request(self, api_key: int, version: int, body: bytes) -> bytes:
        self.corr += 1
        client_id = b"tensortrace-probe"
        header = struct.pack(">hhih", api_key, version, self.corr, len(client_id)) + client_id
        payload = header + body
        self.sock.settimeout(self._timeout())
        self.sock.sendall(struct.pack(">i", len(payload)) + payload)
        head = self._recv_exact(4)
        if head[0] in (0x15, 0x16) and head[1] == 0x03:  # a TLS record (alert, handshake)
            raise _TLSAnswer()
        size = struct.unpack(">i", head)[0]
        if not 4 <= size <= 10_000_000:
            raise ValueError(f"a {size}-byte answer is not a Kafka response")
        data = self._recv_exact(size)
        if struct.unpack(">i", data[:4])[0] != self.corr:
            raise ValueError("the answer does not match the request (not a Kafka broker?)")
        return data[4:]


class _TLSAnswer(Exception):
    """The server answered a plaintext request with a TLS record."""


def _kstr(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">h", len(b)) + b


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        v = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return v[0]

    def string(self) -> str | None:
        n = self.take(">h")
        if n < 0:
            return None
        s = self.data[self.pos:self.pos + n].decode(errors="replace")
        self.pos += n
        return s

    def bytes_(self) -> bytes | None:
        n = self.take(">i")
        if n < 0:
            return None
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b


def _ssl_context(kc: KafkaConfig) -> ssl.SSLContext:
    """The context kafka-python builds from the same settings (kafka/net/transport.py)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = kc.ssl_check_hostname
    if kc.ssl_cafile:
        ctx.load_verify_locations(kc.ssl_cafile)
    else:
        ctx.load_default_certs()
    if kc.ssl_certfile:
        ctx.load_cert_chain(certfile=kc.ssl_certfile, keyfile=kc.ssl_keyfile or None)
    return ctx


def _scram(wire: _Wire, mechanism: str, user: str, password: str) -> tuple[int, str, bytes | None]:
    """One SCRAM exchange (RFC 5802) over SaslAuthenticate v1; returns the last (error, message, bytes)."""
    algo = "sha512" if mechanism.endswith("512") else "sha256"
    nonce = base64.b64encode(os.urandom(24)).decode()
    name = user.replace("=", "=3D").replace(",", "=2C")
    first_bare = f"n={name},r={nonce}"
    err, msg, server_first = _sasl_authenticate(wire, ("n,," + first_bare).encode())
    if err:
        return err, msg, None
    fields = dict(kv.split("=", 1) for kv in (server_first or b"").decode().split(",") if "=" in kv)
    if not fields.get("r", "").startswith(nonce) or "s" not in fields or "i" not in fields:
        return _ERR_SASL_AUTHENTICATION_FAILED, "malformed SCRAM server-first message", None
    salted = hashlib.pbkdf2_hmac(algo, password.encode(), base64.b64decode(fields["s"]), int(fields["i"]))
    client_key = hmac.new(salted, b"Client Key", algo).digest()
    stored_key = hashlib.new(algo, client_key).digest()
    final_no_proof = f"c=biws,r={fields['r']}"
    auth_message = f"{first_bare},{server_first.decode()},{final_no_proof}".encode()
    signature = hmac.new(stored_key, auth_message, algo).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    err, msg, server_final = _sasl_authenticate(
        wire, f"{final_no_proof},p={base64.b64encode(proof).decode()}".encode())
    if err:
        return err, msg, None
    server_key = hmac.new(salted, b"Server Key", algo).digest()
    expected = base64.b64encode(hmac.new(server_key, auth_message, algo).digest()).decode()
    if (server_final or b"").decode() != f"v={expected}":
        return _ERR_SASL_AUTHENTICATION_FAILED, "the server's SCRAM signature is wrong (not the broker we expect)", None
    return 0, "", server_final


def _sasl_authenticate(wire: _Wire, token: bytes) -> tuple[int, str, bytes | None]:
    r = _Reader(wire.request(_SASL_AUTHENTICATE, 1, struct.pack(">i", len(token)) + token))
    err = r.take(">h")
    msg = r.string() or ""
    return err, msg, r.bytes_()


def _scrub(text: str, password: str) -> str:
    return text.replace(password, "***") if password and len(password) >= 3 else text


def probe(kc: KafkaConfig, timeout_s: float = 10.0, metadata: bool = True) -> ProbeResult:
    """Connect once to the bootstrap servers of `kc`; return which answered, or raise.

    KafkaAuthError: authentication failed (wrong password or unknown user), the SASL mechanism is
    not enabled, TLS certificate verification or the TLS handshake failed, or the listener does
    not speak the configured protocol. KafkaUnavailable: nothing reachable or answering within
    `timeout_s`, or the configuration itself has problems. Every message starts with
    `kc.describe()` (listener, mechanism, user) and never contains the password. With
    `metadata` (default) a kafka-python client then bootstraps with `kc.client_kwargs()`.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    where = kc.describe()
    problems = kc.problems()
    if problems:
        raise KafkaUnavailable(f"{where}: configuration: {'; '.join(problems)}")
    password = kc.password() if kc.sasl else ""
    failures: list[str] = []
    answered = ""
    for server in [s.strip() for s in kc.bootstrap_servers.split(",") if s.strip()]:
        host, _, port = server.rpartition(":")
        host = host.strip("[]")
        left = deadline - time.monotonic()
        if left <= 0:
            failures.append(f"{server}: not tried, {timeout_s:g}s spent")
            continue
        try:
            sock = socket.create_connection((host, int(port)), timeout=left)
        except OSError as e:
            failures.append(f"{server}: cannot connect: {e.strerror or e}")
            continue
        try:
            _probe_socket(kc, sock, host, server, password, deadline, where)
            answered = server
            break
        except socket.timeout:
            failures.append(f"{server}: connected, but no answer within {timeout_s:g}s")
        except (ConnectionError, OSError, ValueError) as e:
            hint = " (a TLS listener? security_protocol is " + kc.security_protocol + ")" if not kc.tls else ""
            failures.append(f"{server}: {_scrub(str(e) or type(e).__name__, password)}{hint}")
        finally:
            try:
                sock.close()
            except OSError:
                pass
    if not answered:
        raise KafkaUnavailable(f"{where}: no bootstrap server usable: " + "; ".join(failures))
    brokers = 0
    if metadata:
        brokers = _bootstrap_metadata(kc, answered, deadline, where, password, timeout_s)
    return ProbeResult(server=answered, brokers=brokers, elapsed_s=time.monotonic() - t0)


def _probe_socket(kc: KafkaConfig, sock, host: str, server: str, password: str, deadline: float, where: str) -> None:
    if kc.tls:
        try:
            ctx = _ssl_context(kc)
        except (OSError, ssl.SSLError) as e:
            raise KafkaAuthError(f"{where}: TLS: cannot load the client's TLS files: {e}") from None
        try:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            sock = ctx.wrap_socket(sock, server_hostname=host)
        except ssl.SSLCertVerificationError as e:
            ca = f"ssl_cafile {kc.ssl_cafile}" if kc.ssl_cafile else "no ssl_cafile, so the system CAs"
            raise KafkaAuthError(f"{where}: TLS: certificate verify failed at {server}: {e.verify_message} "
                                 f"(trusted: {ca}; set ssl_cafile to the CA that signed the brokers' "
                                 f"certificates)") from None
        except socket.timeout:
            raise
        except (ssl.SSLError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", None) or str(e) or type(e).__name__
            raise KafkaAuthError(f"{where}: TLS: handshake with {server} failed: {reason} "
                                 f"(is it a TLS listener? security_protocol is {kc.security_protocol})") from None
    wire = _Wire(sock, deadline, server)
    try:
        wire.request(_API_VERSIONS, 0, b"")
    except _TLSAnswer:
        raise KafkaAuthError(f"{where}: {server} answered with TLS: it is a TLS listener, but security_protocol "
                             f"is {kc.security_protocol} (use SSL or SASL_SSL)") from None
    except (ConnectionError, ValueError) as e:
        raise ConnectionError(f"not a Kafka answer to ApiVersions: {e}") from None
    if not kc.sasl:
        try:  # a SASL listener closes the connection on anything but SaslHandshake after ApiVersions
            wire.request(_METADATA, 4, struct.pack(">i?", 0, False))
        except ConnectionError:
            raise KafkaAuthError(f"{where}: {server} closed the connection on a metadata request: the listener "
                                 f"expects SASL authentication (security_protocol is {kc.security_protocol}; "
                                 f"use SASL_PLAINTEXT or SASL_SSL)") from None
        return
    r = _Reader(wire.request(_SASL_HANDSHAKE, 1, _kstr(kc.sasl_mechanism)))
    err = r.take(">h")
    offered = [r.string() for _ in range(max(0, r.take(">i")))]
    if err == _ERR_UNSUPPORTED_SASL_MECHANISM:
        raise KafkaAuthError(f"{where}: SASL mechanism {kc.sasl_mechanism} is not enabled on this listener "
                             f"(it offers {', '.join(o for o in offered if o) or 'none'})")
    if err:
        raise KafkaAuthError(f"{where}: the listener refused the SASL handshake (error {err}): "
                             f"is it a SASL listener? security_protocol is {kc.security_protocol}")
    if kc.sasl_mechanism == "PLAIN":
        err, msg, _ = _sasl_authenticate(wire, b"\0" + kc.sasl_username.encode() + b"\0" + password.encode())
    else:
        err, msg, _ = _scram(wire, kc.sasl_mechanism, kc.sasl_username, password)
    if err == _ERR_SASL_AUTHENTICATION_FAILED:
        raise KafkaAuthError(f"{where}: authentication failed: wrong password or unknown user "
                             f"({server} said: {_scrub(msg, password) or 'SASL_AUTHENTICATION_FAILED'})")
    if err:
        raise KafkaAuthError(f"{where}: SASL authentication at {server} failed with error {err}: "
                             f"{_scrub(msg, password)}")


def supported_kwargs(client_class, kwargs: dict) -> dict:
    """`kwargs` less the settings this kafka-python version's client class does not know (2.x has
    no bootstrap_timeout_ms, 3.x no api_version_auto_timeout_ms; both refuse unknown ones)."""
    known = getattr(client_class, "DEFAULT_CONFIG", None)
    return dict(kwargs) if not known else {k: v for k, v in kwargs.items() if k in known}


def describe_cluster(client_kwargs: dict, timeout_ms: int) -> dict:
    """kafka-python's KafkaAdminClient.describe_cluster() from a new admin client (`client_kwargs`;
    bootstrap, version probe and each request wait at most `timeout_ms`), closed whatever happens."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(**supported_kwargs(KafkaAdminClient, dict(
        client_kwargs, bootstrap_timeout_ms=timeout_ms, api_version_auto_timeout_ms=timeout_ms,
        request_timeout_ms=timeout_ms)))
    try:
        return admin.describe_cluster()
    finally:
        try:
            admin.close()
        except Exception:
            pass


def _bootstrap_metadata(kc: KafkaConfig, server: str, deadline: float, where: str, password: str,
                        timeout_s: float) -> int:
    left_ms = max(500, int((deadline - time.monotonic()) * 1000))
    try:
        cluster = describe_cluster(dict(kc.client_kwargs("tensortrace-probe"), reconnect_backoff_max_ms=1000), left_ms)
        return len(cluster.get("brokers", []))
    except Exception as e:
        text = str(e) if str(e).startswith(type(e).__name__) else f"{type(e).__name__}: {e}"
        raise KafkaUnavailable(f"{where}: {server} accepted the connection, but kafka-python got no cluster "
                               f"metadata within {timeout_s:g}s: {_scrub(text, password)}") from None
