"""One security block for every network endpoint: TLS / mTLS, bearer tokens with roles, audit.

Activations are user data (a residual stream can be inverted back to the prompt), and the control
endpoint decides how much of it is taken. So the query service, the exporter's control service and
the bridge's OTLP receiver are secured by the same block, `EndpointSecurity`, each under its own
flag prefix:

    tensortrace query-server ... --tls-cert /tls/tls.crt --tls-key /tls/tls.key [--tls-client-ca /tls/ca.crt] \\
        --token-file /tokens/tokens
    tensortrace exporter ...     --control-tls-cert ... --control-token-file ...
    tensortrace loader ...       --query-tls-cert ...   --query-token-file ...
    tensortrace bridge ...       --otlp-receiver-tls-cert ... --otlp-receiver-token-file ...
    tensortrace exporter ... --control-host 127.0.0.1 --control-plaintext        # development only

Server side, in code:

    guard = EndpointGuard("query", cfg.query_security, QUERY_RPC_ROLES, registry=registry)
    server = grpc.server(executor, interceptors=[guard.interceptor()])
    port = guard.add_port(server, "0.0.0.0", 50052)     # TLS credentials, or plaintext where allowed

Client side (`tensortrace show/trace --server`, `exporterctl`, the SDK's grpc:// target):

    sec = ClientSecurity(tls_ca="/tls/ca.crt", token_file="/run/token").with_env()
    channel = sec.channel("query.tensortrace:50052")

Decisions, and why:

- **Plaintext is an opt-in, and only for loopback.** Without `tls_cert`/`tls_key` an endpoint
  starts only with `plaintext: true`, and then only on a loopback address (127.0.0.0/8, ::1,
  localhost): plaintext on a pod IP is a development shortcut nobody should take by accident.
  `plaintext_any_address: true` forces it (e.g. behind a service mesh that does mTLS for us).
- **Roles are independent; `control` does not imply `read`.** A token carries one or more of
  `read` (query RPCs: show, trace, the SDK), `control` (exporterctl set) and `ingest` (sending
  spans to the bridge's OTLP receivers) and `forget` (the query service's Forget RPC, `tensortrace
  forget --server`: erasure is irreversible, so neither reading nor steering capture implies it).
  An operator who may switch capture on need not be able to read what it captured; a line can say
  `read,control` where one token should do both. The
  exporter's GetStatus (rings and accounting, no user data) takes either `read` or `control`.
- **Without a token file there is no authorization**: every client that completes the handshake
  may call everything. With mTLS that is the CA's decision (the audit line names the certificate
  subject); with plaintext it is loopback development. With a token file every call needs a valid
  `authorization: Bearer <token>` carrying the RPC's role: none or an unknown one is
  UNAUTHENTICATED, the wrong role PERMISSION_DENIED.
- **Token file** (a Kubernetes Secret mounted as a file): one token per line,
  `<identity> <role>[,<role>...] <token>`; `#` starts a comment. Identities are names the operator
  chose (they become metric labels, so label cardinality is the operator's, never the client's);
  several lines may share an identity (rotation). Tokens are >= 16 printable characters, unique.
  Presented tokens are hashed and compared to every entry with `hmac.compare_digest` (no early
  exit, no timing of which prefix matched); tokens never appear in logs or errors.
- **Reload without restart.** Certificates: grpc calls our fetcher before each new connection's
  handshake (`grpc.dynamic_ssl_server_credentials`); it stats the three files and, when one
  changed, reads and checks them (key matches certificate) and hands grpc the new pair. Existing
  connections keep their session; new ones get the new certificate. The token file is re-read when
  its inode, size or mtime changes (checked at most once a second, on a call). Kubernetes updates a
  mounted Secret by swapping a symlink, which changes the inode. A file that is broken after a
  change (half-written, bad PEM, a malformed line) keeps the previous good contents in force, is
  logged once per change and counted (`tensortrace_security_reload_failures_total{file}`).
  At start the same problems are configuration errors that name the file and the line.
- **Audit.** Each call of an audited RPC (tensor reads, control changes) is one JSON line on the
  `tensortrace.audit` logger and counted in the service's registry; failed authentication and
  authorization are counted by reason (`tensortrace_security_auth_failures_total{endpoint,reason}`).
  docs/security.md has the line format.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import grpc

from tensortrace.service.config import ConfigError, Problems, option

log = logging.getLogger("tensortrace.security")
audit_log = logging.getLogger("tensortrace.audit")

TOKEN_MIN_CHARS = 16
RELOAD_CHECK_S = 1.0
_IDENTITY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,63}$")
_TOKEN = re.compile(r"^[\x21-\x7e]+$")   # printable ASCII, no spaces


class Role(str, enum.Enum):
    READ = "read"          # query RPCs: show, trace, the read-back SDK
    CONTROL = "control"    # exporterctl set: what the agents capture
    INGEST = "ingest"      # send spans to the bridge's OTLP receiver
    FORGET = "forget"      # erase a request's data (`tensortrace forget --server`): irreversible, its own role


ROLES = tuple(r.value for r in Role)


class SecurityError(ConfigError):
    """A certificate, key or token file that cannot work; the message names the file (and line)."""


# -- addresses ------------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost`; a bind address like 0.0.0.0 or a pod IP is not."""
    h = host.strip().strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


