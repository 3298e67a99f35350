"""The probe service's fast paths against their oracles, without a broker:
  * ScoresSink fed natively scanned envelopes (add_scan, tensortrace.wire.native) publishes exactly the
    scores, and counts exactly what, the same sink fed record by record from the Python decoder does;
  * last-token rows scored for many requests in one pass (ScoresSink._batch_last) give bit-identical
    scores to scoring each request on its own."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from tensortrace.consume import InvalidRecord, SealedBatch, Source
from tensortrace.probes import save_probe
from tensortrace.testing.synthetic import SyntheticRequest
from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec, native

from test_service_units import HIDDEN, make_probe, sink_for

pytestmark = pytest.mark.unit

PROBES = [
    make_probe("last1", layers=(1,), pooling="last"),
    make_probe("last1_prompt", layers=(2,), pooling="last", positions="prompt", seed=1),
    make_probe("last1_generated", layers=(0,), pooling="last", positions="generated", seed=2, bias=0.25),
    make_probe("last2", layers=(1, 2), pooling="last", seed=3),
    make_probe("mean_all", layers=(0, 1, 2), pooling="mean", seed=4),
    make_probe("max1", layers=(2,), pooling="max", seed=5),
]


def requests(n=12):
    out = []
    for i in range(n):
        dtype = [torch.bfloat16, torch.float16, torch.float32][i % 3]
        out.append(SyntheticRequest.make(f"r{i}", layers=3, hidden=HIDDEN, prompt=3 + i % 4, generated=1 + i % 5,
                                         dtype=dtype, seed=i))
    return out


def messages(reqs):
    msgs = []
    for r in reqs:
        msgs.extend(v for _, v in r.messages(per_message=5))
    # a re-delivered message and a record that fails its check (dead-lettered both ways)
    msgs.append(msgs[3])
    bad = pb.TensorRecord()
    bad.CopyFrom(reqs[0].records[0])
    bad.raw_size += 1
    msgs.append(codec.encode_envelope([bad]))
    return msgs


def run_sink(tmp_path, msgs, *, use_native: bool, batch_scoring: bool = True, probes=PROBES):
    d = tmp_path / ("native" if use_native else "python") / str(batch_scoring) / str(len(probes))
    for p in probes:
        save_probe(p, d)
    sink, probes, pub = sink_for(d, escalation="")
    sink.batch_scoring = batch_scoring
    refused = []
    for off, value in enumerate(msgs):
        src = Source("t", 0, off)
        sc = native.scan(value) if use_native else None
        if sc is not None:
            refused.extend((off, i, e.reason.value, str(e)) for i, e in sink.add_scan(sc, src))
            continue
        for i, r in enumerate(codec.decode_envelope(value)):
            try:
                if r.WhichOneof("kind") == "summary":
                    sink.add_summary(r.summary, src)
                else:
                    sink.add_tensor(r.tensor, src)
            except InvalidRecord as e:
                refused.append((off, i, e.reason.value, str(e)))
    data = sink.seal()
    assert data is not None
    assert sink.flush(SealedBatch(data=data), threading.Event())
    scores = []
    for sc in pub.scores():
        sc.scored_time_unix_nano = 0
        scores.append(sc.SerializeToString())
    stats = dict(sink.stats.__dict__)
    for k in ("score_seconds", "publish_seconds"):
        stats.pop(k)
    return sorted(scores), stats, refused


@pytest.mark.skipif(not native.AVAILABLE, reason="native decoder not built (no compiler)")
def test_native_scan_path_publishes_the_same_scores_and_counts(tmp_path):
    msgs = messages(requests())
    assert all(native.scan(m) is not None for m in msgs)
    py = run_sink(tmp_path, msgs, use_native=False)
    nat = run_sink(tmp_path, msgs, use_native=True)
    assert nat == py
    scores, stats, refused = nat
    assert len(scores) == 12 * len(PROBES) and [r[2] for r in refused] == ["raw_size"]
    assert stats["records_skipped"] > 0 and stats["records_kept"] > 0


@pytest.mark.skipif(not native.AVAILABLE, reason="native decoder not built (no compiler)")
def test_layers_read_only_by_last_token_probes_hold_one_record_per_phase_and_score_the_same(tmp_path):
    # layer 1: one last-token probe over all positions; layer 2: a prompt-only and a generated-only
    # last-token probe (each needs the latest record of its own phase); layer 0: a mean probe too,
    # so its records are all held. The scores must equal the Python path's, which holds everything.
    probes = [make_probe("last_all", layers=(1,), pooling="last"),
              make_probe("last_prompt", layers=(2,), pooling="last", positions="prompt", seed=1),
              make_probe("last_gen", layers=(2,), pooling="last", positions="generated", seed=2),
              make_probe("last0", layers=(0,), pooling="last", seed=3),
              make_probe("mean0", layers=(0,), pooling="mean", seed=4)]
    reqs = [SyntheticRequest.make(f"r{i}", layers=3, hidden=HIDDEN, prompt=3 + i % 4, generated=2 + i % 5,
                                  dtype=torch.bfloat16, seed=i) for i in range(8)]
    msgs = [v for r in reqs for _, v in r.messages(per_message=40)]   # a request's records in one run
    py = run_sink(tmp_path, msgs, use_native=False, probes=probes)
    nat = run_sink(tmp_path, msgs, use_native=True, probes=probes)
    assert nat[0] == py[0] and nat[2] == py[2]
    superseded = nat[1].pop("records_superseded")
    assert py[1].pop("records_superseded") == 0 and nat[1] == py[1]
    # per request, layers 1 and 2 hold their latest prefill and latest decode record (one prefill
    # record and generated - 1 decode records each); layer 0 (a mean probe reads it) holds all
    decode_records = [(2 + i % 5) - 1 for i in range(8)]
    assert superseded == sum(2 * (d - 1) for d in decode_records) > 0
    got = [pb.ProbeScore.FromString(x) for x in nat[0]]
    assert len(got) == 8 * len(probes) and all(x.complete for x in got)


def test_batched_last_token_scores_are_bit_identical_to_request_by_request(tmp_path):
    msgs = messages(requests())
    one = run_sink(tmp_path, msgs, use_native=False, batch_scoring=False)
    batched = run_sink(tmp_path, msgs, use_native=False, batch_scoring=True)
    assert batched == one
    got = [pb.ProbeScore.FromString(s) for s in batched[0]]
    assert {s.probe for s in got if s.pooling == "last" and s.tokens_scored == 1} >= {"last1", "last1_generated"}


def test_batch_pass_is_used_for_single_layer_last_probes(tmp_path, monkeypatch):
    from tensortrace.probes.sink import ScoresSink

    seen = {}
    orig = ScoresSink._batch_last

    def spy(self, todo, slots):
        out = orig(self, todo, slots)
        seen.update(out)
        return out
    monkeypatch.setattr(ScoresSink, "_batch_last", spy)
    run_sink(tmp_path, messages(requests()), use_native=False)
    names = {name for _, name in seen}
    assert names == {"last1", "last1_prompt", "last1_generated"}
    # every request for last1 and last1_prompt; last1_generated only where a decode step was captured
    # (generated == 1: the first generated token comes out of the prefill forward, no decode record)
    assert len(seen) == 12 + 12 + sum(1 for i in range(12) if 1 + i % 5 > 1)
