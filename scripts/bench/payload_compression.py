"""Payload encoding choice for storage (docs/storage.md): how well activation payloads compress.

    .venv/bin/python scripts/bench/payload_compression.py [--json out.json] [--train-steps 300]

Data: hidden states (all layers, bf16 and fp32) of a small GPT-2-shaped model (4 layers, hidden
256) that this script first trains for --train-steps steps on Python standard-library source text
("trained-ish": its activations have the structure of a trained model, e.g. a few large-magnitude
channels, rather than random-init Gaussian noise), plus the same model at random init and pure
Gaussian bf16 for comparison. Rows are cut the way the exporter cuts them: one record per decode
token (one row, 512 B at hidden 256 bf16) and one per prefill (all prompt rows).

For each data set: bytes and encode/decode MB/s of RAW, ZSTD(1), SHUFFLE_ZSTD(1), LZ4 (codec.encode_payload),
and the bytes ClickHouse stores (system.parts_columns, after OPTIMIZE FINAL) for RAW payloads under the column codecs
LZ4 and ZSTD(1), and SHUFFLE_ZSTD payloads under LZ4.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
import time

import torch

from tensortrace.v1 import records_pb2 as pb
from tensortrace.wire import codec

ENCODINGS = {"raw": pb.RAW, "zstd": pb.ZSTD, "shuffle_zstd": pb.SHUFFLE_ZSTD, "lz4": pb.LZ4}


def corpus(max_bytes: int = 2_000_000) -> bytes:
    import sysconfig

    out = bytearray()
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, "rb") as f:
            out += f.read()
        if len(out) >= max_bytes:
            break
    return bytes(out[:max_bytes])


def make_model(train_steps: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=256, n_positions=256, n_embd=256, n_layer=4, n_head=4)
    model = GPT2LMHeadModel(cfg)
    if train_steps:
        data = torch.tensor(list(corpus()), dtype=torch.long)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        for step in range(train_steps):
            idx = torch.randint(0, len(data) - 129, (16,))
            batch = torch.stack([data[i:i + 128] for i in idx])
            loss = model(batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"trained {train_steps} steps, final loss {loss.item():.2f} (byte-level; ln 256 = 5.55 at random)")
    model.eval()
    return model


def hidden_state_records(model, dtype, n_prompts: int = 8, prompt_len: int = 128, decode_tokens: int = 64):
    """(prefill records, decode records) as the exporter would cut them, RAW bytes."""
    data = corpus()
    prefill, decode = [], []
    with torch.no_grad():
        for k in range(n_prompts):
            start = (k * 104729) % (len(data) - prompt_len - decode_tokens)
            ids = torch.tensor([list(data[start:start + prompt_len + decode_tokens])])
            hs = model(ids, output_hidden_states=True).hidden_states
            for layer, h in enumerate(hs):
                h = h[0].to(dtype)
                prefill.append(codec.tensor_bytes(h[:prompt_len]).tobytes())
                decode.extend(codec.tensor_bytes(h[t:t + 1]).tobytes() for t in range(prompt_len, prompt_len + decode_tokens))
    return prefill, decode


def measure(payloads: list[bytes], elem: int) -> dict:
    raw = sum(len(p) for p in payloads)
    out = {"raw_bytes": raw, "records": len(payloads)}
    for name, enc in ENCODINGS.items():
        t0 = time.perf_counter()
        encoded = [codec.encode_payload(p, enc, elem) for p in payloads]
        t1 = time.perf_counter()
        for p, e in zip(payloads, encoded):
            codec.decode_payload(e, enc, len(p), elem)
        t2 = time.perf_counter()
        size = sum(len(e) for e in encoded)
        out[name] = {"bytes": size, "ratio": raw / size, "encode_MBps": raw / (t1 - t0) / 1e6,
                     "decode_MBps": raw / (t2 - t1) / 1e6}
    return out


def clickhouse_sizes(client, payloads: list[bytes], elem: int, tag: str) -> dict:
    """Stored bytes of the payload column under different column codecs (real chDB engine)."""
    variants = {"raw+LZ4": ("LZ4", pb.RAW), "raw+ZSTD(1)": ("ZSTD(1)", pb.RAW),
                "raw+ZSTD(3)": ("ZSTD(3)", pb.RAW), "shuffle_zstd+LZ4": ("LZ4", pb.SHUFFLE_ZSTD),
                "shuffle_zstd+NONE": ("NONE", pb.SHUFFLE_ZSTD)}
    out = {}
    for name, (col_codec, enc) in variants.items():
        table = f"bench_{tag}_{name.replace('+', '_').replace('(', '').replace(')', '')}"
        client.command(f"DROP TABLE IF EXISTS {table}")
        client.command(f"CREATE TABLE {table} (i UInt32, payload String CODEC({col_codec})) ENGINE = MergeTree ORDER BY i SETTINGS min_bytes_for_wide_part = 0")
        data = [codec.encode_payload(p, enc, elem) for p in payloads]
        t0 = time.perf_counter()
        client.insert(table, [list(range(len(data))), data], column_names=["i", "payload"], column_oriented=True)
        secs = time.perf_counter() - t0
        client.command(f"OPTIMIZE TABLE {table} FINAL")
        stored = client.query(f"SELECT sum(column_data_compressed_bytes) FROM system.parts_columns WHERE database = currentDatabase() "
                              f"AND table = '{table}' AND column = 'payload' AND active").result_rows[0][0]
        raw = sum(len(p) for p in payloads)
        out[name] = {"stored_bytes": int(stored), "ratio": raw / max(1, int(stored)), "insert_MBps": raw / secs / 1e6}
        client.command(f"DROP TABLE {table}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--json", default=".cache/bench/payload_compression.json")
    a = p.parse_args(argv)
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=f"chdb://{tempfile.mkdtemp(prefix='tt-bench-')}")
    torch.set_num_threads(2)
    trained = make_model(a.train_steps)
    random_init = make_model(0, seed=1)
    results = {}
    sets = {}
    for label, model in (("trained", trained), ("random_init", random_init)):
        for dtype in (torch.bfloat16, torch.float32):
            pre, dec = hidden_state_records(model, dtype)
            sets[f"{label}/{str(dtype).removeprefix('torch.')}"] = (pre, dec, 2 if dtype == torch.bfloat16 else 4)
    g = torch.randn(8 * 5 * 192, 256).to(torch.bfloat16)
    sets["gaussian/bfloat16"] = ([codec.tensor_bytes(g[i:i + 128]).tobytes() for i in range(0, 8 * 5 * 128, 128)],
                                 [codec.tensor_bytes(g[i:i + 1]).tobytes() for i in range(8 * 5 * 64)], 2)
    print(f"{'data':<24}{'records':<10}{'raw':>8}{'zstd':>8}{'shuf+zstd':>10}{'lz4':>8}   "
          f"{'CH raw+LZ4':>11}{'raw+ZSTD1':>10}{'raw+ZSTD3':>10}{'shuf+LZ4':>9}   {'shuf enc MB/s':>13}")
    for label, (pre, dec, elem) in sets.items():
        for kind, payloads in (("prefill", pre), ("decode", dec)):
            m = measure(payloads, elem)
            ch = clickhouse_sizes(client, payloads, elem, f"{label.replace('/', '_')}_{kind}")
            results[f"{label}/{kind}"] = {"codec": m, "clickhouse": ch}
            print(f"{label + '/' + kind:<24}{len(payloads):<10}{1.0:>8.2f}{m['zstd']['ratio']:>8.2f}"
                  f"{m['shuffle_zstd']['ratio']:>10.2f}{m['lz4']['ratio']:>8.2f}   "
                  f"{ch['raw+LZ4']['ratio']:>11.2f}{ch['raw+ZSTD(1)']['ratio']:>10.2f}{ch['raw+ZSTD(3)']['ratio']:>10.2f}"
                  f"{ch['shuffle_zstd+LZ4']['ratio']:>9.2f}   {m['shuffle_zstd']['encode_MBps']:>13.0f}")
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"benchmark": "payload_compression", "results": results}, f, indent=1)
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
