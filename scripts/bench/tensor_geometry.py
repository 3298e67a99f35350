#!/usr/bin/env python3
"""What reading a tensor's geometry costs a native tap, warm and cache-cold: the question behind
the per-tap half of the agent's remaining time on the SGLang scheduler (docs/BENCHMARKS.md,
"Session 9"), and whether a torch C++ reader would pay for what it costs to ship. (Since session
13 the agent ships one, agent/_tensorgeom.cpp; this script keeps session 9's bare-call comparison.
The agent-level and real-server comparisons are `cold_calls.py` and `sglang_sections.py --dlpack`.)

A native tap needs a CPU tensor's data pointer, shape, strides and dtype. `_capture.c` (C-API,
no torch headers) takes them from one DLPack export (`torch._C._to_dlpack`: an export object, a
capsule, both freed at once); without it, from the accessors. A torch C++ extension could read
them from the `at::Tensor` inside the Python object (`THPVariable_Unpack`): no export, no
allocation — but it is built against one torch's C++ ABI (the project venv and the SGLang venv
carry different torch versions), so it would be a build per torch, not one `.so`.

Each method is called from Python with one argument, as a METH_O C function (the baseline: a C
function that only returns, `noop`), and timed alone:
- warm: back-to-back calls, median over `--calls`;
- cold: each call after a pass over `--evict-mb` MB of memory by a torch kernel (what a model's
  layer does to the caches between two taps), median over `--cold-calls`.
The C++ reader is compiled here (g++ against the running torch; ~1 minute, cached under
.cache/bench-build/); `--no-cxx` measures the C-API methods only.

    .venv/bin/python scripts/bench/tensor_geometry.py --json .cache/bench/tensor_geometry.json
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CXX = r"""
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

/* geometry(t) -> the sum of data pointer, sizes, strides and dtype: every field a tap reads, from
 * the at::Tensor inside the Python object (no export, no allocation) */
static PyObject *geometry(PyObject *m, PyObject *arg) {
    if (!THPVariable_Check(arg)) { PyErr_SetString(PyExc_TypeError, "a tensor"); return NULL; }
    const at::Tensor &t = THPVariable_Unpack(arg);
    long long acc = (long long)(uintptr_t)t.data_ptr() + (long long)t.scalar_type() + (t.is_cpu() ? 1 : 0);
    auto sz = t.sizes();
    auto st = t.strides();
    for (size_t i = 0; i < sz.size(); i++) acc += sz[i] * 3 + st[i];
    return PyLong_FromLongLong(acc);
}

static PyObject *noop(PyObject *m, PyObject *arg) { Py_RETURN_NONE; }

static PyMethodDef methods[] = {
    {"geometry", geometry, METH_O, "geometry(tensor) -> int"},
    {"noop", noop, METH_O, "noop(x) -> None"},
    {NULL}};

static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_tt_geometry", NULL, -1, methods};

PyMODINIT_FUNC PyInit__tt_geometry(void) { return PyModule_Create(&def); }
"""


def build_cxx():
    """The C++ reader, built against the running torch (cached per torch version and source)."""
    import torch
    from torch.utils import cpp_extension as ce

    key = hashlib.sha256((CXX + torch.__version__ + sys.version).encode()).hexdigest()[:12]
    out_dir = os.path.join(ROOT, ".cache", "bench-build", f"geometry-{key}")
    so = os.path.join(out_dir, "_tt_geometry" + sysconfig.get_config_var("EXT_SUFFIX"))
    if not os.path.exists(so):
        os.makedirs(out_dir, exist_ok=True)
        src = os.path.join(out_dir, "geometry.cpp")
        with open(src, "w") as f:
            f.write(CXX)
        cmd = ["g++", "-O2", "-shared", "-fPIC", "-std=c++20", src, "-o", so,
               f"-I{sysconfig.get_paths()['include']}", *(f"-I{p}" for p in ce.include_paths()),
               *(f"-L{p}" for p in ce.library_paths()), "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python",
               *(f"-Wl,-rpath,{p}" for p in ce.library_paths()),
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
        t0 = time.time()
        subprocess.run(cmd, check=True)
        print(f"built the C++ reader in {time.time() - t0:.0f} s: {so}", file=sys.stderr)
    spec = importlib.util.spec_from_file_location("_tt_geometry", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def methods(cxx):
    import torch

    to_dlpack = torch._C._to_dlpack

    def dlpack(t):   # what _capture.c's rows_view does: export, read, free (here: Python frees it)
        to_dlpack(t)

    def accessors(t):   # _capture.c's fallback: is_cpu, size(), stride(), data_ptr(), dtype
        return t.is_cpu, t.size(), t.stride(), t.data_ptr(), t.dtype

    out = {"dlpack": dlpack, "accessors": accessors}
    if cxx is not None:
        out["cxx"] = cxx.geometry
        out["noop (C)"] = cxx.noop
    return out


def measure(fns, calls, cold_calls, evict_mb):
    import torch

    t = torch.randn(8, 512)[:, :]   # a decode step's residual rows (a view, as a tap sees them)
    evict = torch.zeros(evict_mb << 18)   # evict_mb MB of float32
    res = {}
    for name, fn in fns.items():
        warm = []
        for _ in range(5):
            t0 = time.perf_counter_ns()
            for _ in range(calls):
                fn(t)
            warm.append((time.perf_counter_ns() - t0) / calls)
        res[name] = {"warm_ns": statistics.median(warm), "cold": []}
    names = list(fns)
    for i in range(cold_calls):   # interleaved: each method right after the same kind of eviction
        for name in names[i % len(names):] + names[:i % len(names)]:
            evict.add_(1.0)
            fn = fns[name]
            t0 = time.perf_counter_ns()
            fn(t)
            res[name]["cold"].append(time.perf_counter_ns() - t0)
    for r in res.values():
        r["cold_ns"] = statistics.median(r.pop("cold"))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--cold-calls", type=int, default=400)
    ap.add_argument("--evict-mb", type=int, default=48)
    ap.add_argument("--no-cxx", action="store_true")
    ap.add_argument("--json", default=".cache/bench/tensor_geometry.json")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    cxx = None if a.no_cxx else build_cxx()
    res = measure(methods(cxx), a.calls, a.cold_calls, a.evict_mb)
    load = os.getloadavg()
    print(f"tensor geometry per call from Python (torch {torch.__version__}, {platform.node()}, "
          f"{os.cpu_count()} cpus, load {load[0]:.2f}; warm: median of 5 x {a.calls}; cold: median of "
          f"{a.cold_calls}, each after a pass over {a.evict_mb} MB)")
    print(f"{'method':<12} {'warm ns':>9} {'cold ns':>9}")
    for name, r in res.items():
        print(f"{name:<12} {r['warm_ns']:>9.0f} {r['cold_ns']:>9.0f}")
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"benchmark": "tensor_geometry", "torch": torch.__version__, "host": platform.node(),
                   "cpus": os.cpu_count(), "load_average": load, "results": res,
                   "command": "scripts/bench/tensor_geometry.py " + " ".join(argv if argv is not None else sys.argv[1:])},
                  f, indent=1)


if __name__ == "__main__":
    main()
