"""A real single-node Apache Kafka broker (KRaft, combined broker + controller) on 127.0.0.1.

Runs the broker from the Maven Central jars that `make kafka-jars` resolves into .cache/kafka-libs
(scripts/kafka/pom.xml). For tests and the demo, never for production.

>>> with LocalKafka() as kafka:            # formats a temp data dir, waits until ready
...     producer = KafkaProducer(bootstrap_servers=kafka.bootstrap)
>>> kafka.stop(); kafka.start()            # same ports, same data: a broker outage

Every failure to start raises LocalKafkaError with one line saying what is wrong (java missing,
jars missing, a port taken, the broker exiting or not ready in time); when the broker itself
failed, the tail of its log is printed to stderr first.
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import glob
import os
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

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_LIBS_DIR = REPO_ROOT / ".cache" / "kafka-libs"
LIBS_ENV = "TENSORTRACE_KAFKA_LIBS"
HOST = "127.0.0.1"


class LocalKafkaError(RuntimeError):
    """The local broker could not be started (or stopped). The message is one line."""


def default_libs_dir() -> str:
    return os.environ.get(LIBS_ENV) or str(DEFAULT_LIBS_DIR)


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

    def validate(self) -> None:
        for name in ("broker_port", "controller_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise LocalKafkaError(f"{name} must be 0 (pick a free one) or 1..65535, got {port}")
        if self.broker_port and self.broker_port == self.controller_port:
            raise LocalKafkaError(f"broker_port and controller_port are both {self.broker_port}")
        if self.ready_timeout_s <= 0 or self.stop_timeout_s <= 0:
            raise LocalKafkaError("ready_timeout_s and stop_timeout_s must be positive")
        if not self.heap or not self.heap[:-1].isdigit() or self.heap[-1].lower() not in "kmg":
            raise LocalKafkaError(f"heap must look like 512m or 1g, got {self.heap!r}")


def broker_properties(broker_port: int, controller_port: int, log_dir: str,
                      extra: dict[str, str] | None = None) -> dict[str, str]:
    """server.properties of a one-node KRaft cluster tuned for a small machine and fast startup."""
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{HOST}:{controller_port}",
        "listeners": f"PLAINTEXT://{HOST}:{broker_port},CONTROLLER://{HOST}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{broker_port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": log_dir,
        "num.partitions": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "auto.create.topics.enable": "true",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "1",  # the first consumer group does not wait for 50
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "group.min.session.timeout.ms": "1000",  # lets tests use short session timeouts
        "num.network.threads": "2",
        "num.io.threads": "2",
        "background.threads": "2",
        "num.recovery.threads.per.data.dir": "1",
        "num.replica.fetchers": "1",
        "log.cleaner.threads": "1",
        "log.retention.check.interval.ms": "3600000",
    }
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


def _stop_all_at_exit() -> None:
    for kafka in list(_live):
        try:
            kafka.close()
        except Exception:
            pass


atexit.register(_stop_all_at_exit)


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


class LocalKafka:
    """One broker process. start() / stop() may be repeated; close() also removes a temp data dir."""

    def __init__(self, config: LocalKafkaConfig | None = None, **overrides):
        config = config or LocalKafkaConfig(**overrides)
        config.validate()
        self.config = config
        self._own_data_dir = config.data_dir is None
        if self._own_data_dir:
            sweep_stale_data_dirs()
        self.data_dir = config.data_dir or tempfile.mkdtemp(prefix=_TEMP_PREFIX)
        os.makedirs(self.data_dir, exist_ok=True)
        if self._own_data_dir:
            _write_pid(os.path.join(self.data_dir, "owner.pid"), os.getpid())
        self.log_path = os.path.join(self.data_dir, "broker.log")
        self.broker_port = config.broker_port
        self.controller_port = config.controller_port
        self.cluster_id: str | None = None
        self._proc: subprocess.Popen | None = None
        self.kind = "local Apache Kafka (KRaft, jars from Maven Central)"

    # -- public surface -------------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        if not self.broker_port:
            raise LocalKafkaError("the broker was never started: no port yet")
        return f"{HOST}:{self.broker_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> "LocalKafka":
        """Start the broker and return once a client can talk to it (idempotent while running)."""
        if self.running:
            return self
        java = self._java()
        classpath = self._classpath()
        self._pick_ports()
        props_path = self._write_config()
        if not os.path.exists(os.path.join(self._log_dir(), "meta.properties")):
            self._format(java, classpath, props_path)
        self._launch(java, classpath, props_path)
        try:
            self._wait_ready()
        except BaseException:  # not ready, or Ctrl-C while waiting: leave no broker behind
            self.stop()
            raise
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
        else:
            _signal_group(proc, signal.SIGKILL)  # any stragglers in its group

    def kill(self) -> None:
        """SIGKILL the broker without a clean shutdown (crash tests). Keeps data."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _live.discard(self)
            _signal_group(proc, signal.SIGKILL)
            proc.wait(10)

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

    def __enter__(self) -> "LocalKafka":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"LocalKafka({HOST}:{self.broker_port or '?'}, {state}, data={self.data_dir})"

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

    def _pick_ports(self) -> None:
        for name in ("broker_port", "controller_port"):
            port = getattr(self, name)
            if port:
                if not port_is_free(port):
                    raise LocalKafkaError(f"port {HOST}:{port} ({name}) is already in use")
            else:
                other = self.controller_port if name == "broker_port" else self.broker_port
                port = free_port()
                while port == other:
                    port = free_port()
                setattr(self, name, port)

    def _log_dir(self) -> str:
        return os.path.join(self.data_dir, "kraft-log")

    def _write_config(self) -> str:
        props = broker_properties(self.broker_port, self.controller_port, self._log_dir(),
                                  self.config.extra_properties)
        path = os.path.join(self.data_dir, "server.properties")
        with open(path, "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in props.items())
        for name, text in (("log4j.properties", _LOG4J), ("log4j2.properties", _LOG4J2)):
            with open(os.path.join(self.data_dir, name), "w") as f:
                f.write(text)
        return path

    def _jvm(self, java: str, classpath: str, heap: str) -> list[str]:
        return [java, f"-Xmx{heap}", "-Xms64m", *_JVM_FLAGS,
                f"-Dlog4j.configuration=file:{os.path.join(self.data_dir, 'log4j.properties')}",
                f"-Dlog4j2.configurationFile={os.path.join(self.data_dir, 'log4j2.properties')}",
                "-cp", classpath]

    def _format(self, java: str, classpath: str, props_path: str) -> None:
        self.cluster_id = random_cluster_id()
        cmd = self._jvm(java, classpath, "256m") + [
            "kafka.tools.StorageTool", "format", "-t", self.cluster_id, "-c", props_path]
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
        cmd = self._jvm(java, classpath, self.config.heap) + ["kafka.Kafka", props_path]
        log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.data_dir, start_new_session=True,
                preexec_fn=_die_with_parent if self.config.die_with_parent else None)
        finally:
            log.close()
        _live.add(self)
        if self._own_data_dir:
            _write_pid(os.path.join(self.data_dir, "broker.pid"), self._proc.pid)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.ready_timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                _live.discard(self)
                self._print_tail()
                raise LocalKafkaError(
                    f"Kafka broker exited with code {code} during startup (log: {self.log_path})")
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                self._print_tail()
                raise LocalKafkaError(
                    f"Kafka broker on {self.bootstrap} not ready after {self.config.ready_timeout_s:.0f}s "
                    f"(log: {self.log_path})")
            if _accepts_connections(self.broker_port) and _metadata_ok(self.bootstrap, min(left, 10.0)):
                return
            time.sleep(0.2)

    def _print_tail(self) -> None:
        tail = self.log_tail()
        if tail:
            print(f"--- last lines of {self.log_path} ---\n{tail}\n---", file=sys.stderr)


