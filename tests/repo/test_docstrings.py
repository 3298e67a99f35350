"""Every `>>>` example in a docstring under services/tensortrace runs and prints what it shows.

An example that needs a broker, a model or a file is written as an indented code example without
`>>>` (it still shows the call); a `>>>` example is a promise this test keeps.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_ROOT = ROOT / "services" / "tensortrace"

# Modules whose import needs something this environment may lack: skipped, with the reason, when
# their import fails on exactly that.
OPTIONAL_IMPORTS = {"sglang", "torch", "transformers"}


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        rel = path.relative_to(PACKAGE_ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[1:2] == ["v1"] or parts[-1] == "__main__":   # generated code; running a __main__ runs the program
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        if ">>>" in path.read_text():
            names.append(name)
    return names


def test_the_walk_finds_the_modules_with_examples():
    names = module_names()
    assert "tensortrace.wire.codec" in names and "tensortrace.service.backoff" in names
    assert not any(n.startswith("tensortrace.v1") for n in names)


@pytest.mark.parametrize("name", module_names())
def test_docstring_examples_run(name):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in OPTIONAL_IMPORTS:
            pytest.skip(f"importing {name} needs {e.name}, not installed here")
        raise
    tests = [t for t in doctest.DocTestFinder(exclude_empty=True).find(module, name) if t.examples]
    failures = []

    class Runner(doctest.DocTestRunner):
        def report_failure(self, out, test, example, got):
            failures.append(f"{test.name} (line {_line(test, example)}):\n    >>> {example.source.strip()}\n"
                            f"    expected: {_cut(example.want)}\n    got:      {_cut(got)}")

        def report_unexpected_exception(self, out, test, example, exc_info):
            failures.append(f"{test.name} (line {_line(test, example)}):\n    >>> {example.source.strip()}\n"
                            f"    raised {exc_info[0].__name__}: {_cut(str(exc_info[1]))}")

    runner = Runner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test, out=lambda s: None)
    if not tests:
        pytest.fail(f"{name}: `>>>` in the file but no docstring example found (is it in a comment or a string?)")
    assert not failures, f"{name}: docstring examples that do not run as shown:\n" + "\n".join(failures)


def _line(test: doctest.DocTest, example: doctest.Example) -> str:
    return "?" if test.lineno is None else str(test.lineno + example.lineno + 1)


def _cut(text: str, n: int = 300) -> str:
    text = repr(text.strip())
    return text if len(text) <= n else text[:n] + f"... ({len(text)} characters)"
