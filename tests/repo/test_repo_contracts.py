"""Repository-level guarantees: generated protobuf code is current, no pickle on any wire, no service
package imports another, nothing but tests and benchmarks imports the test helpers (and no import
cycles between packages)."""

from __future__ import annotations

import ast
import glob
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "services" / "tensortrace" / "v1"


def make_proto_command(out_dir: Path) -> list[str]:
    """The protoc command of `make proto` (read from the Makefile), writing into out_dir instead."""
    text = (ROOT / "Makefile").read_text()
    lines = text.splitlines()
    start = lines.index(next(l for l in lines if l.startswith("proto:")))
    recipe = next(l for l in lines[start + 1:] if "grpc_tools.protoc" in l).strip()
    protos = sorted(glob.glob("proto/tensortrace/v1/*.proto", root_dir=ROOT))  # relative, as make passes them
    recipe = recipe.replace("$(PY)", shlex.quote(sys.executable)).replace("$(PROTOS)", " ".join(protos))
    assert "$(" not in recipe, f"unexpanded make variable in the proto recipe: {recipe}"
    args = shlex.split(recipe)
    # Output flags point at `services`; redirect each to the temp dir.
    return [re.sub(r"^(--\w+_out=)services$", rf"\g<1>{out_dir}", a) if a.startswith("--") else a
            for a in args]


def test_generated_protobuf_code_is_not_stale(tmp_path):
    cmd = make_proto_command(tmp_path)
    assert any(a.startswith("--python_out=") and a.endswith(str(tmp_path)) for a in cmd)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"protoc failed: {r.stderr}"
    fresh_dir = tmp_path / "tensortrace" / "v1"
    fresh = {p.name: p.read_bytes() for p in fresh_dir.iterdir() if p.is_file()}
    assert fresh, "protoc generated nothing"
    stale = [name for name, data in fresh.items()
             if not (GENERATED / name).exists() or (GENERATED / name).read_bytes() != data]
    assert not stale, f"generated code is stale, run `make proto` and commit: {sorted(stale)}"
    orphans = [p.name for p in GENERATED.iterdir()
               if re.search(r"_pb2(_grpc)?\.pyi?$", p.name) and p.name not in fresh]
    assert not orphans, f"generated files without a .proto: {sorted(orphans)}"


# Names whose use means Python objects (not a schema) would cross a process boundary.
_FORBIDDEN = [
    (re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|shelve|marshal)\b", re.M), "imports a pickle-like module"),
    (re.compile(r"\btorch\.(save|load)\s*\("), "uses torch.save/torch.load"),
    (re.compile(r"\b(numpy|np)\.load\s*\([^)]*allow_pickle\s*=\s*True"), "loads numpy with allow_pickle"),
    (re.compile(r"\b__reduce(_ex)?__\b"), "defines pickling hooks"),
]


def test_no_pickle_anywhere_under_services():
    offenders = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        text = path.read_text(errors="replace")
        for pattern, what in _FORBIDDEN:
            for m in pattern.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                offenders.append(f"{path.relative_to(ROOT)}:{line} {what}")
    assert not offenders, "no pickle on any wire:\n" + "\n".join(offenders)


def test_the_pickle_check_would_catch_an_offender(tmp_path):
    sample = "import os\nimport pickle\nx = torch.load(f)\n"
    found = [what for pattern, what in _FORBIDDEN if pattern.search(sample)]
    assert found == ["imports a pickle-like module", "uses torch.save/torch.load"]


# -- import rules between the packages under services/tensortrace/ --------------------------------
# Services are deployed, versioned and reasoned about on their own: none imports another. Contracts
# (formats, schema) and machinery (the service runtime, the consumer core) are shared by services,
# so they import none; contracts, the bottom layer, do not import machinery either. What must run services together (one process owns an embedded chDB engine)
# is assembled at the top level: cli.py, compose.py, and the dev/demo tooling. The test helpers
# (tensortrace.testing) may import anything, and only tests and benchmarks import them.
SERVICE_PACKAGES = {"agent", "exporter", "loader", "query", "bridge", "probes"}
CONTRACT_PACKAGES = {"ring", "wire", "storage", "v1"}
MACHINERY_PACKAGES = {"service", "consume"}
TEST_HELPERS = {"testing"}
TOP_LEVEL = {"cli", "compose", "demo", "devstack", "devkafka", ""} | TEST_HELPERS   # "": tensortrace/__init__.py
PACKAGE_ROOT = ROOT / "services" / "tensortrace"


def package_imports(path: Path, source: str | None = None) -> set[str]:
    """The tensortrace packages a module imports (any import, also inside functions), by their
    first name under tensortrace: `from tensortrace.query.server import serve` -> "query"."""
    rel = path.relative_to(PACKAGE_ROOT)
    module = ["tensortrace", *rel.with_suffix("").parts]
    is_package = module[-1] == "__init__"
    if is_package:
        module = module[:-1]
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module if is_package else module[:-1]
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            names = [f"{name}.{a.name}" for a in node.names] if name == "tensortrace" else [name]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "tensortrace" and len(parts) > 1:
                found.add(parts[1])
    return found


