"""`tensortrace probe-train`: fit a probe from labelled requests and write the probe file.

Tooling, not a service: it composes the query SDK (stored requests), the capture agent and ring
reader (a capture run) and the probe SDK, which is why it lives here and not in tensortrace.probes.

    # requests stored by the loader, read through the query SDK; labels keyed by request or trace id
    tensortrace probe-train --query grpc://127.0.0.1:50052 --labels labels.jsonl --layers 10 --out probes/
    # a capture run's ring files (no Kafka, no ClickHouse)
    tensortrace probe-train --capture /run/tensortrace --labels labels.csv --layers 10 --out probes/
    # the built-in dataset: SmolLM2 on the fixed bastioncorpus split (what the demo uses)
    tensortrace probe-train --bastion --layers 10 --out probes/

Labels: JSONL lines `{"request_id": "...", "label": 1}` (or `"trace_id"`: 32 hex chars), or CSV with
a header naming `request_id` or `trace_id` and `label`; label 1/0, true/false. With --query or
--capture, a seeded stratified `--test-fraction` of the labelled requests is held out for the
reported numbers, and a fraction of the remaining benign ones calibrates the threshold.
Only requests whose capture is complete are used (`--allow-incomplete` to override); every one
skipped is reported with the reason.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from tensortrace.probes.meta import LAYER_COMBINE, POOLINGS, POSITIONS


class LabelError(ValueError):
    pass


def _label(v, where: str) -> int:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float)) and v in (0, 1):
        return int(v)
    if isinstance(v, str) and v.strip().lower() in ("0", "1", "true", "false"):
        return int(v.strip().lower() in ("1", "true"))
    raise LabelError(f"{where}: label {v!r} is not 0/1/true/false")


def read_labels(path) -> dict[tuple[str, str], int]:
    """{("request_id" | "trace_id", id): label} from a JSONL or CSV file."""
    p = Path(path)
    if not p.is_file():
        raise LabelError(f"{p}: labels file not found")
    out: dict[tuple[str, str], int] = {}
    rows: list[tuple[str, dict]] = []
    text = p.read_text()
    if p.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        rows = [(f"{p}:{i + 2}", r) for i, r in enumerate(reader)]
    else:
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append((f"{p}:{i + 1}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise LabelError(f"{p}:{i + 1}: not JSON ({e})") from None
    for where, r in rows:
        if not isinstance(r, dict) or "label" not in r:
            raise LabelError(f"{where}: needs a 'label' and a 'request_id' or 'trace_id'")
        if r.get("request_id"):
            key = ("request_id", str(r["request_id"]))
        elif r.get("trace_id"):
            tid = str(r["trace_id"]).lower()
            if len(tid) != 32 or any(c not in "0123456789abcdef" for c in tid):
                raise LabelError(f"{where}: trace_id {r['trace_id']!r} is not 32 hex characters")
            key = ("trace_id", tid)
        else:
            raise LabelError(f"{where}: needs a 'request_id' or 'trace_id'")
        if key in out:
            raise LabelError(f"{where}: {key[0]} {key[1]} labelled twice")
        out[key] = _label(r["label"], where)
    if not out:
        raise LabelError(f"{p}: no labels")
    return out


def examples_from_query(target, labels, hook: str, layers, allow_incomplete: bool, log,
                        database: str = "tensortrace"):
    """Examples read through the query SDK. `target`: grpc://, http(s)://, chdb:// or a
    clickhouse-connect client (left open)."""
    from tensortrace.probes.train import Example
    from tensortrace.query import QueryError, TensorTraceClient

    out, model_ids = [], set()
    tt = TensorTraceClient(target, database=database)
    try:
        for (kind, ident), label in sorted(labels.items()):
            try:
                req = tt.tensors(**{kind: ident}, hooks=[hook], layers=list(layers))
            except QueryError as e:
                log(f"skip {kind} {ident}: {e}")
                continue
            c = req.completeness
            if not c.complete and not allow_incomplete:
                log(f"skip {kind} {ident}: capture is {c.state} ({c.incomplete_reason})")
                continue
            per = {}
            for L in layers:
                if (hook, L) not in req:
                    break
                ct = req[hook, L]
                if ct.gaps:
                    break
                pos = np.asarray(ct.positions if ct.positions is not None else range(ct.start, ct.end))
                per[L] = (pos, ct.tensor.float().numpy(), "prefill")
            if len(per) != len(layers):
                log(f"skip {kind} {ident}: {hook} layers {list(layers)} not all captured without gaps")
                continue
            model_ids.add(req.model)
            out.append(Example(req.request_id, label, per, prompt_tokens=c.prompt_tokens or None))
    finally:
        if isinstance(target, str):
            tt.close()
    return out, model_ids


def examples_from_capture(ring_dir: str, labels, hook: str, layers, allow_incomplete: bool, log):
    """Examples from a capture run's ring files (read the way the exporter reads them)."""
    from tensortrace.devstack.ringread import read_rings
    from tensortrace.probes.records import record_rows
    from tensortrace.probes.train import Example

    got = read_rings(ring_dir)
    by_req = got.by_request()
    out, model_ids = [], set()
    for (kind, ident), label in sorted(labels.items()):
        if kind == "trace_id":
            rids = [rid for rid, s in got.summaries.items() if s.trace_id.hex() == ident]
            if len(rids) != 1:
                log(f"skip trace_id {ident}: {len(rids)} requests in the capture")
                continue
            rid = rids[0]
        else:
            rid = ident
        s = got.summaries.get(rid)
        recs = by_req.get(rid, [])
        if s is None or not recs:
            log(f"skip request {rid}: not in the capture")
            continue
        if (not s.complete or s.records_dropped or s.records_captured != len(recs)) and not allow_incomplete:
            log(f"skip request {rid}: incomplete capture ({len(recs)} of {s.records_captured} records, "
                f"{s.records_dropped} dropped)")
            continue
        per = {}
        for L in layers:
            parts = [record_rows(r) for r in recs if r.hook == hook and r.layer == L]
            if not parts:
                break
            per[L] = (np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]),
                      np.concatenate([[p[3]] * len(p[1]) for p in parts]))
        if len(per) != len(layers):
            log(f"skip request {rid}: {hook} layers {list(layers)} not all captured")
            continue
        model_ids.add(recs[0].model_id)
        out.append(Example(rid, label, per, prompt_tokens=s.prompt_tokens or None))
    return out, model_ids


