"""The probe service's sink and probe directory without a broker: which payloads are read, what is
scored, how completeness, probe faults, file errors, hot reload and shadow mode show in the scores.
The probes are the SDK's own (tensortrace.probes), saved to and loaded from real files."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest

from tensortrace.consume import Release, SealedBatch, Source
from tensortrace.probes import Probe, ProbeMeta, save_probe
from tensortrace.probes.service_probeset import ProbeDirectory
from tensortrace.probes.sink import ScoresSink, rows_float32
from tensortrace.testing.synthetic import SyntheticRequest
from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec

pytestmark = pytest.mark.unit

MODEL = "synthetic/tiny"
HIDDEN = 16


def make_probe(name, layers=(1,), hook="resid_pre", pooling="mean", positions="all", width=HIDDEN, model=MODEL,
               threshold=0.5, seed=0, bias=0.0):
    rng = np.random.default_rng(seed)
    meta = ProbeMeta(model_id=model, hook=hook, layers=list(layers), width=width, pooling=pooling,
                     positions=positions, threshold=threshold)
    weights = {"weight": rng.normal(size=width * len(layers)).astype(np.float32),
               "bias": np.array([bias], dtype=np.float32)}
    return Probe(meta, weights, name=name)


class Published:
    """The sink's publish function: collects what would go to Kafka."""

    def __init__(self):
        self.messages = []

    def __call__(self, messages, stopping):
        self.messages.extend(messages)
        return True

    def scores(self, topic="scores"):
        out = []
        for t, key, value in self.messages:
            if t == topic:
                sc = pb.ProbeScore()
                sc.ParseFromString(value)
                assert key == sc.request_id.encode()
                out.append(sc)
        return out


class Clock:
    def __init__(self):
        self.ns = 0

    def __call__(self):
        return self.ns


def sink_for(directory, escalation="escalations", **kw):
    probes = ProbeDirectory(str(directory), **{k: kw.pop(k) for k in list(kw) if k in (
        "model_id", "hidden_size", "shadow", "shadow_names", "thresholds")})
    probes.reload(force=True)
    pub = Published()
    sink = ScoresSink(probes, pub, scores_topic="scores", escalation_topic=escalation, **kw)
    return sink, probes, pub


def feed(sink, req, records=None, summary=True, partition=0, offset=0):
    recs = req.records if records is None else records
    for i, rec in enumerate(recs):
        sink.add_tensor(rec, Source("t", partition, offset + i))
    if summary:
        sink.add_summary(req.summary, Source("t", partition, offset + len(recs)))


def flush(sink):
    data = sink.seal()
    if data is not None:
        assert sink.flush(SealedBatch(data=data), threading.Event())
    return data


def offline(probe, req, layers=None):
    """The same probe, run offline (Probe.score) on the request's own tensors."""
    inputs = []
    for layer in layers or probe.meta.layers:
        t = req.truth[probe.meta.hook, layer].float().numpy()
        n_prompt = req.summary.prompt_tokens
        pos = np.arange(t.shape[0])
        inputs.append((layer, pos[:n_prompt], t[:n_prompt], "prefill"))
        if t.shape[0] > n_prompt:
            inputs.append((layer, pos[n_prompt:], t[n_prompt:], "decode"))
    return probe.score(inputs, prompt_tokens=req.summary.prompt_tokens)


