"""Probe files are data: every way a probe file can be wrong is refused at load with an error that
names the file and the problem; a directory with one bad probe still loads the others; a probe that
does not fit the stream (model, hook, hidden size) is refused before any request."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest

from tensortrace.probes import (Probe, ProbeFileError, ProbeMeta, ProbeMismatch, load_probe, load_probe_dir,
                                save_probe)

pytestmark = pytest.mark.unit

W = 8


def probe(name="inj", pooling="mean", layers=(3,), width=W, threshold=0.7) -> Probe:
    rng = np.random.default_rng(0)
    meta = ProbeMeta(model_id="smollm2-135m-instruct", model_config_hash="ab" * 32, hook="resid_pre",
                     layers=list(layers), width=width, pooling=pooling, positions="prompt", threshold=threshold,
                     calibration={"method": "fpr", "target_fpr": 0.01}, train_data_hash="cd" * 32,
                     metrics={"auroc": 0.9})
    w = {"weight": rng.normal(size=meta.in_dim).astype(np.float32), "bias": np.array([0.1], np.float32)}
    if pooling == "attention":
        w["attn_query"] = rng.normal(size=meta.in_dim).astype(np.float32)
    return Probe(meta, w, name=name)


def edit_json(json_path, /, **changes):
    d = json.loads(json_path.read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    json_path.write_text(json.dumps(d))


def test_save_then_load_gives_the_same_probe_and_hash(tmp_path):
    p = probe(pooling="attention", layers=(3, 5))
    jpath = save_probe(p, tmp_path)
    assert jpath == tmp_path / "inj.json" and (tmp_path / "inj.safetensors").is_file()
    for ref in (tmp_path / "inj", jpath, tmp_path / "inj.safetensors"):
        q = load_probe(ref)
        assert q.hash == p.hash and q.name == "inj" and q.meta == p.meta
    rows = np.random.default_rng(1).normal(size=(6, W)).astype(np.float32)
    inp = {3: (np.arange(6), rows), 5: (np.arange(6), rows[::-1].copy())}
    assert q.score(inp).score == p.score(inp).score


def test_hash_covers_weights_and_metadata(tmp_path):
    a = probe()
    assert probe(threshold=0.71).hash != a.hash                       # metadata
    b = probe()
    b.weights["weight"][0] += 1e-3
    assert Probe(b.meta, b.weights, name="inj").hash != a.hash          # weights
    save_probe(a, tmp_path)
    edit_json(tmp_path / "inj.json", description="edited")
    assert load_probe(tmp_path / "inj").hash != a.hash


def test_missing_weights(tmp_path):
    save_probe(probe(), tmp_path)
    (tmp_path / "inj.safetensors").unlink()
    with pytest.raises(ProbeFileError, match=r"inj\.safetensors: weights file is missing"):
        load_probe(tmp_path / "inj")


def test_missing_metadata(tmp_path):
    save_probe(probe(), tmp_path)
    (tmp_path / "inj.json").unlink()
    with pytest.raises(ProbeFileError, match=r"inj\.json: metadata file is missing \(its weights"):
        load_probe(tmp_path / "inj")


def test_bad_json(tmp_path):
    save_probe(probe(), tmp_path)
    (tmp_path / "inj.json").write_text('{"model_id": "x",')
    with pytest.raises(ProbeFileError, match="is not valid JSON"):
        load_probe(tmp_path / "inj")


def test_unreadable_weights(tmp_path):
    save_probe(probe(), tmp_path)
    (tmp_path / "inj.safetensors").write_bytes(b"\x00not safetensors")
    with pytest.raises(ProbeFileError, match="not a readable safetensors file"):
        load_probe(tmp_path / "inj")


def test_unknown_pooling(tmp_path):
    save_probe(probe(), tmp_path)
    edit_json(tmp_path / "inj.json", pooling="softmax_magic")
    with pytest.raises(ProbeFileError, match="unknown pooling 'softmax_magic'; poolings: last, mean"):
        load_probe(tmp_path / "inj")


@pytest.mark.parametrize("field,value", [("class", "os:system"), ("module", "evil"),
                                         ("code", "import os; os.system('id')"), ("path", "/tmp/x.py")])
def test_json_asking_for_a_code_path_is_refused(tmp_path, field, value):
    save_probe(probe(), tmp_path)
    edit_json(tmp_path / "inj.json", **{field: value})
    with pytest.raises(ProbeFileError, match=rf"\['{field}'\] ask for code to be loaded; probe files carry data"):
        load_probe(tmp_path / "inj")


def test_kind_that_is_not_installed_is_refused(tmp_path):
    save_probe(probe(), tmp_path)
    edit_json(tmp_path / "inj.json", kind="my_company.probes:Sneaky")
    with pytest.raises(ProbeFileError, match="kind 'my_company.probes:Sneaky' is neither built in .* nor an installed "
                                             "entry point of group 'tensortrace.probes'"):
        load_probe(tmp_path / "inj")


def test_unknown_field_and_unknown_layer_numbering(tmp_path):
    save_probe(probe(), tmp_path)
    edit_json(tmp_path / "inj.json", temperature=2)
    with pytest.raises(ProbeFileError, match=r"unknown field\(s\) \['temperature'\]"):
        load_probe(tmp_path / "inj")
    save_probe(probe(), tmp_path)
    edit_json(tmp_path / "inj.json", layer_numbering="gpt_neox_1based")
    with pytest.raises(ProbeFileError, match="layer_numbering: 'gpt_neox_1based' is not a convention"):
        load_probe(tmp_path / "inj")


def test_shape_mismatch_between_weights_and_metadata(tmp_path):
    save_probe(probe(), tmp_path)
    edit_json(tmp_path / "inj.json", width=576)
    with pytest.raises(ProbeFileError, match=r"inj\.safetensors: weight 'weight' has shape \(8,\) but the metadata "
                                             r"says \(576,\)"):
        load_probe(tmp_path / "inj")
    save_probe(probe(), tmp_path)
    edit_json(tmp_path / "inj.json", layers=[3, 4])
    with pytest.raises(ProbeFileError, match=r"says \(16,\)"):
        load_probe(tmp_path / "inj")


def test_missing_required_field_and_wrong_format(tmp_path):
    save_probe(probe(), tmp_path)
    edit_json(tmp_path / "inj.json", hook=None)
    with pytest.raises(ProbeFileError, match=r"missing field\(s\) \['hook'\]"):
        load_probe(tmp_path / "inj")
    save_probe(probe(), tmp_path)
    edit_json(tmp_path / "inj.json", format_version=2)
    with pytest.raises(ProbeFileError, match="format_version 2 is not 1"):
        load_probe(tmp_path / "inj")


def test_check_stream_refuses_wrong_model_hook_and_width():
    p = probe()
    p.check_stream("smollm2-135m-instruct", "resid_pre", W)
    with pytest.raises(ProbeMismatch, match="trained on model 'smollm2-135m-instruct', the stream is from 'llama-tiny'"):
        p.check_stream("llama-tiny", "resid_pre", W)
    with pytest.raises(ProbeMismatch, match="reads hook 'resid_pre', the stream offers 'attn_out'"):
        p.check_stream("smollm2-135m-instruct", "attn_out", W)
    with pytest.raises(ProbeMismatch, match="expects hidden size 8 on resid_pre, the stream's is 576"):
        p.check_stream("smollm2-135m-instruct", "resid_pre", 576)
    with pytest.raises(ProbeMismatch, match="config hash"):
        p.check_stream("smollm2-135m-instruct", "resid_pre", W, model_config_hash="ef" * 32)


def test_directory_with_one_bad_probe_loads_the_others(tmp_path):
    save_probe(probe("a"), tmp_path)
    save_probe(probe("b", pooling="max"), tmp_path)
    save_probe(probe("c"), tmp_path)
    edit_json(tmp_path / "c.json", pooling="nope")
    (tmp_path / "orphan.safetensors").write_bytes((tmp_path / "a.safetensors").read_bytes())
    (tmp_path / "notes.txt").write_text("ignored")
    probes, errors = load_probe_dir(tmp_path)
    assert sorted(probes) == ["a", "b"] and probes["b"].meta.pooling == "max"
    assert sorted(p.name for p, _ in errors) == ["c.json", "orphan.json"]
    assert all(isinstance(e, ProbeFileError) for _, e in errors)
    with pytest.raises(ProbeFileError, match="is not a directory"):
        load_probe_dir(tmp_path / "nope")


def test_installed_entry_point_kind_is_used_and_a_non_probe_entry_point_is_refused(tmp_path, monkeypatch):
    """A real distribution on sys.path (dist-info with entry_points.txt), found by importlib.metadata."""
    site = tmp_path / "site"
    (site / "ttprobe_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "ttprobe_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: ttprobe-plugin\n"
                                                                   "Version: 0.1\n")
    (site / "ttprobe_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[tensortrace.probes]\ndoubled = ttprobe_plugin:DoubledProbe\nnotaprobe = ttprobe_plugin:NotAProbe\n")
    (site / "ttprobe_plugin.py").write_text(textwrap.dedent("""
        from tensortrace.probes import Probe
        class DoubledProbe(Probe):
            kind = "doubled"
            def token_logits(self, slot, rows):
                s, a = super().token_logits(slot, rows)
                return 2 * s, a
        class NotAProbe:
            pass
    """))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "ttprobe_plugin", raising=False)
    p = probe("d")
    save_probe(p, tmp_path)
    edit_json(tmp_path / "d.json", kind="doubled")
    q = load_probe(tmp_path / "d")
    assert type(q).__name__ == "DoubledProbe"
    rows = np.ones((2, W), np.float32)
    assert q.score({3: (np.arange(2), rows)}).token_logits[0] == pytest.approx(
        2 * (p.score({3: (np.arange(2), rows)}).token_logits[0] - 0.1) + 0.1)
    edit_json(tmp_path / "d.json", kind="notaprobe")
    with pytest.raises(ProbeFileError, match="entry point 'notaprobe' .* is not a Probe subclass"):
        load_probe(tmp_path / "d")
