"""Small helpers shared by the benchmark scripts (stdlib only): bootstrap intervals of a median and
of a geometric-mean ratio, and a process's CPU time."""

from __future__ import annotations

import math
import os
import random
from statistics import fmean, median


def _bootstrap_ci(xs, stat, level: float, resamples: int) -> list[float]:
    """Percentile-bootstrap interval of stat(xs): the samples resampled with replacement, a fixed
    seed, so a rerun on the same JSON gives the same interval."""
    rng = random.Random(7)
    stats = sorted(stat(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    tail = (1 - level) / 2
    return [stats[int(tail * resamples)], stats[int((1 - tail) * resamples) - 1]]


def median_ci(xs, level: float = 0.90, resamples: int = 4000) -> list[float]:
    """Percentile-bootstrap interval of the median of xs."""
    return _bootstrap_ci(xs, median, level, resamples)


def ratio_gmean_ci(nums, dens, level: float = 0.90, resamples: int = 4000) -> tuple[float, list[float]]:
    """The geometric mean of the paired ratios nums[i] / dens[i], minus 1, and its percentile-bootstrap
    interval (the pairs resampled). On a round-to-round scatter that is close to normal in the log,
    the mean of the log ratios is a more efficient estimate than their median (about 1.5x fewer
    rounds for the same interval); both are reported where both are printed."""
    logs = [math.log(n / d) for n, d in zip(nums, dens) if n > 0 and d > 0]
    if not logs:
        return 0.0, [0.0, 0.0]
    lo, hi = _bootstrap_ci(logs, fmean, level, resamples)
    return math.exp(fmean(logs)) - 1, [math.exp(lo) - 1, math.exp(hi) - 1]


def cpu_s(pid=None) -> float:
    """User + system CPU seconds of this process (pid None) or another one (from /proc)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def task_cpu_ns(pid: int) -> int:
    """CPU time of every thread of process `pid` in ns, from /proc/<pid>/task/*/schedstat (the
    scheduler's own accounting: /proc/<pid>/stat counts whole clock ticks, 10 ms, which is 1.3% of
    a 0.8 s benchmark round)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):   # a thread gone meanwhile
            continue
    return total


def ring_tmpdir(prefix: str) -> str:
    """A new directory for benchmark rings on /dev/shm (tmpfs), where deployments keep them (an
    emptyDir with medium Memory): a ring on a disk-backed directory (/tmp here) pays the page
    cache's dirty tracking and writeback on the writer's thread. The caller removes it."""
    import tempfile

    return tempfile.mkdtemp(prefix=prefix, dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