# -- token file -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Principal:
    """Who made a call: `identity` from the token file (or a client certificate's subject);
    `via`: token, mtls, anonymous."""
    identity: str
    via: str
    roles: frozenset = frozenset(ROLES)
    subject: str = ""           # the client certificate's subject (mTLS), for the audit line

    @property
    def metric_identity(self) -> str:
        """The bounded metric label: a token-file identity, else `mtls` / `anonymous` /
        `unauthenticated` (a certificate subject is chosen by whoever got it signed, a presented
        token by the caller: they go in the log line only)."""
        return self.identity if self.via == "token" else "unauthenticated" if self.via == "none" else self.via


@dataclass(frozen=True)
class _Token:
    digest: bytes
    identity: str
    roles: frozenset


class TokenTable:
    """Parsed token file. `match(token)` -> (identity, roles) or None, in constant time over the
    table (every entry is compared)."""

    def __init__(self, entries: list[_Token]):
        self.entries = entries

    @property
    def identities(self) -> list[str]:
        return sorted({e.identity for e in self.entries})

    def match(self, token: str) -> _Token | None:
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found = None
        for e in self.entries:
            if hmac.compare_digest(e.digest, digest) and found is None:
                found = e
        return found


def parse_tokens(text: str, where: str) -> TokenTable:
    """The token file's text -> TokenTable. Raises SecurityError naming `where` and the line (never
    the token). Format: `<identity> <role>[,<role>...] <token>` per line; `#` comments."""
    problems, entries, seen = [], [], {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3:
            problems.append(f"{where}: line {n}: expected `<identity> <role>[,<role>] <token>` (3 fields), "
                            f"got {len(parts)}")
            continue
        identity, roles_text, token = parts
        if not _IDENTITY.match(identity):
            problems.append(f"{where}: line {n}: identity {identity[:80]!r} must be 1-64 of [A-Za-z0-9._@:-], "
                            "starting with a letter or digit")
        roles = [r for r in roles_text.split(",") if r]
        bad = [r for r in roles if r not in ROLES]
        if bad or not roles:
            problems.append(f"{where}: line {n} ({identity}): role(s) {','.join(bad) or roles_text!r} not one of "
                            f"{', '.join(ROLES)}")
        if len(token) < TOKEN_MIN_CHARS or not _TOKEN.match(token):
            problems.append(f"{where}: line {n} ({identity}): the token must be at least {TOKEN_MIN_CHARS} printable "
                            "characters without spaces")
        digest = hashlib.sha256(token.encode()).digest()
        if digest in seen:
            problems.append(f"{where}: line {n} ({identity}): the same token as line {seen[digest]}")
        seen.setdefault(digest, n)
        entries.append(_Token(digest, identity, frozenset(roles)))
    if not entries and not problems:
        problems.append(f"{where}: no tokens (every call would be refused); lines are "
                        "`<identity> <role>[,<role>] <token>`")
    if problems:
        raise SecurityError(problems)
    return TokenTable(entries)


def _stat_key(path: str) -> tuple:
    st = os.stat(path)
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


class ReloadingFile:
    """A file re-parsed when it changes on disk (inode, size or mtime), checked at most every
    `check_s`. A change that does not parse keeps the previous value, logged once and counted."""

    def __init__(self, path: str, parse: Callable[[bytes], Any], kind: str,
                 on_failure: Callable[[str], None] | None = None, check_s: float = RELOAD_CHECK_S):
        self.path, self.parse, self.kind, self.check_s = path, parse, kind, check_s
        self.on_failure = on_failure
        self.lock = threading.Lock()
        self._key = _stat_key(path)
        with open(path, "rb") as f:
            self.value = parse(f.read())       # raises SecurityError at start: a config error
        self._checked = time.monotonic()
        self._failed_key: tuple | None = None
        self.reloads = 0

    def get(self) -> Any:
        now = time.monotonic()
        if now - self._checked >= self.check_s:
            with self.lock:
                if now - self._checked >= self.check_s:
                    self._checked = now
                    self._maybe_reload()
        return self.value

    def _maybe_reload(self) -> None:
        try:
            key = _stat_key(self.path)
        except OSError as e:
            self._fail(("missing",), f"{self.kind} {self.path}: {e.strerror}; keeping the previous contents")
            return
        if key == self._key or key == self._failed_key:
            return
        try:
            with open(self.path, "rb") as f:
                value = self.parse(f.read())
        except (OSError, ValueError) as e:
            self._fail(key, f"{self.kind} {self.path} changed but cannot be used ({e}); keeping the previous contents")
            return
        self.value, self._key, self._failed_key = value, key, None
        self.reloads += 1
        log.info("%s %s reloaded", self.kind, self.path)

    def _fail(self, key: tuple, text: str) -> None:
        if key != self._failed_key:
            self._failed_key = key
            log.error("%s", text)
            if self.on_failure:
                self.on_failure(self.kind)


# -- certificates ---------------------------------------------------------------------------------

def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SecurityError(f"{what} {path}: {e.strerror or e}") from None


def check_key_pair(cert_pem: bytes, key_pem: bytes, cert_path: str, key_path: str) -> str:
    """Raises SecurityError unless `cert_pem` is a PEM certificate whose public key is `key_pem`'s.
    Returns the certificate's subject (for the log)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise SecurityError(f"tls_cert {cert_path}: not a PEM certificate ({e})") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise SecurityError(f"tls_key {key_path}: not an unencrypted PEM private key ({e})") from None
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*fmt) != key.public_key().public_bytes(*fmt):
        raise SecurityError(f"tls_key {key_path} is not the key of tls_cert {cert_path}")
    return cert.subject.rfc4514_string()


def check_ca(ca_pem: bytes, path: str) -> None:
    from cryptography import x509

    try:
        if not x509.load_pem_x509_certificates(ca_pem):
            raise ValueError("no certificate")
    except ValueError as e:
        raise SecurityError(f"tls_client_ca {path}: not PEM certificates ({e})") from None


class CertificateFiles:
    """The server's certificate, key and (mTLS) client CA, as grpc's dynamic credentials: grpc
    calls `fetch()` before each new connection's handshake; it returns a new configuration when a
    file changed and checks out, else None (keep the current one)."""

    def __init__(self, cert: str, key: str, client_ca: str = "", on_failure: Callable[[str], None] | None = None,
                 check_s: float = 0.0):
        self.paths = [p for p in (cert, key, client_ca) if p]
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self.on_failure, self.check_s = on_failure, check_s
        self.lock = threading.Lock()
        self.reloads = 0
        self._failed_key: tuple | None = None
        self._checked = time.monotonic()
        self._key = self._stat()
        self.subject, self.initial = self._load()     # SecurityError at start

    def _stat(self) -> tuple:
        return tuple(_stat_key(p) for p in self.paths)

    def _load(self):
        cert_pem, key_pem = _read(self.cert, "tls_cert"), _read(self.key, "tls_key")
        subject = check_key_pair(cert_pem, key_pem, self.cert, self.key)
        ca_pem = None
        if self.client_ca:
            ca_pem = _read(self.client_ca, "tls_client_ca")
            check_ca(ca_pem, self.client_ca)
        return subject, grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)], root_certificates=ca_pem)

    def fetch(self):
        """grpc's certificate_configuration_fetcher: None (no change) or the new configuration."""
        now = time.monotonic()
        if now - self._checked < self.check_s:
            return None
        with self.lock:
            self._checked = now
            try:
                key = self._stat()
            except OSError as e:
                return self._fail(("missing",), f"TLS files: {e.filename}: {e.strerror}; keeping the current certificate")
            if key == self._key or key == self._failed_key:
                return None
            try:
                subject, config = self._load()
            except Exception as e:   # half-updated (new cert, old key), unreadable: the next handshake retries
                return self._fail(key, f"TLS files changed but cannot be used ({e}); keeping the current certificate")
            self._key, self._failed_key, self.subject = key, None, subject
            self.reloads += 1
            log.info("TLS certificate %s reloaded (subject %s)", self.cert, subject)
            return config

    def _fail(self, key: tuple, text: str):
        if key != self._failed_key:
            self._failed_key = key
            log.error("%s", text)
            if self.on_failure:
                self.on_failure("tls")
        return None


# -- the config block -----------------------------------------------------------------------------

@dataclass
class EndpointSecurity:
    """How one endpoint is secured. Every field is a file path or a switch: no secret is ever a flag."""
    tls_cert: str = option("", "server certificate (PEM; a cert-manager Secret's tls.crt); with tls_key: TLS")
    tls_key: str = option("", "server private key (PEM, unencrypted; tls.key)")
    tls_client_ca: str = option("", "CA bundle (PEM; ca.crt) that client certificates must chain to: mTLS, "
                                    "clients without such a certificate are refused")
    token_file: str = option("", "bearer tokens, one `<identity> <role>[,<role>] <token>` per line (a mounted "
                                 "Secret; reloaded on change); set: every call needs a token with the RPC's role")
    plaintext: bool = option(False, "serve without TLS (development); refused on a non-loopback address unless "
                                    "plaintext_any_address")
    plaintext_any_address: bool = option(False, "allow plaintext on a non-loopback address too (e.g. a mesh "
                                                "sidecar terminates mTLS)")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert or self.tls_key)

    def problems(self, host: str | None = None, endpoint: str = "endpoint") -> list[str]:
        """Every problem, each as "field: why". With `host`, also whether it may listen there.
        Reads the files (a malformed token file or a key that is not the certificate's fails here,
        at start, rather than at the first call)."""
        p = Problems()
        if self.tls:
            if p.check(bool(self.tls_cert) and bool(self.tls_key), "tls_cert/tls_key",
                       "give both (the certificate and its key) or neither"):
                try:
                    CertificateFiles(self.tls_cert, self.tls_key, self.tls_client_ca)
                except SecurityError as e:
                    for x in e.problems:
                        p.add(x.split(" ", 1)[0] if x.startswith("tls_") else "tls_cert", x)
                except OSError as e:
                    p.add("tls_cert", f"{e.filename}: {e.strerror}")
            p.check(not self.plaintext, "plaintext", "set together with tls_cert: choose one")
        else:
            p.check(not self.tls_client_ca, "tls_client_ca", "mTLS needs TLS: set tls_cert and tls_key too")
            if p.check(self.plaintext, "tls_cert",
                       f"the {endpoint} has no TLS: give tls_cert and tls_key, or opt into plaintext "
                       "(development, loopback only)"):
                if host is not None:
                    p.check(is_loopback(host) or self.plaintext_any_address, "plaintext",
                            f"refusing plaintext on {host}, which is not a loopback address: give tls_cert/tls_key, "
                            "bind 127.0.0.1, or force it with plaintext_any_address")
        if self.token_file:
            try:
                with open(self.token_file, "rb") as f:
                    parse_tokens(f.read().decode("utf-8", "replace"), self.token_file)
            except OSError as e:
                p.add("token_file", f"{self.token_file}: {e.strerror}")
            except SecurityError as e:
                for x in e.problems:
                    p.add("token_file", x)
        return p.items

    def validate(self, host: str | None = None, endpoint: str = "endpoint") -> "EndpointSecurity":
        problems = self.problems(host, endpoint)
        if problems:
            raise SecurityError(problems, f"{endpoint} security")
        return self

    def describe(self) -> str:
        t = ("mTLS" if self.tls_client_ca else "TLS") if self.tls else "plaintext"
        return t + (", bearer tokens" if self.token_file else ", no authentication")

    @classmethod
    def loopback_plaintext(cls) -> "EndpointSecurity":
        """Plaintext, no tokens: what tests and the development stack use on 127.0.0.1."""
        return cls(plaintext=True)


