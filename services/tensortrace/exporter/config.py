"""Exporter configuration: every default in one place, `validate()` says exactly what is wrong.

>>> cfg = ExporterConfig(ring_dir="/tmp/rings", bootstrap_servers="127.0.0.1:9092")
>>> cfg.validate()
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field, fields

from tensortrace.wire import codec

COMPRESSIONS = ("zstd", "lz4", "gzip", "none")
PAYLOAD_ENCODINGS = {"RAW": codec.Encoding.Value("RAW"), "ZSTD": codec.Encoding.Value("ZSTD"),
                     "SHUFFLE_ZSTD": codec.Encoding.Value("SHUFFLE_ZSTD")}
# A Kafka batch must stay under the broker's default message.max.bytes (1048588 bytes).
BROKER_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option and the problem."""


@dataclass
class ExporterConfig:
    # where the rings are
    ring_dir: str = "/run/tensortrace"
    scan_interval_s: float = 0.5          # how often the directory is re-listed
    ring_owner_uids: tuple[int, ...] = ()  # owners whose rings are read; () = this process's uid
    ring_group: int | None = None         # gid allowed to share rings (group bits); None = owner-only
    cleanup_grace_s: float = 30.0         # a drained ring of a gone producer is deleted after this
    max_steps_kept: int = 64              # STEP metas kept per ring to resolve slabs (bounded)
    idle_release_s: float = 1.0           # a ring without new frames this long releases its held STEP frame

    # Kafka
    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "tensortrace.activations"
    partitions: int = 0                   # >0: create the topic with this many partitions if absent
    replication_factor: int = 1
    acks: str = "all"                     # all | 1 | 0 (idempotence needs all)
    idempotent: bool = True
    compression: str = "zstd"
    batch_size: int = 1_000_000
    linger_ms: int = 5
    request_timeout_ms: int = 30_000
    delivery_timeout_ms: int = 120_000    # after this a message fails; the ring is re-read
    client_id: str = "tensortrace-exporter"
    max_request_bytes: int = 4 << 20      # one produce request may carry batches of several partitions
    send_buffer_bytes: int = 4 << 20      # socket buffer: keeps a 1 MB batch from stalling the sender

    # messages
    payload_encoding: str = "RAW"
    max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES
    chunk_payload_bytes: int = codec.DEFAULT_CHUNK_PAYLOAD_BYTES

    # bounds (backpressure): beyond these the exporter stops draining; rings fill; agents drop
    max_inflight_bytes: int = 64 << 20
    max_inflight_messages: int = 20_000
    max_pass_bytes: int = 8 << 20         # bytes read from one ring per pass (fairness)
    max_pass_frames: int = 4096

    # identity, endpoints
    node: str = field(default_factory=lambda: os.environ.get("NODE_NAME", os.uname().nodename))
    control_host: str = "127.0.0.1"       # operators use `kubectl port-forward` (insecure gRPC stays local)
    control_port: int = 50051             # 0: an ephemeral port; -1: no control endpoint
    metrics_host: str = "0.0.0.0"          # kubelet probes and Prometheus reach it on the pod IP
    metrics_port: int = 9464              # 0: ephemeral; -1: none
    default_control: dict | None = None   # control document for every ring at attach time
    status_file: str = ""                 # where the bound ports are written (tests, scripts)

    def validate(self) -> "ExporterConfig":
        def bad(name, msg):
            raise ConfigError(f"exporter config {name}: {msg}")

        if not self.ring_dir:
            bad("ring_dir", "is empty")
        if not self.bootstrap_servers:
            bad("bootstrap_servers", "is empty")
        if not self.topic or len(self.topic) > 249 or any(c not in _TOPIC_CHARS for c in self.topic):
            bad("topic", f"{self.topic!r} is not a valid Kafka topic name ([a-zA-Z0-9._-], 1..249 chars)")
        if self.compression not in COMPRESSIONS:
            bad("compression", f"{self.compression!r} is not one of {', '.join(COMPRESSIONS)}")
        if self.payload_encoding not in PAYLOAD_ENCODINGS:
            bad("payload_encoding", f"{self.payload_encoding!r} is not one of {', '.join(PAYLOAD_ENCODINGS)}")
        if str(self.acks) not in ("all", "1", "0", "-1"):
            bad("acks", f"{self.acks!r} is not all, 1 or 0")
        if self.idempotent and str(self.acks) not in ("all", "-1"):
            bad("acks", f"{self.acks!r}: an idempotent producer needs acks=all (or set idempotent=False)")
        for name in ("batch_size", "max_message_bytes", "chunk_payload_bytes", "max_inflight_bytes",
                     "max_inflight_messages", "max_pass_bytes", "max_pass_frames", "max_steps_kept",
                     "request_timeout_ms", "delivery_timeout_ms", "replication_factor",
                     "max_request_bytes", "send_buffer_bytes"):
            if getattr(self, name) <= 0:
                bad(name, f"must be positive, got {getattr(self, name)}")
        if self.linger_ms < 0:
            bad("linger_ms", f"must be >= 0, got {self.linger_ms}")
        if self.partitions < 0:
            bad("partitions", f"must be >= 0 (0: use the topic as it is), got {self.partitions}")
        if self.batch_size > BROKER_DEFAULT_MAX_MESSAGE_BYTES:
            bad("batch_size", f"{self.batch_size} exceeds the broker's default message.max.bytes {BROKER_DEFAULT_MAX_MESSAGE_BYTES}")
        if self.max_message_bytes > BROKER_DEFAULT_MAX_MESSAGE_BYTES - 1024:
            bad("max_message_bytes", f"{self.max_message_bytes} leaves no room under the broker limit {BROKER_DEFAULT_MAX_MESSAGE_BYTES}")
        if self.chunk_payload_bytes > self.max_message_bytes - 16384:
            bad("chunk_payload_bytes", f"{self.chunk_payload_bytes} must be at least 16 KiB below max_message_bytes {self.max_message_bytes} (room for metadata)")
        if self.max_request_bytes < self.max_message_bytes + 4096:
            bad("max_request_bytes", f"{self.max_request_bytes} must exceed max_message_bytes {self.max_message_bytes} (+ 4 KiB request overhead)")
        if self.delivery_timeout_ms < self.request_timeout_ms + self.linger_ms:
            bad("delivery_timeout_ms", f"{self.delivery_timeout_ms} must be >= request_timeout_ms + linger_ms ({self.request_timeout_ms + self.linger_ms})")
        if self.max_inflight_bytes < self.max_message_bytes:
            bad("max_inflight_bytes", f"{self.max_inflight_bytes} is smaller than one message ({self.max_message_bytes})")
        if self.idle_release_s < 0:
            bad("idle_release_s", f"must be >= 0, got {self.idle_release_s}")
        if self.scan_interval_s <= 0 or self.cleanup_grace_s < 0:
            bad("scan_interval_s/cleanup_grace_s", "scan interval must be > 0 and grace >= 0")
        for name in ("control_port", "metrics_port"):
            p = getattr(self, name)
            if not -1 <= p <= 65535:
                bad(name, f"{p} is not a port (0 = ephemeral, -1 = disabled)")
        if self.default_control is not None and not isinstance(self.default_control, dict):
            bad("default_control", "must be a JSON object")
        return self

    @property
    def payload_encoding_code(self) -> int:
        return PAYLOAD_ENCODINGS[self.payload_encoding]

    @property
    def owner_uids(self) -> tuple[int, ...]:
        return self.ring_owner_uids or (os.getuid(),)


_TOPIC_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_args(argv: list[str]) -> ExporterConfig:
    """Command-line flags, one per config field (`--ring-dir`, `--linger-ms`, ...)."""
    defaults = ExporterConfig()
    p = argparse.ArgumentParser(prog="tensortrace exporter",
                                description="Drain the node's shared-memory rings into Kafka.")
    for f in fields(ExporterConfig):
        d = getattr(defaults, f.name)
        flag = _flag(f.name)
        if f.name == "ring_owner_uids":
            p.add_argument(flag, type=lambda s: tuple(int(x) for x in s.split(",") if x), default=d,
                           help="comma-separated uids whose rings are read (default: own uid)")
        elif f.name == "ring_group":
            p.add_argument(flag, type=int, default=d, help="gid allowed to share ring files")
        elif f.name == "default_control":
            p.add_argument(flag, type=json.loads, default=d, help="JSON control document for every ring")
        elif isinstance(d, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=d)
        else:
            p.add_argument(flag, type=type(d), default=d, help=f"(default: {d})")
    ns = p.parse_args(argv)
    cfg = ExporterConfig(**vars(ns))
    try:
        return cfg.validate()
    except ConfigError as e:
        p.error(str(e))
        raise  # unreachable
