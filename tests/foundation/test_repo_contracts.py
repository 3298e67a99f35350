"""Repository-level guarantees: generated protobuf code is current, no pickle on any wire."""

from __future__ import annotations

import glob
import os
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