_SUBFIELDS = [f.name for f in dataclasses.fields(EndpointSecurity)]


def security_option(flag_prefix: str, endpoint: str) -> Any:
    """A config field holding an EndpointSecurity, with short alias flags: for `flag_prefix`
    "control" the flags `--control-tls-cert`, `--control-token-file`, `--control-plaintext`, ...
    (besides the generated `--<field>-tls-cert`); for "" just `--tls-cert`, ..."""
    pre = f"--{flag_prefix}-" if flag_prefix else "--"
    return option(factory=EndpointSecurity,
                  aliases={f: (pre + f.replace("_", "-"),) for f in _SUBFIELDS},
                  help={f: f"{endpoint}: " + (EndpointSecurity.__dataclass_fields__[f].metadata.get("help") or "")
                        for f in _SUBFIELDS})


# -- the server side: credentials, authentication, authorization, audit ------------------------------

class AuditSink:
    """Audit lines (JSON on the `tensortrace.audit` logger) and their counters, in one registry."""

    def __init__(self, registry=None):
        from prometheus_client import CollectorRegistry, Counter

        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.reads = _counter(r, Counter, "tensortrace_audit_reads_total",
                              "Audited reads of captured data, by token identity (or mtls/anonymous), RPC and result",
                              ("endpoint", "identity", "rpc", "result"))
        self.controls = _counter(r, Counter, "tensortrace_audit_control_changes_total",
                                 "Audited control changes (capture selection), by identity and result",
                                 ("endpoint", "identity", "rpc", "result"))
        self.auth_failures = _counter(r, Counter, "tensortrace_security_auth_failures_total",
                                      "Calls refused: no token, unknown token, wrong role, or no client certificate",
                                      ("endpoint", "reason"))
        self.reload_failures = _counter(r, Counter, "tensortrace_security_reload_failures_total",
                                        "Certificate or token files that changed but could not be used (the previous "
                                        "contents stay in force)", ("endpoint", "file"))

    def record(self, kind: str, endpoint: str, principal: Principal, rpc: str, peer: str, result: str,
               fields: dict) -> None:
        line = {"audit": kind, "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z",
                "endpoint": endpoint, "identity": principal.identity, "auth": principal.via}
        if principal.subject:
            line["subject"] = principal.subject
        line.update({"peer": peer, "rpc": rpc, **fields, "result": result})
        audit_log.info("%s", json.dumps(line, separators=(",", ":"), default=str))
        counter = self.controls if kind in ("control", "forget") else self.reads   # forget: a change, rpc=Forget
        counter.labels(endpoint, principal.metric_identity, rpc, result).inc()


