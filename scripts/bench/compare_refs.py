"""Run one benchmark script on two versions of the code, side by side, in one run.

    .venv/bin/python scripts/bench/compare_refs.py --baseline HEAD~3 --repeats 3 --json loader_compare.json \\
        -- scripts/bench/loader_throughput.py --skip readback --seconds 10

The baseline is checked out with `git worktree` into a temporary directory; each repeat runs the
benchmark there and in this working tree, alternating which goes first, with the same interpreter
and the same arguments (its code is imported from its own `services/`, via PYTHONPATH ahead of the
editable install). Every run writes its JSON; this script collects them into one JSON with the
numeric leaves of both sides (per repeat and median) and prints a table of the medians, with the
change in percent. Nothing of the baseline is left behind (the worktree is removed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def leaves(d, prefix=""):
    """Flatten the numeric leaves of a JSON document: {"a.b": 1.5, ...}."""
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(leaves(v, f"{prefix}{k}."))
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        out[prefix[:-1]] = float(d)
    return out


def run_once(tree: Path, script: str, args: list[str], out_json: str, script_tree: Path | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree / "services") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TENSORTRACE_KAFKA_LIBS", str(ROOT / ".cache" / "kafka-libs"))
    cmd = [sys.executable, str((script_tree or tree) / script), *args, "--json", out_json]
    print(f"$ (cd {tree}) {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=tree, env=env, check=True)
    with open(out_json) as f:
        return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", required=True, help="git ref of the baseline (e.g. HEAD~3, a commit)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--script-from", choices=("each", "current"), default="each",
                   help="each: every side runs its own copy of the script (default); current: both run this "
                        "tree's script, each over its own code (for a script newer than the baseline)")
    p.add_argument("--json", default=".cache/bench/compare_refs.json")
    p.add_argument("script", help="benchmark script, relative to the repository root; it must take --json FILE")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    args = [x for x in a.args if x != "--"]
    base_sha = subprocess.run(["git", "rev-parse", a.baseline], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.strip()
    head_sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    tmp = Path(tempfile.mkdtemp(prefix="tt-compare-"))
    wt = tmp / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", str(wt), base_sha], cwd=ROOT, check=True,
                   capture_output=True)
    runs = {"baseline": [], "current": []}
    try:
        for i in range(a.repeats):
            order = [("baseline", wt), ("current", ROOT)]
            if i % 2:
                order.reverse()
            for side, tree in order:
                runs[side].append(run_once(tree, a.script, args, str(tmp / f"{side}-{i}.json"),
                                           ROOT if a.script_from == "current" else None))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=ROOT, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    flat = {side: [leaves(r) for r in rs] for side, rs in runs.items()}
    keys = [k for k in flat["current"][0] if all(k in r for rs in flat.values() for r in rs)]
    medians = {side: {k: statistics.median(r[k] for r in rs) for k in keys} for side, rs in flat.items()}
    result = {"benchmark": "compare_refs", "script": a.script, "args": args, "repeats": a.repeats,
              "baseline": base_sha, "current": head_sha + ("+uncommitted" if dirty else ""),
              "median": medians, "runs": runs}
    print(f"\n{'measure (median of %d)' % a.repeats:<52}{'baseline':>14}{'current':>14}{'change':>9}")
    for k in keys:
        b, c = medians["baseline"][k], medians["current"][k]
        change = f"{(c - b) / b * 100:+.1f}%" if b else ""
        print(f"{k:<52}{b:>14,.2f}{c:>14,.2f}{change:>9}")
    print(f"baseline {base_sha[:10]}  current {result['current'][:18]}")
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
