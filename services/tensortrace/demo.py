"""`make demo` / `python -m tensortrace.demo`: real tensors through a real Kafka broker into a real
ClickHouse engine and back, checked bit for bit.

    python -m tensortrace.demo                  # tiny random Llama, local broker, chDB in a temp dir
    python -m tensortrace.demo --tokens 32

Steps (each a small function, so the full pipeline — agent -> Ring² -> exporter -> Kafka -> loader —
can replace them one by one): start the local Kafka broker; run a forward pass of a tiny
LlamaForCausalLM built from a config (random weights, nothing downloaded) and keep its hidden
states and logits; encode them as wire v1 TensorRecords (chunked where a payload exceeds the Kafka
message limit); publish; consume and reassemble; insert into a ClickHouse table (chDB, embedded);
read back; compare with the model's own tensors; stop the broker (also on failure).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass

from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec


@dataclass
class Captured:
    """One tensor the model produced, and where it came from."""

    hook: str
    layer: int
    tensor: object  # torch.Tensor [tokens, ...]
    encoding: int


def log(msg: str) -> None:
    print(msg, flush=True)


# -- 1. the model --------------------------------------------------------------------------

def run_tiny_llama(tokens: int, seed: int = 0) -> tuple[list[Captured], str]:
    """Forward `tokens` random token ids through a tiny random Llama; return its hidden states
    (residual stream after each layer) and logits, one request's rows each."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, config.vocab_size, (1, tokens))
    with torch.no_grad():
        out = model(input_ids=input_ids, output_hidden_states=True)
    # Hook names as in agent/catalog.py: resid_pre L = HF hidden_states[L]; resid_final = the last
    # entry (after the final norm). One bfloat16 copy shows a 2-byte dtype on the wire.
    hs = out.hidden_states
    captured = [Captured("resid_pre", 0, hs[0][0].clone(), pb.RAW),
                Captured("resid_pre", 1, hs[1][0].clone(), pb.SHUFFLE_ZSTD),
                Captured("resid_pre", 1, hs[1][0].to(torch.bfloat16), pb.LZ4),
                Captured("resid_final", -1, hs[-1][0].clone(), pb.SHUFFLE_ZSTD),
                Captured("logits", -1, out.logits[0].clone(), pb.ZSTD)]
    params = sum(p.numel() for p in model.parameters())
    return captured, f"LlamaForCausalLM (random, {config.num_hidden_layers} layers, hidden {config.hidden_size}, {params / 1e6:.1f}M params)"


# -- 2. records ------------------------------------------------------------------------------

def to_records(captured: list[Captured], request_id: str) -> list[pb.TensorRecord]:
    """One TensorRecord per captured tensor (seq 0, 1, ...), chunked to fit Kafka messages."""
    trace_id, span_id = codec.new_trace_id(), os.urandom(8)
    producer = pb.Producer(node=socket.gethostname(), pod=socket.gethostname(), pid=os.getpid(),
                           generation=time.time_ns())
    out: list[pb.TensorRecord] = []
    for seq, c in enumerate(captured):
        rec = codec.tensor_to_record(
            c.tensor, encoding=c.encoding, model_id="tiny-llama-random", request_id=request_id,
            trace_id=trace_id, span_id=span_id, hook=c.hook, layer=c.layer, tp_size=1,
            phase=pb.PREFILL, token_start=0, producer=producer, seq=seq)
        out.extend(codec.chunk_record(rec))
    return out


# -- 3. Kafka ----------------------------------------------------------------------------------

def publish(bootstrap: str, topic: str, records: list[pb.TensorRecord]) -> int:
    """One envelope per record, keyed by request id; returns bytes sent."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                             max_request_size=codec.DEFAULT_MAX_MESSAGE_BYTES + 64 * 1024)
    sent = 0
    try:
        for rec in records:
            value = codec.encode_envelope([rec])
            producer.send(topic, key=rec.request_id.encode(), value=value)
            sent += len(value)
        producer.flush(30)
    finally:
        producer.close(10)
    return sent


def consume(bootstrap: str, topic: str, expected_records: int, timeout_s: float = 60.0) -> list[pb.TensorRecord]:
    """Read the topic from the start, decode envelopes and reassemble chunks into whole records."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest", fetch_max_bytes=8 << 20)
    assembler = codec.ChunkAssembler(timeout_s=timeout_s)
    whole: list[pb.TensorRecord] = []
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + timeout_s
        while len(whole) < expected_records:
            if time.monotonic() > deadline:
                raise TimeoutError(f"got {len(whole)} of {expected_records} records from {topic} in {timeout_s:.0f}s")
            for batch in consumer.poll(timeout_ms=500).values():
                for msg in batch:
                    for r in codec.decode_envelope(msg.value):
                        rec = assembler.add(r.tensor)
                        if rec is not None:
                            whole.append(rec)
    finally:
        consumer.close()
    return whole


# -- 4. ClickHouse -------------------------------------------------------------------------------

TABLE_DDL = """
CREATE TABLE IF NOT EXISTS demo_tensors (
    request_id String, trace_id String, hook LowCardinality(String), layer Int32,
    token_start UInt32, token_end UInt32, dtype LowCardinality(String), shape Array(Int64),
    encoding LowCardinality(String), raw_size UInt64, payload String,
    producer_pod String, producer_pid UInt32, generation UInt64, seq UInt64
) ENGINE = MergeTree ORDER BY (request_id, seq)
"""
COLUMNS = ["request_id", "trace_id", "hook", "layer", "token_start", "token_end", "dtype", "shape",
           "encoding", "raw_size", "payload", "producer_pod", "producer_pid", "generation", "seq"]