_COUNTERS: "weakref.WeakKeyDictionary[Any, dict[str, Any]]" = weakref.WeakKeyDictionary()
_COUNTERS_LOCK = threading.Lock()


def _counter(registry, Counter, name: str, doc: str, labels: tuple):
    """One counter per (registry, name): several endpoints of one service (the loader's query
    service and bridge receiver) share the registry and the metric, told apart by `endpoint`."""
    with _COUNTERS_LOCK:
        mine = _COUNTERS.setdefault(registry, {})
        c = mine.get(name)
        if c is None:
            c = mine[name] = Counter(name.removesuffix("_total"), doc, labels, registry=registry)
        return c


@dataclass(frozen=True)
class RpcPolicy:
    """What one RPC needs: any of `roles`; `audit`: "read" / "control" (one audit line per call) or
    "" (counted only when refused); `fields`: the request's audited fields (ids, hooks)."""
    roles: tuple[Role, ...]
    audit: str = ""
    fields: Callable[[Any], dict] | None = None


_call = threading.local()


def current_principal() -> Principal | None:
    """Inside a guarded RPC: who is calling."""
    return getattr(_call, "principal", None)


def audit_note(**fields) -> None:
    """Inside a guarded RPC: add fields to its audit line (e.g. the old and new control document)."""
    extra = getattr(_call, "extra", None)
    if extra is not None:
        extra.update(fields)


