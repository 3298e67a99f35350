"""Hugging Face Transformers backend (backend.py) and its per-architecture tap map (archs.py)."""

from tensortrace.agent.backends.hf.archs import ARCHS, ArchMap, arch_for
from tensortrace.agent.backends.hf.backend import HFBackend

__all__ = ["ARCHS", "ArchMap", "arch_for", "HFBackend"]
