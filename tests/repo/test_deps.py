"""The dependency split (pyproject.toml): the core set is what the slim exporter image installs
(docker/exporter/Dockerfile); `[consumers]` adds ClickHouse, OpenTelemetry and matplotlib for the
consumer image. Checked without installing anything: a subprocess whose import system only finds
the standard library and the distributions of the set under test (a meta-path blocker built from
the installed distributions' metadata), as the image would be.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("chdb", "clickhouse_connect", "pandas", "pyarrow", "torch", "transformers", "matplotlib", "opentelemetry")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _closure(requirements: list[str]) -> set[str]:
    """Installed distributions a set of requirements pulls in (extras of the dependencies excluded)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = req.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        todo += [Requirement(r) for r in (md.requires(name) or [])]
    return seen


def _modules_of(dists: set[str]) -> list[str]:
    """Top-level import names provided by these distributions."""
    out = {"tensortrace"}
    for module, providers in md.packages_distributions().items():
        if any(p.lower().replace("_", "-") in dists for p in providers):
            out.add(module)
    return sorted(out)


# Runs in a fresh interpreter: only the stdlib and the allowed modules import; then the code under test.
_BLOCKER = """
import json, sys
ALLOWED = set(json.loads(sys.argv[1]))
class OnlyTheDependencySet:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in sys.stdlib_module_names or top in ALLOWED or top.startswith("_"):
            return None
        raise ModuleNotFoundError(f"No module named {name!r} (not in the dependency set under test)", name=name)
sys.meta_path.insert(0, OnlyTheDependencySet())
"""


def _run_restricted(allowed: list[str], code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCKER + code, json.dumps(allowed)], capture_output=True,
                          text=True, timeout=120, cwd=str(ROOT))


def test_the_core_dependency_set_holds_none_of_the_heavy_packages():
    project = _pyproject()["project"]
    core = _closure(project["dependencies"])
    for heavy in ("chdb", "clickhouse-connect", "pandas", "pyarrow", "torch", "matplotlib", "transformers",
                  "opentelemetry-sdk", "opentelemetry-api"):
        assert heavy not in core, f"{heavy} is in the exporter's dependency set {sorted(core)}"
    consumers = {Requirement(r).name for r in project["optional-dependencies"]["consumers"]}
    assert {"chdb", "clickhouse-connect", "opentelemetry-sdk", "matplotlib"} <= consumers
    assert "tensortrace[agent,consumers]" in project["optional-dependencies"]["dev"]


def test_the_exporter_imports_and_runs_with_the_core_set_only(tmp_path):
    allowed = _modules_of(_closure(_pyproject()["project"]["dependencies"]))
    assert not set(HEAVY) & set(allowed)
    code = f"""
import contextlib, importlib, io, pkgutil
import tensortrace
from tensortrace.cli import main
for cmd in (["exporter", "--help"], ["exporterctl", "--help"], ["ring-dir", "--help"], ["ring-dir", "prepare", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main(cmd)
        except SystemExit as e:
            assert e.code in (0, None), (cmd, e.code)
    assert "usage" in out.getvalue().lower(), cmd
mods = ["tensortrace.service.runtime", "tensortrace.service.config"]
for pkg in ("tensortrace.exporter", "tensortrace.ring", "tensortrace.wire"):
    p = importlib.import_module(pkg)
    mods += [pkg + "." + m.name for m in pkgutil.iter_modules(p.__path__)]
for m in mods:
    importlib.import_module(m)
# the exporter itself: construct it and scan a ring directory
import logging; logging.disable(logging.CRITICAL)
from tensortrace.exporter.config import ExporterConfig
from tensortrace.exporter.service import Exporter
from tensortrace.service.kafka import KafkaConfig
from tensortrace.service.security import EndpointSecurity
exp = Exporter(ExporterConfig(ring_dir={str(tmp_path)!r}, control_port=0, kafka=KafkaConfig(bootstrap_servers="127.0.0.1:9"),
                              control_security=EndpointSecurity(plaintext=True)))
exp.start(); exp.scan(); exp.shutdown(flush_timeout_s=0.1)
heavy = sorted(m for m in sys.modules if m.partition(".")[0] in {HEAVY!r})
print(json.dumps({{"modules": len(mods), "heavy": heavy}}))
"""
    out = _run_restricted(allowed, code)
    assert out.returncode == 0, out.stderr[-4000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["heavy"] == [] and got["modules"] > 10


def test_the_blocker_catches_a_heavy_import():
    """The check above proves something: the same subprocess fails on a module outside the set."""
    allowed = _modules_of(_closure(_pyproject()["project"]["dependencies"]))
    out = _run_restricted(allowed, "import tensortrace.exporter.service\nimport clickhouse_connect\n")
    assert out.returncode != 0
    assert "not in the dependency set under test" in out.stderr and "clickhouse_connect" in out.stderr


def test_the_consumers_need_no_torch():
    project = _pyproject()["project"]
    allowed = _modules_of(_closure(project["dependencies"] + project["optional-dependencies"]["consumers"]))
    assert "torch" not in allowed and "chdb" in allowed
    code = """
import contextlib, io
from tensortrace.cli import COMMANDS, main
for cmd in ("loader", "query-server", "bridge", "probes", "show", "trace"):
    if cmd not in COMMANDS:
        continue
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main([cmd, "--help"])
        except SystemExit as e:
            assert e.code in (0, None), (cmd, e.code)
    assert "usage" in out.getvalue().lower(), cmd
assert not [m for m in sys.modules if m.partition(".")[0] in ("torch", "transformers")]
print("ok")
"""
    out = _run_restricted(allowed, code)
    assert out.returncode == 0, out.stderr[-4000:]