class EndpointGuard:
    """The server side of one EndpointSecurity: `add_port()` (TLS credentials or plaintext, where
    allowed) and `interceptor()` (authentication, roles, audit) for a grpc.server."""

    def __init__(self, endpoint: str, security: EndpointSecurity, policies: dict[str, RpcPolicy], *,
                 registry=None, audit: AuditSink | None = None):
        self.endpoint = endpoint
        self.security = security
        self.policies = policies
        self.audit = audit or AuditSink(registry)
        fail = lambda kind: self.audit.reload_failures.labels(endpoint, kind).inc()  # noqa: E731
        self.certs = (CertificateFiles(security.tls_cert, security.tls_key, security.tls_client_ca, on_failure=fail)
                      if security.tls else None)
        self.tokens = (ReloadingFile(security.token_file, lambda b: parse_tokens(b.decode("utf-8", "replace"),
                                                                                 security.token_file),
                                     "token file", on_failure=fail)
                       if security.token_file else None)
        self.audit.auth_failures.labels(endpoint, "no_token")   # the series exist from the start

    # -- listening ---------------------------------------------------------------------------------
    def add_port(self, server, host: str, port: int) -> int:
        """Bind host:port with this endpoint's transport. Raises SecurityError when plaintext is not
        allowed there, OSError when the port cannot be bound."""
        self.security.validate(host, self.endpoint)
        address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
        try:
            if self.certs is not None:
                creds = grpc.dynamic_ssl_server_credentials(self.certs.initial, self.certs.fetch,
                                                            require_client_authentication=bool(self.security.tls_client_ca))
                bound = server.add_secure_port(address, creds)
            else:
                if not is_loopback(host):
                    log.warning("%s: plaintext on %s (plaintext_any_address): anyone on the network reads and "
                                "impersonates", self.endpoint, host)
                bound = server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"{self.endpoint}: cannot listen on {address}: {e}") from None
        if not bound:
            raise OSError(f"{self.endpoint}: cannot listen on {address} (in use?)")
        log.info("%s on %s:%d: %s", self.endpoint, host, bound, self.security.describe())
        if self.security.tls and not self.security.token_file and not self.security.tls_client_ca:
            log.warning("%s: TLS without client authentication (no token file, no client CA): anyone who reaches "
                        "the port may call every RPC", self.endpoint)
        return bound

    def interceptor(self):
        guard = self

        class _Interceptor(grpc.ServerInterceptor):
            def intercept_service(self, continuation, details):
                handler = continuation(details)
                if handler is None:
                    return None
                return guard._wrap(handler, details.method)

        return _Interceptor()

    # -- per call ----------------------------------------------------------------------------------
    def _fail(self, context, code, reason: str, text: str, rpc: str, principal: Principal | None = None,
              fields: dict | None = None):
        """Count, audit (an audited RPC: who tried what) and abort the call."""
        self.audit.auth_failures.labels(self.endpoint, reason).inc()
        log.warning("%s: %s refused (%s) from %s", self.endpoint, rpc, reason, context.peer())
        policy = self.policies.get(rpc)
        if policy is not None and policy.audit:
            self.audit.record(policy.audit, self.endpoint, principal or Principal("unauthenticated", "none"), rpc,
                              context.peer(), code.name, {**(fields or {}), "reason": reason})
        context.abort(code, f"{self.endpoint}: {text}")

    def authorize(self, context, rpc: str, policy: RpcPolicy | None, fields: dict | None = None) -> Principal:
        """The caller, or the call aborted (UNAUTHENTICATED / PERMISSION_DENIED). `fields`: the
        request's audit fields, for the line of a refused call."""
        subject = ""
        if self.security.tls_client_ca:
            ac = context.auth_context() or {}
            subject = b",".join(ac.get("x509_subject", []) or ac.get("x509_common_name", [])).decode("utf-8", "replace")
        if policy is None:
            self._fail(context, grpc.StatusCode.PERMISSION_DENIED, "unknown_rpc", f"{rpc} is not served to anyone", rpc)
        if self.tokens is None:
            return Principal(subject or "anonymous", "mtls" if subject else "anonymous", subject=subject)
        token = ""
        for k, v in context.invocation_metadata() or ():
            if k == "authorization":
                scheme, _, rest = (v if isinstance(v, str) else v.decode("latin-1")).partition(" ")
                if scheme.lower() == "bearer":
                    token = rest.strip()
                break
        if not token:
            self._fail(context, grpc.StatusCode.UNAUTHENTICATED, "no_token",
                       f"{rpc} needs a bearer token (authorization: Bearer ...; tensortrace clients: --token-file "
                       "or TENSORTRACE_TOKEN_FILE)", rpc, fields=fields)
        entry = self.tokens.get().match(token)
        if entry is None:
            self._fail(context, grpc.StatusCode.UNAUTHENTICATED, "unknown_token",
                       "the bearer token is not in the service's token file (rotated?)", rpc, fields=fields)
        principal = Principal(entry.identity, "token", entry.roles, subject)
        if not any(r.value in entry.roles for r in policy.roles):
            self._fail(context, grpc.StatusCode.PERMISSION_DENIED, "wrong_role",
                       f"{entry.identity} may not call {rpc}: it needs role {' or '.join(r.value for r in policy.roles)}, "
                       f"the token has {','.join(sorted(entry.roles))}", rpc, principal, fields)
        return principal

    def _begin(self, context, rpc: str, request) -> tuple[Principal, RpcPolicy | None, dict]:
        policy = self.policies.get(rpc)
        fields = {}
        if policy is not None and policy.audit and policy.fields is not None and request is not None:
            try:
                fields = policy.fields(request)
            except Exception as e:   # an audit field never fails the call; it says it is missing
                fields = {"fields_error": f"{type(e).__name__}: {e}"}
        principal = self.authorize(context, rpc, policy, fields)
        _call.principal, _call.extra = principal, fields
        return principal, policy, fields

    def _end(self, context, principal: Principal, policy: RpcPolicy, rpc: str, fields: dict, error) -> None:
        _call.principal = _call.extra = None
        if not policy.audit:
            return
        code = None
        with contextlib.suppress(Exception):   # context.abort() set it; a plain exception did not
            code = context.code()
        if code is not None:
            result = getattr(code, "name", str(code))
        else:
            result = "OK" if error is None else "CANCELLED" if isinstance(error, GeneratorExit) else "UNKNOWN"
        self.audit.record(policy.audit, self.endpoint, principal, rpc, context.peer(), result, fields)

    def _wrap(self, handler, method: str):
        rpc = method.rsplit("/", 1)[-1]
        guard = self

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            def unary_unary(request, context):
                principal, policy, fields = guard._begin(context, rpc, request)
                err = None
                try:
                    return inner(request, context)
                except BaseException as e:
                    err = e
                    raise
                finally:
                    guard._end(context, principal, policy, rpc, fields, err)

            return grpc.unary_unary_rpc_method_handler(unary_unary, handler.request_deserializer,
                                                       handler.response_serializer)
        if handler.unary_stream is not None:
            inner_s = handler.unary_stream

            def unary_stream(request, context):
                principal, policy, fields = guard._begin(context, rpc, request)
                err = None
                try:
                    yield from inner_s(request, context)
                except BaseException as e:
                    err = e
                    raise
                finally:
                    guard._end(context, principal, policy, rpc, fields, err)

            return grpc.unary_stream_rpc_method_handler(unary_stream, handler.request_deserializer,
                                                        handler.response_serializer)
        # client-streaming RPCs: authorization only (none is served today)
        kind = "stream_unary" if handler.stream_unary is not None else "stream_stream"
        inner_c = getattr(handler, kind)

        def streaming(request_iterator, context):
            guard.authorize(context, rpc, guard.policies.get(rpc))
            return inner_c(request_iterator, context)

        make = grpc.stream_unary_rpc_method_handler if kind == "stream_unary" else grpc.stream_stream_rpc_method_handler
        return make(streaming, handler.request_deserializer, handler.response_serializer)


