"""One Kafka client configuration for every service: the exporter (producer), the consumers
(loader, bridge, probes) and the demo.

>>> kc = KafkaConfig(bootstrap_servers="kafka-0:9093,kafka-1:9093", security_protocol="SASL_SSL",
...                  sasl_mechanism="SCRAM-SHA-512", sasl_username="tensortrace",
...                  sasl_password_file="/var/run/secrets/kafka/password", ssl_cafile="/etc/kafka/ca.pem")
>>> KafkaConsumer(**kc.client_kwargs(), group_id="g")      # also KafkaProducer, KafkaAdminClient

No production Kafka is open, so SASL (PLAIN, SCRAM-SHA-256/512) and TLS (server CA, client
certificate for mTLS) are first-class. Secrets never come from the command line (they would show
in `ps` and in the pod spec): the password is read from `sasl_password_file` or, when that is
empty, from the environment variable named by `sasl_password_env` (a Kubernetes Secret mounted as a
file or injected as env).
"""

from __future__ import annotations

import os
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
                if not os.path.isfile(self.sasl_password_file):
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

    def describe(self) -> str:
        """Where and how this client connects, for error messages (never the password)."""
        who = f" as {self.sasl_username!r} ({self.sasl_mechanism})" if self.sasl else ""
        return f"{self.security_protocol} listener {self.bootstrap_servers}{who}"
