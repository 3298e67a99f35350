"""Fit a probe from labelled requests, calibrate its threshold at a target false-positive rate on
held-out benign requests, measure it on a test set — every score through `Probe.score`, the code
path the service runs, so the numbers are those of the probe file that is written.

    from tensortrace.probes.train import Example, train_probe, evaluate
    ex = Example("req-1", label=1, layers={10: (positions, rows, "prefill")}, prompt_tokens=42)
    report = train_probe(train_examples, model_id="smollm2-135m-instruct", hook="resid_pre", layers=[10],
                         width=576, pooling="mean", positions="prompt")
    report.probe.meta.threshold, evaluate(report.probe, test_examples)   # {"auroc": ..., "tpr_at_threshold": ...}

How each pooling is fitted (scikit-learn logistic regression, standardised features, L2; folded
back into raw-space weights so the file needs no scaler):
  - mean: on each request's mean of masked rows (exactly the mean-pooled probe);
  - last: on the last masked row;
  - max, ema, rolling_max: on every masked token, labelled with its request's label and weighted
    1/tokens so each request counts once (token-level training; the pooling is applied at scoring);
  - attention: torch, end to end: softmax(q . x_t)-weighted mean of w . x_t + b, cross-entropy, Adam.
Several layers: features concatenated (or averaged, layer_combine="mean") per token.

Threshold: the smallest value whose false-positive rate on the calibration (benign) requests is at
most `target_fpr`; with n benign requests the rate cannot be resolved below 1/n, so with fewer than
100 the threshold is just above the highest benign score — the report says how many there were.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from tensortrace.probes.meta import POOLINGS, ProbeMeta
from tensortrace.probes.probe import Probe


@dataclass
class Example:
    id: str
    label: int                                   # 1 positive (flag), 0 benign
    layers: dict[int, tuple]                     # layer -> (positions, rows[, phase or phases])
    prompt_tokens: int | None = None

    def rows(self, layers: Sequence[int], positions: str, combine: str) -> np.ndarray:
        """(n_masked_tokens, in_dim) float64, in position order — the probe's per-token input."""
        per = []
        keep_pos = None
        for L in layers:
            v = self.layers[L]
            pos, rows = np.asarray(v[0]), np.asarray(v[1])
            phase = np.asarray(v[2]) if len(v) > 2 else np.asarray("prefill")
            if positions == "all":
                keep = np.ones(len(pos), bool)
            elif self.prompt_tokens is not None:
                keep = pos < self.prompt_tokens if positions == "prompt" else pos >= self.prompt_tokens
            else:
                pre = (phase == "prefill") if phase.ndim else np.full(len(pos), str(phase) == "prefill")
                keep = pre if positions == "prompt" else ~pre
            order = np.argsort(pos[keep], kind="stable")
            p, r = pos[keep][order], rows[keep][order]
            if keep_pos is None:
                keep_pos = p
            elif not np.array_equal(p, keep_pos):
                raise ValueError(f"example {self.id}: layers {layers[0]} and {L} cover different positions")
            per.append(r.astype(np.float64))
        return np.concatenate(per, axis=1) if combine == "concat" else np.mean(per, axis=0)


@dataclass
class TrainReport:
    probe: Probe
    metrics: dict[str, Any]
    fit_ids: list[str] = field(default_factory=list)
    calibration_ids: list[str] = field(default_factory=list)


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties counted half)."""
    s, y = np.asarray(scores, float), np.asarray(labels, int)
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def threshold_at_fpr(benign_scores: Sequence[float], target_fpr: float = 0.01) -> float:
    """Smallest t with mean(benign >= t) <= target_fpr (flagged = score >= t)."""
    b = np.sort(np.asarray(benign_scores, float))[::-1]
    if len(b) == 0:
        raise ValueError("no benign scores to calibrate on")
    allowed = int(np.floor(target_fpr * len(b)))     # false positives the target permits
    if allowed >= len(b):
        return float(b[-1])
    return float(np.nextafter(b[allowed], np.inf))


def tpr_at_fpr(scores, labels, target_fpr: float = 0.01) -> float:
    """Oracle: best TPR whose FPR on these same scores is <= target (a ceiling, not a deployable number)."""
    s, y = np.asarray(scores, float), np.asarray(labels, int)
    t = threshold_at_fpr(s[y == 0], target_fpr)
    return float(np.mean(s[y == 1] >= t))


def evaluate(probe: Probe, examples: Sequence[Example], threshold: float | None = None) -> dict[str, Any]:
    """AUROC, TPR/FPR at the probe's calibrated threshold, oracle TPR at 1 % FPR — on `examples`."""
    scores = [probe.score(e.layers, prompt_tokens=e.prompt_tokens).score for e in examples]
    y = np.array([e.label for e in examples])
    s = np.array(scores)
    t = probe.meta.threshold if threshold is None else threshold
    return {
        "n": int(len(y)), "n_positive": int(y.sum()), "n_benign": int((y == 0).sum()),
        "auroc": auroc(s, y),
        "threshold": float(t),
        "tpr_at_threshold": float(np.mean(s[y == 1] >= t)) if y.any() else float("nan"),
        "fpr_at_threshold": float(np.mean(s[y == 0] >= t)) if (y == 0).any() else float("nan"),
        "tpr_at_1pct_fpr_oracle": tpr_at_fpr(s, y, 0.01) if (y == 0).any() and y.any() else float("nan"),
    }


