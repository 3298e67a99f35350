"""Capture overhead inside a real SGLang 0.5.23 server (CPU engine), plugin off vs on.

One server (random Llama, hidden 512, 4 layers, float32) with the plugin and a concurrent ring
consumer; rounds of `--concurrency` concurrent /generate requests (`--prompt` prompt tokens, `--new`
generated, ignore_eos) alternate between variants chosen per request through custom_params:
`off` (capture false: taps stay idle), `hidden-states` (the server's selection), `full` (preset
full). Interleaving makes the shared machine's noise hit every variant alike; we report the median
generated tokens/s per variant (variants in a new random order every round), and `paired`: the median over rounds of the variant's tokens/s over
`off`'s in the same round (seconds apart, so slow drifts of the machine's load cancel), and
`sched cpu`: the server's scheduler process CPU time in the round (every thread's, in ns from
/proc/<pid>/task/*/schedstat) over its wall time, and `vs
off`: that CPU time over off's in the same round (the median over rounds): where a throughput cost
is spent — in the scheduler, or in waiting. `consumer`: the ring consumer's CPU time in the round over its wall time (a process of its own,
as an exporter is; it competes with the server for the machine's two cores, as an exporter would
on a node without spare cores), and `agent/round`: the agent's own inference-thread time in the round (the ring's producer counter,
which the agent in the scheduler process stores every step) over the round's wall time, the
median over rounds — the cost capture puts on the scheduler's thread, which unlike throughput does
not drown in this machine's ±5% round-to-round noise (it leaves out indirect costs: caches, the
ring consumer's CPU).

`--path native,python`: one server per tap path of the agent (the second with TENSORTRACE_NATIVE=0),
rounds interleaved across both servers, so the native fast path and the Python path are measured
side by side in one run (variants `full`, `full@python`, ...).

`--path native,hooks`: the second server taps with PyTorch hooks (TENSORTRACE_MODULE_TAPS=hooks)
instead of wrapped module forwards (agent/forward_wrap.py), variants `full@hooks`, ...

Two servers without the plugin (SGLANG_PLUGINS=none) run alongside: `vanilla`, the baseline of
the `paired vs vanilla` column (what installing TensorTrace costs at all, capture off included),
and `sglang-hidden`, SGLang's own `return_hidden_states` with the server flag it needs
(--enable-return-hidden-states switches the whole server into its hidden-states mode, so it is
not put on the plugin's server: there it slowed every variant, `off` included, which biased the
`off` baseline of sessions 5-7 — their paired ratios, same server on both sides, stand).
Every paired median comes with a percentile-bootstrap 90% interval over the rounds: on this
2-core machine one round's ratio scatters by ±4%, so a 1-point target needs the interval, and
enough rounds (`--rounds 40` narrows it to about ±1 point).

`--before DIR`: one more server whose plugin and agent are imported from DIR (a copy of
`services/` holding an earlier `tensortrace` package, e.g. with the previous SGLang taps), native
path, rounds interleaved with the others (variants `off@before`, `hidden-states@before`,
`full@before`): the change and its baseline side by side in one run; the agent's own time per
round is also paired with the same variant's `@before` round (`agent time vs ...@before`), a
measure that leaves the model's noise out. `--variants off,hidden-states` measures fewer variants
(shorter rounds: more of them in the same time). `--layers` / `--hidden` size
the random Llama (more layers: more module hooks per forward).

Statistics: `paired vs off` is the median of the rounds' ratios; `paired, gmean` their geometric
mean (the total time's ratio), each with a bootstrap 90% interval. The median can miss a cost that
shows as a minority of slow rounds, so targets are read on the geometric mean (docs/BENCHMARKS.md
"Session 14"). `--batched` sends a round's prompts as one batched /generate. `--consumer-nice 0,19`
measures both ring-consumer priorities in one run: the consumer is reniced between rounds, and
variants `@nice19` are paired with `off@nice19`. `--pool A.json,B.json[:SUFFIX]` summarises
several runs' rounds as one (no server).

    .cache/sglang-venv/bin/python scripts/bench/sglang_overhead.py --path native,python --out /tmp/sglang-overhead.json
(PYTHONPATH must hold scripts/sglang/sgl_kernel_stub; scripts/sglang/run-tests.sh shows how.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from statistics import median
from types import SimpleNamespace

from _stats import cpu_s, median_ci, ratio_gmean_ci, ring_tmpdir, task_cpu_ns
from tensortrace.devstack.sglang_server import STUB_DIR, SGLangServer, group_pids
from tensortrace.devstack.tiny_model import make_tiny_model


class RingDrain:
    """A consumer process that releases every frame as it appears (what the exporter does on a
    node, with the exporter's main-loop wait: halved after a wait that brought frames, doubled
    after one that did not, within [5 ms, 50 ms]; a fixed 5 ms poll before session 15), started with this script's `--drain RING_DIR`. A process of its own, as an exporter is:
    a consumer thread in this process would compete for the GIL with the client threads and slow
    every round of its server on the client side. `stats()` asks it for the agent's own
    inference-thread time so far (the ring's producer counter, stored once a step by the agent in
    the server's scheduler process), the slabs and dropped records it saw, and its own CPU time."""

    def __init__(self, ring_dir, nice: int = 0):
        import subprocess

        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--drain", ring_dir],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     preexec_fn=(lambda: os.nice(nice)) if nice else None)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"ring consumer for {ring_dir} did not start")

    def stats(self) -> dict:
        self.proc.stdin.write("?\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> dict:
        try:
            last = self.stats()
        finally:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        return last


def _scheduler_pid(pgid) -> int:
    """SGLang's scheduler process in group `pgid`: the one titled `sglang::scheduler...`
    (setproctitle in SGLang's run_scheduler_process), else the busiest (one session-15 run picked
    another process by CPU alone, and its `sched cpu` column read 0.7%)."""
    for pid in group_pids(pgid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"sglang::scheduler"):
                    return pid
        except OSError:
            continue   # gone meanwhile
    return _busiest_child(pgid)


def _busiest_child(pgid) -> int:
    """The process of group `pgid` with the most CPU time so far: SGLang's scheduler, after warm-up."""
    def cpu(pid):
        try:
            return cpu_s(pid)
        except (OSError, ValueError, IndexError):   # gone meanwhile
            return -1.0
    return max(group_pids(pgid), key=cpu)


def _set_affinity(pid: int, cpus: set) -> None:
    """Every thread of process `pid` onto `cpus` (sched_setaffinity of a pid moves one thread)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return   # gone meanwhile
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass


def _pin(servers, drains, schedulers: set) -> None:
    """--pin: every server's scheduler process (the thread that runs the model, and its helpers) on
    the first CPU; everything else (the servers' tokenizer / detokenizer processes, the ring
    consumers, this script and its client threads) on the others, as an inference host gives the
    model's process cores of its own and runs the exporter and the HTTP front on the rest."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs two CPUs")
    model, rest = {cpus[0]}, set(cpus[1:])
    for srv in servers.values():
        for pid in group_pids(srv.proc.pid):
            _set_affinity(pid, model if pid in schedulers else rest)
    for d in drains.values():
        _set_affinity(d.proc.pid, rest)
    _set_affinity(os.getpid(), rest)


def _renice(pid: int, nice: int) -> None:
    """Every thread of process `pid` to `nice` (setpriority of a pid changes one thread). Lowering
    a nice value needs root or CAP_SYS_NICE."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        except ProcessLookupError:
            continue   # a thread gone meanwhile
        except PermissionError:
            raise SystemExit(f"--consumer-nice: cannot set the ring consumer's nice to {nice} (lowering it "
                             "needs root or CAP_SYS_NICE); give one level") from None


def drain_main(ring_dir) -> None:
    import glob

    from tensortrace.exporter.config import ExporterConfig
    from tensortrace.ring.format import FrameKind, RingReader
    from tensortrace.v1 import records_pb2

    while not glob.glob(os.path.join(ring_dir, "*.ring")):
        time.sleep(0.1)
    reader = RingReader.open(glob.glob(os.path.join(ring_dir, "*.ring"))[0])
    counts = {"slabs": 0, "dropped": 0}
    stop = threading.Event()

    def answer():   # one JSON line per line read; EOF stops the consumer
        for _ in sys.stdin:
            print(json.dumps({"thread_ns": reader.producer_stats()["thread_ns"], "cpu_ns": time.process_time_ns(),
                              **counts}), flush=True)
        stop.set()
    threading.Thread(target=answer, daemon=True).start()
    print("ready", flush=True)
    policy = ExporterConfig()   # the exporter's main-loop wait (ExporterConfig.next_wait)
    wait, read = policy.poll_s, False
    while not stop.is_set():
        end = None
        for f in reader.frames():
            end = f.end
            if f.kind == FrameKind.SLAB:
                counts["slabs"] += 1
            elif f.kind == FrameKind.SUMMARY:
                counts["dropped"] += records_pb2.RequestSummary.FromString(bytes(f.meta)).records_dropped
        if end is not None:   # passes until one finds nothing, as the exporter's main loop
            reader.release(end)
            read = True
            continue
        wait = policy.next_wait(wait, read)
        read = False
        time.sleep(wait)
    reader.close()


VARIANTS = {  # per-request options (custom_params) of each variant; the server selects hidden-states
    "off": {"capture": False},
    "hidden-states": {"capture": True},
    "full": {"capture": True, "preset": "full"},
}
SGLANG_HIDDEN = "sglang-hidden"   # capture off, SGLang's return_hidden_states on
VANILLA = "vanilla"               # a server without the plugin: the baseline


def run(model_path, work, a):
    paths = a.path.split(",") + (["before"] if a.before else [])
    rings = ring_tmpdir("tt-sglang-bench-rings-")   # tmpfs, as deployed (not /tmp: a disk here)
    servers, drains = {}, {}
    try:
        # --model-threads: torch's intra-op threads in every server (OMP_NUM_THREADS; default: torch's own)
        threads = {"OMP_NUM_THREADS": str(a.model_threads)} if a.model_threads else {}
        # SGLang without the plugin (SGLANG_PLUGINS names no installed plugin): `vanilla`, the
        # baseline of everything; and with --enable-return-hidden-states, SGLang's own alternative.
        # That flag switches the whole server into its hidden-states capture mode, so it gets a
        # server of its own (on the plugin's server it slowed every variant, `off` included).
        for name, args in ((VANILLA, ()), (SGLANG_HIDDEN, ("--enable-return-hidden-states",))):
            if name not in a.variants:
                continue
            servers[name] = SGLangServer(model_path, ring_dir=os.path.join(rings, name),
                                         log_path=os.path.join(work, f"server-{name}.log"),
                                         env_extra={"SGLANG_PLUGINS": "none", **threads}, args_extra=args)
            servers[name].start()
        for path in paths:
            ring_dir = os.path.join(rings, path)
            env = {"TENSORTRACE_SELECTION": "hidden-states", "TENSORTRACE_RING_CAPACITY": "256M", **threads}
            if path == "python":
                env["TENSORTRACE_NATIVE"] = "0"
            if path == "hooks":   # native path, module taps as PyTorch hooks (agent/forward_wrap.py)
                env["TENSORTRACE_MODULE_TAPS"] = "hooks"
            if path == "before":   # the earlier package first on the path (SGLang's children inherit it)
                env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.abspath(a.before), STUB_DIR,
                                                                os.environ.get("PYTHONPATH", "")) if p)
            servers[path] = SGLangServer(model_path, ring_dir=ring_dir, log_path=os.path.join(work, f"server-{path}.log"),
                                         env_extra=env)
            servers[path].start()
            drains[path] = RingDrain(ring_dir, a.nices[0])
        return _measure(servers, drains, paths, a)
    finally:
        for d in drains.values():
            try:
                d.close()
            except Exception:  # noqa: BLE001 - a consumer already gone: nothing to stop
                d.proc.kill()
        for srv in servers.values():
            srv.stop()
        shutil.rmtree(rings, ignore_errors=True)


def _measure(servers, drains, paths, a):
    variants = {}   # name -> (server, options, return_hidden_states, the ring consumer's nice in its rounds)
    for i, path in enumerate(paths):
        for v, options in VARIANTS.items():
            if v not in a.variants:
                continue
            if i and v == "off" and path != "before":
                continue   # one baseline: capture off on the first server (and on the earlier package's)
            variants[v if i == 0 else f"{v}@{path}"] = (servers[path], options, False, a.nices[0])
    for n in a.nices[1:]:   # --consumer-nice A,B: the first server's variants again, its consumer reniced
        for v in [v for v in variants if "@" not in v]:
            variants[f"{v}@nice{n}"] = (*variants[v][:3], n)
    if SGLANG_HIDDEN in servers:
        variants[SGLANG_HIDDEN] = (servers[SGLANG_HIDDEN], {"capture": False}, True, None)
    if VANILLA in servers:
        variants[VANILLA] = (servers[VANILLA], {"capture": False}, False, None)
    import random

    rng = random.Random(1)
    prompts = [[rng.randrange(4, 250) for _ in range(a.prompt)] for _ in range(a.concurrency)]

    drain_of = {id(servers[p]): drains[p] for p in paths}
    no_drain = SimpleNamespace(stats=lambda: {"thread_ns": 0, "cpu_ns": 0})   # the servers without the plugin

    def one_round(variant):
        server, options, hidden, _ = variant
        body = lambda p: {"input_ids": p, "sampling_params": {  # noqa: E731
            "max_new_tokens": a.new, "temperature": 0, "ignore_eos": True,
            "custom_params": {"tensortrace": options}}, **({"return_hidden_states": True} if hidden else {})}
        if a.batched:   # one /generate for the whole round: its requests reach the scheduler together
            threads = [threading.Thread(target=server.post, args=("/generate", body(prompts)))]
        else:
            threads = [threading.Thread(target=server.post, args=("/generate", body(p))) for p in prompts]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0

    for variant in variants.values():
        one_round(variant)  # warm-up (the first also runs the taps' self-check)
    sched_of = {id(srv): _scheduler_pid(srv.proc.pid) for srv in servers.values()}   # the scheduler process
    if a.pin:
        _pin(servers, drains, set(sched_of.values()))
    times = {v: [] for v in variants}
    agent_ns = {v: [] for v in variants}   # the agent's own inference-thread time in each round
    sched_s = {v: [] for v in variants}   # the server's scheduler process CPU seconds in each round
    consumer_ns = {v: [] for v in variants}   # the ring consumer's CPU time in each round (+20 ms after it)
    load = [os.getloadavg()]
    names = list(variants)
    for _ in range(a.rounds):  # interleaved, so machine noise hits every variant alike
        # in a shuffled order each round: with a fixed order the first variant always paid for
        # waking the server that had been idle (a bias of a few percent against `off`)
        rng.shuffle(names)
        for v in names:
            drain = drain_of.get(id(variants[v][0]), no_drain)
            if len(a.nices) > 1 and drain is not no_drain:
                _renice(drain.proc.pid, variants[v][3])
            s0 = drain.stats()
            cpu0 = task_cpu_ns(sched_of[id(variants[v][0])])
            times[v].append(one_round(variants[v]))
            sched_s[v].append((task_cpu_ns(sched_of[id(variants[v][0])]) - cpu0) / 1e9)
            time.sleep(0.02)   # the agent stores its counter at a step's end: let the last step's land
            s1 = drain.stats()
            agent_ns[v].append(s1["thread_ns"] - s0["thread_ns"])
            consumer_ns[v].append(s1["cpu_ns"] - s0["cpu_ns"])
    load.append(os.getloadavg())
    time.sleep(1.0)
    rows = summarize(times, agent_ns, sched_s, consumer_ns, a.concurrency * a.new)
    last = [d.stats() for d in drains.values()]
    return rows, {"slabs_drained": sum(x["slabs"] for x in last),
                  "records_dropped": sum(x["dropped"] for x in last),
                  "startup_s": {p: s.startup_s for p, s in servers.items()}, "load_average": load}


def summarize(times, agent_ns, sched_s, consumer_ns, tokens) -> list[dict]:
    """One row per variant from the rounds' measures (dicts variant -> per-round lists, the first
    variant `off` on the first server): medians, paired ratios against `off` in the same round
    (median and geometric mean, each with a bootstrap 90% interval), shares of the round."""
    rows = []
    first = next(iter(times))
    vanilla = times.get(VANILLA)   # (None: --variants left the server without the plugin out)
    for v, ts in times.items():
        # the baseline: "off" on the first server; a variant run with the consumer reniced
        # (`@niceN`), off in the rounds with the same consumer priority
        own_off = "off" + v[v.index("@nice"):] if "@nice" in v else None
        base = own_off if own_off in times else first
        off = times[base]
        # paired: this variant's tokens/s over off's in the same round (seconds apart: the machine's
        # slow drifts cancel), the median over rounds, with a bootstrap 90% interval of that median;
        # and the geometric mean of the same ratios (the more efficient estimate, ratio_gmean_ci)
        ratios = [o / t - 1 for o, t in zip(off, ts)]
        gmean, gmean_ci = ratio_gmean_ci(off, ts)
        ts_sorted = sorted(ts)
        shares = sorted(ns / 1e9 / t for ns, t in zip(agent_ns[v], ts))
        cpu_ratios = [c / o - 1 for c, o in zip(sched_s[v], sched_s[base]) if o]
        row = {"variant": v, "rounds": len(ts), "tokens_per_s_median": tokens / ts_sorted[len(ts) // 2],
               "tokens_per_s_best": tokens / ts_sorted[0], "paired_vs_off": median(ratios),
               "paired_vs_off_ci90": median_ci(ratios),
               "paired_vs_off_gmean": gmean, "paired_vs_off_gmean_ci90": gmean_ci,
               "agent_share_median": shares[len(shares) // 2],
               "consumer_share_median": median(ns / 1e9 / t for ns, t in zip(consumer_ns[v], ts)),
               # the scheduler's CPU time per round over off's in the same round: where the
               # throughput cost is spent (in the scheduler process, or waiting elsewhere)
               "sched_cpu_paired_vs_off": median(cpu_ratios) if cpu_ratios else 0.0,
               "sched_cpu_paired_vs_off_ci90": median_ci(cpu_ratios) if cpu_ratios else [0.0, 0.0],
               "sched_cpu_share_median": median(c / t for c, t in zip(sched_s[v], ts)),
               "round_s": ts, "agent_ns": agent_ns[v], "consumer_ns": consumer_ns[v], "sched_s": sched_s[v]}
        if vanilla is not None:
            vr = [o / t - 1 for o, t in zip(vanilla, ts)]
            row["paired_vs_vanilla"], row["paired_vs_vanilla_ci90"] = median(vr), median_ci(vr)
        rows.append(row)
    # --before: the agent's own time per round against the same variant's on the earlier package,
    # paired by round: far less noisy than throughput (it leaves the model out), so a change of a
    # few µs a forward resolves where the tokens/s intervals are a few percent wide
    by_name = {r["variant"]: r for r in rows}
    for r in rows:
        b = by_name.get(r["variant"] + "@before")
        if b is not None:
            ar = [x / y - 1 for x, y in zip(r["agent_ns"], b["agent_ns"]) if y]
            if ar:
                r["agent_paired_vs_before"], r["agent_paired_vs_before_ci90"] = median(ar), median_ci(ar)
    return rows


def pool(paths) -> tuple[list[dict], dict]:
    """--pool: the rounds of several runs' JSON (the same variants), summarised as one run: every
    round is paired within its own run, as summarize pairs it, and the statistics are taken over all.
    `FILE:SUFFIX` takes that run's variants named with SUFFIX (e.g. `:@nice19`), the suffix dropped;
    `FILE:@` its plain variants only (those without a suffix)."""
    times, agent_ns, sched_s, consumer_ns = {}, {}, {}, {}
    tokens, configs = None, []
    for spec in paths:
        path, _, suffix = spec.partition(":")
        with open(path) as f:
            doc = json.load(f)
        if suffix == "@":   # FILE:@ -> the run's plain variants only
            doc["rows"] = [r for r in doc["rows"] if "@" not in r["variant"]]
        elif suffix:
            doc["rows"] = [dict(r, variant=r["variant"][:-len(suffix)]) for r in doc["rows"]
                           if r["variant"].endswith(suffix)]
            if not doc["rows"]:
                raise SystemExit(f"--pool: {path} has no variant named with {suffix}")
        cfg = doc["config"]
        configs.append(cfg)
        t = cfg["concurrency"] * cfg["new"]
        if tokens not in (None, t):
            raise SystemExit(f"--pool: {path} has {t} tokens a round, the others {tokens}")
        tokens = t
        names = [r["variant"] for r in doc["rows"]]
        if times and names != list(times):
            raise SystemExit(f"--pool: {path} has variants {names}, the others {list(times)}")
        for r in doc["rows"]:
            for store, key in ((times, "round_s"), (agent_ns, "agent_ns"), (sched_s, "sched_s"),
                               (consumer_ns, "consumer_ns")):
                store.setdefault(r["variant"], []).extend(r[key])
    return summarize(times, agent_ns, sched_s, consumer_ns, tokens), {"configs": configs, "runs": list(paths)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--before", default="", help="a services/ directory holding an earlier tensortrace package: one "
                                                 "more server runs it (variants @before)")
    ap.add_argument("--path", default="native", help="the agent's tap path(s), one server each: native | python | "
                                                     "hooks (native, module taps as PyTorch hooks) | "
                                                     "native,hooks,python")
    ap.add_argument("--model-threads", type=int, default=0,
                    help="torch intra-op threads of every server (OMP_NUM_THREADS). By default torch takes "
                         "every core, so the model competes with everything else on the machine; 1 leaves "
                         "this 2-core machine a core for the rest, as a GPU server's host has spare cores")
    ap.add_argument("--consumer-nice", default="0",
                    help="run the ring consumer at this nice level (19: below the server, as an exporter "
                         "deployed at a lower priority than inference on a node without spare cores); "
                         "A,B: both in one run, the consumer reniced between rounds (variants @niceB, "
                         "paired with off@niceB; needs root or CAP_SYS_NICE to lower it back)")
    ap.add_argument("--pin", action="store_true",
                    help="pin every server's scheduler process to the first CPU and everything else (tokenizer "
                         "and detokenizer processes, ring consumers, this script's clients) to the others, as an "
                         "inference host gives the model's process cores of its own")
    ap.add_argument("--variants", default=",".join([*VARIANTS, SGLANG_HIDDEN, VANILLA]),
                    help="the variants measured (off always): fewer variants make a round shorter, so more "
                         "rounds fit the same time and the paired intervals narrow (e.g. off,hidden-states)")
    ap.add_argument("--batched", action="store_true",
                    help="send each round's --concurrency prompts as one batched /generate (a list of input_ids) "
                         "instead of one HTTP request per prompt")
    ap.add_argument("--pool", default="", metavar="JSON,...",
                    help="no server: the tables of several runs' JSON (the same variants) over all their rounds, "
                         "each round paired within its own run; FILE:SUFFIX takes that run's variants named "
                         "with SUFFIX (e.g. run.json:@nice19), the suffix dropped; FILE:@ its plain variants only")
    ap.add_argument("--drain", default="", help=argparse.SUPPRESS)   # the consumer process (RingDrain)
    a = ap.parse_args(argv)
    if a.drain:
        return drain_main(a.drain)
    a.nices = [int(n) for n in str(a.consumer_nice).split(",")]
    if a.pool:
        specs = a.pool.split(",")
        rows, info = pool(specs)
        print(f"pooled: {len(specs)} runs, {rows[0]['rounds']} rounds per variant ({', '.join(specs)})")
        work = ""
    else:
        a.variants = set(a.variants.split(",")) | {"off"}
        unknown = a.variants - {*VARIANTS, SGLANG_HIDDEN, VANILLA}
        if unknown:
            ap.error(f"--variants: unknown {', '.join(sorted(unknown))}; choose from "
                     f"{', '.join([*VARIANTS, SGLANG_HIDDEN, VANILLA])}")
        work = tempfile.mkdtemp(prefix="tt-sglang-bench-")
        model_path = make_tiny_model(os.path.join(work, "model"), arch="llama", layers=a.layers, hidden=a.hidden)
        rows, ring = run(model_path, work, a)
        print(f"SGLang 0.5.23 CPU engine, Llama hidden {a.hidden} x {a.layers} layers fp32, {a.concurrency} "
              f"{'prompts a batched request' if a.batched else 'concurrent requests'}, "
              f"{a.prompt} prompt + {a.new} new tokens; {a.rounds} interleaved rounds per variant; ring drained "
              f"concurrently ({ring['slabs_drained']} slabs, {ring['records_dropped']} records dropped); tap path(s) "
              f"{a.path}; model threads {a.model_threads or 'torch default'}; consumer nice {a.consumer_nice}; "
              f"{'pinned (scheduler: CPU 0, the rest: the others); ' if a.pin else ''}"
              f"load average {ring['load_average'][0][0]:.2f} -> {ring['load_average'][-1][0]:.2f}")
    base = rows[0]["tokens_per_s_median"]   # "off" on the first server
    before = {r["variant"]: r["tokens_per_s_median"] for r in rows}.get("off@before")
    pct = lambda x: f"{x * 100:+.1f}%"   # noqa: E731
    ci = lambda c: f"[{c[0] * 100:+.1f}, {c[1] * 100:+.1f}]"   # noqa: E731
    print(f"{'variant':<22} {'tok/s median':>12} {'tok/s best':>10} {'median vs off':>14} {'paired vs off':>14} "
          f"{'90% interval':>14} {'paired, gmean':>14} {'90% interval':>14} {'agent/round':>11} {'consumer':>9} {'sched cpu':>9} {'vs off':>7}"
          + f" {'paired vs vanilla':>18} {'90% interval':>14}"
          + (f" {'vs off@before':>14}" if before else ""))
    for r in rows:
        med = r["tokens_per_s_median"]
        r["vs_off"] = med / base - 1
        line = (f"{r['variant']:<22} {med:>12.1f} {r['tokens_per_s_best']:>10.1f} {pct(r['vs_off']):>14} "
                f"{pct(r['paired_vs_off']):>14} {ci(r['paired_vs_off_ci90']):>14} "
                f"{pct(r['paired_vs_off_gmean']):>14} {ci(r['paired_vs_off_gmean_ci90']):>14} "
                f"{r['agent_share_median'] * 100:>10.2f}% {r['consumer_share_median'] * 100:>8.2f}% "
                f"{r['sched_cpu_share_median'] * 100:>8.1f}% {pct(r['sched_cpu_paired_vs_off']):>7}")
        if "paired_vs_vanilla" in r:
            line += f" {pct(r['paired_vs_vanilla']):>18} {ci(r['paired_vs_vanilla_ci90']):>14}"
        else:
            line += f" {'-':>18} {'-':>14}"
        if before:
            r["vs_off_before"] = med / before - 1
            line += f" {r['vs_off_before'] * 100:>+13.1f}%"
            if "agent_paired_vs_before" in r:
                line += (f"   agent time vs {r['variant']}@before {pct(r['agent_paired_vs_before'])} "
                         f"{ci(r['agent_paired_vs_before_ci90'])}")
        print(line)
    if a.out:
        # a pool's own configuration is its runs' (info["configs"]); this invocation's flags did not apply
        doc = ({"rows": rows, "pooled": info} if a.pool else
               {"config": dict(vars(a), variants=sorted(a.variants)), "rows": rows, "ring": ring})
        args = sys.argv[1:] if argv is None else argv
        with open(a.out, "w") as f:
            json.dump({**doc, "command": "scripts/bench/sglang_overhead.py " + " ".join(args)}, f, indent=1)
    if work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