def test_a_complete_request_is_scored_complete_and_equal_to_the_probe_run_offline(tmp_path):
    probes = [make_probe("mean1", layers=(1,)), make_probe("last2", layers=(2,), pooling="last", seed=1),
              make_probe("last03", layers=(0, 3), pooling="last", seed=5),
              make_probe("last_prompt", layers=(1,), pooling="last", positions="prompt", seed=6),
              make_probe("max13", layers=(1, 3), pooling="max", seed=2),
              make_probe("prompt_mean", layers=(0,), positions="prompt", seed=3),
              make_probe("gen_mean", layers=(0,), positions="generated", seed=4)]
    for p in probes:
        save_probe(p, tmp_path)
    sink, _, pub = sink_for(tmp_path)
    reqs = [SyntheticRequest.make(f"r{i}", layers=4, hidden=HIDDEN, prompt=5 + i, generated=4 + i) for i in range(3)]
    for i, req in enumerate(reqs):
        feed(sink, req, offset=1000 * i)
    flush(sink)
    got = {(s.request_id, s.probe): s for s in pub.scores()}
    assert len(got) == len(reqs) * len(probes)
    for req in reqs:
        for p in probes:
            sc = got[req.request_id, p.name]
            want = offline(p, req)
            # Tolerance: none. The service widens bf16 rows to float32 exactly and runs the SDK's own
            # update/finalize, the same float64 arithmetic as Probe.score offline.
            assert sc.score == want.score, (req.request_id, p.name, sc.score, want.score)
            assert sc.complete and sc.incomplete_reason == "" and sc.release == "complete"
            if p.meta.pooling == "last":   # the service feeds the last token only: its one token score
                assert sc.tokens_scored == 1 and list(sc.token_positions) == want.token_positions[-1:].tolist()
                np.testing.assert_array_equal(np.asarray(sc.token_scores, np.float32),
                                              want.token_scores[-1:].astype(np.float32))
                continue
            assert sc.tokens_scored == want.tokens_scored > 0
            assert list(sc.token_positions) == want.token_positions.tolist()
            np.testing.assert_array_equal(np.asarray(sc.token_scores, np.float32), want.token_scores.astype(np.float32))
            assert sc.probe_hash == p.hash and sc.trace_id == req.trace_id and sc.span_id == req.summary.span_id
            assert sc.hook == "resid_pre" and list(sc.layers) == list(p.meta.layers) and sc.pooling == p.meta.pooling
            assert sc.request_end_time_unix_nano == req.summary.end_time_unix_nano and sc.scored_time_unix_nano > 0
            assert sc.flagged == (sc.score >= 0.5) and not sc.shadow
    # flagged (non-shadow) scores also go to the escalation topic, unchanged
    flagged = sorted((s.request_id, s.probe) for s in pub.scores() if s.flagged)
    assert sorted((s.request_id, s.probe) for s in pub.scores("escalations")) == flagged
    assert sink.stats.scores == len(got) and sink.stats.requests == {"complete": 3}


def test_records_no_probe_needs_are_counted_but_their_payloads_never_decoded(tmp_path, monkeypatch):
    save_probe(make_probe("p", layers=(2,)), tmp_path)
    sink, _, pub = sink_for(tmp_path)
    decoded = []
    real = codec.decode_payload
    monkeypatch.setattr(codec, "decode_payload", lambda payload, *a: decoded.append(len(payload)) or real(payload, *a))
    # LZ4 payloads: every payload a probe reads goes through codec.decode_payload, so the calls count them
    req = SyntheticRequest.make("r", layers=30, hidden=HIDDEN, prompt=6, generated=5, encoding=pb.LZ4)
    feed(sink, req)
    flush(sink)
    [sc] = pub.scores()
    assert sc.complete
    needed = [r for r in req.records if r.hook == "resid_pre" and r.layer == 2]
    others = [r for r in req.records if not (r.hook == "resid_pre" and r.layer == 2)]
    assert len(decoded) == len(needed) == 5            # prefill + 4 decode steps of layer 2 only
    assert sink.stats.records_kept == len(needed) and sink.stats.records_skipped == len(others)
    assert sink.stats.bytes_skipped == sum(r.raw_size for r in others)
    assert sink.stats.bytes_kept == sum(r.raw_size for r in needed)


def test_prompt_only_probe_keeps_only_prefill_records(tmp_path):
    save_probe(make_probe("p", layers=(0,), positions="prompt"), tmp_path)
    sink, _, pub = sink_for(tmp_path)
    req = SyntheticRequest.make("r", layers=2, hidden=HIDDEN, prompt=6, generated=5)
    feed(sink, req)
    flush(sink)
    assert sink.stats.records_kept == 1   # the one prefill record of layer 0
    [sc] = pub.scores()
    assert sc.complete and sc.tokens_scored == 6 and sc.score == offline(make_probe("p", layers=(0,), positions="prompt"), req).score