def _standardize(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = X.mean(axis=0)
    sd = X.std(axis=0)
    sd[sd < 1e-8] = 1.0
    return mu, sd


def _fold(w_std: np.ndarray, b_std: float, mu: np.ndarray, sd: np.ndarray) -> tuple[np.ndarray, float]:
    """w_std . (x - mu) / sd + b_std  ==  w . x + b."""
    w = w_std / sd
    return w, float(b_std - np.dot(w, mu))


def _fit_logreg(X, y, sample_weight, C, seed):
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise ModuleNotFoundError("probe training needs scikit-learn: `.venv/bin/pip install scikit-learn` "
                                  "(it is in the `probes` extra)") from None
    mu, sd = _standardize(X)
    clf = LogisticRegression(C=C, max_iter=5000, random_state=seed)
    clf.fit((X - mu) / sd, y, sample_weight=sample_weight)
    return _fold(clf.coef_[0].astype(np.float64), float(clf.intercept_[0]), mu, sd)


def _fit_attention(seqs: list[np.ndarray], y, C, seed, steps=400, lr=0.02):
    import torch

    torch.manual_seed(seed)
    X = np.concatenate(seqs)
    mu, sd = _standardize(X)
    n, d, T = len(seqs), X.shape[1], max(len(s) for s in seqs)
    xs = torch.zeros(n, T, d, dtype=torch.float64)
    mask = torch.zeros(n, T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        xs[i, :len(s)] = torch.from_numpy((s - mu) / sd)
        mask[i, :len(s)] = True
    yt = torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    q = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w, q, b], lr=lr)
    l2 = 1.0 / (C * n)
    for _ in range(steps):
        opt.zero_grad()
        a = (xs @ q).masked_fill(~mask, float("-inf"))
        att = torch.softmax(a, dim=1)
        logit = (att * (xs @ w)).sum(1) + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, yt) + l2 * (w @ w + q @ q) / 2
        loss.backward()
        opt.step()
    wf, bf = _fold(w.detach().numpy(), float(b.detach()), mu, sd)
    qf, qb = _fold(q.detach().numpy(), 0.0, mu, sd)
    return wf, bf, qf, qb


def fit_weights(examples: Sequence[Example], meta: ProbeMeta, C: float = 1.0, seed: int = 0) -> dict[str, np.ndarray]:
    """The probe's weights, fitted as the module docstring says for `meta.pooling`."""
    seqs = [e.rows(meta.layers, meta.positions, meta.layer_combine) for e in examples]
    empty = [e.id for e, s in zip(examples, seqs) if len(s) == 0]
    if empty:
        raise ValueError(f"{len(empty)} example(s) have no {meta.positions} tokens: {empty[:5]}")
    y = np.array([e.label for e in examples])
    if len(set(y.tolist())) != 2:
        raise ValueError("training needs both positive and benign examples")
    if meta.pooling == "attention":
        w, b, q, qb = _fit_attention(seqs, y, C, seed)
        return {"weight": w.astype(np.float32), "bias": np.array([b], np.float32),
                "attn_query": q.astype(np.float32), "attn_bias": np.array([qb], np.float32)}
    if meta.pooling == "mean":
        X, yy, sw = np.stack([s.mean(0) for s in seqs]), y, None
    elif meta.pooling == "last":
        X, yy, sw = np.stack([s[-1] for s in seqs]), y, None
    else:  # token-level: every masked token, each request weighing 1 in total
        X = np.concatenate(seqs)
        yy = np.concatenate([np.full(len(s), e.label) for e, s in zip(examples, seqs)])
        sw = np.concatenate([np.full(len(s), 1.0 / len(s)) for s in seqs]) * len(seqs) / len(X)
    w, b = _fit_logreg(X, yy, sw, C, seed)
    return {"weight": w.astype(np.float32), "bias": np.array([b], np.float32)}


C_GRID = (0.001, 0.01, 0.1, 1.0)