def package_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE_ROOT)
    return "" if rel.parts == ("__init__.py",) else rel.parts[0].removesuffix(".py")


def import_graph(sources: dict[Path, str] | None = None) -> dict[str, dict[str, list[str]]]:
    """{package: {imported package: [modules that import it]}} over services/tensortrace/."""
    files = sources or {p: None for p in sorted(PACKAGE_ROOT.rglob("*.py"))}
    graph: dict[str, dict[str, list[str]]] = {}
    for path, source in files.items():
        pkg = package_of(path)
        edges = graph.setdefault(pkg, {})
        for target in package_imports(path, source) - {pkg}:
            edges.setdefault(target, []).append(str(path.relative_to(ROOT)))
    return graph


def import_rule_violations(graph: dict[str, dict[str, list[str]]]) -> list[str]:
    known = SERVICE_PACKAGES | CONTRACT_PACKAGES | MACHINERY_PACKAGES | TOP_LEVEL
    out = [f"{pkg or 'tensortrace'}: a package the import rules do not know; add it to SERVICE_PACKAGES, "
           "CONTRACT_PACKAGES, MACHINERY_PACKAGES or TOP_LEVEL in this test" for pkg in sorted(set(graph) - known)]
    for pkg, edges in sorted(graph.items()):
        for target, where in sorted(edges.items()):
            why = None
            if pkg in SERVICE_PACKAGES and target in SERVICE_PACKAGES:
                why = "a service imports another service (assemble them in compose.py)"
            elif pkg in CONTRACT_PACKAGES | MACHINERY_PACKAGES and target in SERVICE_PACKAGES:
                why = f"{'a contract' if pkg in CONTRACT_PACKAGES else 'shared machinery'} imports a service"
            elif pkg in CONTRACT_PACKAGES and target in MACHINERY_PACKAGES:
                why = "a contract imports shared machinery"
            elif target in TEST_HELPERS and pkg not in TEST_HELPERS:
                why = "imports the test helpers (only tests and benchmarks may)"
            elif pkg not in TOP_LEVEL and target in TOP_LEVEL:
                why = "imports top-level assembly or tooling"
            if why:
                out.append(f"{pkg} -> {target}: {why} ({', '.join(sorted(set(where)))})")
    # cycles between packages (self-imports excluded above)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                out.append("import cycle: " + " -> ".join(p or "tensortrace" for p in cycle))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return out


def test_no_service_imports_another_and_packages_have_no_import_cycles():
    graph = import_graph()
    assert "loader" in graph and "compose" in graph and "service" in graph
    violations = import_rule_violations(graph)
    assert not violations, "import rules (tests/repo/test_repo_contracts.py):\n" + "\n".join(violations)


def test_the_import_rules_would_catch_an_offender():
    def p(name):
        return PACKAGE_ROOT / name

    sources = {
        p("loader/main.py"): "def f():\n    from tensortrace.query.server import serve\n",   # lazy, still counted
        p("query/backend.py"): "from ..loader import rows\n",                               # relative
        p("wire/codec.py"): "import tensortrace.exporter.envelopes\n",
        p("storage/schema.py"): "from tensortrace.service.backoff import Backoff\n",
        p("service/runtime.py"): "from tensortrace import compose\n",
        p("ring/format.py"): "from tensortrace.wire import codec\n",                          # allowed
        p("newthing/x.py"): "",
        p("exporter/drain.py"): "from tensortrace.testing.ringgen import TrafficGen\n",
        p("demo/run.py"): "from tensortrace.testing import synthetic\n",
        p("testing/synthetic.py"): "from tensortrace.loader import rows\nfrom tensortrace.devstack import ringread\n",
    }
    found = import_rule_violations(import_graph(sources))
    assert any(v.startswith("loader -> query: a service imports another service") for v in found)
    assert any(v.startswith("query -> loader: a service imports another service") for v in found)
    assert any(v.startswith("wire -> exporter: a contract imports a service") for v in found)
    assert any(v.startswith("storage -> service: a contract imports shared machinery") for v in found)
    assert any(v.startswith("service -> compose: imports top-level assembly") for v in found)
    assert any(v.startswith("import cycle: loader -> query -> loader") for v in found)
    assert any(v.startswith("newthing: a package the import rules do not know") for v in found)
    assert any(v.startswith("exporter -> testing: imports the test helpers") for v in found)
    assert any(v.startswith("demo -> testing: imports the test helpers") for v in found)
    assert not any(v.startswith(("ring ->", "testing ->")) for v in found)