# -- the client side ------------------------------------------------------------------------------

ENV = {"tls_ca": "TENSORTRACE_TLS_CA", "tls_cert": "TENSORTRACE_TLS_CERT", "tls_key": "TENSORTRACE_TLS_KEY",
       "tls_server_name": "TENSORTRACE_TLS_SERVER_NAME", "token_file": "TENSORTRACE_TOKEN_FILE"}


def read_client_token(path: str) -> str:
    """A client's token file: the token on its first non-empty, non-comment line (a Secret key)."""
    return read_client_token_bytes(_read(path, "token_file"), path)


@dataclass
class ClientSecurity:
    """How a client reaches a secured endpoint. TLS when any TLS option is given, or the address is
    not loopback (system CA roots unless tls_ca); plaintext to a loopback address (kubectl
    port-forward, the development stack), or anywhere with `insecure`."""
    tls_ca: str = ""            # CA bundle the server's certificate must chain to (ca.crt)
    tls_cert: str = ""          # client certificate (mTLS)
    tls_key: str = ""
    tls_server_name: str = ""   # the name the server's certificate must carry, when it is not the host dialled
    token_file: str = ""        # the bearer token, on its first line
    tls: bool = False           # TLS even to a loopback address (system roots unless tls_ca)
    insecure: bool = False      # plaintext even to a non-loopback address

    def with_env(self, environ=None) -> "ClientSecurity":
        """Unset options from TENSORTRACE_TLS_CA / _TLS_CERT / _TLS_KEY / _TLS_SERVER_NAME / _TOKEN_FILE."""
        env = os.environ if environ is None else environ
        return dataclasses.replace(self, **{k: env[v] for k, v in ENV.items() if not getattr(self, k) and env.get(v)})

    def problems(self) -> list[str]:
        p = Problems()
        p.check(bool(self.tls_cert) == bool(self.tls_key), "tls_cert/tls_key", "give both for mTLS, or neither")
        p.check(not (self.insecure and self.uses_tls_options), "insecure",
                "set together with TLS options (--tls-ca/--tls-cert/--tls): choose one")
        for name in ("tls_ca", "tls_cert", "tls_key", "token_file"):
            path = getattr(self, name)
            p.check(not path or os.path.isfile(path), name, f"{path}: no such file")
        return p.items

    @property
    def uses_tls_options(self) -> bool:
        return bool(self.tls or self.tls_ca or self.tls_cert or self.tls_key or self.tls_server_name)

    def uses_tls(self, address: str) -> bool:
        if self.insecure:
            return False
        if self.uses_tls_options:
            return True
        try:
            host, _ = split_host_port(address)
        except ValueError:
            return True
        return not is_loopback(host)

    def channel(self, address: str, options: Iterable[tuple] = ()):
        """A grpc channel to `address` (host:port) with TLS or not (see the class), carrying the
        bearer token in every call's metadata. Raises SecurityError naming a bad option."""
        problems = self.problems()
        if problems:
            raise SecurityError(problems, "client security")
        options = list(options)
        if self.uses_tls(address):
            root = _read(self.tls_ca, "tls_ca") if self.tls_ca else None
            key = _read(self.tls_key, "tls_key") if self.tls_key else None
            chain = _read(self.tls_cert, "tls_cert") if self.tls_cert else None
            if self.tls_server_name:
                options.append(("grpc.ssl_target_name_override", self.tls_server_name))
            ch = grpc.secure_channel(address, grpc.ssl_channel_credentials(root, key, chain), options=options)
        else:
            ch = grpc.insecure_channel(address, options=options)
        if self.token_file:
            ch = grpc.intercept_channel(ch, _TokenInterceptor(self.token_file))
        return ch

    def describe(self, address: str) -> str:
        return ("TLS" if self.uses_tls(address) else "plaintext") + (" + token" if self.token_file else "")


