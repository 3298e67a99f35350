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
    r = subprocess.run([PROJECT_PYTHON, "-m", "tensortrace.demo", "--backend", "sglang", "--model", "tiny",
                        "--sglang-venv", sys.prefix, "--workdir", str(workdir)], capture_output=True, text=True, timeout=480, cwd=ROOT)
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
    # the trace of one request: SGLang's spans (--enable-trace, OTLP to the bridge in the loader
    # process) and TensorTrace's, one trace in the loader's chDB; its timeline and page
    m = re.search(r"^7\. the trace of (req-\d): SGLang's spans", out, re.M)
    assert m, out
    traced, (_, gen, _) = dict((name, trace) for name, trace, *_ in rows)[m.group(1)], sent[m.group(1)]
    assert re.search(r"^   bridge: \d+ TensorTrace spans for \d+ requests, [1-9]\d* engine spans written "
                     r"\([1-9]\d* received over OTLP\)", out, re.M), out
    assert re.search(rf"^   \$ tensortrace trace {traced} (--server 127\.0\.0\.1:\d+|--clickhouse chdb://\S+/chdb) "
                     rf"--html \S+/trace\.html$", out, re.M), out
    assert re.search(rf"^   trace {traced}  request [0-9a-f]+  model tiny-llama$", out, re.M), out
    assert re.search(r"^   request +\+0\.0 ms .* sglang span; 'Req [0-9a-f]{8}'$", out, re.M), out
    assert re.search(r"^   prefill .* sglang prefill_forward$", out, re.M), out
    # one decode_loop span per decode step: the prefill makes the first token
    assert re.search(rf"^   decode .* sglang decode_loop; {gen - 1} steps, p50 ", out, re.M), out
    for stage in ("capture", "export", "kafka", "load"):
        assert re.search(rf"^   {stage} +\+[\d,.]+ ms +[\d,.]+ ms  \|", out, re.M), (stage, out)
    assert re.search(r"^   capture .* tensortrace\.capture span; \d+ records, hooks .*, complete$", out, re.M), out
    assert re.search(r"^   spans: sglang \d+, tensortrace-bridge 3$", out, re.M), out
    page = workdir / "trace.html"
    assert page.is_file() and traced in page.read_text() and page.stat().st_size > 10_000
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


SMOLLM2 = os.path.join(ROOT, ".cache", "models", "smollm2-135m-instruct")


def test_demo_serves_smollm2_and_scores_every_request_with_the_live_probe(tmp_path):
    """`make demo` itself: SmolLM2 with SGLang, the held-out bastioncorpus prompts (a balanced 8 of
    them here, for time), a live probe score per request, the trace of a flagged one."""
    require_sglang()
    if not os.access(PROJECT_PYTHON, os.X_OK):
        pytest.skip(f"the demo runs under the project venv and {PROJECT_PYTHON} is missing: run `make setup`")
    if not os.path.isfile(os.path.join(SMOLLM2, ".converted")):
        pytest.skip(f"SmolLM2 is not prepared at {SMOLLM2}: run `make model`")
    workdir = tmp_path / "demo"
    r = subprocess.run([PROJECT_PYTHON, "-m", "tensortrace.demo", "--sglang-venv", sys.prefix, "--prompts", "8",
                        "--workdir", str(workdir)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    out = r.stdout
    print(out)
    assert r.returncode == 0, out + r.stderr[-3000:]
    assert "RESULT: PASS: 8 requests answered by SmolLM2-135M-Instruct (dequantized from Q4_1), each scored live " \
           "by the probe and complete; 2 checked against an eager HF forward" in out
    assert re.search(r"^     linear on resid_pre layer 10, mean over prompt positions, threshold 0\.\d+", out, re.M), out
    # one line per request: label, live score, flagged or not, complete, its trace id, text -> answer
    rows = re.findall(r"^   (q\d\d) +(injection|benign) +([01]\.\d{3}) (FLAGGED|-) +(yes) +([0-9a-f]{32}) ['\"].+['\"] -> .+$",
                      out, re.M)
    assert len(rows) == 8 and {row[1] for row in rows} == {"injection", "benign"}, out
    assert any(row[3] == "FLAGGED" for row in rows), out
    m = re.search(r"live: (\d+) of (\d+) injections flagged, (\d+) of (\d+) benign passed", out)
    assert m and int(m.group(2)) == 4 and int(m.group(4)) == 4, out
    # two requests' hidden states against an eager HF forward, and the live score equals the offline one
    checked = re.findall(r"^   (q\d\d) +[0-9a-f]{32} +\d+\+\d+ +(\d+) +0 +(\d+)  complete .* "
                         r"max \|diff\| ([0-9.e+-]+), ids exact +\d+ ms  ok$", out, re.M)
    assert len(checked) == 2 and all(int(c) == int(l) > 0 and float(d) <= 1e-3 for _, c, l, d in checked), out
    assert len(re.findall(r"^   q\d\d: live score [01]\.\d{6}, the same probe on the eager HF forward [01]\.\d{6}  ok$",
                          out, re.M)) == 2, out
    # the trace of a flagged request: SGLang's spans, TensorTrace's, and the probe's verdict
    m = re.search(r"^6\. the trace of (q\d\d): SGLang's spans", out, re.M)
    assert m and dict((row[0], row[3]) for row in rows)[m.group(1)] == "FLAGGED", out
    assert re.search(r"^   decode .* sglang decode_loop; \d+ steps", out, re.M), out
    assert re.search(r"^   probe .* tensortrace\.probe span", out, re.M), out
    assert re.search(r"^   probe prompt-injection: [01]\.\d{3} \(threshold [01]\.\d{3}\) FLAGGED; \d+ token scores",
                     out, re.M), out
    page = workdir / "trace.html"
    assert page.is_file() and page.stat().st_size > 10_000
