"""The consume thread's own cost per record: Kafka message -> decoded envelope -> the sink's batch.

    .venv/bin/python scripts/bench/consume_decode.py [--records 40000] [--repeats 5] [--json FILE]

No broker and no ClickHouse: prebuilt messages (the loader benchmark's 4 KiB records, 32 per
message) go through the consume thread's per-message handler in-process, `--repeats` times; the
median and min µs per record are reported. The handler is the consumer core's
(`ConsumerCore._handle_message` into the loader's ClickHouseSink) or, on code older than
`tensortrace.consume`, the loader's own (`Loader._handle_message`), so the same script measures
both sides of `scripts/bench/compare_refs.py --script-from current`. The number is what bounds the
loader's 4 KiB throughput on one core (docs/BENCHMARKS.md), measured without the noise of a broker
and an engine sharing two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class _Message:
    __slots__ = ("offset", "value", "key")

    def __init__(self, offset, value, key):
        self.offset, self.value, self.key = offset, value, key


def handler():
    """(handle(tp, message), reset()) for the code on the import path, and its name."""
    try:
        from tensortrace.consume import ConsumerCore
    except ImportError:   # before tensortrace.consume: the loader held the consume loop itself
        from tensortrace.loader import service as svc
        from tensortrace.wire import codec

        loader = svc.Loader.__new__(svc.Loader)
        loader.stats, loader._holds, loader._read_upto = svc.LoaderStats(), {}, {}
        loader._assembler = codec.ChunkAssembler()

        def reset():
            loader._batch = loader._new_batch()
        return loader._handle_message, reset, "Loader._handle_message"
    from tensortrace.loader.config import LoaderConfig
    from tensortrace.loader.service import ClickHouseSink, LoaderStats
    cfg, stats = LoaderConfig(), LoaderStats()
    sink = ClickHouseSink(cfg, None, stats)
    core = ConsumerCore(cfg, sink, name="bench", stats=stats)

    def reset():
        sink.seal()
        core._ranges = {}
    return core._handle_message, reset, "ConsumerCore._handle_message -> ClickHouseSink"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=40_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default="consume_decode.json")
    a = p.parse_args(argv)
    from kafka import TopicPartition
    from loader_throughput import build_messages

    messages = [_Message(i, v, k) for i, (k, v) in enumerate(build_messages(a.records, 1, 2048, 32))]
    tp = TopicPartition("bench", 0)
    handle, reset, name = handler()
    per_record = []
    for _ in range(a.repeats):
        reset()
        t0 = time.perf_counter()
        for m in messages:
            handle(tp, m)
        per_record.append((time.perf_counter() - t0) / a.records * 1e6)
    reset()
    result = {"benchmark": "consume_decode", "path": name, "records": a.records, "row_bytes": 4096,
              "per_message": 32, "us_per_record": {"median": statistics.median(per_record), "min": min(per_record),
                                                    "runs": per_record}}
    print(f"{'path':<50}{'us/record median':>18}{'min':>8}")
    print(f"{name:<50}{result['us_per_record']['median']:>18.2f}{result['us_per_record']['min']:>8.2f}")
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
