"""The probe service's probes: a directory of probe files, re-read when it changes, each probe checked
against the stream before it scores anything.

    probes = ProbeDirectory("/etc/tensortrace/probes", model_id="", hidden_size=0)
    probes.reload()                          # -> True when the set changed; bad files land in .current.refused
    s = probes.current                       # an immutable ProbeSet snapshot
    s = probes.observe("smollm2", "resid_pre", 576)   # first record of a (model, hook): check_stream, once
    s.keep("smollm2", "resid_pre", 10, pb.PREFILL)    # does any probe need this record's payload?

Why snapshots: three threads look at the probes. The consume thread asks `keep` for every record
(it must be a dict lookup, no lock), the flush thread scores released requests, and the reload
thread (or the consume thread, on a stream's first record) replaces the set. Every change builds a
new `ProbeSet` under a lock and publishes it with one assignment; readers take `current` once and
use that snapshot throughout.

When a probe is checked (refused with a clear error then, never at its first request):
  * at load, the SDK refuses a file it cannot use (bad JSON, unknown pooling, missing weights, a
    field asking for code: `load_probe_dir`'s errors) -> `refused[path]`;
  * at load, with `--model-id` / `--hidden-size` configured: `probe.check_stream(model, hook, width)`;
  * otherwise when the first record of a (model, hook) arrives (`observe`): every probe on that hook
    is checked against the record's model and row width. A probe that fits scores that model's
    requests; one that fits no model seen is listed in `refused` with each model's reason (a stream
    may carry several models: a probe for one is not refused because another model passes by).
A probe added or changed by a reload while a request was in flight missed that request's earlier
records (they were not kept): `since` (the reload generation it appeared in) lets the scorer mark
such a score incomplete, never complete.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field, replace
from typing import Any

from tensortrace.v1 import records_pb2 as pb

log = logging.getLogger("tensortrace.probes")

_PHASES = {"prompt": frozenset({pb.PREFILL}), "generated": frozenset({pb.DECODE}),
           "all": frozenset({pb.PREFILL, pb.DECODE, pb.PHASE_UNSPECIFIED})}


@dataclass(frozen=True)
class ActiveProbe:
    """One loaded probe and how the service runs it."""
    probe: Any
    name: str
    hash: str
    path: str
    hook: str
    layers: tuple[int, ...]
    phases: frozenset
    threshold: float
    shadow: bool
    since: int                      # reload generation in which this version of the probe appeared


@dataclass(frozen=True)
class ProbeSet:
    """An immutable snapshot (module docstring)."""
    generation: int = 0                                   # bumped by every change
    reload_generation: int = 0                            # bumped by every reload that changed the files
    probes: tuple[ActiveProbe, ...] = ()                  # loaded, not refused
    refused: dict[str, str] = field(default_factory=dict)  # file path or probe name -> why
    fits: dict[tuple[str, str], tuple[ActiveProbe, ...]] = field(default_factory=dict)  # (model, hook) -> probes
    checked: frozenset = frozenset()                       # (model, hook) pairs already checked
    mismatches: dict[str, dict[str, str]] = field(default_factory=dict)  # probe name -> model -> why it does not fit
    _keep: dict[tuple[str, str], dict[int, frozenset]] = field(default_factory=dict)  # (model, hook) -> layer -> phases
    # (model, hook) -> layers whose every reader is a one-layer last-token probe: of those layers'
    # records only the one ending latest (per phase) is ever scored (ScoresSink._keep_scan)
    _last_only: dict[tuple[str, str], frozenset] = field(default_factory=dict)

    def last_only(self, model: str, hook: str) -> frozenset:
        return self._last_only.get((model, hook), frozenset())

    def keep(self, model: str, hook: str, layer: int, phase: int) -> bool:
        """Does a probe that fits this model need this record's payload?"""
        layers = self._keep.get((model, hook))
        if layers is None:
            return False
        phases = layers.get(layer)
        return phases is not None and phase in phases

    def keep_mask(self, model: str, hook: str, layers, phases):
        """keep() for columns (numpy int arrays) of records of one (model, hook): a bool array, or
        None when no probe needs any record of it."""
        index = self._keep.get((model, hook))
        if not index:
            return None
        import numpy as np

        if len(layers) <= 64:   # a run of an envelope: plain Python beats numpy's per-call cost here
            return np.array([ph in index.get(layer, ()) for layer, ph in zip(layers.tolist(), phases.tolist())],
                            dtype=bool)
        mask = np.zeros(len(layers), dtype=bool)
        for layer, want in index.items():
            m = phases == -1     # all False
            for phase in want:
                m |= phases == phase
            mask |= (layers == layer) & m
        return mask

    def for_model(self, model: str) -> list[ActiveProbe]:
        out = []
        for (m, _), probes in self.fits.items():
            if m == model:
                out.extend(probes)
        return out


