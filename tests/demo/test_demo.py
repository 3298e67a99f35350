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
    # the trace of one request: the bridge in the loader process wrote its spans into the same chDB
    # engine, `tensortrace trace` prints its timeline and writes the page
    m = re.search(r"^7\. the trace of (req-\d): ", out, re.M)
    assert m, out
    traced = dict((name, trace) for name, trace, *_ in rows)[m.group(1)]
    assert re.search(r"^   bridge: 12 TensorTrace spans for 4 requests, 0 engine spans written", out, re.M), out
    # through the loader's query service while it runs; else (a query service without the Trace RPC)
    # from the chDB path after the loader stopped
    assert re.search(rf"^   \$ tensortrace trace {traced} (--server 127\.0\.0\.1:\d+|--clickhouse "
                     rf"chdb://{re.escape(str(workdir))}/chdb) --html {re.escape(str(workdir))}/trace\.html$",
                     out, re.M), out
    assert re.search(rf"^   trace {traced}  request req-\d  model tiny-llama$", out, re.M), out
    for stage in ("prefill", "decode", "capture", "export", "kafka", "load"):
        assert re.search(rf"^   {stage} +\+[\d,.]+ ms +[\d,.]+ ms  \|", out, re.M), (stage, out)
    assert re.search(r"^   capture .* tensortrace\.capture span; 24 records, hooks logits, resid_final, resid_pre, "
                     r"complete$", out, re.M), out
    assert re.search(r"^   spans: tensortrace-bridge 3$", out, re.M), out
    page = (workdir / "trace.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and traced in page and len(page) > 10_000
    assert f"the picture (timeline, per-layer residual norms over tokens): {workdir}/trace.html" in out


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


@pytest.mark.unit
def test_loader_bridge_flag_composes_a_bridge_config_from_the_loaders_consumer_settings():
    from tensortrace.compose import LoaderWithQueryConfig
    from tensortrace.service.kafka import KafkaConfig
    from tensortrace.service.security import EndpointSecurity

    cfg = LoaderWithQueryConfig(kafka=KafkaConfig(bootstrap_servers="127.0.0.1:9092"), topic="acts",
                                clickhouse_dsn="chdb:///tmp/tt", bridge=True, bridge_otlp_receiver_port=0,
                                bridge_otlp_receiver_security=EndpointSecurity(plaintext=True),
                                bridge_spans_topic="spans")
    assert cfg.problems() == []
    b = cfg.bridge_config()
    assert (b.topic, b.kafka.bootstrap_servers, b.clickhouse_dsn, b.group_id, b.spans_topic, b.otlp_receiver_host) == \
        ("acts", "127.0.0.1:9092", "chdb:///tmp/tt", "tensortrace-bridge", "spans", "127.0.0.1")
    assert cfg.listen_ports() == {"query": -1, "otlp": 0}
    bad = LoaderWithQueryConfig(clickhouse_dsn="chdb:///tmp/tt", bridge=True, bridge_group_id=cfg.group_id,
                                bridge_spans_topic="tensortrace.activations",
                                bridge_otlp_receiver_security=EndpointSecurity(plaintext=True))
    assert bad.problems() == [
        "bridge: spans_topic: 'tensortrace.activations' is also the activation or dead-letter topic",
        "bridge_group_id: must differ from group_id (the bridge reads every request too)"]
    assert "otlp" not in LoaderWithQueryConfig().listen_ports()   # no --bridge: no receiver
