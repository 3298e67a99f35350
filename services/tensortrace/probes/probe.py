"""A probe: a per-token linear transform, a pooling over tokens, a score — one code path online and offline.

A token's logit is `s_t = w . x_t + b`, where `x_t` is the token's row of the probe's hook at its
layer (several layers: their rows concatenated, or averaged). Pooling turns the logits of the
masked tokens (prompt, generated or all) into one logit; the score is its sigmoid.

Streaming. `update` takes the rows of one record (one layer, any positions, any order, any number
of pieces) and keeps, per request, only scalars: a partial logit per (token, layer) until every
layer of the token has arrived, then one logit (and one attention logit) per token. Rows are never
kept. `finalize` pools the finished tokens in position order. Because each token's logit is
computed from its own row alone (float64, summed over layers in layer order) and pooling runs once,
in position order, over the same numbers, a request scored online from records arriving shuffled
and in pieces gets the bit-identical score `score()` gives offline (tests/probes/test_sdk_stream.py).
Memory per open request: 8–16 bytes per masked token, plus one partial per layer for tokens whose
layers have not all arrived.

    probe = load_probe("probes/injection")
    st = probe.new_state(prompt_tokens=12)
    probe.update(st, 10, positions, rows, "prefill")     # as records arrive
    res = probe.finalize(st)                              # res.score, res.flagged()
    probe.score({10: (positions, rows, "prefill")})       # offline: the same three calls
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

import numpy as np

from tensortrace.probes.errors import ProbeInputError, ProbeMismatch
from tensortrace.probes.meta import ProbeMeta

PHASES = ("prefill", "decode")


@dataclass
class ProbeResult:
    score: float                   # sigmoid of the pooled logit, in [0, 1]; nan when no token was scored
    logit: float                   # the pooled logit
    tokens_scored: int
    token_positions: np.ndarray    # int64 (n,), ascending
    token_scores: np.ndarray       # float64 (n,): sigmoid of each token's logit, before pooling
    token_logits: np.ndarray       # float64 (n,)
    threshold: float               # the probe's calibrated threshold
    tokens_missing_layers: int = 0  # tokens of which some (not all) layers arrived: not scored

    @property
    def empty(self) -> bool:
        return self.tokens_scored == 0

    def flagged(self, threshold: float | None = None) -> bool:
        """score >= threshold (the probe's calibrated one by default); never for an empty result."""
        t = self.threshold if threshold is None else threshold
        return (not self.empty) and self.score >= t


@dataclass
class ProbeState:
    """One request's running state. Holds scalars only (see the module docstring)."""
    prompt_tokens: int | None = None
    partial: dict[int, dict[int, tuple[float, float]]] = field(default_factory=dict)  # pos -> layer -> (s, a)
    done: dict[int, tuple[float, float]] = field(default_factory=dict)                # pos -> (s, a)
    rows_seen: int = 0
    rows_used: int = 0


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _canonical_json(d: dict) -> bytes:
    return (json.dumps(d, sort_keys=True, indent=2) + "\n").encode()


def _weights_bytes(weights: Mapping[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save
    return save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(weights.items())})


class Probe:
    """A linear probe with a streaming pooling. Build one with `load_probe` or the training helper;
    `Probe(meta, weights)` checks the weight shapes against the metadata (ValueError).

    Weights (float32 in the file, float64 in use): `weight` (in_dim,), `bias` (1,), and for
    attention pooling `attn_query` (in_dim,) and optionally `attn_bias` (1,).
    Subclasses registered under the entry-point group `tensortrace.probes` may override
    `token_logits` (the per-token transform); the streaming and pooling stay here."""

    kind = "linear"

    def __init__(self, meta: ProbeMeta, weights: Mapping[str, np.ndarray], *, name: str | None = None,
                 digest: str | None = None):
        problems = meta.problems()
        if problems:
            raise ValueError("; ".join(problems))
        self.name = name or meta.name or "probe"
        self.meta = meta if meta.name == self.name else replace(meta, name=self.name)
        self.weights = {k: np.asarray(v) for k, v in weights.items()}
        self._check_weights()
        w = self.weights["weight"].astype(np.float64).reshape(-1)
        q = self.weights["attn_query"].astype(np.float64).reshape(-1) if meta.pooling == "attention" else None
        self._bias = float(self.weights["bias"].reshape(-1)[0])
        self._attn_bias = float(self.weights["attn_bias"].reshape(-1)[0]) if "attn_bias" in self.weights else 0.0
        L, W = len(meta.layers), meta.width
        self._layer_index = {layer: i for i, layer in enumerate(meta.layers)}
        if meta.layer_combine == "concat":
            self._w = [w[i * W:(i + 1) * W] for i in range(L)]
            self._q = [q[i * W:(i + 1) * W] for i in range(L)] if q is not None else None
        else:   # mean over layers: w . mean_l(x_l) = (sum_l w . x_l) / L, divided once per token
            self._w = [w] * L
            self._q = [q] * L if q is not None else None
        self._params = meta.params()
        self._digest = digest

    def _check_weights(self) -> None:
        m, ws = self.meta, self.weights
        need = {"weight", "bias"} | ({"attn_query"} if m.pooling == "attention" else set())
        allowed = need | {"attn_bias"} | ({"attn_query"} if m.pooling != "attention" else set())
        missing, extra = need - set(ws), set(ws) - allowed
        if missing:
            raise ValueError(f"weights lack tensor(s) {sorted(missing)} (pooling {m.pooling!r})")
        if extra:
            raise ValueError(f"weights have unexpected tensor(s) {sorted(extra)}")
        for k in ("weight", "attn_query"):
            if k in ws and ws[k].shape != (m.in_dim,):
                raise ValueError(f"weight {k!r} has shape {tuple(ws[k].shape)} but the metadata says "
                                 f"({m.in_dim},) (width {m.width} x {len(m.layers)} layer(s), "
                                 f"layer_combine {m.layer_combine!r})")
        for k in ("bias", "attn_bias"):
            if k in ws and ws[k].size != 1:
                raise ValueError(f"weight {k!r} has shape {tuple(ws[k].shape)}; it must hold one number")
        for k, v in ws.items():
            if not np.issubdtype(v.dtype, np.floating):
                raise ValueError(f"weight {k!r} has dtype {v.dtype}; it must be floating point")
            if not np.all(np.isfinite(v)):
                raise ValueError(f"weight {k!r} holds non-finite values")

    # --- identity ----------------------------------------------------------------------------
    def files_bytes(self) -> tuple[bytes, bytes]:
        """(safetensors bytes, metadata JSON bytes) exactly as `save_probe` writes them."""
        meta = self.meta.to_json_dict()
        return _weights_bytes(self.weights), _canonical_json(meta)

    @property
    def hash(self) -> str:
        """sha256 hex digest of the weights file and the metadata file (as loaded, or as they would be
        saved: recomputed for a probe built in memory, whose metadata may still be edited)."""
        if self._digest is None:
            return probe_digest(*self.files_bytes())
        return self._digest

    def __repr__(self) -> str:
        m = self.meta
        return (f"Probe({self.name!r}, model={m.model_id!r}, hook={m.hook!r}, layers={m.layers}, "
                f"pooling={m.pooling!r}, positions={m.positions!r}, hash={self.hash[:12]})")

    # --- stream compatibility ----------------------------------------------------------------
    def wants(self, hook: str, layer: int) -> bool:
        """Does this probe read records of (hook, layer)? (for the consumer's `keep`)"""
        return hook == self.meta.hook and layer in self._layer_index

    def check_stream(self, model_id: str, hook: str, width: int, model_config_hash: str | None = None) -> None:
        """Raise ProbeMismatch unless this probe can score a stream of `model_id` / `hook` / `width`."""
        m = self.meta
        if model_id != m.model_id:
            raise ProbeMismatch(f"probe {self.name!r} was trained on model {m.model_id!r}, the stream is "
                                f"from {model_id!r}")
        if model_config_hash and m.model_config_hash and model_config_hash != m.model_config_hash:
            raise ProbeMismatch(f"probe {self.name!r}: model {model_id!r} config hash {model_config_hash[:12]} "
                                f"differs from the one it was trained on ({m.model_config_hash[:12]})")
        if hook != m.hook:
            raise ProbeMismatch(f"probe {self.name!r} reads hook {m.hook!r}, the stream offers {hook!r}")
        if width != m.width:
            raise ProbeMismatch(f"probe {self.name!r} expects hidden size {m.width} on {m.hook}, the stream's "
                                f"is {width}")

    # --- streaming ---------------------------------------------------------------------------
    def new_state(self, prompt_tokens: int | None = None) -> ProbeState:
        """State for one request. `prompt_tokens` sets the prompt/generated boundary by position;
        without it, prefill rows are the prompt and decode rows are generated."""
        if prompt_tokens is not None and prompt_tokens < 0:
            raise ProbeInputError(f"prompt_tokens {prompt_tokens} < 0")
        return ProbeState(prompt_tokens=prompt_tokens)

    def _mask(self, state: ProbeState, positions: np.ndarray, phase) -> np.ndarray:
        which = self.meta.positions
        if which == "all":
            return np.ones(len(positions), dtype=bool)
        if state.prompt_tokens is not None:
            in_prompt = positions < state.prompt_tokens
        else:
            ph = np.asarray(phase)
            if ph.ndim == 0:
                in_prompt = np.full(len(positions), str(ph.item()) == "prefill")   # .item(): str() of a 0-d array prints it (~20 µs)
            else:
                in_prompt = ph == "prefill"
        return in_prompt if which == "prompt" else ~in_prompt

    def token_logits(self, layer_slot: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Per-row partial logits (and attention logits) of one layer's rows, float64.
        Row by row: (rows * w).sum(1) reduces each row on its own, so a row's value does not depend
        on which other rows share the call (a matrix-vector product may block differently)."""
        x = rows.astype(np.float64, copy=False)
        s = (x * self._w[layer_slot]).sum(axis=1)
        a = (x * self._q[layer_slot]).sum(axis=1) if self._q is not None else None
        return s, a

    def fold_token_logits(self, state: ProbeState, positions, logits, attn_logits=None, phase="prefill") -> None:
        """update() for a one-layer probe whose rows' `token_logits` were computed elsewhere (the probe
        service widens and scores the last-token rows of many requests in one call): the state is the
        one update() on those rows would leave, since a row's logit does not depend on its batch."""
        if len(self.meta.layers) != 1:
            raise ProbeInputError(f"probe {self.name!r} reads {len(self.meta.layers)} layers; token logits can "
                                  "be folded only for a one-layer probe (use update)")
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        state.rows_seen += len(positions)
        if len(positions) == 0:
            return
        keep = self._mask(state, positions, np.asarray(phase))
        done = state.done
        for i, pos in enumerate(positions.tolist()):
            if not keep[i] or pos in done:
                continue
            a = float(attn_logits[i]) if attn_logits is not None else 0.0
            done[pos] = (float(logits[i]) + self._bias, a + self._attn_bias)
            state.rows_used += 1

    def update(self, state: ProbeState, layer: int, positions, rows, phase="prefill") -> None:
        """Fold one record's rows into `state`. Layers the probe does not read are ignored, as are
        masked-out positions and tokens already finished (a re-delivered record changes nothing).
        `phase`: 'prefill' | 'decode', or one per row."""
        slot = self._layer_index.get(int(layer))
        positions = np.asarray(positions).reshape(-1)
        if slot is None:            # a layer this probe does not read: not even its shape matters
            state.rows_seen += len(positions)
            return
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[0] != positions.shape[0]:
            raise ProbeInputError(f"probe {self.name!r}: rows of shape {tuple(rows.shape)} do not match "
                                  f"{positions.shape[0]} position(s); expected ({positions.shape[0]}, width)")
        if rows.shape[1] != self.meta.width:
            raise ProbeInputError(f"probe {self.name!r}: rows have width {rows.shape[1]}, the probe expects "
                                  f"{self.meta.width} ({self.meta.hook})")
        ph = np.asarray(phase)
        if ph.ndim == 0:
            if str(ph.item()) not in PHASES:
                raise ProbeInputError(f"phase {str(ph.item())!r} is not one of {PHASES}")
        elif ph.shape != positions.shape:
            raise ProbeInputError(f"{ph.shape[0]} phases for {positions.shape[0]} rows")
        state.rows_seen += len(positions)
        if len(positions) == 0:
            return
        keep = self._mask(state, positions, ph)
        if not keep.all():
            positions, rows = positions[keep], rows[keep]
        if len(positions) == 0:
            return
        s, a = self.token_logits(slot, rows)
        L = len(self.meta.layers)
        done, partial = state.done, state.partial
        for i, pos in enumerate(positions.tolist()):
            if pos in done:
                continue
            ai = float(a[i]) if a is not None else 0.0
            if L == 1:
                done[pos] = (float(s[i]) + self._bias, ai + self._attn_bias)
                state.rows_used += 1
                continue
            parts = partial.setdefault(pos, {})
            if slot in parts:
                continue
            parts[slot] = (float(s[i]), ai)
            state.rows_used += 1
            if len(parts) == L:     # every layer arrived: sum in layer order (order-independent result)
                del partial[pos]
                ss = sum(parts[j][0] for j in range(L))
                aa = sum(parts[j][1] for j in range(L))
                if self.meta.layer_combine == "mean":
                    ss, aa = ss / L, aa / L
                done[pos] = (ss + self._bias, aa + self._attn_bias)

    def finalize(self, state: ProbeState) -> ProbeResult:
        """Pool the finished tokens in position order. Does not change `state`."""
        pos = np.array(sorted(state.done), dtype=np.int64)
        if len(pos):
            sa = np.array([state.done[p] for p in pos.tolist()], dtype=np.float64)
            s, a = sa[:, 0], sa[:, 1]
        else:
            s = a = np.zeros(0, dtype=np.float64)
        logit = pool(self.meta.pooling, s, a, self._params) if len(s) else float("nan")
        score = _sigmoid(logit) if len(s) else float("nan")
        token_scores = 1.0 / (1.0 + np.exp(-s)) if len(s) else s
        return ProbeResult(score=score, logit=logit, tokens_scored=len(s), token_positions=pos,
                           token_scores=token_scores, token_logits=s, threshold=float(self.meta.threshold),
                           tokens_missing_layers=len(state.partial))

    def score(self, inputs, prompt_tokens: int | None = None) -> ProbeResult:
        """Offline: `new_state` + `update` for every piece + `finalize` (the streaming code path).
        `inputs`: {layer: (positions, rows[, phase])} or an iterable of (layer, positions, rows[, phase])."""
        st = self.new_state(prompt_tokens)
        for layer, positions, rows, phase in _pieces(inputs):
            self.update(st, layer, positions, rows, phase)
        return self.finalize(st)


def _pieces(inputs) -> Iterable[tuple[int, Any, Any, Any]]:
    items = inputs.items() if isinstance(inputs, Mapping) else None
    if items is not None:
        for layer, v in items:
            if len(v) == 2:
                yield layer, v[0], v[1], "prefill"
            else:
                yield layer, v[0], v[1], v[2]
    else:
        for v in inputs:
            if len(v) == 3:
                yield v[0], v[1], v[2], "prefill"
            else:
                yield v[0], v[1], v[2], v[3]


def pool(pooling: str, s: np.ndarray, a: np.ndarray, params: Mapping[str, Any]) -> float:
    """Pooled logit of per-token logits `s` (position order) and attention logits `a`."""
    n = len(s)
    if pooling == "last":
        return float(s[-1])
    if pooling == "mean":
        return float(np.mean(s))
    if pooling == "max":
        return float(np.max(s))
    if pooling == "ema":
        alpha = float(params["alpha"])
        e = best = float(s[0])
        for x in s[1:].tolist():
            e = alpha * x + (1.0 - alpha) * e
            best = max(best, e)
        return best
    if pooling == "rolling_max":
        w = int(params["window"])
        if n <= w:
            return float(np.mean(s))
        c = np.concatenate([[0.0], np.cumsum(s)])
        return float(np.max((c[w:] - c[:-w]) / w))
    if pooling == "attention":
        z = a - np.max(a)
        e = np.exp(z)
        return float(np.sum(e * s) / np.sum(e))
    raise ValueError(f"unknown pooling {pooling!r}")


def probe_digest(weights_bytes: bytes, meta_bytes: bytes) -> str:
    h = hashlib.sha256()
    h.update(hashlib.sha256(weights_bytes).digest())
    h.update(hashlib.sha256(meta_bytes).digest())
    return h.hexdigest()
