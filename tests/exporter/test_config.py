import re

import pytest

from tensortrace.exporter.config import ConfigError, ExporterConfig, KafkaConfig
from tensortrace.exporter.main import SERVICE

pytestmark = pytest.mark.unit


def test_defaults_are_valid_and_match_the_issue():
    from tensortrace.service.security import EndpointSecurity

    with pytest.raises(ConfigError, match="control_security.tls_cert: the control endpoint has no TLS"):
        ExporterConfig().validate()   # the control endpoint is secured, or plaintext by choice (docs/security.md)
    cfg = ExporterConfig(control_security=EndpointSecurity(plaintext=True)).validate()
    assert (cfg.ring_dir, cfg.topic, cfg.acks, cfg.compression, cfg.idempotent) == (
        "/run/tensortrace", "tensortrace.activations", "all", "zstd", True)
    assert cfg.kafka.bootstrap_servers == "127.0.0.1:9092" and cfg.control_port == 50051


@pytest.mark.parametrize("change, message", [
    (dict(compression="snappy"), "compression: 'snappy' is not one of zstd, lz4, gzip, none"),
    (dict(payload_encoding="LZMA"), "payload_encoding: 'LZMA'"),
    (dict(acks="1"), "idempotent producer needs acks=all"),
    (dict(topic="bad topic!"), "not a valid Kafka topic name"),
    (dict(batch_size=2_000_000), "batch_size: 2000000 exceeds the broker's default message.max.bytes"),
    (dict(max_inflight_bytes=1000), "smaller than one message"),
    (dict(chunk_payload_bytes=999_000), "chunk_payload_bytes: 999000 must be at least 16 KiB below"),
    (dict(control_port=70000), "control_port: 70000 is not a port"),
    (dict(kafka=KafkaConfig(bootstrap_servers="nohostport")), "kafka.bootstrap_servers: 'nohostport' is not host:port"),
])
def test_validate_says_exactly_what_is_wrong(change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ExporterConfig(**change).validate()


def test_validate_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as e:
        ExporterConfig(ring_dir="", compression="snappy", control_port=70000,
                       kafka=KafkaConfig(bootstrap_servers="x", security_protocol="SASL_SSL")).validate()
    fields = [p.split(":")[0] for p in e.value.problems]
    assert fields[:3] == ["ring_dir", "kafka.bootstrap_servers", "kafka.sasl_mechanism"]
    assert {"compression", "control_port", "kafka.sasl_username"} <= set(fields)
    assert str(e.value).splitlines()[0] == "exporter config: ring_dir: is empty"   # one problem per line


def test_flags_map_to_fields():
    cfg, runtime = SERVICE.parse(["--ring-dir", "/tmp/x", "--compression", "lz4", "--no-idempotent", "--acks", "1",
                                  "--ring-owner-uids", "0,1000", "--default-control", '{"enabled": false}',
                                  "--kafka-security-protocol", "SSL", "--kafka-ssl-check-hostname=false",
                                  "--ring-group", "2000", "--metrics-port", "0", "--status-file", "/tmp/st.json",
                                  "--control-plaintext"])
    assert (cfg.ring_dir, cfg.compression, cfg.idempotent, cfg.acks) == ("/tmp/x", "lz4", False, "1")
    assert cfg.ring_owner_uids == (0, 1000) and cfg.default_control == {"enabled": False} and cfg.ring_group == 2000
    assert (cfg.kafka.security_protocol, cfg.kafka.ssl_check_hostname) == ("SSL", False)
    assert (runtime.http_port, runtime.status_file) == (0, "/tmp/st.json")


def test_bootstrap_servers_is_an_alias_of_the_kafka_flag():
    for flag in ("--bootstrap-servers", "--bootstrap", "--kafka-bootstrap-servers"):
        cfg, _ = SERVICE.parse([flag, "k1:9092,k2:9092", "--control-plaintext"])
        assert cfg.kafka.bootstrap_servers == "k1:9092,k2:9092"
        assert cfg.kafka.client_kwargs("tensortrace-exporter")["bootstrap_servers"] == ["k1:9092", "k2:9092"]


def test_the_http_port_defaults_to_9464_and_is_the_runtimes():
    cfg, runtime = SERVICE.parse(["--control-plaintext"])
    assert runtime.http_port == 9464 and runtime.http_host == "0.0.0.0"
    assert cfg.listen_ports() == {"control": 50051}


def test_bad_config_exits_2_naming_every_problem_and_its_flag(capsys):
    assert SERVICE.main(["--compression", "brotli", "--bootstrap-servers", "nohostport", "--http-port", "70000",
                         "--control-plaintext"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "tensortrace exporter: config: kafka.bootstrap_servers (--kafka-bootstrap-servers): 'nohostport' is not host:port",
        "tensortrace exporter: config: compression (--compression): 'brotli' is not one of zstd, lz4, gzip, none",
        "tensortrace exporter: config: http_port (--http-port): 70000 is not a port (0: ephemeral, -1: none)",
    ]


def test_a_float_rendered_by_helm_is_refused_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as e:
        SERVICE.parse(["--batch-size", "1.048576e+06"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --batch-size: '1.048576e+06' is a floating-point number, not an integer" in err
    assert "use `int` in the template" in err
