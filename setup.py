"""Native extensions (CPython C API), built by `pip install` where a C compiler is present.

pyproject.toml holds the metadata; this file only lists the compiled parts. Each is `optional`: without
a compiler (or on a build error) pip prints the error, installs the package anyway, and the code that
uses the extension falls back to its pure-Python path (the oracle its tests compare against). An
editable install (`make setup`) builds them in place, beside their Python modules.
"""

from setuptools import Extension, setup

# One entry per native module; its Python fallback lives in the package that imports it.
NATIVE = [
    # envelope scanner for the consumers' hot loop (fallback: wire/codec.py + consume/validate.py)
    ("tensortrace.wire._decode", ["services/tensortrace/wire/_decode.c"]),
    # the capture agent's per-tap fast path (fallback: agent/core.py's Python path; agent/native.py)
    ("tensortrace.agent._capture", ["services/tensortrace/agent/_capture.c"]),
]

# headers a module's C source includes (a change rebuilds it)
DEPENDS = {"tensortrace.agent._capture": ["services/tensortrace/agent/tensorgeom.h"]}

setup(ext_modules=[Extension(name, sources, optional=True, extra_compile_args=["-O3", "-std=c11"],
                             depends=DEPENDS.get(name, []))
                   for name, sources in NATIVE])
