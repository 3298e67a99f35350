"""The probe SDK's errors: one for a probe file that cannot be used, one for a probe that does not fit a stream.

    try:
        probe = load_probe("probes/injection")
    except ProbeFileError as e:      # names the file and what is wrong with it
        log.error("%s", e)
"""

from __future__ import annotations


class ProbeError(Exception):
    """Base of the probe SDK's errors."""


class ProbeFileError(ProbeError):
    """A probe file cannot be loaded: missing weights, bad JSON, unknown pooling, a class that is not
    installed, a weight shape that disagrees with the metadata. `path` names the file."""

    def __init__(self, path, message: str):
        self.path = str(path)
        self.reason = message
        super().__init__(f"{self.path}: {message}")


class ProbeMismatch(ProbeError):
    """A probe does not fit the stream it is asked to score (other model, hook or hidden size)."""


class ProbeInputError(ProbeError, ValueError):
    """Rows given to `update` / `score` that the probe cannot use (wrong width, positions vs rows)."""
