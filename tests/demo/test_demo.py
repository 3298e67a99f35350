"""`make demo` (tensortrace.demo) with the Hugging Face fallback backend, end to end: a real Kafka
broker, exporter and loader processes, the capture agent in HF generate, read-back through the
query service, bit-exact against the model's own hidden states. The SGLang-backed demo (the
default) is tested under the SGLang venv: tests/sglang/test_sglang_demo.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def run_demo(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    # A subprocess: the demo starts a broker and services and must stop them all when it exits.
    return subprocess.run([sys.executable, "-m", "tensortrace.demo", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_hf_demo_runs_the_whole_pipeline_and_proves_bit_exact_read_back(tmp_path):
    workdir = tmp_path / "demo"
    r = run_demo("--backend", "hf", "--workdir", str(workdir))
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "RESULT: PASS: 4 requests complete, trace ids match their traceparent headers, " \
           "hidden states bit-identical to the model's own" in out
    # every request: complete, nothing dropped, everything captured loaded, bit-exact
    rows = re.findall(r"^   (req-\d) +([0-9a-f]{32}) +(\d+)\+(\d+) +(\d+) +(\d+) +(\d+)  complete .* bit-exact .* ok$",
                      out, re.M)
    assert [row[0] for row in rows] == ["req-1", "req-2", "req-3", "req-4"], out
    sent = dict(re.findall(r"^   (req-\d) .* traceparent 00-([0-9a-f]{32})-[0-9a-f]{16}-01$", out, re.M))
    for name, trace, prompt, gen, captured, dropped, loaded in rows:
        assert sent[name] == trace  # the trace id read back is the one in the header sent
        assert int(gen) == 6 and int(dropped) == 0 and int(captured) == int(loaded) > 0
    assert sorted(int(row[2]) for row in rows) == [5, 11, 19, 32]
    # `tensortrace show` for one request, and the exporter's books balance
    assert re.search(r"^5\. \$ tensortrace show [0-9a-f]{32} --server 127\.0\.0\.1:\d+$", out, re.M)
    assert re.search(r"^   completeness: complete  captured \d+  loaded \d+  dropped 0$", out, re.M)
    m = re.search(r"produced (\d+) = published (\d+) \+ dropped by the agent 0 \+ dropped by the exporter 0; "
                  r"pending 0  ok", out)
    assert m and m.group(1) == m.group(2), out
    assert re.search(r"records: published (\d+) = \d+ captured for the 4 requests \+ 4 summaries  ok", out)
    # the pieces really ran: chDB files written by the loader process, the exporter's log
    assert (workdir / "chdb").is_dir() and (workdir / "exporter.log").is_file()


def test_demo_without_kafka_jars_fails_with_one_line(tmp_path):
    r = run_demo("--backend", "hf", env={"TENSORTRACE_KAFKA_LIBS": str(tmp_path)})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"error: Kafka broker jars not found in {tmp_path}: run `make kafka-jars`"


def test_sglang_demo_without_the_sglang_venv_says_how_to_build_it(tmp_path):
    r = run_demo("--sglang-venv", str(tmp_path / "no-venv"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"error: SGLang venv not found ({tmp_path / 'no-venv' / 'bin' / 'python'} missing): run `make sglang-env`, "
        "or `make demo BACKEND=hf` for the Hugging Face fallback"]
