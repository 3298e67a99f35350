"""Test harness for the SGLang backend: find SGLang, launch a real server (SGLangServer, from
tensortrace.devstack.sglang_server), read a Ring² directory back through the production split rule.

SGLang's tests run under the SGLang virtualenv (scripts/sglang/run-tests.sh); under the project
venv, where SGLang is not installed, they skip — unless TENSORTRACE_REQUIRE_SGLANG=1 (set by
that script), where a missing SGLang is a failure.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field

import pytest

from tensortrace.devstack.sglang_server import ROOT, STUB_DIR, SGLangServer, free_port  # noqa: F401 (re-exported)

sys.path.insert(0, os.path.join(ROOT, "scripts", "sglang"))

def _has_sglang() -> bool:
    # tests/ is on sys.path under pytest, so this very directory is a namespace package called
    # `sglang`; the real SGLang is a regular package (it has an origin file).
    try:
        spec = importlib.util.find_spec("sglang")
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is not None


HAS_SGLANG = _has_sglang()
REQUIRE_SGLANG = os.environ.get("TENSORTRACE_REQUIRE_SGLANG") == "1"


def require_sglang():
    """Skip (project venv) or fail (SGLang venv run) when SGLang cannot be imported."""
    if HAS_SGLANG:
        return
    if REQUIRE_SGLANG:
        pytest.fail("TENSORTRACE_REQUIRE_SGLANG=1 but `import sglang` fails in " + sys.executable)
    pytest.skip("SGLang is not installed in this interpreter; these tests run under the SGLang venv "
                "(bash scripts/sglang/run-tests.sh)")


@dataclass
class RingContents:
    records: list = field(default_factory=list)    # TensorRecords
    summaries: dict = field(default_factory=dict)  # request_id -> RequestSummary
    steps: list = field(default_factory=list)      # RingStep

    def by_request(self):
        out = defaultdict(list)
        for r in self.records:
            out[r.request_id].append(r)
        return out


def read_rings(ring_dir: str) -> RingContents:
    """Every frame of every ring in `ring_dir`, split into TensorRecords the way the exporter does
    (tensortrace.ring.slabs). Reads without releasing (the producer keeps running)."""
    from tensortrace.ring.format import RingReader
    from tensortrace.ring.slabs import decode_frame, ring_producer
    from tensortrace.v1 import records_pb2 as pb

    out = RingContents()
    for path in sorted(glob.glob(os.path.join(ring_dir, "*.ring"))):
        reader = RingReader.open(path)
        try:
            producer = ring_producer(reader.header)
            steps = {}
            for frame in reader.frames():
                step, records = decode_frame(frame, steps, producer)
                if step is not None:
                    out.steps.append(step)
                for r in records:
                    if isinstance(r, pb.RequestSummary):
                        assert r.request_id not in out.summaries, f"two summaries for {r.request_id}"
                        out.summaries[r.request_id] = r
                    else:
                        out.records.append(r)
        finally:
            reader.close()
    return out
