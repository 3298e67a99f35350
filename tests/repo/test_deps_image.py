"""The slim exporter image builds (docker/exporter/Dockerfile) and holds what test_deps.py promises:
runs as 10001, `tensortrace exporter` and `ring-dir` work, no chDB/pandas/pyarrow/torch/matplotlib,
OCI labels set. Built with buildah (no daemon; root, chroot isolation) where it is installed;
skipped with the reason elsewhere. No registry is reachable here, so the base image must already be
in local storage: the Dockerfile's pinned base, or the one `docker/local-base.sh` makes (~7 min).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "exporter" / "Dockerfile"
LOCAL_BASE = "localhost/tensortrace-base:bookworm"


def _buildah(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"buildah {' '.join(args[:3])}... exited {out.returncode}:\n{out.stderr[-4000:]}")
    return out


def _has_image(ref: str) -> bool:
    return _buildah("inspect", "--type", "image", ref, check=False).returncode == 0


def _base_image() -> str:
    if shutil.which("buildah") is None:
        pytest.skip("no container engine: buildah is not installed (apt-get install buildah)")
    if os.geteuid() != 0:
        pytest.skip("buildah without a daemon builds as root here (chroot isolation)")
    wanted = os.environ.get("TENSORTRACE_TEST_BASE_IMAGE")
    if wanted:
        return wanted
    pinned = re.search(r"^ARG BASE_IMAGE=(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    for ref in (pinned, LOCAL_BASE):
        if _has_image(ref):
            return ref
    pytest.skip(f"base image {pinned} is not in local storage and no registry is reachable; "
                f"docker/local-base.sh makes {LOCAL_BASE} (~7 min), or set TENSORTRACE_TEST_BASE_IMAGE")


def test_the_exporter_image_builds_slim_and_non_root():
    base = _base_image()
    tag = f"localhost/tensortrace-exporter:test-{uuid.uuid4().hex[:8]}"
    args = ["build", "--pull=never", "--isolation", "chroot", "--build-arg", f"BASE_IMAGE={base}",
            "--build-arg", "REVISION=test", "-f", str(DOCKERFILE), "-t", tag]
    if os.path.exists("/etc/ssl/certs/ca-certificates.crt"):   # a TLS-intercepting proxy's CA, if any
        args += ["-v", "/etc/ssl/certs:/host-certs:ro", "--build-arg", "PIP_CERT=/host-certs/ca-certificates.crt"]
    if os.environ.get("PIP_INDEX_URL"):
        args += ["--build-arg", f"PIP_INDEX_URL={os.environ['PIP_INDEX_URL']}"]
    ctr = None
    try:
        _buildah(*args, str(ROOT), timeout=1100)
        fmt = "{{.OCIv1.Config.User}}|{{.OCIv1.Config.Entrypoint}}|{{index .OCIv1.Config.Labels \"org.opencontainers.image.title\"}}|{{index .OCIv1.Config.Labels \"org.opencontainers.image.revision\"}}"
        user, entry, title, revision = _buildah("inspect", "--type", "image", "--format", fmt, tag).stdout.strip().split("|")
        assert (user, entry, title, revision) == ("10001:10001", "[tensortrace]", "tensortrace-exporter", "test")
        ctr = _buildah("from", "--pull=never", tag).stdout.strip()
        script = ("id -u; id -g; tensortrace exporter --help >/dev/null && echo exporter-ok; "
                  "tensortrace ring-dir prepare --help >/dev/null && echo ring-dir-ok; "
                  "python3 -c \"import importlib.util as u; print(','.join(m for m in ('chdb', 'clickhouse_connect', "
                  "'pandas', 'pyarrow', 'torch', 'matplotlib', 'opentelemetry') if u.find_spec(m)) or 'none')\"")
        out = _buildah("run", "--isolation", "chroot", ctr, "--", "sh", "-c", script).stdout.split()
        assert out == ["10001", "10001", "exporter-ok", "ring-dir-ok", "none"], out
    finally:
        if ctr:
            _buildah("rm", ctr, check=False)
        _buildah("rmi", "-f", tag, check=False)
