"""End to end with every part real: a tiny Llama generating with the capture agent -> ring ->
`tensortrace exporter` process -> Kafka -> the probe service -> the scores topic. Each request's
score equals the same probe run offline on the model's own hidden states (`output_hidden_states`
of an uninstrumented run), tolerance 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tensortrace.agent import AgentConfig, CaptureAgent, Selection  # noqa: E402
from tensortrace.agent.backends.hf import HFBackend  # noqa: E402
from tensortrace.probes import Probe, ProbeMeta, save_probe  # noqa: E402
from tensortrace.probes.config import ProbesConfig  # noqa: E402
from tensortrace.probes.service import ProbesService  # noqa: E402
from tensortrace.service import KafkaConfig  # noqa: E402
from tensortrace.testing.kafka import consume_all  # noqa: E402
from tensortrace.testing.tiny_models import left_padded, make  # noqa: E402
from tensortrace.testing.waiting import wait_until  # noqa: E402
from tensortrace.v1 import records_pb2 as pb  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPTS = [[5, 6, 7], [11, 12, 13, 14, 15, 16], [21], [31, 32, 33, 34]]
NEW_TOKENS = 5
MODEL_ID = "tiny-llama"


@pytest.fixture
def exporter(tmp_path, kafka_broker, fresh_topic):
    ring_dir = tmp_path / "rings"
    ring_dir.mkdir(mode=0o700)
    topic = fresh_topic(partitions=2, dlq=True)
    status = tmp_path / "exporter.status.json"
    log = open(tmp_path / "exporter.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tensortrace.cli", "exporter", "--ring-dir", str(ring_dir),
                             "--bootstrap-servers", kafka_broker.bootstrap, "--topic", topic, "--control-port", "0",
                             "--control-host", "127.0.0.1", "--control-plaintext", "--metrics-port", "-1",
                             "--status-file", str(status),
                             "--scan-interval-s", "0.1", "--linger-ms", "2", "--allow-flat-rings"],
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


def test_scores_from_a_real_model_through_the_exporter_equal_the_probe_on_its_own_hidden_states(
        kafka_broker, fresh_topic, exporter, tmp_path):
    ring_dir, topic = exporter
    scores_topic = fresh_topic()
    model = make("llama")
    hidden = model.config.hidden_size
    rng = np.random.default_rng(0)
    probes = [Probe(ProbeMeta(model_id=MODEL_ID, hook="resid_pre", layers=[1], width=hidden, pooling=pooling,
                              positions=positions),
                    {"weight": rng.normal(size=hidden * n_layers).astype(np.float32), "bias": np.zeros(1, np.float32)},
                    name=name)
              for name, pooling, positions, n_layers in (("mean_l1", "mean", "all", 1), ("max_prompt_l1", "max", "prompt", 1),
                                                         ("last_l1", "last", "all", 1))]
    probes.append(Probe(ProbeMeta(model_id=MODEL_ID, hook="resid_pre", layers=[0, 1], width=hidden, pooling="mean"),
                        {"weight": rng.normal(size=2 * hidden).astype(np.float32), "bias": np.zeros(1, np.float32)},
                        name="mean_l0_l1"))
    for p in probes:
        save_probe(p, tmp_path / "probes")
    svc = ProbesService(ProbesConfig(kafka=KafkaConfig(bootstrap_servers=kafka_broker.bootstrap), topic=topic,
                                     dlq_topic=topic + ".dlq", group_id=f"g-{topic}", probe_dir=str(tmp_path / "probes"),
                                     scores_topic=scores_topic, escalation_topic="", batch_max_delay_s=0.05,
                                     model_id=MODEL_ID, hidden_size=hidden))
    assert svc.probes.current.refused == {} and len(svc.probes.current.probes) == len(probes)
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    try:
        agent = CaptureAgent(AgentConfig(ring_dir=ring_dir, model_id=MODEL_ID, pod="pod-probes", ring_capacity=16 << 20),
                             Selection.preset("hidden-states"))
        ids, mask = left_padded(PROMPTS)
        kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                  return_dict_in_generate=True)
        ref = model.generate(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kw)
        backend = HFBackend(model, agent)
        rids = [f"hf-{b}" for b in range(len(PROMPTS))]
        out, ctxs = backend.generate(ids, attention_mask=mask, request_ids=rids, **kw)
        backend.detach()
        agent.close()
        assert torch.equal(out.sequences, ref.sequences)

        n_expected = len(rids) * len(probes)
        got = {}
        for msgs in consume_all(kafka_broker.bootstrap, scores_topic, n_expected, timeout_s=180).values():
            for key, value in msgs:
                sc = pb.ProbeScore()
                sc.ParseFromString(value)
                got[sc.request_id, sc.probe] = sc
        assert len(got) == n_expected
        P = ids.shape[1]
        for b, rid in enumerate(rids):
            n = len(PROMPTS[b])
            for p in probes:
                # the model's own residual stream of this request, position by position
                inputs = []
                for layer in p.meta.layers:
                    rows = torch.cat([ref.hidden_states[0][layer][b, P - n:]] +
                                     [ref.hidden_states[k][layer][b, :1] for k in range(1, NEW_TOKENS)]).float().numpy()
                    pos = np.arange(rows.shape[0])
                    inputs += [(layer, pos[:n], rows[:n], "prefill"), (layer, pos[n:], rows[n:], "decode")]
                want = p.score(inputs, prompt_tokens=n)
                sc = got[rid, p.name]
                assert sc.complete and sc.release == "complete" and sc.trace_id == ctxs[b].trace_id, (rid, p.name, sc.incomplete_reason)
                assert sc.score == want.score, (rid, p.name, sc.score, want.score)   # tolerance 0
                if p.meta.pooling != "last":
                    assert sc.tokens_scored == want.tokens_scored
    finally:
        svc.stop()
        thread.join(timeout=60)
    assert not thread.is_alive()
