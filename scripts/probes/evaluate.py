"""Honest numbers for probes on a real model: AUROC and TPR at 1 % FPR on held-out prompts, per pooling
and layer, next to a TF-IDF baseline and the same model with random weights.

    .venv/bin/python scripts/probes/evaluate.py            # ~10 min on 2 busy cores; needs `make model`
    .venv/bin/python scripts/probes/evaluate.py --layers 5,10,15,20,25 --formats chat,raw --json out.json

Data: bastioncorpus, the fixed split of tensortrace.probes.data.bastion_split (109 train / 72 test).
Model: "SmolLM2-135M-Instruct (dequantized from Q4_1)"; activations are `output_hidden_states` of
each prompt alone (resid_pre; the capture path gives the same rows bit for bit — tests/probes/
test_train_activations.py). Formats: `chat` = the model's chat template with its default system
prompt and the generation prompt (what /v1/chat/completions feeds the model; the demo's format),
`raw` = the prompt text alone. Every probe: `train_probe` (C by 5-fold CV on the fit split, a third of
the training benign prompts held out to calibrate the threshold at 1 % FPR), scored on the test split
through `Probe.score` — the code path the service runs. TF-IDF baselines: the same split, the same
calibration rule. "tpr_at_threshold" is the deployable number (threshold fixed before the test set
is seen); "tpr_at_1pct_fpr_oracle" picks the threshold on the test set itself (a ceiling). With 26
benign test prompts an FPR below 1/26 cannot be measured; AUROC has a bootstrap 95 % interval.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from tensortrace.probes.data import SMOLLM2_LABEL, SMOLLM2_WIDTH, bastion_split, config_hash, smollm2_path
from tensortrace.probes.train import (Example, auroc, evaluate, split_calibration, threshold_at_fpr, tpr_at_fpr,
                                      train_probe)

SEED = 0


def bootstrap_auroc(scores, labels, n=1000, seed=0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    s, y = np.asarray(scores), np.asarray(labels)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    out = []
    for _ in range(n):   # resample within each class (stratified): both are always present
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        out.append(auroc(s[idx], y[idx]))
    return float(np.percentile(out, 2.5)), float(np.percentile(out, 97.5))


def activations(model, tok, prompts, layers, chat: bool) -> list[Example]:
    from tensortrace.probes.demo_probe import examples
    return examples(model, tok, prompts, layers, chat=chat)


def probe_row(kind, fmt, layers, pooling, train_ex, test_ex, model_id, cfg_hash, params=None, combine="concat"):
    t0 = time.monotonic()
    rep = train_probe(train_ex, model_id=model_id, hook="resid_pre", layers=layers, width=SMOLLM2_WIDTH,
                      pooling=pooling, pooling_params=params, positions="prompt", layer_combine=combine,
                      name=f"{kind}-{fmt}-{pooling}", seed=SEED, model_config_hash=cfg_hash)
    scores = [rep.probe.score(e.layers, prompt_tokens=e.prompt_tokens).score for e in test_ex]
    m = evaluate(rep.probe, test_ex)
    lo, hi = bootstrap_auroc(scores, [e.label for e in test_ex])
    return {"model": kind, "format": fmt, "method": "probe", "layers": layers, "layer_combine": combine,
            "pooling": pooling, "pooling_params": rep.probe.meta.params(), "C": rep.metrics["fit_params"]["C"],
            **m, "auroc_ci95": [lo, hi], "seconds": round(time.monotonic() - t0, 2)}


def tfidf_row(name, vec_kw, split) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline

    t0 = time.monotonic()
    train = [Example(p.id, p.label, {}) for p in split.train]
    fit, cal = split_calibration(train, 0.33, SEED)            # the same held-out benign prompts as the probes
    text = {p.id: p.text for p in split.train + split.test}
    pipe = make_pipeline(TfidfVectorizer(**vec_kw), LogisticRegression(max_iter=5000))
    gs = GridSearchCV(pipe, {"logisticregression__C": [0.1, 1.0, 10.0, 100.0]}, scoring="roc_auc",
                      cv=StratifiedKFold(5, shuffle=True, random_state=SEED))
    gs.fit([text[e.id] for e in fit], [e.label for e in fit])
    t = threshold_at_fpr(gs.predict_proba([text[e.id] for e in cal])[:, 1], 0.01)
    s = gs.predict_proba([p.text for p in split.test])[:, 1]
    y = np.array([p.label for p in split.test])
    lo, hi = bootstrap_auroc(s, y)
    return {"model": "none", "format": "text", "method": name, "layers": [], "pooling": "", "C": gs.best_params_[
        "logisticregression__C"], "n": int(len(y)), "n_positive": int(y.sum()), "n_benign": int((y == 0).sum()),
        "auroc": auroc(s, y), "auroc_ci95": [lo, hi], "threshold": t, "tpr_at_threshold": float(np.mean(s[y == 1] >= t)),
        "fpr_at_threshold": float(np.mean(s[y == 0] >= t)), "tpr_at_1pct_fpr_oracle": tpr_at_fpr(s, y, 0.01),
        "seconds": round(time.monotonic() - t0, 2)}


def table(rows) -> str:
    out = ["| model | format | method | layers | pooling | test AUROC (95% CI) | TPR @ calibrated thr | FPR @ calibrated thr | oracle TPR @ 1% FPR |",
           "|---|---|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        layers = ",".join(map(str, r["layers"])) + (" (mean)" if r.get("layer_combine") == "mean" and len(r["layers"]) > 1 else "")
        pool = r["pooling"] + (f" w={r['pooling_params']['window']}" if r["pooling"] == "rolling_max" else "") + (
            f" a={r['pooling_params']['alpha']}" if r["pooling"] == "ema" else "")
        out.append(f"| {r['model']} | {r['format']} | {r['method']} | {layers} | {pool} | {r['auroc']:.3f} "
                   f"({r['auroc_ci95'][0]:.2f}–{r['auroc_ci95'][1]:.2f}) | {r['tpr_at_threshold']:.2f} | "
                   f"{r['fpr_at_threshold']:.2f} | {r['tpr_at_1pct_fpr_oracle']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="5,10,15,20,25")
    ap.add_argument("--pool-layer", type=int, default=10, help="the layer every pooling is compared at")
    ap.add_argument("--formats", default="chat,raw")
    ap.add_argument("--random-formats", default="chat,raw", help="formats the random-weights model is run with")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy CPU)")
    ap.add_argument("--json", default=".cache/bench/probes_quality.json")
    a = ap.parse_args(argv)
    import torch

    from tensortrace.probes.activations import load_model

    torch.set_num_threads(a.threads)
    layers = [int(x) for x in a.layers.split(",")]
    if a.pool_layer not in layers:
        layers.append(a.pool_layer)
    split = bastion_split()
    path = smollm2_path()
    cfg = config_hash(path)
    rows: list[dict] = []
    t_start = time.monotonic()

    def log(msg):
        print(f"[{time.monotonic() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    for name, kw in (("tfidf word 1-2gram", {"ngram_range": (1, 2), "sublinear_tf": True}),
                     ("tfidf char 2-5gram", {"analyzer": "char_wb", "ngram_range": (2, 5), "sublinear_tf": True})):
        rows.append(tfidf_row(name, kw, split))
        log(f"{name}: AUROC {rows[-1]['auroc']:.3f}")

    for kind, formats in (("smollm2", a.formats), ("smollm2-random", a.random_formats)):
        formats = [f for f in formats.split(",") if f]
        if not formats:
            continue
        model, tok = load_model(path, random_weights=(kind == "smollm2-random"), seed=SEED)
        for fmt in formats:
            t0 = time.monotonic()
            tr = activations(model, tok, split.train, layers, chat=(fmt == "chat"))
            te = activations(model, tok, split.test, layers, chat=(fmt == "chat"))
            log(f"{kind} {fmt}: activations of {len(tr) + len(te)} prompts in {time.monotonic() - t0:.0f} s")
            for L in layers:
                rows.append(probe_row(kind, fmt, [L], "mean", tr, te, "smollm2-135m-instruct", cfg))
                log(f"{kind} {fmt} L{L} mean: AUROC {rows[-1]['auroc']:.3f}")
            poolings = [("last", None), ("max", None), ("ema", {"alpha": 0.5}), ("rolling_max", {"window": 8}),
                        ("attention", None)]
            if kind != "smollm2":
                poolings = [("last", None), ("max", None)]
            for pooling, params in poolings:
                rows.append(probe_row(kind, fmt, [a.pool_layer], pooling, tr, te, "smollm2-135m-instruct", cfg, params))
                log(f"{kind} {fmt} L{a.pool_layer} {pooling}: AUROC {rows[-1]['auroc']:.3f}")
            if kind == "smollm2":
                for ls, combine in (([10, 20], "concat"), (layers, "mean")):
                    rows.append(probe_row(kind, fmt, sorted(ls), "mean", tr, te, "smollm2-135m-instruct", cfg,
                                          combine=combine))
                    log(f"{kind} {fmt} L{ls} {combine} mean: AUROC {rows[-1]['auroc']:.3f}")
            del tr, te
        del model

    doc = {"benchmark": "probes_quality", "model": SMOLLM2_LABEL, "model_config_sha256": cfg,
           "data": {"source": split.source, "split_seed": split.seed, "split_sha256": split.hash,
                    "train": len(split.train), "test": len(split.test),
                    "test_positive": sum(p.label for p in split.test)},
           "activations": "HF output_hidden_states (resid_pre), one prompt per forward, fp32, torch "
                          f"{torch.__version__}",
           "host": {"python": platform.python_version(), "machine": platform.machine()},
           "seconds": round(time.monotonic() - t_start, 1), "rows": rows}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(doc, indent=2) + "\n")
    print(table(rows))
    print(f"\nJSON: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
