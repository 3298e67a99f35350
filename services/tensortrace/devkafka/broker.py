"""A real single-node Apache Kafka broker (KRaft, combined broker + controller) on 127.0.0.1.

Runs the broker from the Maven Central jars that `make kafka-jars` resolves into .cache/kafka-libs
(scripts/kafka/pom.xml). For tests and the demo, never for production.

    with LocalKafka() as kafka:            # formats a temp data dir, waits until ready
        producer = KafkaProducer(bootstrap_servers=kafka.bootstrap)
    kafka.stop(); kafka.start()            # same ports, same data: a broker outage

    with LocalKafka(security="SASL_SSL") as kafka:   # + a SASL_SSL listener (SCRAM-SHA-512/256, PLAIN)
        kc = kafka.client_config()                   # a tensortrace.service.kafka.KafkaConfig for it
        KafkaProducer(**kc.client_kwargs())

`.bootstrap` is always the PLAINTEXT listener (inter-broker traffic and test setup); with
security="SASL_SSL" the SASL_SSL listener is `.secure_bootstrap`, with certificates made at start
by keytool (devkafka/tls.py) and a SCRAM user created when the data dir is formatted.
A three-node cluster from the same jars: `LocalKafkaCluster` (devkafka/cluster.py).

Every failure to start raises LocalKafkaError with one line saying what is wrong (java missing,
jars missing, a port taken, the broker exiting or not ready in time); when the broker itself
failed, the tail of its log is printed to stderr first.
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import glob
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_LIBS_DIR = REPO_ROOT / ".cache" / "kafka-libs"
LIBS_ENV = "TENSORTRACE_KAFKA_LIBS"
CDS_ENV = "TENSORTRACE_KAFKA_CDS"  # "0": never use or write the JVM class-data archive
HOST = "127.0.0.1"
SECURITY_MODES = ("PLAINTEXT", "SASL_SSL")
SCRAM_MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256")
SASL_MECHANISMS = (*SCRAM_MECHANISMS, "PLAIN")   # what the SASL_SSL listener accepts
SECURE_LISTENER = "SASL_SSL"


class LocalKafkaError(RuntimeError):
    """The local broker could not be started (or stopped). The message is one line."""


def default_libs_dir() -> str:
    return os.environ.get(LIBS_ENV) or str(DEFAULT_LIBS_DIR)


# Characters that would break the JAAS line (quotes) or the --add-scram argument ([name=..,password=..]).
_SECRET_OK = re.compile(r"^[A-Za-z0-9._~+/@%^*()!?:-]+$")


@dataclass
class LocalKafkaConfig:
    """How to run the broker. Ports 0 mean: pick a free one on start."""

    libs_dir: str = field(default_factory=default_libs_dir)
    java: str = "java"
    broker_port: int = 0
    controller_port: int = 0
    data_dir: str | None = None  # None: a fresh temp dir, removed by close()
    heap: str = "512m"
    ready_timeout_s: float = 60.0
    stop_timeout_s: float = 20.0
    # The broker dies with the process that started it (Linux PR_SET_PDEATHSIG), so a killed
    # test run cannot leave a broker behind. Start it from a thread that lives as long as it.
    die_with_parent: bool = True
    extra_properties: dict[str, str] = field(default_factory=dict)
    # "SASL_SSL": one more listener (SASL over TLS: SCRAM-SHA-512, SCRAM-SHA-256, PLAIN) with
    # certificates made by keytool at start, and the user below (SCRAM credentials written when
    # the data dir is formatted). The PLAINTEXT listener stays (inter-broker, test setup).
    security: str = "PLAINTEXT"
    secure_port: int = 0
    sasl_username: str = "tensortrace"
    sasl_password: str = ""  # "": the one stored in data_dir by an earlier run, else a random one
    # Keep a JVM class-data-sharing archive of the broker's classes next to the jars
    # (<libs_dir>/.cds/, written once by the first broker that stops cleanly): a later start
    # loads ~1 s less on a small machine. Off with TENSORTRACE_KAFKA_CDS=0.
    class_data_sharing: bool = True

    def validate(self) -> None:
        for name in ("broker_port", "controller_port", "secure_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise LocalKafkaError(f"{name} must be 0 (pick a free one) or 1..65535, got {port}")
        if self.broker_port and self.broker_port == self.controller_port:
            raise LocalKafkaError(f"broker_port and controller_port are both {self.broker_port}")
        if self.secure_port and self.secure_port in (self.broker_port, self.controller_port):
            raise LocalKafkaError(f"secure_port {self.secure_port} is also the broker or controller port")
        if self.ready_timeout_s <= 0 or self.stop_timeout_s <= 0:
            raise LocalKafkaError("ready_timeout_s and stop_timeout_s must be positive")
        if not self.heap or not self.heap[:-1].isdigit() or self.heap[-1].lower() not in "kmg":
            raise LocalKafkaError(f"heap must look like 512m or 1g, got {self.heap!r}")
        if self.security not in SECURITY_MODES:
            raise LocalKafkaError(f"security must be one of {', '.join(SECURITY_MODES)}, got {self.security!r}")
        if self.secure_port and self.security == "PLAINTEXT":
            raise LocalKafkaError("secure_port is set but security is PLAINTEXT (no SASL_SSL listener)")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.sasl_username or ""):
            raise LocalKafkaError(f"sasl_username must be letters, digits, '.', '_' or '-', got {self.sasl_username!r}")
        if self.sasl_password and not _SECRET_OK.match(self.sasl_password):
            raise LocalKafkaError("sasl_password may not contain quotes, commas, brackets, '=', spaces or backslashes")


def broker_properties(broker_port: int, controller_port: int, log_dir: str,
                      extra: dict[str, str] | None = None, *, node_id: int = 1, voters: str | None = None,
                      replication: int = 1, secure_port: int = 0, keystore: str = "",
                      keystore_password: str = "", plain_users: dict[str, str] | None = None) -> dict[str, str]:
    """server.properties of a KRaft node (broker + controller) tuned for a small machine and fast
    startup. One node by default; `voters` ("1@host:port,2@...") and `replication` (3) make it a
    member of a local cluster; `secure_port` adds a SASL_SSL listener (then `keystore`,
    `keystore_password` and `plain_users` for the PLAIN mechanism are needed)."""
    min_isr = "2" if replication >= 3 else "1"
    rf = str(replication)
    listeners = [f"PLAINTEXT://{HOST}:{broker_port}"]
    advertised = [f"PLAINTEXT://{HOST}:{broker_port}"]
    protocol_map = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
    if secure_port:
        listeners.append(f"{SECURE_LISTENER}://{HOST}:{secure_port}")
        advertised.append(f"{SECURE_LISTENER}://{HOST}:{secure_port}")
        protocol_map.append(f"{SECURE_LISTENER}:SASL_SSL")
    listeners.append(f"CONTROLLER://{HOST}:{controller_port}")
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.voters": voters or f"{node_id}@{HOST}:{controller_port}",
        "listeners": ",".join(listeners),
        "advertised.listeners": ",".join(advertised),
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": ",".join(protocol_map),
        "log.dirs": log_dir,
        "num.partitions": "1",
        "default.replication.factor": rf,
        "min.insync.replicas": min_isr,
        "auto.create.topics.enable": "true",
        "offsets.topic.replication.factor": rf,
        "offsets.topic.num.partitions": "1",  # the first consumer group does not wait for 50
        "transaction.state.log.replication.factor": rf,
        "transaction.state.log.min.isr": min_isr,
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": rf,
        "share.coordinator.state.topic.min.isr": min_isr,
        "group.initial.rebalance.delay.ms": "0",
        "group.min.session.timeout.ms": "1000",  # lets tests use short session timeouts
        # The broker is unfenced on a heartbeat answer once it has caught up: beat often.
        "broker.heartbeat.interval.ms": "500",
        "num.network.threads": "2",
        "num.io.threads": "2",
        "background.threads": "2",
        "num.recovery.threads.per.data.dir": "1",
        "num.replica.fetchers": "1",
        "log.cleaner.threads": "1",
        "log.retention.check.interval.ms": "3600000",
    }
    if replication > 1:
        # A SIGKILLed node is fenced (its partitions get new leaders) 4 s after its last heartbeat
        # instead of 9 s; replicas of a restarted node rejoin the ISR as soon as they caught up.
        props["broker.session.timeout.ms"] = "4000"
    if secure_port:
        props.update({
            "sasl.enabled.mechanisms": ",".join(SASL_MECHANISMS),
            f"listener.name.{SECURE_LISTENER.lower()}.ssl.keystore.type": "PKCS12",
            f"listener.name.{SECURE_LISTENER.lower()}.ssl.keystore.location": keystore,
            f"listener.name.{SECURE_LISTENER.lower()}.ssl.keystore.password": keystore_password,
            f"listener.name.{SECURE_LISTENER.lower()}.ssl.key.password": keystore_password,
            f"listener.name.{SECURE_LISTENER.lower()}.ssl.client.auth": "none",
        })
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        for mech in SCRAM_MECHANISMS:
            props[f"listener.name.{SECURE_LISTENER.lower()}.{mech.lower()}.sasl.jaas.config"] = scram
        users = " ".join(f'user_{u}="{p}"' for u, p in (plain_users or {}).items())
        props[f"listener.name.{SECURE_LISTENER.lower()}.plain.sasl.jaas.config"] = (
            f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};")
    props.update(extra or {})
    return props


_LOG4J = """\
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.org.apache.kafka.controller.EventPerformanceMonitor=WARN
log4j.logger.org.apache.kafka.controller.PeriodicTaskControlManager=WARN
"""
# Some Kafka classes touch the log4j2 API directly; give it a config so it does not complain.
_LOG4J2 = """\
status = error
appender.console.type = Console
appender.console.name = stdout
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.stdout.ref = stdout
"""

_JVM_FLAGS = [
    "-XX:+UseSerialGC",          # two cores: no parallel GC threads fighting the tests
    "-XX:TieredStopAtLevel=1",   # C1 only: faster startup, plenty for test traffic
    "-XX:-UsePerfData",
    "-Djava.awt.headless=true",
]

_FORMAT_TIMEOUT_S = 120

_live: "weakref.WeakSet[LocalKafka]" = weakref.WeakSet()


def _close_all_at_exit(live: weakref.WeakSet) -> None:
    """close() every object still in `live`, ignoring errors (an atexit hook; cluster.py has one too)."""
    for obj in list(live):
        try:
            obj.close()
        except Exception:
            pass


atexit.register(_close_all_at_exit, _live)


def random_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding (Kafka's Uuid form)."""
    while True:
        cid = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
        if not cid.startswith("-"):  # Kafka refuses ids that look like a command-line flag
            return cid


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def free_ports(n: int, taken: set[int] | None = None) -> list[int]:
    """n distinct free ports on 127.0.0.1 (none of them in `taken`)."""
    out: list[int] = []
    taken = set(taken or ())
    while len(out) < n:
        p = free_port()
        if p not in taken and p not in out:
            out.append(p)
    return out


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR: a port in TIME_WAIT (our own broker just stopped) counts as free,
        # a port someone listens on does not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel to SIGTERM it when we die.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


