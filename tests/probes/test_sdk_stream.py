"""The probe SDK scores a request the same online and offline: records shuffled and cut into pieces
give the bit-identical score and per-token scores that `Probe.score` gives (tolerance: exact — each
token's logit comes from its own row, float64, layers summed in layer order, pooling once in
position order). A plain-numpy reference checks that the number itself is right (|diff| <= 1e-9)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tensortrace.probes import POOLINGS, Probe, ProbeInputError, ProbeMeta, ProbeState

pytestmark = pytest.mark.unit

W, PROMPT, GEN = 16, 23, 9
LAYERS = [2, 5, 7]


def make_probe(pooling="mean", layers=(5,), combine="concat", positions="all", params=None, seed=0) -> Probe:
    rng = np.random.default_rng(seed)
    meta = ProbeMeta(model_id="tiny", hook="resid_pre", layers=list(layers), width=W, pooling=pooling,
                     pooling_params=params or {}, positions=positions, layer_combine=combine, threshold=0.5)
    d = meta.in_dim
    w = {"weight": rng.normal(0, 0.3, d).astype(np.float32), "bias": np.array([0.2], np.float32)}
    if pooling == "attention":
        w["attn_query"] = rng.normal(0, 0.5, d).astype(np.float32)
    return Probe(meta, w, name=f"p-{pooling}")


def request_rows(seed=1):
    """{layer: (positions, rows, phases)} for a request with PROMPT prompt and GEN generated tokens."""
    rng = np.random.default_rng(seed)
    n = PROMPT + GEN
    pos = np.arange(n)
    phases = np.array(["prefill"] * PROMPT + ["decode"] * GEN)
    return {L: (pos, rng.normal(size=(n, W)).astype(np.float32), phases) for L in LAYERS + [9]}


def records(req, rng):
    """The request as a stream would deliver it: prefill in chunks, one record per decode step, per
    layer; then shuffled."""
    out = []
    for L, (pos, rows, phases) in req.items():
        cuts = sorted(rng.choice(np.arange(1, PROMPT), size=3, replace=False).tolist())
        bounds = [0, *cuts, PROMPT] + list(range(PROMPT + 1, PROMPT + GEN + 1))
        for a, b in zip(bounds, bounds[1:]):
            out.append((L, pos[a:b], rows[a:b], "prefill" if b <= PROMPT else "decode"))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def reference_score(probe: Probe, req, prompt_tokens=None) -> tuple[float, np.ndarray]:
    """Independent numpy: build X per token, one matmul, mask, pool."""
    m = probe.meta
    pos, _, phases = req[m.layers[0]]
    X = [req[L][1].astype(np.float64) for L in m.layers]
    X = np.concatenate(X, axis=1) if m.layer_combine == "concat" else np.mean(X, axis=0)
    w = probe.weights["weight"].astype(np.float64)
    s = X @ w + float(probe.weights["bias"][0])
    if m.positions == "prompt":
        keep = (pos < prompt_tokens) if prompt_tokens is not None else phases == "prefill"
    elif m.positions == "generated":
        keep = (pos >= prompt_tokens) if prompt_tokens is not None else phases == "decode"
    else:
        keep = np.ones(len(pos), bool)
    s = s[keep]
    p = m.params()
    if m.pooling == "last":
        z = s[-1]
    elif m.pooling == "mean":
        z = s.mean()
    elif m.pooling == "max":
        z = s.max()
    elif m.pooling == "ema":
        e, best = s[0], s[0]
        for x in s[1:]:
            e = p["alpha"] * x + (1 - p["alpha"]) * e
            best = max(best, e)
        z = best
    elif m.pooling == "rolling_max":
        k = p["window"]
        z = max(s[i:i + k].mean() for i in range(len(s) - k + 1)) if len(s) > k else s.mean()
    else:
        a = X[keep] @ probe.weights["attn_query"].astype(np.float64)
        wts = np.exp(a - a.max()) / np.exp(a - a.max()).sum()
        z = float((wts * s).sum())
    return 1 / (1 + math.exp(-z)), s


CASES = [(pool, layers, combine, positions)
         for pool in POOLINGS
         for layers, combine in (([5], "concat"), (LAYERS, "concat"), (LAYERS, "mean"))
         for positions in ("all", "prompt", "generated")]


@pytest.mark.parametrize("pooling,layers,combine,positions", CASES)
def test_online_shuffled_pieces_equal_offline_bit_for_bit(pooling, layers, combine, positions):
    params = {"window": 4} if pooling == "rolling_max" else ({"alpha": 0.3} if pooling == "ema" else {})
    probe = make_probe(pooling, layers, combine, positions, params)
    req = request_rows()
    offline = probe.score(req)
    for trial in range(3):
        rng = np.random.default_rng(100 + trial)
        st = probe.new_state()
        for L, pos, rows, phase in records(req, rng):
            probe.update(st, L, pos, rows, phase)
        online = probe.finalize(st)
        assert online.score == offline.score, (trial, online.score, offline.score)
        assert np.array_equal(online.token_scores, offline.token_scores)
        assert np.array_equal(online.token_positions, offline.token_positions)
    # and the number is the right one
    want, s = reference_score(probe, req)
    assert abs(offline.score - want) <= 1e-9
    np.testing.assert_allclose(offline.token_logits, s, rtol=0, atol=1e-9)
    expect_n = {"all": PROMPT + GEN, "prompt": PROMPT, "generated": GEN}[positions]
    assert offline.tokens_scored == expect_n
    assert offline.tokens_missing_layers == 0


def test_prompt_boundary_by_position_when_prompt_tokens_is_given():
    probe = make_probe("mean", positions="prompt")
    req = request_rows()
    # every row labelled "prefill" (e.g. a chunked re-prefill), but the request says 20 prompt tokens
    lying = {L: (pos, rows, "prefill") for L, (pos, rows, _) in req.items()}
    res = probe.score(lying, prompt_tokens=20)
    want, _ = reference_score(probe, req, prompt_tokens=20)
    assert res.tokens_scored == 20 and abs(res.score - want) <= 1e-9


def test_redelivered_record_changes_nothing():
    probe = make_probe("mean", layers=LAYERS)
    req = request_rows()
    once = probe.score(req)
    twice = probe.score(list(records(req, np.random.default_rng(0))) * 2)
    assert twice.score == once.score and twice.tokens_scored == once.tokens_scored


def test_layers_the_probe_does_not_read_are_ignored():
    probe = make_probe("max", layers=[5])
    req = request_rows()
    noisy = dict(req)
    noisy[9] = (req[9][0], req[9][1] * 1000, req[9][2])
    assert probe.score(noisy).score == probe.score({5: req[5]}).score
    assert probe.wants("resid_pre", 5) and not probe.wants("resid_pre", 9) and not probe.wants("attn_out", 5)
    st = probe.new_state()
    probe.update(st, 9, np.arange(3), np.zeros((3, 4 * W), np.float32), "prefill")   # another width: ignored too
    assert probe.finalize(st).empty and st.rows_seen == 3


def test_token_missing_a_layer_is_not_scored_and_is_counted():
    probe = make_probe("mean", layers=LAYERS)
    req = request_rows()
    cut = {L: v for L, v in req.items()}
    pos, rows, ph = cut[7]
    cut[7] = (pos[:-2], rows[:-2], ph[:-2])     # the last two tokens' layer 7 never arrived
    res = probe.score(cut)
    assert res.tokens_scored == PROMPT + GEN - 2 and res.tokens_missing_layers == 2


def test_state_keeps_scalars_not_rows():
    probe = make_probe("attention", layers=LAYERS)
    st = probe.new_state()
    for L, pos, rows, phase in records(request_rows(), np.random.default_rng(3)):
        probe.update(st, L, pos, rows, phase)
        for v in st.done.values():
            assert isinstance(v, tuple) and all(isinstance(x, float) for x in v)
        for parts in st.partial.values():
            assert all(isinstance(x, float) for p in parts.values() for x in p)
    assert len(st.done) == PROMPT + GEN and not st.partial


def test_last_pooling_takes_the_highest_position_whatever_the_arrival_order():
    probe = make_probe("last")
    req = request_rows()
    pos, rows, ph = req[5]
    st = probe.new_state()
    probe.update(st, 5, pos[-1:], rows[-1:], "decode")       # the last token arrives first
    probe.update(st, 5, pos[:-1], rows[:-1], ph[:-1])
    res = probe.finalize(st)
    assert res.logit == res.token_logits[-1] and res.token_positions[-1] == PROMPT + GEN - 1


def test_empty_request_is_not_flagged():
    probe = make_probe("mean", positions="generated")
    res = probe.score({5: (np.arange(4), np.ones((4, W), np.float32), "prefill")})
    assert res.empty and math.isnan(res.score) and not res.flagged() and not res.flagged(0.0)


def test_flagged_uses_the_calibrated_threshold():
    probe = make_probe("mean")
    res = probe.score(request_rows())
    assert res.flagged(res.score) and not res.flagged(res.score + 1e-6)
    assert res.flagged() == (res.score >= probe.meta.threshold)


@pytest.mark.parametrize("bad,match", [
    (lambda: (5, np.arange(3), np.zeros((3, W + 1), np.float32), "prefill"), "width 17"),
    (lambda: (5, np.arange(4), np.zeros((3, W), np.float32), "prefill"), "do not match 4 position"),
    (lambda: (5, np.arange(3), np.zeros((3, W), np.float32), "warmup"), "phase 'warmup'"),
    (lambda: (5, np.arange(3), np.zeros((3, W), np.float32), ["prefill"] * 2), "2 phases for 3 rows"),
])
def test_bad_rows_are_refused_with_a_clear_error(bad, match):
    probe = make_probe("mean")
    with pytest.raises(ProbeInputError, match=match):
        probe.update(probe.new_state(), *bad())


def test_weights_that_disagree_with_metadata_are_refused():
    meta = ProbeMeta(model_id="tiny", hook="resid_pre", layers=[1, 2], width=W)
    with pytest.raises(ValueError, match=r"shape \(16,\) but the metadata says \(32,\)"):
        Probe(meta, {"weight": np.zeros(W, np.float32), "bias": np.zeros(1, np.float32)})
    meta = ProbeMeta(model_id="tiny", hook="resid_pre", layers=[1], width=W, pooling="attention")
    with pytest.raises(ValueError, match="lack tensor.*attn_query"):
        Probe(meta, {"weight": np.zeros(W, np.float32), "bias": np.zeros(1, np.float32)})


def test_state_type_is_exported():
    assert isinstance(make_probe().new_state(), ProbeState)


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_folding_precomputed_token_logits_leaves_the_state_update_leaves(positions):
    # the probe service scores many requests' last-token rows in one token_logits call and folds
    # each row's logit into its request's state: the result must be update()'s, bit for bit
    probe = make_probe("last", positions=positions)
    req = request_rows()
    pos, rows, phases = req[5]
    for prompt_tokens in (PROMPT, None):
        a, b = probe.new_state(prompt_tokens), probe.new_state(prompt_tokens)
        for i in (0, PROMPT - 1, PROMPT, PROMPT + GEN - 1):
            probe.update(a, 5, pos[i:i + 1], rows[i:i + 1], phases[i])
            s, att = probe.token_logits(0, rows[i:i + 1])
            probe.fold_token_logits(b, pos[i:i + 1], s, att, phases[i])
        assert (a.rows_seen, a.rows_used, a.done) == (b.rows_seen, b.rows_used, b.done)
        assert probe.finalize(a).score == probe.finalize(b).score
    with pytest.raises(ProbeInputError, match="one-layer probe"):
        make_probe("last", layers=(2, 5)).fold_token_logits(probe.new_state(), [0], [0.0])
