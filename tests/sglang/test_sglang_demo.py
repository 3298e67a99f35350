"""`make demo` with its default backend: a real SGLang server with the TensorTrace plugin (this venv's
SGLang) serving concurrent requests with traceparent headers, through the exporter, Kafka, the
loader and the query service, checked against an eager Hugging Face forward (token ids exact,
hidden states within the tolerance test_sglang_real_server.py states, reason printed).

The demo itself runs under the project venv (.venv: Kafka, chDB, gRPC clients) and launches only
the SGLang server with this venv's interpreter, so this venv needs nothing beyond SGLang."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from sglang_harness import ROOT, require_sglang

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROJECT_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")


def test_demo_serves_through_real_sglang_and_reads_every_request_back(tmp_path):
    require_sglang()
    if not os.access(PROJECT_PYTHON, os.X_OK):
        pytest.skip(f"the demo runs under the project venv and {PROJECT_PYTHON} is missing: run `make setup`")
    workdir = tmp_path / "demo"
    r = subprocess.run([PROJECT_PYTHON, "-m", "tensortrace.demo", "--backend", "sglang", "--sglang-venv", sys.prefix,
                        "--workdir", str(workdir)], capture_output=True, text=True, timeout=290, cwd=ROOT)
    out = r.stdout
    print(out)
    assert r.returncode == 0, out + r.stderr[-3000:]
    assert "RESULT: PASS: 4 requests complete, trace ids match their traceparent headers, token ids exact, " \
           "hidden states within 0.0001 of an eager HF forward" in out
    assert re.search(r"SGLang server pid \d+ \(own process group\) healthy at http://127\.0\.0\.1:\d+", out)
    served = re.findall(r"^   (req-\d)  (/generate|/v1/completions) +prompt +(\d+) tokens -> generated (\d+)  "
                        r"traceparent 00-([0-9a-f]{32})-[0-9a-f]{16}-01$", out, re.M)
    assert sorted(api for _, api, *_ in served) == ["/generate"] * 3 + ["/v1/completions"]
    rows = re.findall(r"^   (req-\d) +([0-9a-f]{32}) +(\d+)\+(\d+) +(\d+) +0 +(\d+)  complete .* "
                      r"max \|diff\| ([0-9.e+-]+), ids exact +\d+ ms  ok$", out, re.M)
    assert len(rows) == 4, out
    sent = {name: (int(p), int(g), trace) for name, _, p, g, trace in served}
    for name, trace, prompt, gen, captured, loaded, diff in rows:
        assert sent[name] == (int(prompt), int(gen), trace)  # summary tokens and trace id as served
        assert int(captured) == int(loaded) > 0 and float(diff) <= 1e-4
    assert "why a tolerance for SGLang: SGLang computes the same function with other kernels" in out
    assert re.search(r"^   completeness: complete  captured \d+  loaded \d+  dropped 0$", out, re.M)
    assert re.search(r"^   token_ids +-1 ", out, re.M)  # `tensortrace show` lists the hooks read back
    m = re.search(r"produced (\d+) = published (\d+) \+ dropped by the agent 0 \+ dropped by the exporter 0; "
                  r"pending 0  ok", out)
    assert m and m.group(1) == m.group(2), out
    # everything the demo started is gone: the SGLang server's process group, the exporter, the loader
    pids = [int(p) for p in re.findall(r"(?:SGLang server|exporter process|loader process) pid (\d+)", out)]
    assert len(pids) == 3, out
    assert _gone(pids[0], group=True) and _gone(pids[1]) and _gone(pids[2])


def _gone(pid: int, group: bool = False, wait_s: float = 10.0) -> bool:
    """True once no process (or process group) `pid` exists; orphans may take a moment to be reaped."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            (os.killpg if group else os.kill)(pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
