"""Probes: small classifiers over captured activations, scored offline or on the live stream.

    from tensortrace.probes import load_probe
    probe = load_probe("probes/injection")               # <name>.safetensors + <name>.json
    probe.score({10: (positions, rows, "prefill")}).score  # offline; online: new_state/update/finalize

The SDK imports numpy and safetensors only; training (`tensortrace.probes.train`, scikit-learn /
torch) and the model helpers (`tensortrace.probes.data`, transformers) import theirs when called.
docs/probes.md: the SDK, the file format, training, the measured numbers.
"""

from tensortrace.probes.errors import ProbeError, ProbeFileError, ProbeInputError, ProbeMismatch
from tensortrace.probes.files import ENTRY_POINT_GROUP, load_probe, load_probe_dir, probe_class, save_probe
from tensortrace.probes.meta import LAYER_COMBINE, LAYER_NUMBERING, POOLINGS, POSITIONS, ProbeMeta
from tensortrace.probes.probe import Probe, ProbeResult, ProbeState, pool

__all__ = [
    "Probe", "ProbeResult", "ProbeState", "ProbeMeta", "ProbeError", "ProbeFileError", "ProbeMismatch",
    "ProbeInputError", "load_probe", "load_probe_dir", "save_probe", "probe_class", "pool", "POOLINGS",
    "POSITIONS", "LAYER_COMBINE", "LAYER_NUMBERING", "ENTRY_POINT_GROUP",
]
