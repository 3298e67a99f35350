"""`make demo` / `python -m tensortrace.demo`: the whole pipeline on this machine, checked end to end.

    python -m tensortrace.demo                   # a real SGLang server with the TensorTrace plugin
    python -m tensortrace.demo --backend hf      # fallback: Hugging Face generate with the capture agent

Starts a local Apache Kafka broker, the `tensortrace exporter` and `tensortrace loader` processes
(chDB engine, query service on gRPC), serves a few concurrent requests with W3C `traceparent`
headers through the capture agent, reads every request's tensors back through the query service
and checks them against an eager Hugging Face reference; prints what happened; stops everything it
started (also on failure or Ctrl-C). Exit status 0 only if every check passed.

run.py: the orchestration and the report; stack.py: the broker/exporter/loader processes;
serve.py: the two backends; verify.py: the reference and the checks.
"""

from tensortrace.demo.run import main

__all__ = ["main"]
