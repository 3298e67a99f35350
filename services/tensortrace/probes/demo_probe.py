"""The demo's prompt-injection probe, in one call: SmolLM2 activations of the fixed bastioncorpus
train split -> a probe file; the held-out test split is what the demo sends live.

    from tensortrace.probes import demo_probe
    result = demo_probe.train("probes/")            # writes probes/prompt-injection.{safetensors,json}
    result.path, result.test_metrics["auroc"], result.test_metrics["tpr_at_threshold"]
    for p in demo_probe.test_prompts():              # held out: never seen in training or calibration
        send(p.text)                                 # p.label: 1 injection, 0 benign

Activations: `output_hidden_states` of each prompt alone, formatted with the model's chat template
and generation prompt — what SGLang's /v1/chat/completions feeds the model (the capture path gives
the same rows, bit for bit: tests/probes/test_train_activations.py). The probe reads resid_pre at
DEMO_LAYERS over the prompt tokens only, so it scores a request as soon as its prefill is captured.
Model id: "smollm2-135m-instruct" (the model directory's name, which the SGLang plugin reports).
Takes ~1 min on 2 CPU cores (model load + 109 forwards + fit).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tensortrace.probes.data import (SMOLLM2_ID, SMOLLM2_LABEL, SMOLLM2_WIDTH, Prompt, bastion_split, config_hash,
                                     smollm2_path)
from tensortrace.probes.files import save_probe
from tensortrace.probes.train import Example, TrainReport, evaluate, train_probe

DEMO_NAME = "prompt-injection"
DEMO_HOOK = "resid_pre"
DEMO_LAYERS = (10,)
DEMO_POOLING = "mean"
DEMO_POSITIONS = "prompt"


@dataclass
class DemoProbe:
    path: Path                  # the probe's JSON file
    report: TrainReport
    test_metrics: dict          # on the held-out test split


def examples(model, tok, prompts: Sequence[Prompt], layers: Sequence[int], chat: bool = True) -> list[Example]:
    """One Example per prompt: resid_pre rows at `layers` of the whole prompt (prefill)."""
    import numpy as np

    from tensortrace.probes.activations import encode, hidden_states

    ids = [encode(tok, p.text, chat=chat) for p in prompts]
    acts = hidden_states(model, ids, layers)
    out = []
    for p, i, a in zip(prompts, ids, acts):
        pos = np.arange(len(i))
        out.append(Example(p.id, p.label, {L: (pos, a[L], "prefill") for L in layers}, prompt_tokens=len(i)))
    return out


def test_prompts() -> list[Prompt]:
    """The held-out prompts (bastioncorpus test split) for the demo to send."""
    return bastion_split().test


def train(out_dir, *, layers: Sequence[int] = DEMO_LAYERS, pooling: str = DEMO_POOLING,
          positions: str = DEMO_POSITIONS, name: str = DEMO_NAME, model_path=None, pooling_params=None,
          model_id: str = SMOLLM2_ID, model=None, tok=None, threads: int | None = 1) -> DemoProbe:
    """Train the demo probe on the train split, evaluate it on the test split, write it to `out_dir`.
    `threads`: torch threads for the forwards (restored after; 1 is fastest on a busy CPU)."""
    import torch

    from tensortrace.probes.activations import load_model

    path = Path(model_path) if model_path else smollm2_path()
    if model is None:
        model, tok = load_model(path)
    split = bastion_split()
    layers = list(layers)
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        train_ex = examples(model, tok, split.train, layers)
        test_ex = examples(model, tok, split.test, layers)
    finally:
        torch.set_num_threads(threads_before)
    report = train_probe(train_ex, model_id=model_id, hook=DEMO_HOOK, layers=layers, width=SMOLLM2_WIDTH,
                         pooling=pooling, pooling_params=pooling_params, positions=positions, name=name,
                         model_config_hash=config_hash(path), model_label=SMOLLM2_LABEL,
                         train_data_hash=split.hash,
                         description=f"prompt injection / jailbreak vs benign look-alike; {split.source} fixed "
                                     f"split (seed {split.seed}), chat-formatted prompts")
    test = evaluate(report.probe, test_ex)
    report.probe.meta.metrics["test"] = test
    out = save_probe(report.probe, out_dir)
    return DemoProbe(out, report, test)
