import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

torch = pytest.importorskip("torch")


@pytest.fixture
def ring_dir(tmp_path):
    d = tmp_path / "rings"
    d.mkdir()
    return str(d)