PASSWORD_FILE = "sasl-password"  # in the (top) data dir, 0600: what client_config() hands to clients


def sasl_password_for(data_dir: str, config: LocalKafkaConfig) -> str:
    """The SCRAM/PLAIN user's password: the configured one, else the one a previous run stored in
    `data_dir` (its SCRAM credentials are in the formatted metadata), else a new random one, stored."""
    path = os.path.join(data_dir, PASSWORD_FILE)
    if config.sasl_password:
        password = config.sasl_password
    elif os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            password = f.read().strip()
    else:
        password = secrets.token_urlsafe(18)
    write_secret(path, password)
    return password


def write_secret(path: str, text: str) -> str:
    """Write `text` to a new 0600 file (for password files handed to clients)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.chmod(path, 0o600)
    return path


_W = TypeVar("_W", bound="_StartedInWith")


class _StartedInWith:
    """`with X() as x:` starts x and closes it at the end, or at once when start() fails
    (LocalKafka and LocalKafkaCluster)."""

    def __enter__(self: _W) -> _W:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


class LocalKafka(_StartedInWith):
    """One broker process. start() / stop() may be repeated; close() also removes a temp data dir.

    Also one node of a LocalKafkaCluster (`cluster.brokers[i]`): then `start()` restarts just this
    node on the same ports and data and returns once the cluster sees it unfenced.
    """

    def __init__(self, config: LocalKafkaConfig | None = None, **overrides):
        config = config or LocalKafkaConfig(**overrides)
        config.validate()
        self.config = config
        self.data_dir, self._own_data_dir = _open_data_dir(config)
        self.log_path = os.path.join(self.data_dir, "broker.log")
        self.broker_port = config.broker_port
        self.controller_port = config.controller_port
        self.secure_port = config.secure_port
        self.cluster_id: str | None = None
        self.sasl_username = config.sasl_username
        self.sasl_password = sasl_password_for(self.data_dir, config) if self.secure else ""
        self.tls = None  # devkafka.tls.DevTLS once made (security="SASL_SSL")
        self.node_id = 1
        self._cluster = None  # the LocalKafkaCluster this node belongs to, if any
        self._proc: subprocess.Popen | None = None
        self._cds_dump: tuple[str, str] | None = None  # (temp archive, final archive) being written
        self.kind = "local Apache Kafka (KRaft, jars from Maven Central)"
        self.last_start_s: float | None = None  # seconds the last start() took

    # -- public surface -------------------------------------------------------------------
    @property
    def secure(self) -> bool:
        return self.config.security == "SASL_SSL"

    @property
    def bootstrap(self) -> str:
        """The PLAINTEXT listener: host:port."""
        if not self.broker_port:
            raise LocalKafkaError("the broker was never started: no port yet")
        return f"{HOST}:{self.broker_port}"

    @property
    def secure_bootstrap(self) -> str:
        """The SASL_SSL listener (security="SASL_SSL" only): host:port."""
        if not self.secure:
            raise LocalKafkaError("this broker has no SASL_SSL listener (start it with security='SASL_SSL')")
        if not self.secure_port:
            raise LocalKafkaError("the broker was never started: no port yet")
        return f"{HOST}:{self.secure_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def client_config(self, mechanism: str = "SCRAM-SHA-512", **overrides):
        """A tensortrace.service.kafka.KafkaConfig for this broker: with security="SASL_SSL" its
        SASL_SSL listener, `mechanism` (SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN), the user, a 0600
        password file in the data dir and the PEM CA; else the PLAINTEXT listener. `overrides`
        replace fields (e.g. sasl_password_file=... with a wrong password)."""
        if self._cluster is not None:
            return self._cluster.client_config(mechanism, **overrides)
        return _client_config(self.bootstrap, self.secure and self.secure_bootstrap, self.data_dir,
                              self.sasl_username, self.sasl_password, self.tls, mechanism, overrides)

    def start(self) -> "LocalKafka":
        """Start the broker and return once a client can talk to it (idempotent while running)."""
        if self.running:
            return self
        if self._cluster is not None and (not self._cluster._formatted() or (self.secure and self.tls is None)):
            raise LocalKafkaError("start the cluster (LocalKafkaCluster.start()) before one of its brokers")
        t0 = time.monotonic()
        java = self._java()
        classpath = self._classpath()
        self._pick_ports()
        tls_job = None
        if self.secure and self.tls is None:  # keytool runs while the data dir is formatted
            tls_job = TLSJob(os.path.join(self.data_dir, "tls"), self.config.java)
            self.tls = tls_job.tls
        try:
            props_path = self._write_config()
            if not os.path.exists(os.path.join(self._log_dir(), "meta.properties")):
                self._format(java, classpath, props_path)
        finally:
            if tls_job is not None:
                try:
                    tls_job.result()
                except BaseException:
                    self.tls = None
                    raise
        self._launch(java, classpath, props_path)
        try:
            self._wait_ready(time.monotonic() + self.config.ready_timeout_s)
        except BaseException:  # not ready, or Ctrl-C while waiting: leave no broker behind
            self.stop()
            raise
        self.last_start_s = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Stop the broker (SIGTERM to its process group, SIGKILL after stop_timeout_s). Keeps data."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        _live.discard(self)
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(self.config.stop_timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(10)
                self._end_cds_dump(keep=False)
        else:
            _signal_group(proc, signal.SIGKILL)  # any stragglers in its group
        self._end_cds_dump(keep=proc.returncode is not None and proc.returncode != -signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the broker without a clean shutdown (crash tests). Keeps data."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _live.discard(self)
            _signal_group(proc, signal.SIGKILL)
            proc.wait(10)
            self._end_cds_dump(keep=False)

    def close(self) -> None:
        """Stop, and remove the data dir if this object created it."""
        self.stop()
        if self._own_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 256 * lines))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        node = f"node {self.node_id}, " if self._cluster is not None else ""
        return f"LocalKafka({node}{HOST}:{self.broker_port or '?'}, {state}, data={self.data_dir})"

    # -- steps of start() -----------------------------------------------------------------
    def _java(self) -> str:
        java = shutil.which(self.config.java)
        if java is None:
            raise LocalKafkaError(
                f"{self.config.java} not found on PATH (need Java 17+ to run the local Kafka broker)")
        return java

    def _classpath(self) -> str:
        libs = self.config.libs_dir
        if not glob.glob(os.path.join(libs, "kafka_2.13-*.jar")) or not glob.glob(
                os.path.join(libs, "kafka-clients-*.jar")):
            raise LocalKafkaError(f"Kafka broker jars not found in {libs}: run `make kafka-jars`")
        return os.path.join(os.path.abspath(libs), "*")

    def _port_names(self) -> tuple[str, ...]:
        return ("broker_port", "controller_port", "secure_port") if self.secure else ("broker_port", "controller_port")

    def _pick_ports(self) -> None:
        names = self._port_names()
        for name in names:
            port = getattr(self, name)
            if port:
                if not port_is_free(port):
                    raise LocalKafkaError(f"port {HOST}:{port} ({name}) is already in use")
        for name in names:
            if not getattr(self, name):
                others = {getattr(self, n) for n in names if n != name}
                setattr(self, name, free_ports(1, others)[0])

    def _log_dir(self) -> str:
        return os.path.join(self.data_dir, "kraft-log")

    def _properties(self) -> dict[str, str]:
        c = self._cluster
        kw = {}
        if self.secure:
            kw = dict(secure_port=self.secure_port, keystore=self.tls.keystore, keystore_password=self.tls.password,
                      plain_users={self.sasl_username: self.sasl_password})
        return broker_properties(self.broker_port, self.controller_port, self._log_dir(),
                                 self.config.extra_properties, node_id=self.node_id,
                                 voters=c.voters if c is not None else None,
                                 replication=len(c.brokers) if c is not None else 1, **kw)

    def _write_config(self) -> str:
        props = self._properties()
        path = os.path.join(self.data_dir, "server.properties")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold passwords
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in props.items())
        for name, text in (("log4j.properties", _LOG4J), ("log4j2.properties", _LOG4J2)):
            with open(os.path.join(self.data_dir, name), "w") as f:
                f.write(text)
        return path

    def _jvm(self, java: str, classpath: str, heap: str, cds: bool = False) -> list[str]:
        return [java, f"-Xmx{heap}", "-Xms64m", *_JVM_FLAGS, *self._cds_flags(java, dump=cds),
                f"-Dlog4j.configuration=file:{os.path.join(self.data_dir, 'log4j.properties')}",
                f"-Dlog4j2.configurationFile={os.path.join(self.data_dir, 'log4j2.properties')}",
                "-cp", classpath]

    def _format(self, java: str, classpath: str, props_path: str, cluster_id: str | None = None) -> None:
        self.cluster_id = cluster_id or random_cluster_id()
        cmd = self._jvm(java, classpath, "256m") + [
            "kafka.tools.StorageTool", "format", "-t", self.cluster_id, "-c", props_path]
        if self.secure:
            for mech in SCRAM_MECHANISMS:
                cmd += ["--add-scram", f"{mech}=[name={self.sasl_username},password={self.sasl_password}]"]
        try:
            with open(self.log_path, "ab") as log:
                r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir,
                                   timeout=_FORMAT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._print_tail()
            raise LocalKafkaError(f"formatting the Kafka data dir {self._log_dir()} took over "
                                  f"{_FORMAT_TIMEOUT_S}s (log: {self.log_path})") from None
        if r.returncode != 0:
            self._print_tail()
            raise LocalKafkaError(f"formatting the Kafka data dir {self._log_dir()} failed "
                                  f"(exit {r.returncode}; log: {self.log_path})")

    def _launch(self, java: str, classpath: str, props_path: str) -> None:
        cmd = self._jvm(java, classpath, self.config.heap, cds=True) + ["kafka.Kafka", props_path]
        log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.data_dir, start_new_session=True,
                preexec_fn=_die_with_parent if self.config.die_with_parent else None)
        except BaseException:
            self._end_cds_dump(keep=False)
            raise
        finally:
            log.close()
        _live.add(self)
        if self._own_data_dir or self._cluster is not None:
            _write_pid(os.path.join(self.data_dir, "broker.pid"), self._proc.pid)

    def _wait_ready(self, deadline: float) -> None:
        while True:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                _live.discard(self)
                self._end_cds_dump(keep=False)
                self._print_tail()
                raise LocalKafkaError(
                    f"Kafka broker{self._which()} exited with code {code} during startup (log: {self.log_path})")
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                self._print_tail()
                raise LocalKafkaError(
                    f"Kafka broker{self._which()} on {self.bootstrap} not ready after "
                    f"{self.config.ready_timeout_s:.0f}s (log: {self.log_path})")
            if (_accepts_connections(self.broker_port)
                    and (not self.secure or _accepts_connections(self.secure_port))
                    and _metadata_ok(self.bootstrap, min(left, 10.0),
                                     self.node_id if self._cluster is not None else None)):
                return
            time.sleep(0.2)

    def _which(self) -> str:
        return f" {self.node_id}" if self._cluster is not None else ""

    def _print_tail(self) -> None:
        tail = self.log_tail()
        if tail:
            print(f"--- last lines of {self.log_path} ---\n{tail}\n---", file=sys.stderr)

    # -- JVM class-data sharing -------------------------------------------------------------
    def _cds_flags(self, java: str, dump: bool) -> list[str]:
        """-XX:SharedArchiveFile when an archive for these jars and this JVM exists; when none does
        and `dump`, this broker writes one at its clean exit (-XX:ArchiveClassesAtExit, to a temp
        name renamed by stop()); at most one writer at a time (a lock file)."""
        if not self.config.class_data_sharing or os.environ.get(CDS_ENV, "") == "0":
            return []
        try:
            archive = _cds_archive_path(java, self.config.libs_dir)
        except OSError:
            return []
        quiet = "-Xlog:cds=off,cds+dynamic=off"  # CDS warnings (old class files it skips) are noise
        if os.path.exists(archive):
            return [f"-XX:SharedArchiveFile={archive}", quiet]
        if not dump or self._cds_dump is not None:
            return []
        lock = archive + ".lock"
        try:
            os.makedirs(os.path.dirname(archive), exist_ok=True)
            _remove_stale_cds_files(os.path.dirname(archive))
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError:
            return []  # not writable, or someone else is writing it
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        tmp = f"{archive}.{os.getpid()}.tmp"
        self._cds_dump = (tmp, archive)
        return [f"-XX:ArchiveClassesAtExit={tmp}", quiet]

    def _end_cds_dump(self, keep: bool) -> None:
        dump, self._cds_dump = self._cds_dump, None
        if dump is None:
            return
        tmp, archive = dump
        try:
            if keep and os.path.getsize(tmp) > 0:
                os.replace(tmp, archive)
                for old in glob.glob(os.path.join(os.path.dirname(archive), "kafka-*.jsa")):
                    if old != archive:  # made for other jars or another JVM: never used again
                        os.unlink(old)
        except OSError:
            pass
        for p in (tmp, archive + ".lock"):
            try:
                os.unlink(p)
            except OSError:
                pass


def _cds_archive_path(java: str, libs_dir: str) -> str:
    """<libs_dir>/.cds/kafka-<key>.jsa; the key changes with the JVM and with the jars."""
    h = hashlib.sha256()
    real_java = os.path.realpath(java)
    st = os.stat(real_java)
    h.update(f"{real_java}:{st.st_size}:{st.st_mtime_ns}".encode())
    for jar in sorted(glob.glob(os.path.join(libs_dir, "*.jar"))):
        st = os.stat(jar)
        h.update(f"{os.path.basename(jar)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return os.path.join(os.path.abspath(libs_dir), ".cds", f"kafka-{h.hexdigest()[:16]}.jsa")


def _remove_stale_cds_files(directory: str) -> None:
    """Temp archives and locks whose writer process is gone (a killed test run)."""
    for path in glob.glob(os.path.join(directory, "*.jsa.*.tmp")) + glob.glob(os.path.join(directory, "*.jsa.lock")):
        try:
            if path.endswith(".tmp"):
                pid = int(path.rsplit(".", 2)[-2])
            else:
                with open(path) as f:
                    pid = int(f.read().strip() or 0)
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError, FileNotFoundError):
            try:
                os.unlink(path)
            except OSError:
                pass
        except (PermissionError, OSError):
            pass


class TLSJob:
    """make_dev_tls in a background thread; `.tls` (paths, password) is known at once."""

    def __init__(self, directory: str, java: str):
        from tensortrace.devkafka.tls import plan_dev_tls

        self.tls = plan_dev_tls(directory)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(java,), name="devkafka-keytool", daemon=True)
        self._thread.start()

    def _run(self, java: str) -> None:
        from tensortrace.devkafka.tls import make_dev_tls

        try:
            make_dev_tls(self.tls.directory, java=java, hosts=self.tls.hosts, password=self.tls.password)
        except BaseException as e:  # handed to result()
            self._error = e

    def result(self):
        from tensortrace.devkafka.tls import DevTLSError

        self._thread.join()
        if isinstance(self._error, DevTLSError):
            raise LocalKafkaError(f"TLS material for the SASL_SSL listener: {self._error}") from None
        if self._error is not None:
            raise self._error
        return self.tls


def _client_config(bootstrap: str, secure_bootstrap, secret_dir: str, username: str, password: str,
                   tls, mechanism: str, overrides: dict):
    from tensortrace.service.kafka import KafkaConfig

    if not secure_bootstrap:
        return KafkaConfig(bootstrap_servers=bootstrap, **overrides)
    if mechanism not in SASL_MECHANISMS:
        raise LocalKafkaError(f"mechanism must be one of {', '.join(SASL_MECHANISMS)}, got {mechanism!r}")
    path = write_secret(os.path.join(secret_dir, PASSWORD_FILE), password)
    kw = dict(bootstrap_servers=secure_bootstrap, security_protocol="SASL_SSL", sasl_mechanism=mechanism,
              sasl_username=username, sasl_password_file=path, ssl_cafile=tls.ca_pem if tls else "")
    kw.update(overrides)
    return KafkaConfig(**kw)


_TEMP_PREFIX = "tensortrace-kafka-"


def _write_pid(path: str, pid: int) -> None:
    with open(path, "w") as f:
        f.write(str(pid))


def _open_data_dir(config: LocalKafkaConfig) -> tuple[str, bool]:
    """(data dir, own): config.data_dir (made if missing), or a fresh temp dir that this process
    owns (owner.pid in it, for sweep_stale_data_dirs; stale ones of dead owners swept first)."""
    own = config.data_dir is None
    if own:
        sweep_stale_data_dirs()
    data_dir = config.data_dir or tempfile.mkdtemp(prefix=_TEMP_PREFIX)
    os.makedirs(data_dir, exist_ok=True)
    if own:
        _write_pid(os.path.join(data_dir, "owner.pid"), os.getpid())
    return data_dir, own


def _pid_alive(path: str) -> bool:
    try:
        with open(path) as f:
            os.kill(int(f.read().strip() or 0), 0)
    except FileNotFoundError:
        return False
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # exists, someone else's
    return True


def sweep_stale_data_dirs(parent: str | None = None) -> list[str]:
    """Remove temp data dirs left by killed owners (e.g. a SIGKILLed test run): only dirs whose
    owner process and broker processes (a cluster's: one per node dir) are all gone. Returns what
    it removed."""
    parent = parent or tempfile.gettempdir()
    removed = []
    for d in glob.glob(os.path.join(parent, _TEMP_PREFIX + "*")):
        owner = os.path.join(d, "owner.pid")
        if not os.path.exists(owner):
            continue  # not ours to judge (an older layout, or being created right now)
        brokers = [os.path.join(d, "broker.pid"), *glob.glob(os.path.join(d, "*", "broker.pid"))]
        if _pid_alive(owner) or any(_pid_alive(b) for b in brokers):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the broker leads its own group
    except (ProcessLookupError, PermissionError):
        pass


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


def _metadata_ok(bootstrap: str, timeout_s: float, node_id: int | None = None,
                 brokers: int | None = None) -> bool:
    """True when the broker answers a cluster metadata request and is unfenced: any broker (one
    node), broker `node_id` (a cluster member), or at least `brokers` unfenced ones.

    Runs in a daemon thread with a deadline: a client stuck on a half-started broker must not
    hang start() past its timeout.
    """
    result: list[bool] = []

    def probe() -> None:
        from tensortrace.service.kafka import describe_cluster

        try:
            cluster = describe_cluster(dict(bootstrap_servers=bootstrap, client_id="tensortrace-devkafka-ready"),
                                       int(max(timeout_s, 1.0) * 1000))
            unfenced = {b.get("broker_id") for b in cluster.get("brokers", []) if not b.get("is_fenced", False)}
            if node_id is not None:
                ok = node_id in unfenced
            else:
                ok = len(unfenced) >= (brokers or 1)
            result.append(ok)
        except Exception:
            result.append(False)

    t = threading.Thread(target=probe, name="devkafka-ready-probe", daemon=True)
    t.start()
    t.join(timeout_s + 1.0)
    return bool(result and result[0])
