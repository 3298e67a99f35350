"""The training helper: AUROC and the 1 %-FPR threshold are computed right; a probe trained on data
with a real signal finds it for every pooling; the threshold keeps the calibration FPR at the target;
`tensortrace probe-train` builds its dataset from a real capture run and from ClickHouse through the
query SDK, reads labels by request or trace id, and refuses bad labels with the line that is wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tensortrace.probes import POOLINGS, load_probe
from tensortrace.probes.train import (Example, auroc, evaluate, split_calibration, threshold_at_fpr, tpr_at_fpr,
                                      train_probe)
from tensortrace.devstack.probe_train import LabelError, main, read_labels

sklearn = pytest.importorskip("sklearn")

W = 12


def planted(n_pos=40, n_neg=40, seed=0, signal=1.5):
    """Requests of 6..14 tokens; positives carry `signal` along a fixed direction on 3 of their tokens
    (two anywhere, and the last)."""
    rng = np.random.default_rng(seed)
    direction = np.zeros(W)
    direction[0] = 1.0
    out = []
    for i in range(n_pos + n_neg):
        label = int(i < n_pos)
        T = int(rng.integers(6, 15))
        rows = rng.normal(size=(T, W))
        if label:
            rows[[*rng.choice(T - 1, 2, replace=False), T - 1]] += signal * 3 * direction   # the last one too
        out.append(Example(f"r{i:03d}", label, {4: (np.arange(T), rows.astype(np.float32), "prefill")},
                           prompt_tokens=T))
    return out


@pytest.mark.unit
def test_auroc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + y, 1)      # rounded: ties exercised
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.unit
def test_threshold_keeps_fpr_at_or_below_target():
    rng = np.random.default_rng(2)
    benign = rng.normal(size=1000)
    t = threshold_at_fpr(benign, 0.01)
    assert np.mean(benign >= t) <= 0.01
    assert np.mean(benign >= np.nextafter(t, -np.inf)) > 0.01 or np.sum(benign >= t) == 10
    small = np.array([0.1, 0.5, 0.3])
    t = threshold_at_fpr(small, 0.01)                # cannot resolve 1 %: just above the maximum
    assert t > 0.5 and t == np.nextafter(0.5, np.inf)
    s = np.array([0.9, 0.8, 0.2, 0.1, 0.6])
    y = np.array([1, 1, 0, 0, 1])
    assert tpr_at_fpr(s, y) == 1.0
    with pytest.raises(ValueError, match="no benign scores"):
        threshold_at_fpr([], 0.01)


@pytest.mark.unit
@pytest.mark.parametrize("pooling", list(POOLINGS))
def test_training_finds_a_planted_signal_with_every_pooling(pooling, tmp_path):
    train, test = planted(seed=0), planted(seed=1)
    rep = train_probe(train, model_id="m", hook="resid_pre", layers=[4], width=W, pooling=pooling,
                      positions="prompt", name=f"t-{pooling}", seed=0)
    m = evaluate(rep.probe, test)
    assert m["auroc"] >= 0.85, m
    # the threshold was set on held-out benign requests at the target rate
    cal = [e for e in train if e.id in set(rep.calibration_ids)]
    assert cal and all(e.label == 0 for e in cal) and not set(rep.calibration_ids) & set(rep.fit_ids)
    cal_scores = [rep.probe.score(e.layers, e.prompt_tokens).score for e in cal]
    assert np.mean(np.array(cal_scores) >= rep.probe.meta.threshold) <= 0.01
    assert rep.probe.meta.calibration["n_benign"] == len(cal)
    # the file written scores exactly like the probe in memory
    from tensortrace.probes import save_probe
    save_probe(rep.probe, tmp_path)
    back = load_probe(tmp_path / f"t-{pooling}")
    assert back.hash == rep.probe.hash
    assert [back.score(e.layers, e.prompt_tokens).score for e in test[:5]] == \
           [rep.probe.score(e.layers, e.prompt_tokens).score for e in test[:5]]


@pytest.mark.unit
def test_training_without_signal_is_near_chance():
    train, test = planted(seed=3, signal=0.0), planted(seed=4, signal=0.0)
    m = evaluate(train_probe(train, model_id="m", hook="resid_pre", layers=[4], width=W).probe, test)
    assert 0.3 <= m["auroc"] <= 0.7, m


@pytest.mark.unit
def test_calibration_split_is_benign_seeded_and_disjoint():
    ex = planted()
    fit, cal = split_calibration(ex, 0.33, seed=5)
    assert len(cal) == round(40 * 0.33) and all(e.label == 0 for e in cal)
    assert {e.id for e in fit} | {e.id for e in cal} == {e.id for e in ex} and not {e.id for e in fit} & {e.id for e in cal}
    assert [e.id for e in split_calibration(ex, 0.33, seed=5)[1]] == [e.id for e in cal]


@pytest.mark.unit
@pytest.mark.parametrize("content,suffix,match", [
    ('{"request_id": "a", "label": 2}\n', ".jsonl", r"labels\.jsonl:1: label 2 is not 0/1/true/false"),
    ('{"label": 1}\n', ".jsonl", "needs a 'request_id' or 'trace_id'"),
    ('{"trace_id": "abc", "label": 1}\n', ".jsonl", "trace_id 'abc' is not 32 hex characters"),
    ('{"request_id": "a", "label": 1}\n{"request_id": "a", "label": 0}\n', ".jsonl", r":2: request_id a labelled twice"),
    ('not json\n', ".jsonl", r":1: not JSON"),
    ('request_id,label\na,maybe\n', ".csv", r"labels\.csv:2: label 'maybe'"),
])
def test_bad_labels_are_refused_with_the_line(tmp_path, content, suffix, match):
    p = tmp_path / f"labels{suffix}"
    p.write_text(content)
    with pytest.raises(LabelError, match=match):
        read_labels(p)


@pytest.mark.unit
def test_labels_csv_and_jsonl(tmp_path):
    (tmp_path / "l.csv").write_text("request_id,label\nq1,1\nq2,false\n")
    assert read_labels(tmp_path / "l.csv") == {("request_id", "q1"): 1, ("request_id", "q2"): 0}
    (tmp_path / "l.jsonl").write_text(json.dumps({"trace_id": "AB" * 16, "label": True}) + "\n")
    assert read_labels(tmp_path / "l.jsonl") == {("trace_id", "ab" * 16): 1}


def _capture_run(ring_dir, n=24):
    """A real capture: tiny llama through the HF backend into a ring; 'positive' prompts contain
    token 7 repeated, benign ones do not. Returns {request_id: label} and {request_id: trace id hex}."""
    torch = pytest.importorskip("torch")
    from tensortrace.agent import AgentConfig, CaptureAgent, Selection
    from tensortrace.agent.backends.hf import HFBackend
    from tensortrace.testing.tiny_models import make

    model = make("llama")
    agent = CaptureAgent(AgentConfig(ring_dir=str(ring_dir), model_id="llama-tiny", ring_capacity=32 << 20),
                         Selection.from_doc({"selection": {"hooks": ["resid_pre"], "layers": [1]}}))
    backend = HFBackend(model, agent)
    rng = np.random.default_rng(0)
    labels, traces = {}, {}
    for i in range(n):
        label = i % 2
        toks = rng.integers(10, 90, size=int(rng.integers(5, 12))).tolist()
        if label:
            toks[1:4] = [7, 7, 7]
        x = torch.tensor([toks])
        rid = f"req-{i:02d}"
        _, ctxs = backend.generate(x, attention_mask=torch.ones_like(x), request_ids=[rid], max_new_tokens=2,
                                   do_sample=False, pad_token_id=0)
        labels[rid] = label
        traces[rid] = ctxs[0].trace_id.hex()
    backend.detach()
    agent.close()
    return labels, traces


@pytest.mark.unit
def test_probe_train_cli_from_a_capture_run(tmp_path, capsys):
    rings = tmp_path / "rings"
    rings.mkdir(mode=0o700)
    labels, traces = _capture_run(rings)
    lab = tmp_path / "labels.jsonl"
    # half keyed by request id, half by trace id; one unknown request is reported and skipped
    lines = [json.dumps({"request_id": r, "label": y}) if i % 2 else json.dumps({"trace_id": traces[r], "label": y})
             for i, (r, y) in enumerate(sorted(labels.items()))]
    lab.write_text("\n".join(lines + [json.dumps({"request_id": "never-served", "label": 1})]) + "\n")
    rc = main(["--capture", str(rings), "--labels", str(lab), "--layers", "1", "--out", str(tmp_path / "out"),
               "--name", "sevens", "--test-fraction", "0.25", "--positions", "all"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "skip request never-served: not in the capture" in err and "24 of 25 labelled requests usable" in err
    p = load_probe(tmp_path / "out" / "sevens")
    assert p.meta.model_id == "llama-tiny" and p.meta.width == 32 and p.meta.layers == [1]
    p.check_stream("llama-tiny", "resid_pre", 32)
    assert p.meta.metrics["test"]["n"] == 6 and "AUROC" in out and "wrote" in out
    assert p.meta.calibration["target_fpr"] == 0.01


@pytest.mark.unit
def test_probe_train_cli_refuses_bad_arguments(tmp_path, capsys):
    (tmp_path / "l.jsonl").write_text('{"request_id": "a", "label": 5}\n')
    assert main(["--capture", str(tmp_path), "--labels", str(tmp_path / "l.jsonl"), "--out", str(tmp_path)]) == 2
    assert "label 5 is not 0/1/true/false" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--capture", str(tmp_path), "--out", str(tmp_path), "--pooling", "median"])
    with pytest.raises(SystemExit):
        main(["--capture", str(tmp_path), "--labels", "x", "--out", str(tmp_path), "--pooling", "ema", "--alpha", "2"])
    assert "alpha" in capsys.readouterr().err


@pytest.mark.integration
def test_probe_train_reads_requests_through_the_query_sdk(tmp_path, tt_db):
    """Records of a real capture inserted the way the loader inserts them; the dataset read back
    through TensorTraceClient is the ring's rows, bit for bit."""
    from tensortrace.devstack.ringread import read_rings
    from tensortrace.probes.records import record_rows
    from tensortrace.devstack.probe_train import examples_from_capture, examples_from_query
    from tensortrace.testing.clickhouse import insert_rows

    client, db = tt_db
    rings = tmp_path / "rings"
    rings.mkdir(mode=0o700)
    labels, traces = _capture_run(rings, n=10)
    got = read_rings(str(rings))
    insert_rows(client, db, got.records, list(got.summaries.values()))
    keyed = {("trace_id" if i % 2 else "request_id", traces[r] if i % 2 else r): y
             for i, (r, y) in enumerate(sorted(labels.items()))}
    logs = []
    q, models = examples_from_query(client, keyed, "resid_pre", [1], False, logs.append, database=db)
    c, _ = examples_from_capture(str(rings), keyed, "resid_pre", [1], False, logs.append)
    assert models == {"llama-tiny"} and len(q) == len(c) == 10 and not logs
    for a, b in zip(sorted(q, key=lambda e: e.id), sorted(c, key=lambda e: e.id)):
        assert a.id == b.id and a.label == b.label and a.prompt_tokens == b.prompt_tokens
        assert np.array_equal(a.layers[1][0], b.layers[1][0]) and np.array_equal(a.layers[1][1], b.layers[1][1])
    assert record_rows(got.records[0])[2].dtype == np.float32