def _keep_index(fits: dict) -> dict:
    index: dict[tuple[str, str], dict[int, frozenset]] = {}
    for key, probes in fits.items():
        layers = index.setdefault(key, {})
        for p in probes:
            for layer in p.layers:
                layers[layer] = layers.get(layer, frozenset()) | p.phases
    return index


def _last_only_index(fits: dict) -> dict:
    out: dict[tuple[str, str], frozenset] = {}
    for key, probes in fits.items():
        readers: dict[int, list] = {}
        for p in probes:
            for layer in p.layers:
                readers.setdefault(layer, []).append(p)
        only = frozenset(layer for layer, ps in readers.items()
                         if all(len(p.layers) == 1 and getattr(p.probe.meta, "pooling", "") == "last" for p in ps))
        if only:
            out[key] = only
    return out


def _signature(directory: str) -> tuple:
    """What a change of the directory changes: every file's name, size and mtime."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except FileNotFoundError:
        return ("missing",)
    out = []
    for e in entries:
        if e.name.startswith("."):   # save_probe's temporary files: the rename that follows is the change
            continue
        try:
            st = e.stat()
        except FileNotFoundError:   # removed while listing: the next poll sees it gone
            continue
        out.append((e.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


class ProbeDirectory:
    """The probes of one directory, hot-reloaded (module docstring)."""

    def __init__(self, directory: str, *, model_id: str = "", hidden_size: int = 0, shadow: bool = False,
                 shadow_names: frozenset[str] = frozenset(), thresholds: dict | None = None):
        self.directory = directory
        self.model_id = model_id
        self.hidden_size = hidden_size
        self.shadow = shadow
        self.shadow_names = frozenset(shadow_names)
        self.thresholds = dict(thresholds or {})
        self.current = ProbeSet()
        self.reloads = 0                  # reloads that changed the set
        self.reload_failures = 0          # directory unreadable
        self._signature: tuple | None = None
        self._pending: tuple | None = None      # a changed signature seen once, not yet settled
        self._streams: dict[tuple[str, str], int] = {}   # (model, hook) -> row width, as first seen
        self._lock = threading.Lock()

    # -- reload (reload thread; also once at start) ------------------------------------------------

    def changed(self) -> bool:
        return _signature(self.directory) != self._signature

    def reload(self, force: bool = False, settle: bool = False) -> bool:
        """Re-read the directory if a file was added, changed or removed. True when it was re-read.

        `settle` (the service's polling loop): re-read only once the directory looked the same at
        two polls in a row. A probe is two files, written one after the other (weights, then
        metadata); without this, a poll between the two would load new weights with old metadata."""
        from tensortrace.probes import ProbeFileError, load_probe_dir

        sig = _signature(self.directory)
        if not force and sig == self._signature:
            return False
        if settle and not force and sig != self._pending:
            self._pending = sig
            return False
        try:
            loaded, errors = load_probe_dir(self.directory)
            probes = list(loaded.values())
        except ProbeFileError as e:    # the directory itself is missing or unreadable
            probes, errors = [], [(self.directory, e)]
            self.reload_failures += 1
        with self._lock:
            self._signature = sig
            old = {p.hash: p for p in self.current.probes}
            gen = self.current.reload_generation + 1
            refused = {str(path): str(getattr(e, "reason", e)) for path, e in errors}
            active, names = [], set()
            for probe in probes:
                path = os.path.join(self.directory, probe.name + ".json")
                if probe.name in names:
                    refused[path] = f"probe name {probe.name!r} is used by another file in {self.directory}"
                    continue
                why = self._check_configured(probe)
                if why:
                    refused[path] = why
                    continue
                names.add(probe.name)
                prev = old.get(probe.hash)
                active.append(self._active(probe, path, prev.since if prev is not None else gen))
            self._publish(active, refused, gen, recheck=True)
            self.reloads += 1
        for path, why in refused.items():
            log.error("probe refused: %s: %s", path, why)
        log.info("probes loaded from %s: %s", self.directory,
                 ", ".join(f"{p.name} ({p.hash[:12]})" for p in active) or "none")
        return True

    def _active(self, probe, path: str, since: int) -> ActiveProbe:
        m = probe.meta
        threshold = self.thresholds.get(probe.name, m.threshold)
        return ActiveProbe(probe=probe, name=probe.name, hash=probe.hash, path=path, hook=m.hook,
                           layers=tuple(int(x) for x in m.layers), phases=_PHASES.get(m.positions, _PHASES["all"]),
                           threshold=float(threshold), shadow=self.shadow or probe.name in self.shadow_names,
                           since=since)

    def _check_configured(self, probe) -> str:
        """With --model-id (and --hidden-size) configured, a probe that does not fit is refused at load."""
        from tensortrace.probes import ProbeMismatch

        if not self.model_id:
            return ""
        try:
            probe.check_stream(self.model_id, probe.meta.hook, self.hidden_size or probe.meta.width)
        except ProbeMismatch as e:
            return f"does not fit the configured stream (--model-id {self.model_id}" + (
                f", --hidden-size {self.hidden_size}" if self.hidden_size else "") + f"): {e}"
        return ""

    # -- the stream (consume thread) ---------------------------------------------------------------

    def observe(self, model: str, hook: str, width: int) -> ProbeSet:
        """The first record of (model, hook): check every probe on that hook against it, once."""
        with self._lock:
            if (model, hook) not in self.current.checked:
                self._streams[(model, hook)] = width
                self._publish(list(self.current.probes), dict(self.current.refused),
                              self.current.reload_generation, recheck=False, new_stream=(model, hook))
            return self.current

    def _publish(self, active: list[ActiveProbe], refused: dict[str, str], reload_gen: int, recheck: bool,
                 new_stream: tuple[str, str] | None = None) -> None:
        """Build and publish the next snapshot (caller holds the lock). `recheck`: the probes changed,
        so every stream seen so far is checked again; otherwise only `new_stream`."""
        from tensortrace.probes import ProbeMismatch

        cur = self.current
        fits: dict[tuple[str, str], list[ActiveProbe]] = {}
        mismatches: dict[str, dict[str, str]] = {} if recheck else {k: dict(v) for k, v in cur.mismatches.items()}
        names = {p.name for p in active}
        if not recheck:
            fits = {k: [p for p in v if p.name in names] for k, v in cur.fits.items()}
        streams = self._streams.items() if recheck else [(new_stream, self._streams[new_stream])]
        for (model, hook), width in streams:
            for p in active:
                if p.hook != hook:
                    continue
                try:
                    p.probe.check_stream(model, hook, width)
                except ProbeMismatch as e:
                    mismatches.setdefault(p.name, {})[model] = str(e)
                    log.error("probe %s (%s) does not fit model %s, hook %s, width %d: %s", p.name, p.path, model,
                              hook, width, e)
                    continue
                fits.setdefault((model, hook), []).append(p)
        # a probe that fits no model it was checked against is refused, with every reason
        fitting = {p.name for ps in fits.values() for p in ps}
        keep_active = []
        for p in active:
            if p.name in mismatches and p.name not in fitting:
                reasons = "; ".join(f"model {m}: {why}" for m, why in sorted(mismatches[p.name].items()))
                refused[p.path] = f"probe {p.name} does not fit the stream: {reasons}"
            keep_active.append(p)
        fits_t = {k: tuple(v) for k, v in fits.items() if v}
        checked = frozenset(self._streams)
        self.current = ProbeSet(generation=cur.generation + 1, reload_generation=reload_gen,
                                probes=tuple(p for p in keep_active if p.path not in refused),
                                refused=refused, fits=fits_t, checked=checked, mismatches=mismatches,
                                _keep=_keep_index(fits_t), _last_only=_last_only_index(fits_t))

    def set_shadow(self, shadow: bool) -> None:   # tests, operators (not a hot path)
        with self._lock:
            self.shadow = shadow
            probes = [replace(p, shadow=shadow or p.name in self.shadow_names) for p in self.current.probes]
            self._publish(probes, dict(self.current.refused), self.current.reload_generation, recheck=True)
