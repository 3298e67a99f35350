"""Read back what an agent wrote (tensortrace.devstack.ringread: the production split rule)."""

from tensortrace.devstack.ringread import RingContents as ReadBack, drain, read_rings  # noqa: F401
