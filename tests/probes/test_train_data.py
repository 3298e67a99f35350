"""The labelled data and the model helper: the bastioncorpus split is fixed (pinned by its hash, so a
changed corpus or rule is noticed), stratified, disjoint; the model helper says what to run when the
converted model is missing."""

from __future__ import annotations

from collections import Counter

import pytest

from tensortrace.probes.data import (BASTION_SPLIT_SEED, ModelNotPrepared, bastion_prompts, bastion_split,
                                     smollm2_path)

pytestmark = pytest.mark.unit
pytest.importorskip("bastioncorpus")

# sha256 of (split, id, label, text) rows: bastioncorpus 0.6.0, seed 20261130, 40 % test
PINNED_SPLIT = "ecd390207df04b07834afefb987322c045d40d1beb63f40b3aac9c6f82c3f7f9"


def test_corpus_is_what_the_docs_say():
    rows = bastion_prompts()
    assert len(rows) == 181
    assert Counter(r.label for r in rows) == {1: 118, 0: 63}
    assert {r.lang for r in rows} == {"en", "de", "fr", "es", "it"}


def test_split_is_fixed_stratified_and_disjoint():
    s = bastion_split()
    assert s.seed == BASTION_SPLIT_SEED and (len(s.train), len(s.test)) == (109, 72)
    assert s.hash == PINNED_SPLIT, "the split changed: update docs/probes.md numbers and this pin together"
    assert not {p.id for p in s.train} & {p.id for p in s.test}
    # every (label, language) stratum is split about 60/40
    tr, te = Counter((p.label, p.lang) for p in s.train), Counter((p.label, p.lang) for p in s.test)
    for key in set(tr) | set(te):
        n = tr[key] + te[key]
        assert abs(te[key] - n * 0.4) <= 0.5 + 1e-9, (key, tr[key], te[key])
    assert bastion_split().hash == s.hash                         # deterministic
    assert bastion_split(seed=1).hash != s.hash                   # and the seed matters


def test_missing_model_says_to_run_make_model(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORTRACE_MODELS", str(tmp_path))
    with pytest.raises(ModelNotPrepared, match="run `make model`"):
        smollm2_path()