def test_a_request_with_a_missing_record_is_scored_incomplete_after_the_timeout_never_complete(tmp_path):
    save_probe(make_probe("p", layers=(1,)), tmp_path)
    sink, _, pub = sink_for(tmp_path, timeout_s=5)
    clock = Clock()
    sink.view.clock = clock
    req = SyntheticRequest.make("r", layers=2, hidden=HIDDEN, prompt=4, generated=4)
    lost = [i for i, r in enumerate(req.records) if r.layer == 1 and r.phase == pb.DECODE][0]
    feed(sink, req, records=[r for i, r in enumerate(req.records) if i != lost])
    assert flush(sink) is None and pub.messages == []          # still waiting for the lost record
    clock.ns += 6 * 10**9
    sink.view._last_scan = -10**12
    flush(sink)
    [sc] = pub.scores()
    assert not sc.complete and sc.release == "timeout"
    assert f"{len(req.records) - 1} of {len(req.records)} captured records arrived" in sc.incomplete_reason
    assert sc.tokens_scored == req.summary.prompt_tokens + req.summary.generated_tokens - 2   # one row missing
    assert math.isfinite(sc.score)


def test_a_request_whose_summary_reports_drops_is_scored_incomplete_with_the_reason(tmp_path):
    save_probe(make_probe("p", layers=(1,)), tmp_path)
    sink, _, pub = sink_for(tmp_path)
    req = SyntheticRequest.make("r", layers=2, hidden=HIDDEN, prompt=4, generated=3)
    req.summary.records_dropped = 2
    req.summary.dropped_by_reason["ring_full"] = 2
    req.summary.complete = False
    req.summary.incomplete_reason = "ring full: 2 records dropped"
    feed(sink, req)
    flush(sink)
    [sc] = pub.scores()
    assert not sc.complete and sc.release == "complete"     # released at once: every announced record came
    assert "ring full" in sc.incomplete_reason or "dropped" in sc.incomplete_reason


def test_a_probe_whose_layer_was_not_captured_gives_an_explicit_incomplete_score(tmp_path):
    save_probe(make_probe("p", layers=(7,)), tmp_path)          # the stream carries layers 0..1
    sink, _, pub = sink_for(tmp_path)
    req = SyntheticRequest.make("r", layers=2, hidden=HIDDEN)
    feed(sink, req)
    flush(sink)
    [sc] = pub.scores()
    assert not sc.complete and math.isnan(sc.score) and not sc.flagged and sc.tokens_scored == 0
    assert "no records of resid_pre layer(s) [7]" in sc.incomplete_reason


class Exploding(Probe):
    def update(self, state, layer, positions, rows, phase="prefill"):
        raise RuntimeError("boom")


def test_a_probe_that_raises_is_isolated_and_counted_and_the_others_keep_scoring(tmp_path):
    save_probe(make_probe("good", layers=(1,)), tmp_path)
    sink, probes, pub = sink_for(tmp_path)
    bad = make_probe("bad", layers=(1,), seed=9)
    bad.__class__ = Exploding
    # put the exploding probe beside the good one, as if an installed entry point misbehaved
    from dataclasses import replace
    good = probes.current.probes[0]
    probes._publish([good, replace(good, probe=bad, name="bad", hash=bad.hash, path="bad.json")], {}, 1, recheck=True)
    for i in range(3):
        feed(sink, SyntheticRequest.make(f"r{i}", layers=2, hidden=HIDDEN), offset=100 * i)
    flush(sink)
    assert sorted(s.request_id for s in pub.scores()) == ["r0", "r1", "r2"]
    assert {s.probe for s in pub.scores()} == {"good"}
    assert sink.stats.errors == {("bad", "update"): 3}


def write_json(path, d):
    path.write_text(json.dumps(d))