class _TokenInterceptor:
    """Adds `authorization: Bearer <token>` to every call; the token file is re-read when it
    changes (a long-lived SDK client survives a token rotation)."""

    def __new__(cls, path: str):
        class Interceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
            def __init__(self):
                self.file = ReloadingFile(path, lambda b: read_client_token_bytes(b, path), "token file")

            def _details(self, d):
                md = [(k, v) for k, v in (d.metadata or ()) if k != "authorization"]
                md.append(("authorization", f"Bearer {self.file.get()}"))
                return _CallDetails(d.method, d.timeout, md, d.credentials, getattr(d, "wait_for_ready", None),
                                    getattr(d, "compression", None))

            def intercept_unary_unary(self, continuation, d, request):
                return continuation(self._details(d), request)

            def intercept_unary_stream(self, continuation, d, request):
                return continuation(self._details(d), request)

        return Interceptor()


def read_client_token_bytes(data: bytes, path: str) -> str:
    for line in data.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            if not _TOKEN.match(line):
                raise SecurityError(f"token_file {path}: the token has spaces or unprintable characters")
            return line
    raise SecurityError(f"token_file {path}: empty (expected the token on one line)")


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


def add_client_flags(p) -> None:
    """The client options every command that dials a tensortrace endpoint takes (show, trace,
    exporterctl, probe-train)."""
    g = p.add_argument_group("connection security (TLS, tokens)")
    g.add_argument("--tls-ca", default="", help=f"CA bundle the server's certificate chains to (${ENV['tls_ca']})")
    g.add_argument("--tls-cert", default="", help=f"client certificate for mTLS (${ENV['tls_cert']})")
    g.add_argument("--tls-key", default="", help=f"its private key (${ENV['tls_key']})")
    g.add_argument("--tls-server-name", default="",
                   help=f"the name in the server's certificate, when dialling another (port-forward) "
                        f"(${ENV['tls_server_name']})")
    g.add_argument("--token-file", default="", help=f"file with the bearer token (${ENV['token_file']})")
    g.add_argument("--tls", action="store_true", help="TLS even to a loopback address (system CA roots unless --tls-ca)")
    g.add_argument("--insecure", action="store_true",
                   help="plaintext even to a non-loopback address (default: TLS there, plaintext to loopback)")


def client_security_from_args(a) -> ClientSecurity:
    return ClientSecurity(a.tls_ca, a.tls_cert, a.tls_key, a.tls_server_name, a.token_file, a.tls,
                          a.insecure).with_env()
