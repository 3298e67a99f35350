"""Probe files: `<name>.safetensors` (weights) + `<name>.json` (metadata). Data only, never code.

    save_probe(probe, "probes/")                  # writes probes/<name>.safetensors, then probes/<name>.json
    probe = load_probe("probes/injection")        # or ".../injection.json" / ".../injection.safetensors"
    probes, errors = load_probe_dir("probes/")    # {name: Probe}, [(path, ProbeFileError)]

Loading refuses, with a ProbeFileError naming the file: a missing weights or metadata file, JSON that
does not parse, a metadata field this SDK does not know (including any that asks for a class,
module or code path), an unknown pooling / positions / layer numbering, a `kind` that is neither
built in nor an installed entry point of group `tensortrace.probes`, and weights whose shapes
disagree with the metadata. Whether the probe fits a stream (model, hook, hidden size) is
`Probe.check_stream`, which the service calls when it loads the probe, before any request.

Writes are atomic (temporary file + rename) and the weights go first, so a directory watcher that
sees a new `.json` finds its weights complete.
"""

from __future__ import annotations

import json
import os
from importlib.metadata import entry_points
from pathlib import Path

from tensortrace.probes.errors import ProbeFileError
from tensortrace.probes.meta import BUILTIN_KINDS, ProbeMeta
from tensortrace.probes.probe import Probe, probe_digest

ENTRY_POINT_GROUP = "tensortrace.probes"


def _paths(path) -> tuple[Path, Path, str]:
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    return p.with_suffix(".safetensors"), p.with_suffix(".json"), p.name


def probe_class(kind: str, path="<probe>") -> type[Probe]:
    """The class for `kind`: built in, or an installed entry point of group `tensortrace.probes`."""
    if kind in BUILTIN_KINDS:
        return Probe
    eps = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if kind not in eps:
        raise ProbeFileError(path, f"kind {kind!r} is neither built in ({', '.join(BUILTIN_KINDS)}) nor an "
                                   f"installed entry point of group {ENTRY_POINT_GROUP!r} "
                                   f"(installed: {', '.join(sorted(eps)) or 'none'})")
    try:
        cls = eps[kind].load()
    except Exception as e:  # noqa: BLE001 — an installed plugin that fails to import is a clear load error
        raise ProbeFileError(path, f"entry point {kind!r} ({eps[kind].value}) failed to load: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, Probe)):
        raise ProbeFileError(path, f"entry point {kind!r} ({eps[kind].value}) is not a Probe subclass")
    return cls


def load_probe(path) -> Probe:
    """Load one probe; raises ProbeFileError with the file and the reason."""
    wpath, jpath, name = _paths(path)
    if not jpath.is_file():
        raise ProbeFileError(jpath, "metadata file is missing" + (
            f" (its weights {wpath.name} are there)" if wpath.is_file() else ""))
    meta_bytes = jpath.read_bytes()
    try:
        d = json.loads(meta_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProbeFileError(jpath, f"is not valid JSON: {e}") from None
    try:
        meta = ProbeMeta.from_json_dict(d)
    except (ValueError, TypeError) as e:
        raise ProbeFileError(jpath, str(e)) from None
    cls = probe_class(meta.kind, jpath)
    if not wpath.is_file():
        raise ProbeFileError(wpath, "weights file is missing (a probe is <name>.safetensors + <name>.json)")
    weights_bytes = wpath.read_bytes()
    try:
        from safetensors.numpy import load
        weights = load(weights_bytes)
    except Exception as e:  # noqa: BLE001 — safetensors raises its own error types
        raise ProbeFileError(wpath, f"is not a readable safetensors file: {e}") from None
    try:
        return cls(meta, weights, name=name, digest=probe_digest(weights_bytes, meta_bytes))
    except ValueError as e:
        raise ProbeFileError(wpath, str(e)) from None


def load_probe_dir(directory) -> tuple[dict[str, Probe], list[tuple[Path, ProbeFileError]]]:
    """Every probe in `directory` (by file name, sorted). A bad probe is an entry in the errors list;
    the others load. A weights file without its metadata is an error too."""
    d = Path(directory)
    if not d.is_dir():
        raise ProbeFileError(d, "is not a directory")
    probes: dict[str, Probe] = {}
    errors: list[tuple[Path, ProbeFileError]] = []
    stems = sorted({p.with_suffix("") for p in d.iterdir()
                    if p.suffix in (".json", ".safetensors") and not p.name.startswith(".")})
    for stem in stems:
        try:
            probes[stem.name] = load_probe(stem)
        except ProbeFileError as e:
            errors.append((Path(e.path), e))
    return probes, errors


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_probe(probe: Probe, directory, name: str | None = None) -> Path:
    """Write `<directory>/<name>.safetensors` then `<name>.json`; returns the JSON path.
    The loaded probe's `hash` equals `probe.hash` when `name` is the probe's own."""
    if name is not None and name != probe.name:
        probe = type(probe)(probe.meta, probe.weights, name=name)
    name = probe.name
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"probe name {name!r} cannot be a file name")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    wbytes, jbytes = probe.files_bytes()
    _atomic_write(d / f"{name}.safetensors", wbytes)
    _atomic_write(d / f"{name}.json", jbytes)
    return d / f"{name}.json"