def test_bad_probe_files_are_refused_with_a_clear_error_and_the_others_load(tmp_path):
    save_probe(make_probe("good", layers=(1,)), tmp_path)
    save_probe(make_probe("other_model", model="someone/else"), tmp_path)
    save_probe(make_probe("unknown_pooling"), tmp_path)
    meta = json.loads((tmp_path / "unknown_pooling.json").read_text())
    meta["pooling"] = "median"
    write_json(tmp_path / "unknown_pooling.json", meta)
    save_probe(make_probe("no_weights"), tmp_path)
    (tmp_path / "no_weights.safetensors").unlink()
    save_probe(make_probe("code"), tmp_path)
    meta = json.loads((tmp_path / "code.json").read_text())
    meta["module"] = "os.system"
    write_json(tmp_path / "code.json", meta)
    save_probe(make_probe("wide", width=32), tmp_path)

    # with the stream's model configured, the other model's probe is refused at load
    sink, probes, pub = sink_for(tmp_path, model_id=MODEL)
    refused = probes.current.refused
    by_name = {k.rsplit("/", 1)[-1]: v for k, v in refused.items()}
    assert "trained on model 'someone/else'" in by_name["other_model.json"] and "--model-id" in by_name["other_model.json"]
    assert "unknown pooling 'median'" in by_name["unknown_pooling.json"]
    assert "weights file is missing" in by_name["no_weights.safetensors"]
    assert "ask for code" in by_name["code.json"]
    assert {p.name for p in probes.current.probes} == {"good", "wide"}   # wide: checked at the first record

    # the hidden size is checked when the first record of its model and hook arrives, before any score
    feed(sink, SyntheticRequest.make("r", layers=2, hidden=HIDDEN))
    flush(sink)
    assert "hidden size 32" in probes.current.refused[str(tmp_path / "wide.json")]
    assert {p.name for p in probes.current.probes} == {"good"}
    assert [s.probe for s in pub.scores()] == ["good"]


def test_without_a_configured_model_a_probe_is_refused_when_the_stream_shows_it_does_not_fit(tmp_path):
    save_probe(make_probe("good", layers=(1,)), tmp_path)
    save_probe(make_probe("other_model", model="someone/else"), tmp_path)
    sink, probes, pub = sink_for(tmp_path)
    feed(sink, SyntheticRequest.make("r", layers=2, hidden=HIDDEN))
    flush(sink)
    why = probes.current.refused[str(tmp_path / "other_model.json")]
    assert "does not fit the stream" in why and "synthetic/tiny" in why
    assert [s.probe for s in pub.scores()] == ["good"]


def test_hot_reload_adds_changes_and_removes_probes_without_a_restart(tmp_path):
    save_probe(make_probe("a", layers=(1,)), tmp_path)
    sink, probes, pub = sink_for(tmp_path)
    feed(sink, SyntheticRequest.make("r0", layers=2, hidden=HIDDEN), offset=0)
    flush(sink)
    assert {s.probe for s in pub.scores()} == {"a"}
    hash_a = pub.scores()[0].probe_hash

    # a new probe file, and a changed one (new weights: new hash)
    save_probe(make_probe("b", layers=(0,), seed=5), tmp_path)
    save_probe(make_probe("a", layers=(1,), seed=7), tmp_path)
    assert probes.reload()
    pub.messages.clear()
    feed(sink, SyntheticRequest.make("r1", layers=2, hidden=HIDDEN), offset=100)
    flush(sink)
    got = {s.probe: s for s in pub.scores()}
    assert set(got) == {"a", "b"} and got["a"].probe_hash != hash_a and all(s.complete for s in got.values())

    # a bad file appears: reported, the others keep scoring; then a probe is removed
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "b.json").unlink()
    (tmp_path / "b.safetensors").unlink()
    assert probes.reload()
    assert "is not valid JSON" in probes.current.refused[str(tmp_path / "broken.json")]
    pub.messages.clear()
    feed(sink, SyntheticRequest.make("r2", layers=2, hidden=HIDDEN), offset=200)
    flush(sink)
    assert [s.probe for s in pub.scores()] == ["a"]
    assert not probes.reload()                     # nothing changed: nothing re-read


