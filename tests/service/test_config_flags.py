"""Flags generated from a config dataclass (tensortrace.service.config): one `--kebab-case` flag per
field, nested dataclasses prefixed, aliases and help from field metadata, strict integers (what Helm
renders), every validation problem reported at once."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from tensortrace.service.config import (ConfigError, FlagParser, Problems, config_from_args, flags_from_dataclass,
                                        option, raise_problems)
from tensortrace.service.kafka import KafkaConfig

pytestmark = pytest.mark.unit


@dataclass
class Inner:
    host: str = "localhost"
    port: int = 1


@dataclass
class Sample:
    flag_aliases: ClassVar[dict] = {"inner.port": ("--port",)}

    name: str = option("x", "what it is called", aliases=("--title",))
    count: int = 3
    ratio: float = 0.5
    enabled: bool = True
    uids: tuple[int, ...] = ()
    group: int | None = None
    doc: dict | None = None
    inner: Inner = field(default_factory=Inner, metadata={"aliases": {"host": ("--inner-address",)}})
    kafka: KafkaConfig = option(factory=KafkaConfig, aliases={"bootstrap_servers": ("--bootstrap",)})
    hidden: list = option(factory=list, flag=False)

    def problems(self) -> list[str]:
        p = Problems()
        p.check(self.count >= 0, "count", f"{self.count} < 0")
        p.check(bool(self.name), "name", "empty")
        p.extend(self.kafka.problems(), prefix="kafka.")
        return p.items

    def validate(self) -> "Sample":
        return raise_problems(self, "sample config")


def test_one_kebab_case_flag_per_field_nested_ones_prefixed():
    p = argparse.ArgumentParser()
    flags = flags_from_dataclass(Sample, p)
    assert flags["count"] == "--count" and flags["inner.host"] == "--inner-host"
    assert {flags[f"kafka.{n}"] for n in ("bootstrap_servers", "security_protocol", "sasl_mechanism", "sasl_username",
                                          "sasl_password_file", "ssl_cafile")} == {
        "--kafka-bootstrap-servers", "--kafka-security-protocol", "--kafka-sasl-mechanism", "--kafka-sasl-username",
        "--kafka-sasl-password-file", "--kafka-ssl-cafile"}
    assert "hidden" not in flags
    assert not any("password" in f and not f.endswith(("-file", "-env")) for f in p._option_string_actions), \
        "a password is never a flag"


def test_values_of_every_kind_parse_and_the_others_keep_their_defaults():
    cfg = config_from_args(Sample, ["--count", "1048576", "--ratio", "2", "--no-enabled", "--uids", "0,1000",
                                    "--group", "7", "--doc", '{"a": 1}', "--inner-port", "9", "--bootstrap", "k:1"])
    assert (cfg.count, cfg.ratio, cfg.enabled, cfg.uids, cfg.group, cfg.doc) == (1048576, 2.0, False, (0, 1000), 7, {"a": 1})
    assert (cfg.inner.host, cfg.inner.port) == ("localhost", 9)
    assert cfg.kafka.bootstrap_servers == "k:1" and cfg.kafka.security_protocol == "PLAINTEXT"
    assert cfg.name == "x" and cfg.hidden == []
    assert config_from_args(Sample, []) == Sample()


def test_aliases_from_metadata_nested_metadata_and_the_class_table():
    cfg = config_from_args(Sample, ["--title", "t", "--inner-address", "h", "--port", "5"])
    assert (cfg.name, cfg.inner.host, cfg.inner.port) == ("t", "h", 5)


@pytest.mark.parametrize("argv, value", [
    (["--enabled"], True), (["--enabled=false"], False), (["--enabled", "true"], True), (["--no-enabled"], False),
])
def test_booleans_take_the_forms_a_template_renders(argv, value):
    assert config_from_args(Sample, argv).enabled is value


def test_an_empty_optional_int_is_none():
    assert config_from_args(Sample, ["--group", ""]).group is None


@pytest.mark.parametrize("argv, message", [
    (["--count", "1.048576e+06"], "argument --count: '1.048576e+06' is a floating-point number, not an integer "
                                  "(did a Helm template render 1048576 as a float? use `int` in the template)"),
    (["--count", "ten"], "argument --count: 'ten' is not an integer"),
    (["--uids", "1,2.5"], "argument --uids: '2.5' is a floating-point number"),
    (["--doc", "[1]"], "argument --doc: must be a JSON object, got list"),
    (["--doc", "{nope"], "argument --doc: not JSON"),
    (["--ratio", "nan"], "argument --ratio: 'nan' is not a finite number"),
    (["--enabled=maybe"], "argument --enabled: 'maybe' is not true or false"),
])
def test_a_bad_value_exits_2_naming_the_flag(argv, message, capsys):
    p = FlagParser(prog="tensortrace sample")
    flags_from_dataclass(Sample, p)
    with pytest.raises(SystemExit) as e:
        p.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tensortrace sample: error: ") and message in err and "usage:" not in err


def test_validate_raises_every_problem_at_once_one_per_line():
    with pytest.raises(ConfigError) as e:
        Sample(count=-1, name="", kafka=KafkaConfig(bootstrap_servers="nohostport")).validate()
    assert e.value.problems == ["count: -1 < 0", "name: empty", "kafka.bootstrap_servers: 'nohostport' is not host:port"]
    assert str(e.value).splitlines() == ["sample config: count: -1 < 0", "sample config: name: empty",
                                         "sample config: kafka.bootstrap_servers: 'nohostport' is not host:port"]
    assert isinstance(e.value, ValueError)


def test_one_config_error_class_for_every_service():
    from tensortrace.exporter.config import ConfigError as ExporterConfigError
    from tensortrace.loader.config import ConfigError as LoaderConfigError

    assert ExporterConfigError is LoaderConfigError is ConfigError


def test_a_secret_field_is_refused_as_a_flag():
    @dataclass
    class Leaky:
        sasl_password: str = ""

    with pytest.raises(TypeError, match="a secret never becomes a flag"):
        flags_from_dataclass(Leaky, argparse.ArgumentParser())
