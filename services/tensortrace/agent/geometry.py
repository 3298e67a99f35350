"""The tensor-geometry module (agent/_tensorgeom.cpp): build it for this interpreter's torch, load it.

The native taps (agent/_capture.c) read a tensor's data pointer, shape, strides and dtype. Without
this module they ask torch through a DLPack export (~9 µs cache-cold per tap, most of a tap's
cost); with it they read the THPVariable and its TensorImpl directly through torch's own inline
accessors (docs/agent.md, "Tensor geometry without a torch call"). Those layouts are torch's
private C++ ABI, so the module is compiled against the headers of the torch that will load it,
one build per torch version, and refuses to load under any other:

    python -m tensortrace.agent.geometry build    # for this interpreter's torch (make setup /
                                                  # make sglang-env / the SGLang image run it)
    python -m tensortrace.agent.geometry status   # used here? why not? (exit 0: used, 1: not)
    TENSORTRACE_GEOMETRY=0                        # the environment switch: DLPack even where built

Without a C++ compiler, or with a torch that ships no headers, `build` says so and exits 0: the
agent works as before, on DLPack. The build lives beside this file, under _geom/torch-<build>/
(TENSORTRACE_GEOMETRY_DIR overrides the root, for read-only installs), one folder per torch
build (version, source commit, C++ string ABI); a build from other sources than this checkout's
(a stale one) is refused too.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ENV = "TENSORTRACE_GEOMETRY"
ENV_DIR = "TENSORTRACE_GEOMETRY_DIR"
ABI = 1   # TT_GEOMETRY_ABI in tensorgeom.h
MODULE = "tensortrace.agent._tensorgeom"
HERE = Path(__file__).resolve().parent
log = logging.getLogger("tensortrace.agent")
_logged: set = set()
SOURCES = (HERE / "_tensorgeom.cpp", HERE / "tensorgeom.h")


def root() -> Path:
    return Path(os.environ[ENV_DIR]) if os.environ.get(ENV_DIR) else HERE / "_geom"


def torch_build(torch) -> str:
    """What a build is for: the torch version, its source commit and its C++ string ABI. Two
    installs with one version string (a pip and a conda 2.14.0) differ in the others."""
    git = (getattr(getattr(torch, "version", None), "git_version", None) or "unknown")[:12]
    abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
    return f"{torch.__version__}-{git}-cxx11abi{abi}"


def module_path(build: str) -> Path:
    return root() / f"torch-{build}" / ("_tensorgeom" + sysconfig.get_config_var("EXT_SUFFIX"))


def source_sha() -> str:
    """The sources this checkout has; a build compiled from others (a stale one) is not loaded."""
    h = hashlib.sha256()
    for src in SOURCES:
        h.update(src.read_bytes())
    return h.hexdigest()[:16]


def compiler() -> tuple[str | None, str]:
    """(the C++ compiler's path, "") or (None, why there is none): $CXX, else c++ or g++ on PATH."""
    want = os.environ.get("CXX")
    cxx = shutil.which(want) if want else (shutil.which("c++") or shutil.which("g++"))
    if cxx:
        return cxx, ""
    return None, f"no C++ compiler ({'$CXX=' + want + ' is not an executable' if want else 'c++/g++ not on PATH'})"


def has_headers() -> bool:
    """This torch ships the C++ headers the module is compiled against (torch/include)."""
    from torch.utils import cpp_extension
    return any(Path(p, "torch/csrc/autograd/python_variable.h").exists() for p in cpp_extension.include_paths())


def _command(torch, out: Path) -> list[str]:
    from torch.utils import cpp_extension
    cxx, why = compiler()
    if not cxx:
        raise FileNotFoundError(why)
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(HERE)]
    libs = cpp_extension.library_paths()
    abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
    return [cxx, "-O2", "-fPIC", "-shared", "-std=c++20", "-fvisibility=hidden",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f'-DTT_TORCH_VERSION="{torch.__version__}"',
            f'-DTT_TORCH_BUILD="{torch_build(torch)}"', f'-DTT_SOURCE_SHA="{source_sha()}"',
            *(f"-I{p}" for p in includes), str(SOURCES[0]), "-o", str(out),
            *(f"-L{p}" for p in libs), "-lc10", "-ltorch_python",
            *(f"-Wl,-rpath,{p}" for p in libs)]


