"""The Helm chart starts the services with flags they accept: every `- --flag=value` argument of the
exporter DaemonSet and the loader Deployment, rendered with the chart's default values, is parsed and
validated by the service's own argument parser and config. (No helm binary here: the template
expressions these args use are plain value look-ups, rendered below; anything else fails the test.)"""

from __future__ import annotations

import os
import re

import pytest
import yaml

from tensortrace.exporter.config import parse_args as exporter_args
from tensortrace.loader.main import parse_args as loader_args

CHART = os.path.join(os.path.dirname(__file__), "..", "..", "charts", "tensortrace")
pytestmark = pytest.mark.unit


def _values() -> dict:
    with open(os.path.join(CHART, "values.yaml")) as f:
        return yaml.safe_load(f)


def _render_args(template: str, container: str) -> list[str]:
    values = _values()
    with open(os.path.join(CHART, "templates", template)) as f:
        text = f.read()
    block = text.split(f"- name: {container}", 1)[1].split("args:", 1)[1]
    args = []
    depth = 0  # inside optional flags ({{- with/if }} blocks): off with the default values
    for line in block.splitlines()[1:]:
        s = line.strip()
        if s.startswith(("{{- with", "{{- if")):
            depth += 1
            continue
        if s.startswith("{{- end"):
            depth -= 1
            continue
        if depth:
            continue
        if not s.startswith("- "):
            break
        arg = s[2:]

        def lookup(m):
            node = values
            for key in m.group(1).split(".")[2:]:  # ".Values.a.b" -> a, b
                node = node[key]
            return str(node)

        arg = re.sub(r"\{\{\s*(\.Values(?:\.\w+)+)\s*\}\}", lookup, arg)
        arg = arg.replace("$(NODE_NAME)", "node-a")
        assert "{{" not in arg, f"unrendered template expression in {arg!r}"
        args.append(arg)
    return args


def test_exporter_daemonset_args_parse_and_validate():
    args = _render_args("exporter-daemonset.yaml", "exporter")
    assert args[0] == "exporter"
    cfg = exporter_args(args[1:])
    values = _values()
    assert cfg.ring_dir == values["ringDir"]
    assert cfg.topic == values["kafka"]["topic"]
    assert cfg.control_port == values["exporter"]["controlPort"]
    assert cfg.node == "node-a"


def test_loader_deployment_args_parse_and_validate():
    args = _render_args("loader-deployment.yaml", "loader")
    assert args[0] == "loader"
    cfg = loader_args(args[1:])
    values = _values()
    assert cfg.query_port == values["loader"]["queryPort"]
    assert cfg.query_host == "0.0.0.0"  # the Service reaches it through the pod IP
    assert cfg.ttl_days == values["loader"]["ttlDays"]
    assert cfg.payload_codec == values["loader"]["payloadCodec"]
    assert cfg.recompress_after_hours == values["loader"]["recompressAfterHours"]
