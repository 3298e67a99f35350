"""The consume thread's own cost per record: Kafka message -> decoded envelope -> the sink's batch.

    .venv/bin/python scripts/bench/consume_decode.py [--records 40000] [--repeats 5] [--decoder native,python] [--json FILE]

No broker and no ClickHouse: prebuilt messages (the loader benchmark's 4 KiB records, 32 per
message) go through the consume thread's per-message handler in-process, `--repeats` times; the
median and min µs per record are reported. The handler is the consumer core's
(`ConsumerCore._handle_message` into the loader's ClickHouseSink) or, on code older than
`tensortrace.consume`, the loader's own (`Loader._handle_message`), so the same script measures
both sides of `scripts/bench/compare_refs.py --script-from current`. The number is what bounds the
loader's 4 KiB throughput on one core (docs/BENCHMARKS.md), measured without the noise of a broker
and an engine sharing two cores.

`--decoder native,python` measures both paths of the same code side by side, alternating runs:
"native" is the core's native envelope scanner into ClickHouseSink.add_scan (tensortrace.wire.native;
the default where the extension is built), "python" the same core with it turned off
(codec.decode_envelope + add_tensor per record). Each run also times building the Arrow table from
the batch (`arrow_us_per_record`, the flush thread's share), since the native path moves work there.
CPU time of this process (time.process_time) is reported beside wall time: on a shared machine it is
the steadier of the two.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class _Message:
    """A kafka-python ConsumerRecord's fields (the consumer core before confluent-kafka)."""
    __slots__ = ("offset", "value", "key")

    def __init__(self, offset, value, key):
        self.offset, self.value, self.key = offset, value, key


class _RdMessage:
    """A confluent-kafka Message's accessors (the consumer core since it reads with librdkafka)."""
    __slots__ = ("_offset", "_value", "_key")

    def __init__(self, offset, value, key):
        self._offset, self._value, self._key = offset, value, key

    def error(self):
        return None

    def topic(self):
        return "bench"

    def partition(self):
        return 0

    def offset(self):
        return self._offset

    def value(self):
        return self._value

    def key(self):
        return self._key


def handler(decoder: str = "python"):
    """(handle(tp, message), reset(), name, sink-or-None) for the code on the import path."""
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
        return loader._handle_message, reset, "Loader._handle_message", None
    from tensortrace.loader.config import LoaderConfig
    from tensortrace.loader.service import ClickHouseSink, LoaderStats
    cfg, stats = LoaderConfig(), LoaderStats()
    sink = ClickHouseSink(cfg, None, stats)
    core = ConsumerCore(cfg, sink, name="bench", stats=stats)
    if decoder == "python":
        if hasattr(core, "disable_native"):   # (code before the native decoder has only this path)
            core.disable_native()             # what TENSORTRACE_NATIVE=0 does
    elif not getattr(core, "native", False):
        raise SystemExit("--decoder native: the native decoder is not built or disabled on this code")

    def reset():
        sink.seal()
        core._ranges = {}
    return core._handle_message, reset, f"ConsumerCore._handle_message -> ClickHouseSink ({decoder})", sink


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=40_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=".cache/bench/consume_decode.json")
    p.add_argument("--decoder", default="native,python", help="comma-separated: native, python (side by side)")
    a = p.parse_args(argv)
    load0 = os.getloadavg()
    try:
        from kafka import TopicPartition      # only the two-argument handler (kafka-python era) uses it
    except ImportError:
        from collections import namedtuple
        TopicPartition = namedtuple("TopicPartition", "topic partition")
    from loader_throughput import build_messages

    built = build_messages(a.records, 1, 2048, 32)
    tp = TopicPartition("bench", 0)
    decoders = [d for d in a.decoder.split(",") if d]
    handlers = {d: handler(d) for d in decoders}
    # handle(tp, message) before the consumer core read with confluent-kafka, handle(message) since
    one_arg = len(inspect.signature(handlers[decoders[0]][0]).parameters) == 1
    messages = [(_RdMessage if one_arg else _Message)(i, v, k) for i, (k, v) in enumerate(built)]
    runs = {d: {"wall": [], "cpu": [], "arrow": []} for d in decoders}
    for _ in range(a.repeats):
        for d in decoders:          # alternate, so both see the same load
            handle, reset, name, sink = handlers[d]
            reset()
            t0, c0 = time.perf_counter(), time.process_time()
            if one_arg:
                for m in messages:
                    handle(m)
            else:
                for m in messages:
                    handle(tp, m)
            t1, c1 = time.perf_counter(), time.process_time()
            runs[d]["wall"].append((t1 - t0) / a.records * 1e6)
            runs[d]["cpu"].append((c1 - c0) / a.records * 1e6)
            if sink is not None:    # the flush thread's share: the batch -> an Arrow table
                t2 = time.perf_counter()
                sink.columns.activations_table(time.time_ns())
                runs[d]["arrow"].append((time.perf_counter() - t2) / a.records * 1e6)
    for d in decoders:
        handlers[d][1]()
    result = {"benchmark": "consume_decode", "records": a.records, "row_bytes": 4096, "per_message": 32,
              "load_avg_start": load0, "load_avg_end": os.getloadavg(), "decoders": {}}
    print(f"{'path':<62}{'us/rec median':>14}{'min':>7}{'cpu med':>9}{'arrow':>7}{'MB/s':>8}")
    for d in decoders:
        r = runs[d]
        med = statistics.median(r["wall"])
        arrow = statistics.median(r["arrow"]) if r["arrow"] else 0.0
        result["decoders"][d] = {"path": handlers[d][2], "us_per_record": {"median": med, "min": min(r["wall"]), "runs": r["wall"]},
                                 "cpu_us_per_record": {"median": statistics.median(r["cpu"]), "runs": r["cpu"]},
                                 "arrow_us_per_record": {"median": arrow, "runs": r["arrow"]},
                                 "consume_thread_MB_per_s": 4096 / med}
        print(f"{handlers[d][2]:<62}{med:>14.2f}{min(r['wall']):>7.2f}{statistics.median(r['cpu']):>9.2f}{arrow:>7.2f}"
              f"{4096 / med:>8.0f}")
    # the single-path keys older readers of this JSON use
    first = result["decoders"][decoders[0]]
    result["path"], result["us_per_record"] = first["path"], first["us_per_record"]
    print(f"load average {load0} -> {result['load_avg_end']}")
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
