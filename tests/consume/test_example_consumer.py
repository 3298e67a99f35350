"""The example consumer in docs/consumers.md (docs/examples/token_counter.py) works as shown, in
process and as a service with its own flags, metrics and SIGTERM handling."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tensortrace.service.kafka import KafkaConfig
from tensortrace.testing.kafka import create_topics
from tensortrace.testing.synthetic import SyntheticRequest, produce
from tensortrace.testing.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "examples" / "token_counter.py"


def load_example():
    spec = importlib.util.spec_from_file_location("token_counter", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.unit
def test_the_docs_show_the_example_as_it_is_and_it_is_under_100_lines():
    text = (ROOT / "docs" / "consumers.md").read_text()
    code = EXAMPLE.read_text()
    assert "```python\n" + code + "```" in text
    assert len(code.splitlines()) < 100


@pytest.mark.integration
def test_token_counter_counts_tokens_per_model_in_process(kafka_broker):
    mod = load_example()
    bs = kafka_broker.bootstrap
    topic = create_topics(bs, 2, prefix="tt-example", dlq=True)
    a = [SyntheticRequest.make(f"a{i}", layers=2, hidden=8, prompt=5, generated=3, model_id="model-a") for i in range(3)]
    b = [SyntheticRequest.make("b0", layers=1, hidden=8, prompt=7, generated=2, model_id="model-b")]
    for r in a + b:
        produce(bs, topic, r.messages(per_message=2) + r.messages(per_message=5))   # every message twice
    cfg = mod.TokenCounterConfig(kafka=KafkaConfig(bootstrap_servers=bs), topic=topic, dlq_topic=topic + ".dlq",
                                 batch_max_delay_s=0.05)
    counter = mod.TokenCounter(cfg)
    t = threading.Thread(target=counter.run, daemon=True)
    t.start()
    try:
        assert wait_until(lambda: counter.tokens == {"model-a": 3 * 8, "model-b": 9})
        time.sleep(0.3)   # the duplicates must not count twice
        assert counter.tokens == {"model-a": 24, "model-b": 9}
        assert counter.registry.get_sample_value("token_counter_requests_total",
                                                 {"model": "model-a", "state": "complete"}) == 3
    finally:
        counter.stop()
        t.join(timeout=30)
    assert not t.is_alive()


@pytest.mark.integration
def test_token_counter_runs_as_a_service_with_metrics_and_stops_on_sigterm(kafka_broker, tmp_path):
    bs = kafka_broker.bootstrap
    topic = create_topics(bs, 2, prefix="tt-example", dlq=True)
    req = SyntheticRequest.make("svc", layers=1, hidden=8, prompt=4, generated=2, model_id="model-s")
    produce(bs, topic, req.messages())
    status = tmp_path / "status.json"
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), "--kafka-bootstrap-servers", bs, "--topic", topic,
                             "--dlq-topic", topic + ".dlq", "--http-port", "0", "--http-host", "127.0.0.1",
                             "--status-file", str(status), "--batch-max-delay-s", "0.05"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_until(status.exists, 30), "no status file"
        port = json.loads(status.read_text())["ports"]["http"]

        def metric():
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            m = re.search(r'token_counter_tokens_total\{kind="generated",model="model-s"\} (\S+)', body)
            return float(m.group(1)) if m else None
        assert wait_until(lambda: metric() == 2.0)
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.unit
def test_token_counter_reports_every_config_problem_at_once():
    r = subprocess.run([sys.executable, str(EXAMPLE), "--kafka-bootstrap-servers", "nohostport",
                        "--request-timeout-s", "0", "--dlq-topic", "tensortrace.activations"],
                       capture_output=True, text=True, timeout=60, env={**os.environ})
    assert r.returncode == 2
    for field in ("bootstrap_servers", "request_timeout_s", "dlq_topic"):
        assert field in r.stderr, r.stderr