def captured_states(model, token_ids: Sequence[Sequence[int]], layers: Sequence[int], model_id: str = "model",
                    ring_dir: str | Path | None = None) -> list[dict[int, tuple[np.ndarray, np.ndarray]]]:
    """The prompt's resid_pre rows as the capture path delivers them: agent + HF backend -> ring ->
    records (prefill only: one `generate` step per prompt). {layer: (positions, rows)} per prompt."""
    import torch

    from tensortrace.agent import AgentConfig, CaptureAgent, Selection
    from tensortrace.agent.backends.hf import HFBackend
    from tensortrace.devstack.ringread import drain
    from tensortrace.probes.records import record_rows
    from tensortrace.ring.format import RingReader

    layers = list(layers)
    with tempfile.TemporaryDirectory(prefix="tt-probe-capture-") as tmp:
        rd = Path(ring_dir) if ring_dir else Path(tmp)
        sel = Selection.from_doc({"selection": {"hooks": ["resid_pre"], "layers": layers, "positions": "prefill"}})
        agent = CaptureAgent(AgentConfig(ring_dir=str(rd), model_id=model_id, ring_capacity=64 << 20), sel)
        backend = HFBackend(model, agent)
        reader = RingReader.open(agent.ring_path)
        out = []
        try:
            for i, ids in enumerate(token_ids):
                x = torch.tensor([list(ids)])
                rid = f"probe-act-{i}"
                backend.generate(x, attention_mask=torch.ones_like(x), request_ids=[rid], max_new_tokens=1,
                                 do_sample=False, pad_token_id=0)
                got = drain(reader)
                per = {}
                for L in layers:
                    recs = [r for r in got.records if r.request_id == rid and r.hook == "resid_pre" and r.layer == L]
                    parts = sorted((record_rows(r) for r in recs), key=lambda t: int(t[1][0]))
                    if not parts:
                        raise RuntimeError(f"capture path delivered no resid_pre/{L} rows for prompt {i}")
                    per[L] = (np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]))
                out.append(per)
        finally:
            backend.detach()
            agent.close()
            reader.close()
    return out


