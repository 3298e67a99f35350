"""Test harness for the SGLang backend: find SGLang, launch a real server (SGLangServer, from
tensortrace.devstack.sglang_server), read a Ring² directory back through the production split rule.

SGLang's tests run under the SGLang virtualenv (scripts/sglang/run-tests.sh); under the project
venv, where SGLang is not installed, they skip — unless TENSORTRACE_REQUIRE_SGLANG=1 (set by
that script), where a missing SGLang is a failure.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from tensortrace.devstack.sglang_server import ROOT, STUB_DIR, SGLangServer, free_port  # noqa: F401 (re-exported)


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


from tensortrace.devstack.ringread import RingContents, read_rings  # noqa: E402,F401 (re-exported)