_TEMP_PREFIX = "tensortrace-kafka-"


def _write_pid(path: str, pid: int) -> None:
    with open(path, "w") as f:
        f.write(str(pid))


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
    owner process and broker process are both gone. Returns what it removed."""
    parent = parent or tempfile.gettempdir()
    removed = []
    for d in glob.glob(os.path.join(parent, _TEMP_PREFIX + "*")):
        owner = os.path.join(d, "owner.pid")
        if not os.path.exists(owner):
            continue  # not ours to judge (an older layout, or being created right now)
        if _pid_alive(owner) or _pid_alive(os.path.join(d, "broker.pid")):
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


def _metadata_ok(bootstrap: str, timeout_s: float) -> bool:
    """True when the broker answers a cluster metadata request and is unfenced.

    Runs in a daemon thread with a deadline: a client stuck on a half-started broker must not
    hang start() past its timeout.
    """
    result: list[bool] = []

    def probe() -> None:
        from kafka import KafkaAdminClient

        admin = None
        try:
            ms = int(max(timeout_s, 1.0) * 1000)
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, bootstrap_timeout_ms=ms,
                                     request_timeout_ms=ms, client_id="tensortrace-devkafka-ready")
            cluster = admin.describe_cluster()
            result.append(any(not b.get("is_fenced", False) for b in cluster.get("brokers", [])))
        except Exception:
            result.append(False)
        finally:
            if admin is not None:
                try:
                    admin.close()
                except Exception:
                    pass

    t = threading.Thread(target=probe, name="devkafka-ready-probe", daemon=True)
    t.start()
    t.join(timeout_s + 1.0)
    return bool(result and result[0])
