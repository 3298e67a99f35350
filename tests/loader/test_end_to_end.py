"""End to end, every part real: a tiny model with the capture agent -> ring -> `tensortrace exporter`
process -> Kafka -> `tensortrace loader` process (SIGKILLed once mid-stream, restarted) -> chDB ->
read back through the loader's query service. Every tensor of every request of a batched
generation is bit-identical to the model's own (`output_hidden_states` of an uninstrumented run),
the requests table says each request is complete, and after a merge no row is duplicated."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from tensortrace.agent import AgentConfig, CaptureAgent, Selection  # noqa: E402
from tensortrace.agent.backends.hf import HFBackend  # noqa: E402
from tensortrace.devstack.processes import LoaderProcess  # noqa: E402
from tensortrace.query import TensorTraceClient  # noqa: E402
from tensortrace.testing.clickhouse import count_rows  # noqa: E402
from tensortrace.testing.kafka import committed, end_offsets  # noqa: E402
from tensortrace.testing.tiny_models import left_padded, make  # noqa: E402
from tensortrace.testing.waiting import wait_until  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROUNDS = [[[5, 6, 7], [11, 12, 13, 14, 15, 16], [21]], [[31, 32, 33, 34], [41, 42]]]
NEW_TOKENS = 4


@pytest.fixture
def exporter(tmp_path, kafka_broker, fresh_topic):
    ring_dir = tmp_path / "rings"
    ring_dir.mkdir(mode=0o700)
    topic = fresh_topic(partitions=2)
    status = tmp_path / "exporter.status.json"
    log = open(tmp_path / "exporter.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tensortrace.cli", "exporter", "--ring-dir", str(ring_dir),
                             "--bootstrap-servers", kafka_broker.bootstrap, "--topic", topic, "--control-port", "0",
                             "--control-host", "127.0.0.1", "--control-plaintext", "--metrics-port", "0",
                             "--metrics-host", "127.0.0.1",
                             "--status-file", str(status), "--scan-interval-s", "0.1", "--linger-ms", "2",
                             "--allow-flat-rings"],
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    assert wait_until(lambda: status.exists() or proc.poll() is not None, timeout_s=60), "exporter did not start"
    assert proc.poll() is None, (tmp_path / "exporter.log").read_text()[-3000:]
    yield str(ring_dir), topic
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def generate(model, agent, prompts, prefix):
    ids, mask = left_padded(prompts)
    kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True)
    ref = model.generate(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kw)
    backend = HFBackend(model, agent)
    rids = [f"{prefix}-{b}" for b in range(len(prompts))]
    out, ctxs = backend.generate(ids, attention_mask=mask, request_ids=rids, **kw)
    backend.detach()
    assert torch.equal(out.sequences, ref.sequences)
    P = ids.shape[1]
    want = {}
    for b, rid in enumerate(rids):
        n = len(prompts[b])
        want[rid] = (ctxs[b].trace_id, [torch.cat([ref.hidden_states[0][L][b, P - n:]] +
                                                  [ref.hidden_states[k][L][b, :1] for k in range(1, NEW_TOKENS)])
                                        for L in range(model.config.num_hidden_layers + 1)])
    return want


def test_tiny_model_to_clickhouse_bit_exact_through_a_loader_crash(kafka_broker, exporter, tmp_path):
    ring_dir, topic = exporter
    model = make("llama")
    agent = CaptureAgent(AgentConfig(ring_dir=ring_dir, model_id="tiny-llama", pod="pod-e2e", ring_capacity=16 << 20),
                         Selection.preset("hidden-states"))
    path = tmp_path / "chdb"
    args = ["--bootstrap", kafka_broker.bootstrap, "--topic", topic, "--dlq-topic", topic + ".dlq",
            "--group", "e2e", "--clickhouse", f"chdb://{path}", "--batch-max-rows", "20",
            "--batch-max-delay", "0.05", "--stats-interval", "0.02", "--session-timeout-ms", "6000"]
    first = LoaderProcess(args)
    try:
        want = generate(model, agent, ROUNDS[0], "round0")
        assert wait_until(lambda: first.stats.get("tensor_rows", 0) > 0 or first.proc.poll() is not None,
                          timeout_s=120, interval=0.005), "".join(first.lines[-20:])
        first.kill(signal.SIGKILL)   # mid-stream: round 1 has not even been generated yet
        want.update(generate(model, agent, ROUNDS[1], "round1"))
        stats = agent.stats()
        agent.close()
        final = LoaderProcess(args + ["--query-port", "0"])
        try:
            assert wait_until(lambda: final.query_address is not None, timeout_s=60)
            with TensorTraceClient(f"grpc://{final.query_address}", poll_interval_s=0.1) as tt:
                for rid, (trace_id, hidden) in want.items():
                    got = tt.tensors(trace_id=trace_id.hex(), hooks=["resid_pre", "resid_final"], wait_s=120)
                    assert got.request_id == rid
                    assert got.completeness.state == "complete", got.completeness
                    assert got.completeness.records_dropped == 0
                    hs = got.hidden_states()
                    assert len(hs) == len(hidden)
                    for L, (g, w) in enumerate(zip(hs, hidden)):
                        assert g.dtype == w.dtype and torch.equal(g[0], w), f"{rid} hidden state {L} differs from the model's"
            partitions = 2
            ends = end_offsets(kafka_broker.bootstrap, topic, partitions)
            assert wait_until(lambda: committed(kafka_broker.bootstrap, "e2e", topic, partitions) == ends, timeout_s=60)
        finally:
            final.kill(signal.SIGTERM)
        assert final.proc.returncode == 0, "".join(final.lines[-20:])
    finally:
        first.kill(signal.SIGKILL)
    counts = count_rows(path, "tensortrace")
    assert counts["distinct"] == counts["final"] == counts["raw_after_merge"] == stats.written
    assert counts["summaries_final"] == counts["summaries_after_merge"] == len(want)
