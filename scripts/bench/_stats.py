"""Small statistics shared by the benchmark scripts (stdlib only)."""

from __future__ import annotations

import random


def median(xs) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def median_ci(xs, level: float = 0.90, resamples: int = 4000) -> list[float]:
    """Percentile-bootstrap interval of the median of xs (the samples resampled with replacement;
    a fixed seed, so a rerun on the same JSON gives the same interval)."""
    rng = random.Random(7)
    meds = sorted(median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    tail = (1 - level) / 2
    return [meds[int(tail * resamples)], meds[int((1 - tail) * resamples) - 1]]
