"""Run a process as another user, as a Kubernetes container would (runAsUser, runAsGroup,
supplementalGroups): for permission tests that run as root and drop privileges per "container".

    with shared_tmpdir("tt-perm-") as d:                       # /tmp/tt-perm-xxxx, mode 0755, removed after
        out = run_python_as(Identity(10001, 10001, (2000,)), "import os; print(os.getuid())")
        assert out.stdout.strip() == "10001"

Only root can switch users: `can_switch_users()` says whether the tests that need it can run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True)
class Identity:
    """uid, primary gid and supplementary groups of a process (a pod's securityContext)."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def preexec(self):
        """A preexec_fn for subprocess: setgroups, setgid, setuid (in that order: after setuid no
        more changes are allowed). Nothing to do when it is this process's identity already."""
        ident = self

        def drop() -> None:
            if (os.geteuid(), os.getegid()) == (ident.uid, ident.gid) and not ident.groups:
                return
            os.setgroups(list(ident.groups))
            os.setgid(ident.gid)
            os.setuid(ident.uid)
        return drop


ROOT = Identity(0, 0, ())


def can_switch_users() -> bool:
    return os.geteuid() == 0


def _world_reachable(path: str) -> bool:
    """Every directory above `path` lets other users through (o+x), and the file is o+rx."""
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    for i in range(2, len(parts)):
        if not os.stat(os.sep.join(parts[:i])).st_mode & 0o001:
            return False
    return os.stat(real).st_mode & 0o005 == 0o005


def python_argv(code: str, *args: str) -> list[str]:
    """`python -c code args...` that any user can run, with this environment's packages.

    In a container the image's interpreter is readable by its user. Here the virtualenv's
    interpreter may live under a private home (/root, mode 0700): then the system interpreter of
    the same version runs instead, with this virtualenv's site-packages first on its path (same
    CPython minor version, so the same compiled extensions)."""
    exe = sys.executable
    if _world_reachable(exe) and _world_reachable(sys.base_prefix + "/lib"):
        return [exe, "-c", code, *args]
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    for cand in (f"/usr/bin/python{ver}", f"/usr/local/bin/python{ver}"):
        if os.path.exists(cand) and _world_reachable(cand):
            exe = cand
            break
    else:
        raise RuntimeError(f"no Python {ver} interpreter other users can run (this one: {sys.executable})")
    purelib = sysconfig.get_paths()["purelib"]
    boot = ("import site, sys\n_before = list(sys.path)\n"
            f"site.addsitedir({purelib!r})\n"
            "sys.path[:] = [p for p in sys.path if p not in _before] + _before\ndel _before\n")
    return [exe, "-s", "-c", boot + code, *args]


def tensortrace_argv(*args: str) -> list[str]:
    """`tensortrace args...` (the console script) that any user can run."""
    return python_argv("import sys\nfrom tensortrace.cli import main\nsys.exit(main(sys.argv[1:]))", *args)


def run_python_as(ident: Identity, code: str, *args: str, env: dict | None = None,
                  timeout_s: float = 180.0) -> subprocess.CompletedProcess:
    """`python -c code args...` as `ident`; stdout and stderr captured as text."""
    return subprocess.run(python_argv(code, *args), preexec_fn=ident.preexec(),
                          env=env if env is not None else dict(os.environ), capture_output=True,
                          text=True, timeout=timeout_s, cwd="/")


@contextlib.contextmanager
def shared_tmpdir(prefix: str = "tt-"):
    """A temporary directory every user can traverse (0755; pytest's own tmp_path is 0700 under a
    0700 parent, which a dropped-privilege process cannot enter). Removed afterwards."""
    d = tempfile.mkdtemp(prefix=prefix)
    try:
        os.chmod(d, 0o755)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