def split_test(examples, fraction: float, seed: int):
    """Stratified by label, seeded: (train, test)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for lab in (0, 1):
        group = sorted((e for e in examples if e.label == lab), key=lambda e: e.id)
        idx = rng.permutation(len(group))
        k = int(round(len(group) * fraction))
        test += [group[i] for i in idx[:k]]
        train += [group[i] for i in idx[k:]]
    return train, test


def _layers(spec: str) -> list[int]:
    try:
        out = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers {spec!r}: comma-separated integers, e.g. 10 or 8,12") from None
    if not out:
        raise argparse.ArgumentTypeError("--layers: at least one layer")
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tensortrace probe-train", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--query", metavar="TARGET", help="grpc://host:port, http(s)://clickhouse, or chdb:///path")
    src.add_argument("--capture", metavar="RING_DIR", help="directory of a capture run's ring files")
    src.add_argument("--bastion", action="store_true", help="SmolLM2 on the fixed bastioncorpus split (needs `make model`)")
    ap.add_argument("--database", default="tensortrace", help="ClickHouse database (with --query)")
    ap.add_argument("--labels", help="JSONL or CSV labels file (with --query / --capture)")
    ap.add_argument("--out", required=True, help="directory to write <name>.safetensors + <name>.json into")
    ap.add_argument("--name", default="probe")
    ap.add_argument("--hook", default="resid_pre")
    ap.add_argument("--layers", type=_layers, default=[10], help="layer(s), e.g. 10 or 8,12 (default 10)")
    ap.add_argument("--layer-combine", choices=LAYER_COMBINE, default="concat")
    ap.add_argument("--pooling", choices=list(POOLINGS), default="mean")
    ap.add_argument("--window", type=int, help="rolling_max window (tokens)")
    ap.add_argument("--alpha", type=float, help="ema smoothing factor in (0, 1]")
    ap.add_argument("--positions", choices=POSITIONS, default="prompt")
    ap.add_argument("--target-fpr", type=float, default=0.01)
    ap.add_argument("--test-fraction", type=float, default=0.3, help="held out for the reported numbers")
    ap.add_argument("--calibration-fraction", type=float, default=0.33, help="of the training benign requests")
    ap.add_argument("--C", type=float, default=None, help="inverse L2 strength (default: 5-fold CV on the training split)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-id", help="the stream's model id (default: the one the requests carry)")
    ap.add_argument("--allow-incomplete", action="store_true", help="also train on incompletely captured requests")
    return ap


def main(argv=None) -> int:
    ap = parser()
    a = ap.parse_args(argv)

    def log(msg):
        print(f"probe-train: {msg}", file=sys.stderr)

    params = {}
    if a.window is not None:
        params["window"] = a.window
    if a.alpha is not None:
        params["alpha"] = a.alpha
    if not 0 < a.test_fraction < 1 or not 0 < a.calibration_fraction < 1 or not 0 < a.target_fpr < 1:
        ap.error("--test-fraction, --calibration-fraction and --target-fpr must be in (0, 1)")
    from tensortrace.probes.meta import ProbeMeta
    problems = ProbeMeta(model_id="x", hook=a.hook, layers=a.layers, width=1, pooling=a.pooling,
                         pooling_params=params, positions=a.positions).problems()
    if problems:
        ap.error("; ".join(problems))

    if a.bastion:
        if a.labels:
            ap.error("--labels does not go with --bastion (the corpus carries its labels)")
        from tensortrace.probes import demo_probe
        from tensortrace.probes.data import ModelNotPrepared
        try:
            res = demo_probe.train(a.out, layers=a.layers, pooling=a.pooling, positions=a.positions, name=a.name,
                                   pooling_params=params)
        except ModelNotPrepared as e:
            log(str(e))
            return 2
        _print(res.report.probe, res.path, res.report.metrics, res.test_metrics)
        return 0

    if not a.labels:
        ap.error("--labels is required with --query / --capture")
    try:
        labels = read_labels(a.labels)
    except LabelError as e:
        log(str(e))
        return 2
    if a.query:
        examples, model_ids = examples_from_query(a.query, labels, a.hook, a.layers, a.allow_incomplete, log,
                                                  database=a.database)
    else:
        examples, model_ids = examples_from_capture(a.capture, labels, a.hook, a.layers, a.allow_incomplete, log)
    log(f"{len(examples)} of {len(labels)} labelled requests usable")
    if len({e.label for e in examples}) < 2:
        log("need both positive and benign requests with captured tensors; nothing written")
        return 2
    if len(model_ids) > 1 and not a.model_id:
        log(f"requests come from several models {sorted(model_ids)}; choose one with --model-id")
        return 2
    model_id = a.model_id or next(iter(model_ids))
    width = next(iter(examples[0].layers.values()))[1].shape[1]
    train, test = split_test(examples, a.test_fraction, a.seed)
    from tensortrace.probes.files import save_probe
    from tensortrace.probes.train import evaluate, examples_hash, train_probe
    try:
        rep = train_probe(train, model_id=model_id, hook=a.hook, layers=a.layers, width=width, pooling=a.pooling,
                          pooling_params=params, positions=a.positions, layer_combine=a.layer_combine, name=a.name,
                          calibration_fraction=a.calibration_fraction, target_fpr=a.target_fpr, C=a.C, seed=a.seed,
                          train_data_hash=examples_hash(examples),
                          description=f"trained by probe-train from {a.query or a.capture} with {a.labels}")
    except ValueError as e:
        log(str(e))
        return 2
    test_metrics = evaluate(rep.probe, test) if len({e.label for e in test}) == 2 else {}
    if test_metrics:
        rep.probe.meta.metrics["test"] = test_metrics
    path = save_probe(rep.probe, a.out)
    _print(rep.probe, path, rep.metrics, test_metrics)
    return 0


def _print(probe, path, fit, test) -> None:
    m = probe.meta
    print(f"wrote {path} (hash {probe.hash[:16]})")
    print(f"  model {m.model_id}  hook {m.hook}  layers {m.layers}  pooling {m.pooling}  positions {m.positions}")
    print(f"  threshold {m.threshold:.6f} at target FPR {m.calibration['target_fpr']:.0%} on "
          f"{m.calibration['n_benign']} held-out benign requests")
    if test:
        print(f"  test: n={test['n']} ({test['n_positive']} positive)  AUROC {test['auroc']:.3f}  "
              f"TPR {test['tpr_at_threshold']:.3f} / FPR {test['fpr_at_threshold']:.3f} at the threshold  "
              f"(oracle TPR at 1% FPR {test['tpr_at_1pct_fpr_oracle']:.3f})")
    else:
        print("  test: not enough labelled requests of both kinds held out")
