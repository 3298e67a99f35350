"""The SGLang backend's CUDA-graph decision, measured on an SGLang-SHAPED harness (real SGLang cannot
be installed on the GPU machine: no network). Decode steps of a Qwen3-4B-sized decoder (bf16,
hidden 2560, 36 layers, GQA 32/8 heads x 128, MLP 9728, static KV cache) built like SGLang's:
fused QKV and gate/up GEMMs, static input/output buffers, torch.cuda.CUDAGraph replay.

Variants per batch size (mean ms per decode step):
  graph            graph replay, no taps (SGLang's default decode)
  eager            the same step run eagerly, no taps
  eager+capture    eager with taps (resid_pre per layer + logits) handed to the TensorTrace agent
                   (its CUDA staging path: device copy + async D2H into the ring) — what
                   TENSORTRACE_CUDA_GRAPH=eager does on captured steps
  (graphs are captured with capture_error_mode="thread_local": the agent's commit thread makes CUDA
  calls while the main thread captures; under the default "global" mode that is an error)
  graph+static     taps registered BEFORE graph capture copy into static device buffers inside the
                   graph; after replay the real rows are handed to the agent — the alternative

    python scripts/bench/sglang_cuda_graph.py --out bench-sglang-graph.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import torch
import torch.nn.functional as F


class Layer(torch.nn.Module):
    def __init__(self, H, nq, nkv, d, I, ctx, bs_max, dtype):
        super().__init__()
        dev = "cuda"
        self.nq, self.nkv, self.d = nq, nkv, d
        self.qkv = torch.nn.Linear(H, (nq + 2 * nkv) * d, bias=False, device=dev, dtype=dtype)
        self.o = torch.nn.Linear(nq * d, H, bias=False, device=dev, dtype=dtype)
        self.gate_up = torch.nn.Linear(H, 2 * I, bias=False, device=dev, dtype=dtype)
        self.down = torch.nn.Linear(I, H, bias=False, device=dev, dtype=dtype)
        self.ln1 = torch.nn.RMSNorm(H, device=dev, dtype=dtype)
        self.ln2 = torch.nn.RMSNorm(H, device=dev, dtype=dtype)
        self.k_cache = torch.randn(bs_max, nkv, ctx, d, device=dev, dtype=dtype)
        self.v_cache = torch.randn(bs_max, nkv, ctx, d, device=dev, dtype=dtype)

    def forward(self, h, residual):
        residual = h if residual is None else h + residual   # fused add+RMSNorm in SGLang
        x = self.ln1(residual)
        bs = x.shape[0]
        q, k, v = self.qkv(x).split([self.nq * self.d, self.nkv * self.d, self.nkv * self.d], dim=-1)
        q = q.view(bs, self.nq, 1, self.d)
        a = F.scaled_dot_product_attention(q, self.k_cache[:bs], self.v_cache[:bs], enable_gqa=True)
        h = self.o(a.reshape(bs, -1))
        residual = h + residual
        x = self.ln2(residual)
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u), residual


class Model(torch.nn.Module):
    def __init__(self, layers=36, H=2560, nq=32, nkv=8, d=128, I=9728, V=32000, ctx=1024, bs_max=32,
                 dtype=torch.bfloat16):
        super().__init__()
        self.embed = torch.nn.Embedding(V, H, device="cuda", dtype=dtype)
        self.layers = torch.nn.ModuleList(Layer(H, nq, nkv, d, I, ctx, bs_max, dtype) for _ in range(layers))
        self.norm = torch.nn.RMSNorm(H, device="cuda", dtype=dtype)
        self.lm_head = torch.nn.Linear(H, V, bias=False, device="cuda", dtype=dtype)
        self.taps = []  # callables(layer_index, residual_in) — module-tap stand-ins

    def forward(self, ids):
        h, residual = self.embed(ids), None
        for i, layer in enumerate(self.layers):
            for tap in self.taps:
                tap(i, h if residual is None else None, h, residual)
            h, residual = layer(h, residual)
        return self.lm_head(self.norm(h + residual))


def _start_drain(path):
    import threading

    from tensortrace.ring.format import RingReader

    reader = RingReader.open(path)

    def loop():
        while True:
            end = None
            for frame in reader.frames():
                end = frame.end
            if end is not None:
                reader.release(end)
            time.sleep(0.001)

    threading.Thread(target=loop, daemon=True).start()


def bench(fn, iters):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000 / iters


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    model = Model(bs_max=max(a.batch)).eval()
    L = len(model.layers)
    H = model.norm.weight.shape[0]
    agent, agent_error = None, ""
    ring_dir = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)   # removed at the end
    try:
        from tensortrace.agent.config import AgentConfig
        from tensortrace.agent.core import CaptureAgent
        from tensortrace.agent.layout import Phase, RequestRows, StepLayout
        from tensortrace.agent.selection import Selection

        agent = CaptureAgent(AgentConfig(ring_dir=ring_dir, model_id="bench", ring_capacity=1 << 30),
                             Selection.preset("hidden-states"))
        _start_drain(agent.ring_path)  # a consumer, as the exporter is on a real node
    except Exception as e:  # noqa: BLE001
        agent_error = f"{type(e).__name__}: {e}"
    rows = []
    for bs in a.batch:
        ids = torch.randint(0, 32000, (bs,), device="cuda")
        with torch.no_grad():
            eager_ms = bench(lambda: model(ids), a.iters)
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    model(ids)
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g, capture_error_mode="thread_local"):
                static_logits = model(ids)
            graph_ms = bench(g.replay, a.iters)

            rec = {"batch": bs, "graph_ms": graph_ms, "eager_ms": eager_ms}
            if agent is not None:
                rids = [f"r{bs}-{i}" for i in range(bs)]
                for rid in rids:
                    agent.begin_request(rid, prompt_tokens=1)
                layout = StepLayout(requests=tuple(RequestRows(r, i, 1, 100, Phase.DECODE, seq_index=i)
                                                   for i, r in enumerate(rids)), total_rows=bs)

                def agent_tap(i, first, h, residual):
                    if agent.wants("resid_pre", i):
                        agent.capture("resid_pre", i, first if first is not None else h + residual)

                def eager_capture():
                    agent.begin_step(layout)
                    model.taps = [agent_tap]
                    out = model(ids)
                    agent.capture("logits", -1, out)
                    agent.end_step()
                    model.taps = []
                    return out

                try:
                    rec["eager_capture_ms"] = bench(eager_capture, a.iters)
                    # static-buffer variant: taps inside the graph copy into preallocated buffers
                    static = torch.empty(L, bs, H, device="cuda", dtype=torch.bfloat16)

                    def static_tap(i, first, h, residual):
                        static[i].copy_(first if first is not None else h + residual)

                    model.taps = [static_tap]
                    g2 = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g2, capture_error_mode="thread_local"):
                        static_logits2 = model(ids)
                    model.taps = []

                    # what the SGLang plugin hands the agent after a replay: one capture_static call
                    # (docs/agent.md "Native fast path"; CUDA buffers take the Python staging path)
                    static_items = [("resid_pre", i, static[i]) for i in range(L)] + [("logits", -1, static_logits2)]

                    def graph_static():
                        g2.replay()
                        agent.begin_step(layout)
                        agent.capture_static(static_items, bs)
                        agent.end_step()

                    rec["graph_static_capture_ms"] = bench(graph_static, a.iters)
                    st = agent.stats()
                    rec["agent_written"], rec["agent_dropped"] = st.written, st.dropped
                except Exception as e:  # noqa: BLE001
                    agent_error = f"{type(e).__name__}: {e}"
            rows.append(rec)
    dev = torch.cuda.get_device_name()
    print(f"SGLang-shaped decode step, {L} layers, hidden {H}, bf16, {dev}")
    print(f"{'batch':>5} {'graph ms':>9} {'eager ms':>9} {'eager+capture':>14} {'graph+static':>13}")
    for r in rows:
        print(f"{r['batch']:>5} {r['graph_ms']:>9.3f} {r['eager_ms']:>9.3f} "
              f"{r.get('eager_capture_ms', float('nan')):>14.3f} {r.get('graph_static_capture_ms', float('nan')):>13.3f}")
    if agent_error:
        print("agent:", agent_error)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": dev, "layers": L, "hidden": H, "rows": rows, "agent_error": agent_error}, f, indent=1)
    if agent is not None:
        agent.close()
    shutil.rmtree(ring_dir, ignore_errors=True)   # a 1 GiB ring on tmpfs


if __name__ == "__main__":
    main()