def store(client, records: list[pb.TensorRecord]) -> None:
    client.command(TABLE_DDL)
    rows = [[r.request_id, r.trace_id.hex(), r.hook, r.layer, r.token_start, r.token_end,
             codec.dtype_name(r.dtype), list(r.shape), pb.Encoding.Name(r.encoding), r.raw_size,
             r.payload, r.producer.pod, r.producer.pid, r.producer.generation, r.seq] for r in records]
    client.insert("demo_tensors", rows, column_names=COLUMNS)


def read_back(client, request_id: str) -> list[pb.TensorRecord]:
    """TensorRecords rebuilt from the table rows of one request, in seq order."""
    result = client.query(
        f"SELECT {', '.join(COLUMNS)} FROM demo_tensors WHERE request_id = {{rid:String}} ORDER BY seq",
        parameters={"rid": request_id}, column_formats={"payload": "bytes"})
    out = []
    for row in result.named_results():
        out.append(pb.TensorRecord(
            request_id=row["request_id"], trace_id=bytes.fromhex(row["trace_id"]), hook=row["hook"],
            layer=row["layer"], token_start=row["token_start"], token_end=row["token_end"],
            dtype=codec.dtype_code(row["dtype"]), shape=row["shape"], encoding=pb.Encoding.Value(row["encoding"]),
            raw_size=row["raw_size"], payload=row["payload"], seq=row["seq"],
            producer=pb.Producer(pod=row["producer_pod"], pid=row["producer_pid"], generation=row["generation"])))
    return out


# -- 5. the check --------------------------------------------------------------------------------

def bit_identical(a, b) -> bool:
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def compare(captured: list[Captured], stored: list[pb.TensorRecord]) -> list[tuple[Captured, pb.TensorRecord, bool]]:
    if len(stored) != len(captured):
        raise AssertionError(f"{len(captured)} tensors captured but {len(stored)} read back")
    return [(c, rec, bit_identical(c.tensor, codec.record_to_tensor(rec))) for c, rec in zip(captured, stored)]


def print_table(results: list[tuple[Captured, pb.TensorRecord, bool]]) -> None:
    log(f"  {'hook':<13}{'layer':>6}  {'shape':<14}{'dtype':<10}{'encoding':<14}{'raw B':>9}{'stored B':>10}  bit-identical")
    for c, rec, same in results:
        log(f"  {c.hook:<13}{c.layer:>6}  {str(list(rec.shape)):<14}{codec.dtype_name(rec.dtype):<10}"
            f"{pb.Encoding.Name(rec.encoding):<14}{rec.raw_size:>9}{len(rec.payload):>10}  {'yes' if same else 'NO'}")


# -- main ----------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tensortrace demo", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16, help="prompt length of the one demo request")
    p.add_argument("--ch-path", default=None, help="chDB data dir (default: a temp dir)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    import clickhouse_connect

    from tensortrace.devkafka import LocalKafka, LocalKafkaError

    workdir = tempfile.mkdtemp(prefix="tensortrace-demo-")
    ch_path = args.ch_path or os.path.join(workdir, "chdb")
    request_id, topic = "demo-req-1", "tensortrace.activations.demo"

    log("1. starting a local Apache Kafka broker (KRaft, jars from Maven Central) ...")
    t0 = time.monotonic()
    kafka = LocalKafka()
    try:
        kafka.start()
    except LocalKafkaError as e:
        kafka.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        log(f"   broker ready at {kafka.bootstrap} in {time.monotonic() - t0:.1f}s")

        log(f"2. forward pass of a tiny model on {args.tokens} tokens ...")
        captured, model_desc = run_tiny_llama(args.tokens)
        log(f"   {model_desc}: captured {len(captured)} tensors")

        records = to_records(captured, request_id)
        log(f"3. encoded as {len(records)} wire-v1 TensorRecord messages "
            f"({len(records) - len(captured)} extra from chunking payloads over {codec.DEFAULT_CHUNK_PAYLOAD_BYTES} bytes)")
        sent = publish(kafka.bootstrap, topic, records)
        log(f"   published {sent} bytes to Kafka topic {topic}")

        received = consume(kafka.bootstrap, topic, expected_records=len(captured))
        log(f"4. consumed and reassembled {len(received)} records from Kafka")

        client = clickhouse_connect.get_client(dsn=f"chdb://{ch_path}")
        try:
            version = client.query("SELECT version()").result_rows[0][0]
            store(client, received)
            stored = read_back(client, request_id)
        finally:
            client.close()
        log(f"5. inserted into ClickHouse {version} (chDB embedded, {ch_path}), table demo_tensors; "
            f"read back {len(stored)} rows")

        results = compare(captured, stored)
        log("6. read-back tensors vs the model's own tensors:")
        print_table(results)
        ok = all(same for _, _, same in results)
        log(f"RESULT: {'all ' + str(len(results)) + ' tensors bit-identical' if ok else 'MISMATCH'} "
            f"after model -> wire v1 -> Kafka -> ClickHouse -> wire v1")
        return 0 if ok else 1
    finally:
        kafka.close()
        log("broker stopped")
        if args.ch_path is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
