"""The demo on a real model: SmolLM2-135M-Instruct (dequantized from Q4_1) served by SGLang, a
prompt-injection probe scoring every request live.

    model_dir = served_model_dir(smollm2_path(), workdir)      # what SGLang loads (see below)
    probe = ensure_probe(model, tok, log)                       # cached in .cache/probes/demo/, else trained
    reqs = chat_requests(test_prompts(), verify=2)              # the held-out bastioncorpus prompts
    serve_chat(server, reqs)                                    # /v1/chat/completions, each with its traceparent
    ScoresReader(bootstrap, SCORES_TOPIC).wait_for(reqs, 60)    # ProbeScore per request, off the scores topic

The probe (tensortrace.probes.demo_probe) is trained on the fixed bastioncorpus train split with
SmolLM2's own hidden states of each chat-formatted prompt; the demo sends the held-out test split,
which the probe never saw. The probe reads resid_pre at one layer over the prompt positions, so
the SGLang server captures exactly that (TENSORTRACE_SELECTION), and the few requests whose hidden
states are checked against an eager Hugging Face forward ask for every layer and position through
their own `custom_params.tensortrace` options.

Why the SGLang server runs with --disable-radix-cache: every chat prompt starts with the same
system prompt, and a radix-cache hit skips those positions' forward, so no resid_pre rows exist for
them and a probe pooling over the whole prompt would pool over fewer tokens than it was trained on.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tensortrace.demo.serve import new_traceparent
from tensortrace.demo.stack import SCORES_TOPIC
MAX_NEW_TOKENS = 8
VERIFY_HOOKS = ["resid_pre", "resid_final", "token_ids"]


def probe_cache_dir() -> Path:
    from tensortrace.probes.data import repo_root

    return repo_root() / ".cache" / "probes" / "demo"


def served_model_dir(src: Path, workdir: str) -> str:
    """The model directory SGLang loads. The converted checkpoint keeps the GGUF `quantization_config`
    in its config.json (transformers wrote it) although the weights are plain fp32; SGLang would
    then build GGUF layers and fail on the first forward. Served here: a directory of links to the
    checkpoint's files with that one key dropped from config.json. Its name is the model id the
    plugin reports (the directory's basename), the same as the checkpoint's."""
    with open(src / "config.json") as f:
        cfg = json.load(f)
    if "quantization_config" not in cfg:
        return str(src)
    out = Path(workdir) / src.name
    out.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(src):
        if name == "config.json":
            cfg.pop("quantization_config")
            (out / name).write_text(json.dumps(cfg, indent=1))
        elif not (out / name).exists():
            os.symlink(src / name, out / name)
    return str(out)


@dataclass
class DemoProbeInfo:
    path: Path              # the probe's JSON file
    meta: object            # ProbeMeta
    trained_s: float | None  # None: reused from the cache


def ensure_probe(model, tok, model_path: Path, log) -> DemoProbeInfo:
    """The demo's probe from the cache when it was trained for this model (config hash) on this split
    (data hash); otherwise trained now (~1 min) and cached."""
    from tensortrace.probes import load_probe
    from tensortrace.probes.data import bastion_split, config_hash
    from tensortrace.probes.demo_probe import DEMO_NAME, train

    cache = probe_cache_dir()
    path = cache / f"{DEMO_NAME}.json"
    want = (config_hash(model_path), bastion_split().hash)
    if path.is_file():
        try:
            probe = load_probe(path)
            if (probe.meta.model_config_hash, probe.meta.train_data_hash) == want:
                return DemoProbeInfo(path, probe.meta, None)
            log(f"   cached probe {path} is for another model or split: training again")
        except Exception as e:   # a damaged cache is retrained, not fatal
            log(f"   cached probe {path} unreadable ({type(e).__name__}: {e}): training again")
    t0 = time.monotonic()
    result = train(cache, model=model, tok=tok, model_path=model_path)
    return DemoProbeInfo(result.path, result.report.probe.meta, time.monotonic() - t0)


@dataclass
class ChatRequest:
    name: str
    prompt_id: str
    text: str
    label: int                    # 1 injection / jailbreak, 0 benign look-alike
    traceparent: str
    trace_id: str
    verify: bool = False          # capture every layer and position, check against an eager HF forward
    api: str = "/v1/chat/completions"
    max_new_tokens: int = MAX_NEW_TOKENS
    prompt: list[int] = field(default_factory=list)   # token ids SGLang fed the model (chat template applied)
    output: list[int] = field(default_factory=list)
    answer: str = ""
    request_id: str = ""
    cached_tokens: int = 0
    error: str = ""

    @property
    def sequence(self) -> list[int]:
        return self.prompt + self.output


def balanced_subset(prompts, n: int) -> list:
    """The first n prompts taking injections and benign ones in turn (each in id order)."""
    inj = [p for p in prompts if p.label == 1]
    ben = [p for p in prompts if p.label == 0]
    out = []
    while len(out) < n and (inj or ben):
        for group in (inj, ben):
            if group and len(out) < n:
                out.append(group.pop(0))
    return sorted(out, key=lambda p: p.id)


def chat_requests(prompts, verify: int = 2) -> list[ChatRequest]:
    """One request per prompt, each with its own traceparent; the first `verify` injections and
    benign prompts (by id) are also checked against the reference."""
    out, picked = [], {0: 0, 1: 0}
    for i, p in enumerate(prompts):
        tp, tid = new_traceparent()
        v = picked[p.label] < (verify + p.label) // 2     # an odd one more injection
        if v:
            picked[p.label] += 1
        out.append(ChatRequest(f"q{i + 1:02d}", p.id, p.text, p.label, tp, tid, verify=v))
    return out


def serve_chat(server, reqs: list[ChatRequest], model_id: str, concurrency: int = 24) -> None:
    """Every request through SGLang's OpenAI-compatible chat API (the model's chat template, greedy),
    `concurrency` at a time; token ids come back with return_token_ids."""
    sem = threading.Semaphore(concurrency)
    verify_opts = {"hooks": VERIFY_HOOKS, "layers": "all", "positions": "all"}

    def send(r: ChatRequest) -> None:
        with sem:
            body = {"model": model_id, "messages": [{"role": "user", "content": r.text}],
                    "max_tokens": r.max_new_tokens, "temperature": 0, "return_token_ids": True}
            if r.verify:
                body["custom_params"] = {"tensortrace": verify_opts}
            try:
                status, out = server.post("/v1/chat/completions", body, headers={"traceparent": r.traceparent},
                                          timeout=300)
                if status != 200:
                    r.error = f"HTTP {status}: {str(out)[:200]}"
                    return
                choice = out["choices"][0]
                r.request_id = out["id"]
                r.prompt = list(choice.get("prompt_token_ids") or [])
                r.output = list(choice.get("response_token_ids") or [])
                r.answer = choice["message"]["content"] or ""
            except Exception as e:  # noqa: BLE001 - reported per request
                r.error = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=send, args=(r,), daemon=True) for r in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)


class ScoresReader:
    """ProbeScores off the scores topic (every partition from the start, no group), by request id."""

    def __init__(self, bootstrap: str, topic: str = SCORES_TOPIC):
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                      consumer_timeout_ms=200)
        parts = self.consumer.partitions_for_topic(topic) or {0}
        self.consumer.assign([TopicPartition(topic, p) for p in sorted(parts)])
        self.consumer.seek_to_beginning()
        self.scores: dict[str, object] = {}
        self.messages = 0

    def poll(self) -> None:
        from tensortrace.v1 import records_pb2 as pb

        for batch in self.consumer.poll(timeout_ms=200).values():
            for msg in batch:
                sc = pb.ProbeScore()
                sc.ParseFromString(msg.value)
                self.messages += 1
                self.scores[sc.request_id] = sc   # a re-published score has the same identity and value

    def wait_for(self, request_ids: list[str], timeout_s: float) -> dict[str, object]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not all(r in self.scores for r in request_ids):
            self.poll()
        return {r: self.scores[r] for r in request_ids if r in self.scores}

    def close(self) -> None:
        self.consumer.close()
