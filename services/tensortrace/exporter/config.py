"""Exporter configuration: every default in one place, `problems()` lists everything that is wrong.

>>> cfg = ExporterConfig(ring_dir="/tmp/rings", kafka=KafkaConfig(bootstrap_servers="127.0.0.1:9092"),
...                      control_security=EndpointSecurity(plaintext=True))
>>> cfg.problems(), cfg.validate() is cfg
([], True)
>>> ExporterConfig(ring_dir="", control_port=-1).problems()
['ring_dir: is empty']
>>> ExporterConfig().problems()    # the control endpoint: TLS, or plaintext by choice (docs/security.md)
['control_security.tls_cert: the control endpoint has no TLS: give tls_cert and tls_key, or opt into plaintext (development, loopback only)']

Flags (`tensortrace exporter --help`) are generated from the fields (tensortrace.service.config):
`--ring-dir`, `--linger-ms`, `--kafka-bootstrap-servers` (alias `--bootstrap-servers`), ...
The HTTP endpoint (`--http-port`, alias `--metrics-port`), `--status-file` and the drain timeout
are the service runtime's (tensortrace.service.runtime), the same for every service.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tensortrace.service.config import ConfigError, Problems, option, raise_problems  # noqa: F401 (ConfigError re-exported)
from tensortrace.service.kafka import KafkaConfig
from tensortrace.service.security import EndpointSecurity, security_option
from tensortrace.wire import codec

COMPRESSIONS = ("zstd", "lz4", "gzip", "none")
PAYLOAD_ENCODINGS = {"RAW": codec.Encoding.Value("RAW"), "ZSTD": codec.Encoding.Value("ZSTD"),
                     "SHUFFLE_ZSTD": codec.Encoding.Value("SHUFFLE_ZSTD")}
# A Kafka batch must stay under the broker's default message.max.bytes (1048588 bytes).
BROKER_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
DEFAULT_CONTROL_PORT = 50051
CLIENT_ID = "tensortrace-exporter"   # Kafka client id unless --kafka-client-id says otherwise


@dataclass
class ExporterConfig:
    # where the rings are
    ring_dir: str = option("/run/tensortrace", "directory watched for *.ring files (a hostPath shared with the inference pods)")
    scan_interval_s: float = option(0.5, "how often the ring directory is listed")
    ring_owner_uids: tuple[int, ...] = option((), "comma-separated uids whose owner-only (0600) rings are read (none: this process's uid)")
    ring_group: int | None = option(None, "ring group: 0660 rings of this gid are read whatever their owner, in a ring dir "
                                          "others cannot write; the exporter must be in the group (none: owner only)")
    allow_flat_rings: bool = option(False, "development only: also read rings directly in the ring dir (no pod "
                                           "subdirectory), their pod and node taken from the ring header the producer "
                                           "wrote; off: each pod's rings must be in <ring dir>/<namespace>_<pod>/, "
                                           "identity from that location")
    max_rings_per_pod: int = option(64, "rings of one pod directory held at a time (read, quarantined or awaiting "
                                        "removal); more are refused: a pod cannot grow the exporter's state without bound")
    cleanup_grace_s: float = option(30.0, "a drained ring of a gone producer is deleted this long after it was detached")
    max_steps_kept: int = option(64, "STEP metas kept per ring to resolve SLAB frames (bounded)")
    idle_release_s: float = option(1.0, "a ring with no new frame for this long also releases its newest STEP frame")
    poll_s: float = option(0.005, "the main loop's shortest wait between passes (an acknowledgement wakes it early)")
    idle_poll_max_s: float = option(0.05, "its longest: a wait that brought frames halves the next, one that brought "
                                          "none doubles it, within [poll_s, this]; idle, the exporter wakes ~20 times a "
                                          "second, and a frame waits at most this long for a pass (while Kafka accepts "
                                          "sends); scans and housekeeping run at passes (= poll_s: a fixed poll)")

    # Kafka
    kafka: KafkaConfig = option(factory=KafkaConfig, aliases={"bootstrap_servers": ("--bootstrap-servers", "--bootstrap")})
    topic: str = option("tensortrace.activations", "activations topic")
    partitions: int = option(0, "> 0: create the topic with this many partitions if it does not exist")
    replication_factor: int = option(1, "replication factor of a topic the exporter creates")
    acks: str = option("all", "all | 1 | 0 (the idempotent producer needs all)")
    idempotent: bool = option(True, "idempotent producer (no duplicates of its own within a session)")
    compression: str = option("zstd", "Kafka batch compression: zstd, lz4, gzip, none")
    batch_size: int = option(1_000_000, "Kafka batch bytes (under the broker's 1048588-byte default)")
    linger_ms: int = option(5, "Kafka linger")
    request_timeout_ms: int = option(30_000, "Kafka request timeout")
    delivery_timeout_ms: int = option(120_000, "a send not acknowledged within this fails; the ring is re-read")
    max_request_bytes: int = option(4 << 20, "produce request size (batches of several partitions)")
    send_buffer_bytes: int = option(4 << 20, "socket buffer: keeps a 1 MB batch from stalling the sender")

    # messages
    payload_encoding: str = option("RAW", "per-record payload encoding: RAW, ZSTD, SHUFFLE_ZSTD")
    max_message_bytes: int = option(codec.DEFAULT_MAX_MESSAGE_BYTES, "message size bound")
    chunk_payload_bytes: int = option(codec.DEFAULT_CHUNK_PAYLOAD_BYTES, "larger payloads are chunked")

    # bounds (backpressure): beyond these the exporter stops draining; rings fill; agents drop
    max_inflight_bytes: int = option(64 << 20, "message bytes sent and not yet acknowledged (backpressure)")
    max_inflight_messages: int = option(20_000, "messages sent and not yet acknowledged (backpressure)")
    max_pass_bytes: int = option(8 << 20, "bytes read from one ring per pass (fairness between rings)")
    max_pass_frames: int = option(4096, "frames read from one ring per pass")
    max_pass_records: int = option(16384, "records built from one ring per pass (bounds one pass's CPU: one-byte rows "
                                          "pack ~900k records into 8 MiB); the pass stops before the frame that would "
                                          "exceed it, the next pass reads that frame (a frame is never split)")

    # identity, control endpoint
    node: str = option(factory=lambda: os.environ.get("NODE_NAME", os.uname().nodename),
                       help="node name (default: $NODE_NAME or the hostname)")
    control_host: str = option("127.0.0.1", "gRPC control address (plaintext only on loopback: kubectl port-forward)")
    control_port: int = option(DEFAULT_CONTROL_PORT, "gRPC control port; 0: ephemeral, -1: none")
    # TLS / mTLS / tokens of the control endpoint: --control-tls-cert, --control-token-file,
    # --control-plaintext (loopback development), ... (service/security.py, docs/security.md)
    control_security: EndpointSecurity = security_option("control", "control endpoint")
    default_control: dict | None = option(None, "JSON control document written into every ring when it is attached")

    def problems(self) -> list[str]:
        p = Problems()
        p.check(bool(self.ring_dir), "ring_dir", "is empty")
        p.extend(self.kafka.problems(), prefix="kafka.")
        p.check(bool(self.topic) and len(self.topic) <= 249 and all(c in _TOPIC_CHARS for c in self.topic), "topic",
                f"{self.topic!r} is not a valid Kafka topic name ([a-zA-Z0-9._-], 1..249 chars)")
        p.check(self.compression in COMPRESSIONS, "compression",
                f"{self.compression!r} is not one of {', '.join(COMPRESSIONS)}")
        p.check(self.payload_encoding in PAYLOAD_ENCODINGS, "payload_encoding",
                f"{self.payload_encoding!r} is not one of {', '.join(PAYLOAD_ENCODINGS)}")
        if p.check(str(self.acks) in ("all", "1", "0", "-1"), "acks", f"{self.acks!r} is not all, 1 or 0"):
            p.check(not self.idempotent or str(self.acks) in ("all", "-1"), "acks",
                    f"{self.acks!r}: an idempotent producer needs acks=all (or set idempotent=False)")
        for name in ("batch_size", "max_message_bytes", "chunk_payload_bytes", "max_inflight_bytes",
                     "max_inflight_messages", "max_pass_bytes", "max_pass_frames", "max_pass_records", "max_steps_kept",
                     "request_timeout_ms", "delivery_timeout_ms", "replication_factor", "max_rings_per_pod",
                     "max_request_bytes", "send_buffer_bytes"):
            p.check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        p.check(self.linger_ms >= 0, "linger_ms", f"must be >= 0, got {self.linger_ms}")
        p.check(self.partitions >= 0, "partitions", f"must be >= 0 (0: use the topic as it is), got {self.partitions}")
        p.check(self.batch_size <= BROKER_DEFAULT_MAX_MESSAGE_BYTES, "batch_size",
                f"{self.batch_size} exceeds the broker's default message.max.bytes {BROKER_DEFAULT_MAX_MESSAGE_BYTES}")
        p.check(self.max_message_bytes <= BROKER_DEFAULT_MAX_MESSAGE_BYTES - 1024, "max_message_bytes",
                f"{self.max_message_bytes} leaves no room under the broker limit {BROKER_DEFAULT_MAX_MESSAGE_BYTES}")
        p.check(self.chunk_payload_bytes <= self.max_message_bytes - 16384, "chunk_payload_bytes",
                f"{self.chunk_payload_bytes} must be at least 16 KiB below max_message_bytes {self.max_message_bytes} "
                "(room for metadata)")
        p.check(self.max_request_bytes >= self.max_message_bytes + 4096, "max_request_bytes",
                f"{self.max_request_bytes} must exceed max_message_bytes {self.max_message_bytes} (+ 4 KiB request overhead)")
        p.check(self.delivery_timeout_ms >= self.request_timeout_ms + self.linger_ms, "delivery_timeout_ms",
                f"{self.delivery_timeout_ms} must be >= request_timeout_ms + linger_ms "
                f"({self.request_timeout_ms + self.linger_ms})")
        p.check(self.max_inflight_bytes >= self.max_message_bytes, "max_inflight_bytes",
                f"{self.max_inflight_bytes} is smaller than one message ({self.max_message_bytes})")
        p.check(self.idle_release_s >= 0, "idle_release_s", f"must be >= 0, got {self.idle_release_s}")
        p.check(self.scan_interval_s > 0, "scan_interval_s", f"must be > 0, got {self.scan_interval_s}")
        if p.check(0 < self.poll_s <= 1, "poll_s", f"must be in (0, 1] seconds, got {self.poll_s}"):
            p.check(self.poll_s <= self.idle_poll_max_s <= 1, "idle_poll_max_s",
                    f"must be in [poll_s={self.poll_s}, 1] seconds, got {self.idle_poll_max_s}")
        p.check(self.cleanup_grace_s >= 0, "cleanup_grace_s", f"must be >= 0, got {self.cleanup_grace_s}")
        p.check(-1 <= self.control_port <= 65535, "control_port",
                f"{self.control_port} is not a port (0 = ephemeral, -1 = disabled)")
        if self.control_port >= 0:
            p.extend(self.control_security.problems(self.control_host, "control endpoint"), prefix="control_security.")
        p.check(self.default_control is None or isinstance(self.default_control, dict), "default_control",
                "must be a JSON object")
        return p.items

    def validate(self) -> "ExporterConfig":
        """Self, or a ConfigError listing every problem (one per line)."""
        return raise_problems(self, "exporter config")

    def listen_ports(self) -> dict[str, int]:
        """Ports this configuration listens on (besides the runtime's HTTP port); -1: none."""
        return {"control": self.control_port}

    def next_wait(self, wait: float, read: bool) -> float:
        """The main loop's next wait, after a wait of `wait` seconds that ran its course (one cut
        short by an acknowledgement or a stop keeps its length): half as long, at least `poll_s`,
        when frames came in it (`read`); twice as long, at most `idle_poll_max_s`, when none did.

        Idle, the exporter wakes 1/idle_poll_max_s times a second instead of 1/poll_s. Under traffic
        the wait tends toward the time between the producer's steps, but acknowledgements cut
        waits short (one wake a batch), so the saving there is small: 2.4 wakes a step against
        2.7 at a step every 15 ms (docs/BENCHMARKS.md "Exporter idle CPU"). A frame waits for a
        pass at most about one gap between steps, never more than `idle_poll_max_s`. A burst is
        read at once: a pass that finds work is followed by another without a wait, until one
        finds nothing.

        >>> cfg = ExporterConfig(poll_s=0.005, idle_poll_max_s=0.05)
        >>> w, seq = cfg.poll_s, []
        >>> for read in (False, False, False, False, False, True, True, True, True):
        ...     w = cfg.next_wait(w, read)
        ...     seq.append(w)
        >>> seq
        [0.01, 0.02, 0.04, 0.05, 0.05, 0.025, 0.0125, 0.00625, 0.005]
        """
        return max(self.poll_s, wait / 2) if read else min(self.idle_poll_max_s, wait * 2)

    @property
    def payload_encoding_code(self) -> int:
        return PAYLOAD_ENCODINGS[self.payload_encoding]

    @property
    def owner_uids(self) -> tuple[int, ...]:
        return self.ring_owner_uids or (os.getuid(),)


_TOPIC_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
