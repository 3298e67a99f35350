"""`make demo` / `python -m tensortrace.demo`: the product's three jobs on this machine, checked end to end.

    python -m tensortrace.demo                   # SmolLM2 in a real SGLang server + a live prompt-injection probe
    python -m tensortrace.demo --model tiny      # a tiny random Llama in SGLang (nothing to prepare)
    python -m tensortrace.demo --backend hf      # fallback: Hugging Face generate with the capture agent

Starts a local Apache Kafka broker, the `tensortrace exporter` process and `tensortrace loader
--bridge` (chDB engine, query service on gRPC, the OTel bridge with its OTLP receiver for SGLang's
spans, the probe-scores consumer), with SmolLM2 also `tensortrace probes`; serves concurrent
requests with W3C `traceparent` headers through the capture agent; prints each request's probe
score (SmolLM2) and checks requests' tensors read back through the query service against an eager
Hugging Face reference; prints one request's trace end to end (`tensortrace trace`) and writes its
HTML page; stops everything it started (also on failure, Ctrl-C or SIGTERM). Exit status 0 only if
every check passed.

run.py: the orchestration and the report (tiny model, HF), and the trace step; run_smollm2.py: the
real-model run; smollm2.py: its pieces (served model directory, probe cache, chat requests, scores
reader); stack.py: the broker/exporter/loader processes; serve.py: the tiny-model backends;
verify.py: the reference and the checks.
"""

from tensortrace.demo.run import main

__all__ = ["main"]