def test_a_probe_loaded_while_a_request_is_in_flight_scores_it_incomplete(tmp_path):
    save_probe(make_probe("a", layers=(1,)), tmp_path)
    sink, probes, pub = sink_for(tmp_path)
    req = SyntheticRequest.make("r", layers=2, hidden=HIDDEN, prompt=4, generated=4)
    half = len(req.records) // 2
    feed(sink, req, records=req.records[:half], summary=False)
    save_probe(make_probe("late", layers=(1,), seed=3), tmp_path)
    assert probes.reload()
    for i, rec in enumerate(req.records[half:]):
        sink.add_tensor(rec, Source("t", 0, half + i))
    sink.add_summary(req.summary, Source("t", 0, len(req.records)))
    flush(sink)
    got = {s.probe: s for s in pub.scores()}
    assert got["a"].complete
    assert not got["late"].complete and "loaded while the request was in flight" in got["late"].incomplete_reason


def test_shadow_mode_scores_but_never_flags_or_escalates(tmp_path):
    # bias +50: every token's logit is far above the threshold
    save_probe(make_probe("loud", layers=(1,), bias=50.0), tmp_path)
    save_probe(make_probe("quiet", layers=(1,), bias=50.0, seed=2), tmp_path)
    sink, _, pub = sink_for(tmp_path, shadow_names=frozenset({"quiet"}))
    feed(sink, SyntheticRequest.make("r", layers=2, hidden=HIDDEN))
    flush(sink)
    got = {s.probe: s for s in pub.scores()}
    assert got["loud"].flagged and not got["loud"].shadow
    assert got["quiet"].shadow and not got["quiet"].flagged and got["quiet"].score > 0.99
    assert [s.probe for s in pub.scores("escalations")] == ["loud"]
    assert sink.stats.shadow_flagged == 1 and sink.stats.flagged == 1

    sink2, _, pub2 = sink_for(tmp_path, shadow=True)            # global shadow mode
    feed(sink2, SyntheticRequest.make("r", layers=2, hidden=HIDDEN))
    flush(sink2)
    assert all(s.shadow and not s.flagged for s in pub2.scores()) and pub2.scores("escalations") == []


def test_threshold_override_from_the_config_replaces_the_calibrated_one(tmp_path):
    save_probe(make_probe("p", layers=(1,), threshold=0.5), tmp_path)
    sink, _, pub = sink_for(tmp_path, thresholds={"p": 1.5})
    feed(sink, SyntheticRequest.make("r", layers=2, hidden=HIDDEN))
    flush(sink)
    [sc] = pub.scores()
    assert sc.threshold == 1.5 and not sc.flagged


def test_rows_are_widened_to_float32_bit_exactly_for_every_float_dtype_and_encoding():
    import torch

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for enc in (pb.RAW, pb.LZ4, pb.SHUFFLE_ZSTD):
            t = torch.randn(5, 8).to(dtype)
            rec = codec.tensor_to_record(t, encoding=enc, hook="resid_pre", layer=0, token_start=3)
            np.testing.assert_array_equal(rows_float32(rec), t.float().numpy())


def test_a_failed_publish_is_not_durable_and_nothing_is_counted(tmp_path):
    save_probe(make_probe("p", layers=(1,)), tmp_path)
    probes = ProbeDirectory(str(tmp_path))
    probes.reload(force=True)
    stopping = threading.Event()
    stopping.set()
    sink = ScoresSink(probes, lambda messages, stopping: False, scores_topic="scores")
    feed(sink, SyntheticRequest.make("r", layers=2, hidden=HIDDEN))
    data = sink.seal()
    assert data is not None and data.requests[0][0].release is Release.COMPLETE
    assert sink.flush(SealedBatch(data=data), stopping) is False
    assert sink.stats.scores == 0 and sink.stats.requests == {}


