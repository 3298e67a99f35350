"""The statistics the SGLang throughput benchmark reports its targets with (scripts/bench/_stats.py,
scripts/bench/sglang_overhead.py's summarize and --pool): a wrong pairing or estimator would put a
wrong number in docs/BENCHMARKS.md, so they are checked on rounds whose answer is known."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench"
sys.path.insert(0, str(BENCH))

import _stats  # noqa: E402
import sglang_overhead  # noqa: E402

pytestmark = pytest.mark.unit


def _rounds(n, cost, sd, seed):
    """n paired rounds: off's time, and the variant's = off's x (1 + cost) x lognormal noise."""
    rng = random.Random(seed)
    off = [0.8 * math.exp(rng.gauss(0, 0.15)) for _ in range(n)]
    return off, [o * (1 + cost) * math.exp(rng.gauss(0, sd)) for o in off]


def test_gmean_ratio_recovers_a_known_cost_and_its_interval_covers_it():
    off, slow = _rounds(2000, 0.02, 0.08, seed=3)   # the variant 2% slower: throughput x 1/1.02
    g, (lo, hi) = _stats.ratio_gmean_ci(off, slow)
    assert g == pytest.approx(1 / 1.02 - 1, abs=0.004)
    assert lo < 1 / 1.02 - 1 < hi and hi - lo < 0.01
    # the same rounds, no cost: the interval straddles zero; identical rounds: exactly zero
    g0, (lo0, hi0) = _stats.ratio_gmean_ci(*_rounds(2000, 0.0, 0.08, seed=4))
    assert lo0 < g0 < hi0 and abs(g0) < 0.006 and hi0 - lo0 < 0.01
    assert _stats.ratio_gmean_ci(off, off) == (0.0, [0.0, 0.0])
    assert _stats.ratio_gmean_ci([], []) == (0.0, [0.0, 0.0])


def test_gmean_is_not_fooled_by_skew_the_median_misses():
    """Rounds where the variant is usually as fast but now and then much slower: the median of the
    paired ratios reads no cost, the geometric mean (total time) reads the real one."""
    rng = random.Random(5)
    off = [0.8] * 1000
    slow = [0.8 * (1.25 if rng.random() < 0.1 else 1.0) for _ in off]
    g, _ = _stats.ratio_gmean_ci(off, slow)
    assert sorted(o / t - 1 for o, t in zip(off, slow))[500] == 0.0   # the median: no cost
    assert g == pytest.approx(math.exp(-sum(math.log(t / o) for o, t in zip(off, slow)) / 1000) - 1)
    assert g < -0.015


def _measures(variants, n=200):
    """Every variant's rounds paired with one `off` series: off x (1 + cost) x noise."""
    rng = random.Random(10)
    off = [0.8 * math.exp(rng.gauss(0, 0.15)) for _ in range(n)]
    times, agent, sched, consumer = {}, {}, {}, {}
    for v, cost in variants.items():
        ts = off if v == "off" else [o * (1 + cost) * math.exp(rng.gauss(0, 0.01)) for o in off]
        times[v], agent[v], sched[v], consumer[v] = ts, [1e6] * n, list(ts), [2e6] * n
    return times, agent, sched, consumer


def test_summarize_pairs_a_reniced_consumers_variants_with_off_at_the_same_priority():
    # the same off rounds under both priorities would hide the pairing: give them different costs
    times, agent, sched, consumer = _measures({"off": 0.0, "hidden-states": 0.01})
    # at nice 19 every round 5% slower, capture on or off: no cost against its own off
    for v in ("off", "hidden-states"):
        times[v + "@nice19"] = [t * 1.05 for t in times["off"]]
        sched[v + "@nice19"] = [t * 1.05 for t in sched["off"]]
        agent[v + "@nice19"], consumer[v + "@nice19"] = agent[v], consumer[v]
    rows = {r["variant"]: r for r in sglang_overhead.summarize(times, agent, sched, consumer, tokens=384)}
    at19 = rows["hidden-states@nice19"]
    assert at19["paired_vs_off_gmean"] == pytest.approx(0.0, abs=1e-12)
    assert at19["paired_vs_off"] == pytest.approx(0.0, abs=1e-12)
    assert at19["sched_cpu_paired_vs_off"] == pytest.approx(0.0, abs=1e-12)   # off@nice19's CPU the baseline
    assert rows["off@nice19"]["paired_vs_off"] == pytest.approx(0.0, abs=1e-12)
    hs = rows["hidden-states"]   # against plain off: 1% slower, 1% more scheduler CPU
    assert hs["paired_vs_off_gmean"] == pytest.approx(1 / 1.01 - 1, abs=0.002)
    assert hs["sched_cpu_paired_vs_off"] == pytest.approx(0.01, abs=0.002)
    assert hs["rounds"] == 200


def test_pool_pairs_each_round_within_its_run(tmp_path):
    """--pool: every run's rounds paired within that run, the statistics over all of them; runs
    with other variants or another round size are refused."""
    paths = []
    for i, cost in enumerate((0.0, 0.04)):
        times, agent, sched, consumer = _measures({"off": 0.0, "hidden-states": cost}, n=100)
        rows = sglang_overhead.summarize(times, agent, sched, consumer, tokens=384)
        p = tmp_path / f"run{i}.json"
        p.write_text(json.dumps({"config": {"concurrency": 8, "new": 48}, "rows": rows}))
        paths.append(str(p))
    rows, info = sglang_overhead.pool(paths)
    hs = {r["variant"]: r for r in rows}["hidden-states"]
    assert hs["rounds"] == 200 and info["runs"] == paths
    both = [json.loads(Path(p).read_text())["rows"] for p in paths]
    logs = [math.log(o / t) for run in both for o, t in zip(run[0]["round_s"], run[1]["round_s"])]
    assert hs["paired_vs_off_gmean"] == pytest.approx(math.exp(sum(logs) / len(logs)) - 1)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"config": {"concurrency": 8, "new": 96}, "rows": both[0]}))
    with pytest.raises(SystemExit, match="tokens a round"):
        sglang_overhead.pool([paths[0], str(other)])
    # FILE:SUFFIX: a run's reniced-consumer variants pooled as the plain ones of the others
    both_levels = tmp_path / "levels.json"
    both_levels.write_text(json.dumps({"config": {"concurrency": 8, "new": 48}, "rows": both[1] + [
        dict(r, variant=r["variant"] + "@nice19") for r in both[0]]}))
    rows2, _ = sglang_overhead.pool([paths[1], f"{both_levels}:@nice19"])
    assert [r["variant"] for r in rows2] == ["off", "hidden-states"]
    assert {r["variant"]: r for r in rows2}["hidden-states"]["paired_vs_off_gmean"] == pytest.approx(
        hs["paired_vs_off_gmean"])   # the same 200 pairs as pooling the two plain runs
    plain, _ = sglang_overhead.pool([paths[0], f"{both_levels}:@"])   # its plain variants: run 1's
    assert {r["variant"]: r for r in plain}["hidden-states"]["paired_vs_off_gmean"] == pytest.approx(
        hs["paired_vs_off_gmean"])
    with pytest.raises(SystemExit, match="no variant named"):
        sglang_overhead.pool([f"{both_levels}:@nice5"])
    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps({"config": {"concurrency": 8, "new": 48},
                                   "rows": [dict(both[0][0], variant="full"), both[0][1]]}))
    with pytest.raises(SystemExit, match="variants"):
        sglang_overhead.pool([paths[0], str(renamed)])
