"""End to end: a tiny model with the real capture agent -> ring -> exporter process -> real Kafka ->
a plain kafka-python consumer reassembles every tensor and checks it bit-exact against the model's
own tensors (`output_hidden_states` / `output_logits` of an uninstrumented run), and checks that
each request summary matches what arrived."""

from __future__ import annotations

import collections
import os

import pytest

torch = pytest.importorskip("torch")

from tensortrace.agent import AgentConfig, CaptureAgent, Selection  # noqa: E402
from tensortrace.agent.backends.hf import HFBackend  # noqa: E402
from tensortrace.testing.ringgen import consume_all  # noqa: E402
from tensortrace.testing.tiny_models import left_padded, make  # noqa: E402
from tensortrace.wire import codec  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPTS = [[5, 6, 7], [11, 12, 13, 14, 15, 16], [21], [31, 32, 33, 34]]
NEW_TOKENS = 4


def test_tiny_model_to_kafka_bit_exact_with_matching_summaries(kafka_broker, fresh_topic, ring_dir, exporter_factory):
    topic = fresh_topic(partitions=3)
    exp = exporter_factory(ring_dir, kafka_broker.bootstrap, topic, extra=["--compression", "zstd", "--cleanup-grace-s", "30"])
    model = make("llama")
    ids, mask = left_padded(PROMPTS)
    B, P = ids.shape
    gen_kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                  return_dict_in_generate=True)
    ref = model.generate(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_logits=True, **gen_kw)

    agent = CaptureAgent(AgentConfig(ring_dir=ring_dir, model_id="tiny-llama", pod="pod-e2e", ring_capacity=16 << 20),
                         Selection.preset("hidden-states"))
    backend = HFBackend(model, agent)
    rids = [f"e2e-{b}" for b in range(B)]
    out, ctxs = backend.generate(ids, attention_mask=mask, request_ids=rids, **gen_kw)
    backend.detach()
    assert torch.equal(out.sequences, ref.sequences)
    stats = agent.stats()
    agent.close()   # the exporter drains the ring, detaches, and removes it after the grace period

    asm = codec.ChunkAssembler()
    tensors = collections.defaultdict(list)    # (rid, hook, layer) -> [TensorRecord]
    summaries, seqs = {}, collections.Counter()

    def complete(records):
        for key, r in records[complete.n:]:
            if r.HasField("summary"):
                summaries[r.summary.request_id] = r.summary
                assert key == r.summary.request_id.encode()
                continue
            t = asm.add(r.tensor)
            if t is not None:
                assert key == t.request_id.encode()
                if seqs[t.seq] == 0:
                    tensors[(t.request_id, t.hook, t.layer)].append(t)
                seqs[t.seq] += 1
        complete.n = len(records)
        return len(summaries) == B and all(
            sum(len(v) for k, v in tensors.items() if k[0] == rid) >= summaries[rid].records_captured for rid in summaries)

    complete.n = 0
    consume_all(kafka_broker.bootstrap, topic, complete, timeout_s=120)
    assert len(summaries) == B

    n_layers = model.config.num_hidden_layers
    for b, rid in enumerate(rids):
        n_prompt = len(PROMPTS[b])
        s = summaries[rid]
        arrived = sum(len(v) for k, v in tensors.items() if k[0] == rid)
        assert s.records_captured == arrived and s.records_dropped == 0 and s.complete
        assert s.trace_id == ctxs[b].trace_id and s.prompt_tokens == n_prompt
        assert s.producer.pod == "pod-e2e"

        def rows(hook, layer):
            recs = sorted(tensors[(rid, hook, layer)], key=lambda t: (t.step, t.token_start))
            assert all(r.trace_id == ctxs[b].trace_id for r in recs)
            return torch.cat([codec.record_to_tensor(r) for r in recs]), [p for r in recs for p in range(r.token_start, r.token_end)]

        for L in range(n_layers + 1):
            hook, layer = ("resid_pre", L) if L < n_layers else ("resid_final", -1)
            want = torch.cat([ref.hidden_states[0][L][b, P - n_prompt:]] +
                             [ref.hidden_states[k][L][b, :1] for k in range(1, NEW_TOKENS)])
            got, positions = rows(hook, layer)
            assert positions == list(range(n_prompt + NEW_TOKENS - 1))
            assert got.dtype == want.dtype and torch.equal(got, want), f"{rid} {hook} {layer} differs from the model's"
        got, positions = rows("logits", -1)
        assert torch.equal(got, torch.stack([ref.logits[k][b] for k in range(NEW_TOKENS)]))
    # every record the agent wrote arrived (once here: no faults injected)
    assert sum(seqs.values()) == len(seqs) == stats.written
    ring = exp.wait_for(lambda: (r := exp.ring(os.path.basename(agent.ring_path))) and r.state == "detached" and r,
                        what="agent ring drained and detached")
    assert ring.frames_released == ring.frames_committed and ring.frames_dropped_by_producer == 0
