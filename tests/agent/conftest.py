import pytest

# The capture agent's tests need torch (the `agent` extra); without it the whole folder skips.
torch = pytest.importorskip("torch")
