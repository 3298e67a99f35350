import re

import pytest

from tensortrace.exporter.config import ConfigError, ExporterConfig, parse_args

pytestmark = pytest.mark.unit


def test_defaults_are_valid_and_match_the_issue():
    cfg = ExporterConfig().validate()
    assert (cfg.ring_dir, cfg.topic, cfg.acks, cfg.compression, cfg.idempotent) == (
        "/run/tensortrace", "tensortrace.activations", "all", "zstd", True)


@pytest.mark.parametrize("change, message", [
    (dict(compression="snappy"), "compression: 'snappy' is not one of zstd, lz4, gzip, none"),
    (dict(payload_encoding="LZMA"), "payload_encoding: 'LZMA'"),
    (dict(acks="1"), "idempotent producer needs acks=all"),
    (dict(topic="bad topic!"), "not a valid Kafka topic name"),
    (dict(batch_size=2_000_000), "batch_size: 2000000 exceeds the broker's default message.max.bytes"),
    (dict(max_inflight_bytes=1000), "smaller than one message"),
    (dict(chunk_payload_bytes=999_000), "chunk_payload_bytes: 999000 must be at least 16 KiB below"),
    (dict(control_port=70000), "control_port: 70000 is not a port"),
])
def test_validate_says_exactly_what_is_wrong(change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ExporterConfig(**change).validate()


def test_flags_map_to_fields():
    cfg = parse_args(["--ring-dir", "/tmp/x", "--compression", "lz4", "--no-idempotent", "--acks", "1",
                      "--ring-owner-uids", "0,1000", "--default-control", '{"enabled": false}'])
    assert (cfg.ring_dir, cfg.compression, cfg.idempotent, cfg.acks) == ("/tmp/x", "lz4", False, "1")
    assert cfg.ring_owner_uids == (0, 1000) and cfg.default_control == {"enabled": False}


def test_bad_flag_exits_with_the_reason(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--compression", "brotli"])
    assert "compression: 'brotli' is not one of" in capsys.readouterr().err