def build(force: bool = False) -> tuple[Path | None, str]:
    """(path, "") once the module for this interpreter's torch is built (or already was), else (None, why).
    Never raises for what a machine may lack or refuse (no torch, no compiler, no headers, a
    read-only or full disk): the taps then read geometry through DLPack."""
    try:
        import torch
    except ImportError as e:
        return None, f"torch is not importable here ({e})"
    out = module_path(torch_build(torch))
    try:
        cmd = _command(torch, out)
    except FileNotFoundError as e:
        return None, str(e)
    if not has_headers():
        return None, "this torch ships no C++ headers (torch/include)"
    stamp = out.with_name(out.name + ".sha256")
    want = hashlib.sha256(" ".join(cmd).encode()).hexdigest()   # (the command names the sources' hash)
    tmp = None
    try:
        if not force and out.exists() and stamp.exists() and stamp.read_text().strip() == want:
            return out, ""
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)   # one per build
        os.close(fd)
        cmd[cmd.index("-o") + 1] = tmp
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-12:])
            return None, f"the compiler failed ({cmd[0]}, exit {r.returncode}):\n{tail}"
        os.replace(tmp, out)   # atomic: a process that has the old build mapped keeps it
        tmp = None
        stamp.write_text(want + "\n")
        return out, ""
    except OSError as e:
        return None, f"cannot write the build under {out.parent} ({e}); {ENV_DIR} moves it"
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def load():
    """(the geometry capsule, "") for this process's torch, or (None, a one-line reason). Never
    raises: whatever goes wrong here, the taps read geometry through DLPack."""
    if os.environ.get(ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return None, f"disabled by {ENV}={os.environ[ENV]}"
    try:
        return _load()
    except Exception as e:  # noqa: BLE001 - an agent starts whatever this module's state is
        return None, f"the tensor-geometry module could not be loaded ({type(e).__name__}: {e})"


def _load():
    import torch
    want = torch_build(torch)
    path = module_path(want)
    if not path.exists():
        return None, (f"not built for torch {want} ({path}); "
                      "`python -m tensortrace.agent.geometry build` builds it")
    mod = sys.modules.get(MODULE)
    if mod is None or getattr(mod, "__file__", None) != str(path):
        try:
            loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
            spec = importlib.util.spec_from_file_location(MODULE, path, loader=loader)
            mod = importlib.util.module_from_spec(spec)
            loader.exec_module(mod)
        except ImportError as e:
            return None, f"{path} does not load ({e}); rebuild it (`python -m tensortrace.agent.geometry build`)"
        sys.modules[MODULE] = mod
    got = (getattr(mod, "ABI", None), getattr(mod, "TORCH_BUILD", None), getattr(mod, "SOURCE_SHA", None))
    if got != (ABI, want, source_sha()):
        return None, (f"{path} was built for torch {got[1]} from sources {got[2]} (ABI {got[0]}); this process "
                      f"has torch {want} and sources {source_sha()} (ABI {ABI}): rebuild it "
                      "(`python -m tensortrace.agent.geometry build`)")
    return mod.geometry, ""


def log_unused(reason: str) -> None:
    """One line per process and reason: the native taps read geometry through DLPack, and why."""
    if reason not in _logged:
        _logged.add(reason)
        log.info("tensortrace: tensor geometry through DLPack (%s)", reason)


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m tensortrace.agent.geometry", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("build", "status"))
    p.add_argument("--force", action="store_true", help="rebuild even when the build is current")
    a = p.parse_args(argv)
    if a.action == "build":
        path, why = build(force=a.force)
        if path is None:
            print(f"tensortrace: tensor-geometry module not built: {why}\n"
                  "  (the agent reads tensor geometry through DLPack instead; nothing else changes)")
        else:
            print(f"tensortrace: tensor-geometry module ready: {path}")
        return 0
    cap, why = load()
    print("tensortrace: tensor geometry from the TensorImpl" if cap is not None else f"tensortrace: tensor geometry through DLPack: {why}")
    return 0 if cap is not None else 1


if __name__ == "__main__":
    sys.exit(main())
