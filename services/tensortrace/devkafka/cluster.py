"""A real three-node Apache Kafka cluster on 127.0.0.1 (KRaft), from the same jars as LocalKafka.

    with LocalKafkaCluster() as kafka:                # 3 nodes, each broker + controller
        kafka.bootstrap                               # "127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3"
        kafka.brokers[1].kill()                       # SIGKILL one node (the quorum of 3 keeps 2)
        kafka.brokers[1].start()                      # same ports, same data; back once unfenced
    LocalKafkaCluster(security="SASL_SSL").client_config()   # KafkaConfig for the SASL_SSL listeners

Topology: N combined broker+controller nodes with a static controller quorum of all N (three
JVMs, not four: the fastest to start on a small machine, and any single node may die). Topic
defaults for tests: default.replication.factor=N, min.insync.replicas=2 (N >= 3), the offsets,
transaction and share-state topics replicated N times with min ISR 2.

Start: ports for every node are picked, the first node's data dir is formatted by Kafka's
StorageTool (with the SCRAM user when security="SASL_SSL", while keytool makes the certificates)
and its output is copied to the other nodes with their own meta.properties (node.id, a fresh
directory.id, the same cluster.id) — one formatting JVM instead of N; then all nodes are
launched at once and start() returns when every one is registered and unfenced.

Each node is a LocalKafka (`.brokers[i]`, node id i + 1): `.kill()`, `.stop()`, `.start()`,
`.running`, `.log_path`. Start and restart nodes from a thread that outlives them (the main
thread): a broker dies with the thread that started it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import atexit
import dataclasses
import glob
import os
import shutil
import signal
import subprocess
import time
import weakref

from tensortrace.devkafka.broker import (
    HOST,
    _StartedInWith,
    LocalKafka,
    LocalKafkaConfig,
    LocalKafkaError,
    TLSJob,
    _client_config,
    _close_all_at_exit,
    _live,
    _metadata_ok,
    _open_data_dir,
    _signal_group,
    free_ports,
    random_cluster_id,
    sasl_password_for,
)

DEFAULT_CLUSTER_HEAP = "320m"

_live_clusters: "weakref.WeakSet[LocalKafkaCluster]" = weakref.WeakSet()

# Registered after broker.py's hook, so it runs first: a temp cluster is killed and its dir
# removed at once, instead of each node stopping gracefully on its own.
atexit.register(_close_all_at_exit, _live_clusters)


class LocalKafkaCluster(_StartedInWith):
    """N local Kafka nodes (default 3). start() / stop() may be repeated; close() also removes a
    temp data dir. Config fields as LocalKafkaConfig (heap is per node, default 320m); the ports
    are picked per node and must stay 0."""

    def __init__(self, brokers: int = 3, config: LocalKafkaConfig | None = None, **overrides):
        overrides.setdefault("heap", DEFAULT_CLUSTER_HEAP)
        overrides.setdefault("ready_timeout_s", 120.0)
        config = config or LocalKafkaConfig(**overrides)
        config.validate()
        if brokers < 1:
            raise LocalKafkaError(f"brokers must be at least 1, got {brokers}")
        if config.broker_port or config.controller_port or config.secure_port:
            raise LocalKafkaError("a LocalKafkaCluster picks every node's ports itself: leave the ports 0")
        self.config = config
        self.data_dir, self._own_data_dir = _open_data_dir(config)
        self.sasl_username = config.sasl_username
        secure = config.security == "SASL_SSL"
        self.sasl_password = sasl_password_for(self.data_dir, config) if secure else ""
        self.cluster_id: str | None = None
        self.tls = None
        self.brokers: list[LocalKafka] = []
        for i in range(brokers):
            node_cfg = dataclasses.replace(config, data_dir=os.path.join(self.data_dir, f"node-{i + 1}"),
                                           sasl_password=self.sasl_password)
            node = LocalKafka(node_cfg)
            node.node_id = i + 1
            node._cluster = self
            self.brokers.append(node)
        self.kind = f"local Apache Kafka cluster ({brokers} KRaft nodes, jars from Maven Central)"
        self.last_start_s: float | None = None  # seconds the last start() took
        self.start_phases: dict[str, float] = {}  # where that time went

    # -- public surface -------------------------------------------------------------------
    @property
    def secure(self) -> bool:
        return self.config.security == "SASL_SSL"

    @property
    def bootstrap(self) -> str:
        """Every node's PLAINTEXT listener, comma-separated."""
        return ",".join(n.bootstrap for n in self.brokers)

    @property
    def secure_bootstrap(self) -> str:
        """Every node's SASL_SSL listener (security="SASL_SSL"), comma-separated."""
        return ",".join(n.secure_bootstrap for n in self.brokers)

    @property
    def voters(self) -> str:
        return ",".join(f"{n.node_id}@{HOST}:{n.controller_port}" for n in self.brokers)

    @property
    def running(self) -> bool:
        """True when every node runs."""
        return all(n.running for n in self.brokers)

    def client_config(self, mechanism: str = "SCRAM-SHA-512", **overrides):
        """A tensortrace.service.kafka.KafkaConfig: the SASL_SSL listeners of all nodes with the
        SCRAM (or PLAIN) user, a 0600 password file and the PEM CA (security="SASL_SSL"); else the
        PLAINTEXT listeners. `overrides` replace fields."""
        return _client_config(self.bootstrap, self.secure and self.secure_bootstrap, self.data_dir,
                              self.sasl_username, self.sasl_password, self.tls, mechanism, overrides)

    def start(self) -> "LocalKafkaCluster":
        """Start every node that is not running, in parallel; return once all are unfenced."""
        if self.running:
            return self
        t0 = time.monotonic()
        phases: dict[str, float] = {}
        first = self.brokers[0]
        java = first._java()
        classpath = first._classpath()
        try:
            self._pick_ports()  # every node's, distinct (kept from an earlier start)
            tls_job = None
            if self.secure and self.tls is None:  # keytool runs while the data dirs are formatted
                tls_job = TLSJob(os.path.join(self.data_dir, "tls"), self.config.java)
                self._set_tls(tls_job.tls)
            try:
                if not self._formatted():
                    self._format_all(java, classpath)
                    phases["format"] = time.monotonic() - t0
            finally:
                if tls_job is not None:
                    try:
                        tls_job.result()
                    except BaseException:
                        self._set_tls(None)
                        raise
                    phases["tls"] = time.monotonic() - t0
            _live_clusters.add(self)
            pending = [n for n in self.brokers if not n.running]
            for n in pending:
                n._pick_ports()  # the same ports again: fails with one line if one was taken meanwhile
            t_launch = time.monotonic()
            for n in pending:  # all JVMs at once, from this thread (they die with it)
                n._launch(java, classpath, n._write_config())
            deadline = t_launch + self.config.ready_timeout_s
            for n in pending:
                n._wait_ready(deadline)
                phases[f"node {n.node_id} ready"] = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise
        self.last_start_s = time.monotonic() - t0
        self.start_phases = phases
        return self

    def stop(self) -> None:
        """Stop every node (SIGTERM to all at once, SIGKILL after stop_timeout_s). Keeps data."""
        procs = []
        for n in self.brokers:
            proc, n._proc = n._proc, None
            if proc is not None:
                procs.append((n, proc))
                if proc.poll() is None:
                    _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + self.config.stop_timeout_s
        for n, proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(10)
            _signal_group(proc, signal.SIGKILL)  # any stragglers in its group
            _live.discard(n)
            n._end_cds_dump(keep=proc.returncode != -signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL every node."""
        for n in self.brokers:
            n.kill()

    def close(self) -> None:
        """Stop every node, and remove the data dir if this object created it. A temp cluster is
        SIGKILLed (its data goes anyway): when every node stops at once, each controller's
        graceful Raft shutdown waits ~5 s for voters that are leaving too."""
        _live_clusters.discard(self)
        if self._own_data_dir:
            self.kill()
            shutil.rmtree(self.data_dir, ignore_errors=True)
        else:
            self.stop()

    def wait_for_unfenced(self, count: int | None = None, timeout_s: float = 30.0) -> None:
        """Wait until `count` (default: all) nodes are registered and unfenced."""
        count = len(self.brokers) if count is None else count
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            live = [n for n in self.brokers if n.running]
            if live and _metadata_ok(",".join(n.bootstrap for n in live), min(5.0, deadline - time.monotonic()),
                                     brokers=count):
                return
            time.sleep(0.2)
        raise LocalKafkaError(f"fewer than {count} unfenced brokers after {timeout_s:.0f}s")

    def __repr__(self) -> str:
        up = sum(n.running for n in self.brokers)
        return f"LocalKafkaCluster({len(self.brokers)} nodes, {up} running, data={self.data_dir})"

    # -- steps of start() -----------------------------------------------------------------
    def _set_tls(self, tls) -> None:
        self.tls = tls
        for n in self.brokers:
            n.tls = tls

    def _formatted(self) -> bool:
        return all(os.path.exists(os.path.join(n._log_dir(), "meta.properties")) for n in self.brokers)

    def _pick_ports(self) -> None:
        names = self.brokers[0]._port_names()
        taken = {getattr(n, name) for n in self.brokers for name in names} - {0}
        for n in self.brokers:
            for name in names:
                if not getattr(n, name):
                    port = free_ports(1, taken)[0]
                    taken.add(port)
                    setattr(n, name, port)

    def _format_all(self, java: str, classpath: str) -> None:
        """Format node 1 with Kafka's StorageTool, copy what it wrote to the other nodes with their
        own meta.properties (same cluster id, own node id and directory id)."""
        self.cluster_id = self.cluster_id or random_cluster_id()
        first = self.brokers[0]
        for n in self.brokers:
            if os.path.isdir(n._log_dir()) and not os.path.exists(os.path.join(n._log_dir(), "meta.properties")):
                shutil.rmtree(n._log_dir())  # a half-formatted dir from a failed start
        props_path = first._write_config()
        if not os.path.exists(os.path.join(first._log_dir(), "meta.properties")):
            first._format(java, classpath, props_path, cluster_id=self.cluster_id)
        meta = _read_properties(os.path.join(first._log_dir(), "meta.properties"))
        self.cluster_id = meta["cluster.id"]
        for n in self.brokers[1:]:
            n.cluster_id = self.cluster_id
            if os.path.exists(os.path.join(n._log_dir(), "meta.properties")):
                continue
            os.makedirs(n._log_dir(), exist_ok=True)
            for path in glob.glob(os.path.join(first._log_dir(), "*")):
                if os.path.basename(path) != "meta.properties" and os.path.isfile(path):
                    shutil.copy2(path, n._log_dir())
            node_meta = dict(meta, **{"node.id": str(n.node_id), "directory.id": random_cluster_id()})
            tmp = os.path.join(n._log_dir(), "meta.properties.tmp")
            with open(tmp, "w") as f:
                f.write("#\n" + "".join(f"{k}={v}\n" for k, v in node_meta.items()))
            os.replace(tmp, os.path.join(n._log_dir(), "meta.properties"))


def _read_properties(path: str) -> dict[str, str]:
    out = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                k, _, v = line.partition("=")
                out[k.strip()] = v.strip()
    return out