def test_bad_service_flags_are_all_reported_at_once_with_their_flag_and_exit_2(capsys):
    from tensortrace.cli import main

    rc = main(["probes", "--probe-dir", "", "--scores-topic", "tensortrace.activations", "--thresholds", '{"a": "x"}',
               "--escalation-topic", "tensortrace.activations.dlq"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "probe_dir (--probe-dir): empty" in err
    assert "scores_topic (--scores-topic): 'tensortrace.activations' is also the activation or dead-letter topic" in err
    assert "escalation_topic (--escalation-topic): 'tensortrace.activations.dlq' is also" in err
    assert "thresholds (--thresholds): 'a': 'x' is not a number" in err


def test_a_request_whose_summary_never_comes_is_scored_incomplete_saying_so(tmp_path):
    save_probe(make_probe("p", layers=(1,)), tmp_path)
    sink, _, pub = sink_for(tmp_path, timeout_s=5)
    clock = Clock()
    sink.view.clock = clock
    req = SyntheticRequest.make("r", layers=2, hidden=HIDDEN, prompt=4, generated=3)
    feed(sink, req, summary=False)
    clock.ns += 6 * 10**9
    sink.view._last_scan = -10**12
    flush(sink)
    [sc] = pub.scores()
    assert not sc.complete and sc.release == "timeout" and sc.request_end_time_unix_nano == 0
    assert sc.incomplete_reason == f"timeout: no summary arrived ({len(req.records)} records did; the producer may have died)"


def test_the_polling_reload_waits_until_a_change_has_settled(tmp_path):
    save_probe(make_probe("a", layers=(1,)), tmp_path)
    probes = ProbeDirectory(str(tmp_path))
    probes.reload(force=True)
    old_hash = probes.current.probes[0].hash
    # the weights of a new version are written, its metadata not yet: not loaded
    new = make_probe("a", layers=(1,), seed=11)
    wbytes, jbytes = new.files_bytes()
    (tmp_path / "a.safetensors").write_bytes(wbytes)
    assert not probes.reload(settle=True) and probes.current.probes[0].hash == old_hash
    (tmp_path / "a.json").write_bytes(jbytes)
    assert not probes.reload(settle=True)          # changed again since the last poll: wait once more
    assert probes.reload(settle=True) and probes.current.probes[0].hash == new.hash


def without_prompt_prefix(req, k):
    """The request as an engine with a prefix cache captures it: its first k prompt positions were
    served from the cache, so no forward (and no tap) computed them. Every record still arrives as
    the summary announces: only the positions are missing."""
    out = []
    for rec in req.records:
        if rec.phase == pb.PREFILL and rec.positions_kind == pb.TOKEN_RANGE and rec.token_start == 0:
            rows = rec.token_end - rec.token_start
            per_row = rec.raw_size // rows
            cut = pb.TensorRecord()
            cut.CopyFrom(rec)
            cut.token_start = k
            cut.shape[0] = rows - k
            cut.raw_size = per_row * (rows - k)
            cut.payload = rec.payload[per_row * k:]
            out.append(cut)
        else:
            out.append(rec)
    return out


def test_a_probe_pooling_prompt_positions_a_prefix_cache_skipped_is_scored_incomplete_with_the_reason(tmp_path):
    # The records are all there (the view releases the request COMPLETE), but the probe pools over
    # positions that were never computed: its score is explicitly incomplete, never complete.
    for p in (make_probe("prompt_mean", layers=(0,), positions="prompt"),
              make_probe("all_mean", layers=(1,), positions="all", seed=1),
              make_probe("gen_mean", layers=(1,), positions="generated", seed=2)):
        save_probe(p, tmp_path)
    sink, _, pub = sink_for(tmp_path)
    req = SyntheticRequest.make("r", layers=2, hidden=HIDDEN, prompt=6, generated=3, encoding=pb.RAW)
    feed(sink, req, records=without_prompt_prefix(req, 2))
    flush(sink)
    got = {s.probe: s for s in pub.scores()}
    for name in ("prompt_mean", "all_mean"):
        assert not got[name].complete, name
        assert "2 of 6 prompt positions were not captured (from position 0" in got[name].incomplete_reason
    assert got["gen_mean"].complete   # it pools generated positions only, all of which were computed

    sink, _, pub = sink_for(tmp_path)   # the same request with every position: complete
    feed(sink, req)
    flush(sink)
    assert all(s.complete for s in pub.scores())