def select_C(examples: Sequence[Example], meta: ProbeMeta, seed: int = 0, grid=C_GRID) -> float:
    """L2 strength by 5-fold stratified cross-validated AUROC on the training examples only, on the
    pooled features (the last row for `last`, the mean row otherwise — a cheap proxy for the token-level
    and attention fits)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    seqs = [e.rows(meta.layers, meta.positions, meta.layer_combine) for e in examples]
    X = np.stack([s[-1] if meta.pooling == "last" else s.mean(0) for s in seqs])
    y = np.array([e.label for e in examples])
    folds = StratifiedKFold(n_splits=min(5, int(np.bincount(y).min())), shuffle=True, random_state=seed)
    best, best_auc = grid[0], -1.0
    for C in grid:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000))
        auc = float(np.mean(cross_val_score(model, X, y, cv=folds, scoring="roc_auc")))
        if auc > best_auc + 1e-9:
            best, best_auc = C, auc
    return best


def examples_hash(examples: Sequence[Example]) -> str:
    """sha256 over (id, label) of the training examples, in id order."""
    h = hashlib.sha256()
    for e in sorted(examples, key=lambda e: e.id):
        h.update(f"{e.id}\t{e.label}\n".encode())
    return h.hexdigest()


def split_calibration(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(fit, calibration): `fraction` of the benign examples (seeded) held out for the threshold."""
    rng = np.random.default_rng(seed)
    benign = sorted((e for e in examples if e.label == 0), key=lambda e: e.id)
    k = max(1, int(round(len(benign) * fraction)))
    cal_idx = set(rng.permutation(len(benign))[:k].tolist())
    cal = [e for i, e in enumerate(benign) if i in cal_idx]
    cal_ids = {e.id for e in cal}
    return [e for e in examples if e.id not in cal_ids], cal


def train_probe(examples: Sequence[Example], *, model_id: str, hook: str, layers: Sequence[int], width: int,
                pooling: str = "mean", pooling_params: dict | None = None, positions: str = "prompt",
                layer_combine: str = "concat", name: str = "probe", calibration: Sequence[Example] | None = None,
                calibration_fraction: float = 0.33, target_fpr: float = 0.01, C: float | None = None, seed: int = 0,
                model_config_hash: str = "", model_label: str = "", train_data_hash: str = "",
                description: str = "") -> TrainReport:
    """Fit on `examples` (minus a held-out benign calibration split, unless `calibration` is given),
    set the threshold at `target_fpr` on the calibration requests, and return the probe.
    `C` (inverse L2 strength): None chooses it by cross-validation on the fit split (`select_C`)."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; poolings: {', '.join(POOLINGS)}")
    if calibration is None:
        fit, cal = split_calibration(examples, calibration_fraction, seed)
    else:
        fit, cal = list(examples), list(calibration)
    if any(e.label != 0 for e in cal):
        raise ValueError("calibration examples must all be benign (label 0)")
    meta = ProbeMeta(model_id=model_id, hook=hook, layers=list(layers), width=width, pooling=pooling,
                     pooling_params=dict(pooling_params or {}), positions=positions, layer_combine=layer_combine,
                     model_config_hash=model_config_hash, model_label=model_label, name=name,
                     train_data_hash=train_data_hash or examples_hash(examples), description=description,
                     created_unix=round(time.time(), 3))
    problems = meta.problems()
    if problems:
        raise ValueError("; ".join(problems))
    if C is None:
        C = select_C(fit, meta, seed)
    weights = fit_weights(fit, meta, C=C, seed=seed)
    probe = Probe(meta, weights, name=name)
    cal_scores = [probe.score(e.layers, prompt_tokens=e.prompt_tokens).score for e in cal]
    threshold = threshold_at_fpr(cal_scores, target_fpr)
    fit_metrics = evaluate(probe, fit, threshold)
    meta.threshold = threshold
    meta.calibration = {"method": "fpr_on_held_out_benign", "target_fpr": target_fpr, "n_benign": len(cal),
                        "resolution_fpr": 1.0 / len(cal),
                        "note": ("threshold is just above the highest calibration score: fewer than "
                                 f"{int(np.ceil(1 / target_fpr))} benign requests cannot resolve {target_fpr:.0%}")
                        if len(cal) * target_fpr < 1 else ""}
    meta.metrics = {"fit": {k: fit_metrics[k] for k in ("n", "n_positive", "n_benign", "auroc")},
                    "fit_params": {"C": C, "seed": seed, "method": "torch attention" if pooling == "attention"
                                   else ("logreg tokens" if pooling in ("max", "ema", "rolling_max") else "logreg pooled")}}
    probe = Probe(meta, weights, name=name)
    return TrainReport(probe, dict(meta.metrics), [e.id for e in fit], [e.id for e in cal])
