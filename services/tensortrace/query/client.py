"""The read-back SDK: a request's captured tensors, back as torch tensors.

    from tensortrace.query import TensorTraceClient
    tt = TensorTraceClient("grpc://127.0.0.1:50052")          # or "http://user:pw@ch:8123", "chdb:///path"
    req = tt.tensors(trace_id="4bf92f3577b34da6a3ce929d0e0e4736", hooks=["resid_pre"], wait_s=5)
    req["resid_pre", 3].tensor.shape, req.completeness.state     # (torch.Size([37, 2048]), 'complete')
    hs = req.hidden_states()    # like output_hidden_states: tuple of [1, seq, hidden]

Secured query services (docs/security.md): `TensorTraceClient("grpc://query:50052",
security=ClientSecurity(tls_ca="/tls/ca.crt", token_file="/run/token"))`, or the same from
TENSORTRACE_TLS_CA / TENSORTRACE_TOKEN_FILE; `grpcs://` asks for TLS even to a loopback address.

Backends: `grpc://host:port` talks to the query service (`tensortrace loader --query-port` or
`tensortrace query-server`); `http(s)://` and `chdb://` read ClickHouse directly. An embedded chDB
path can only be opened by one process, so a reader next to a running loader uses grpc://.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from tensortrace.query import validate
from tensortrace.query.assemble import CapturedTensor, assemble_pages
from tensortrace.query.backend import ClickHouseBackend, HookLayerStats, RequestRef
from tensortrace.query.errors import AmbiguousRequest, IncompleteData, InvalidQuery, NotFound, QueryTimeout
from tensortrace.wire.completeness import Completeness, completeness

# hidden_states[i] for i < num_layers is the residual stream entering layer i; the last one is the
# final norm output. This is what transformers' output_hidden_states returns (catalog.py says the same).
HIDDEN_STATE_LAYER_HOOK = "resid_pre"
HIDDEN_STATE_FINAL_HOOK = "resid_final"


@dataclass
class RequestTensors:
    """Everything read back for one request."""
    request_id: str
    trace_id: str                                    # 32 hex chars
    model: str
    tensors: dict[tuple[str, int], CapturedTensor]
    completeness: Completeness
    hook_stats: list[HookLayerStats] = field(default_factory=list)

    def __getitem__(self, key: tuple[str, int]) -> CapturedTensor:
        try:
            return self.tensors[key]
        except KeyError:
            raise KeyError(f"{key} not captured; have {sorted(self.tensors)[:20]}") from None

    def __contains__(self, key) -> bool:
        return key in self.tensors

    @property
    def hooks(self) -> list[str]:
        return sorted({h for h, _ in self.tensors})

    def layers(self, hook: str) -> list[int]:
        return sorted(layer for h, layer in self.tensors if h == hook)

    def hidden_states(self, allow_gaps: bool = False) -> tuple:
        """(resid_pre[0], ..., resid_pre[L-1], resid_final) each as [1, seq, hidden], like
        transformers' `output_hidden_states=True`. Needs every layer's resid_pre and resid_final
        over the same positions; raises IncompleteData naming what is missing."""
        layers = self.layers(HIDDEN_STATE_LAYER_HOOK)
        if not layers:
            raise IncompleteData(f"no {HIDDEN_STATE_LAYER_HOOK} captured for request {self.request_id}")
        if layers != list(range(len(layers))):
            missing = sorted(set(range(max(layers) + 1)) - set(layers))
            raise IncompleteData(f"{HIDDEN_STATE_LAYER_HOOK} missing for layers {missing}")
        final = self.tensors.get((HIDDEN_STATE_FINAL_HOOK, -1))
        if final is None:
            raise IncompleteData(f"no {HIDDEN_STATE_FINAL_HOOK} captured: the last hidden state is the final norm output")
        parts = [self.tensors[HIDDEN_STATE_LAYER_HOOK, i] for i in layers] + [final]
        spans = {(p.start, p.end) for p in parts}
        if len(spans) != 1:
            raise IncompleteData(f"hidden states cover different positions: {sorted(spans)}")
        if not allow_gaps and any(p.gaps for p in parts):
            bad = [(p.hook, p.layer, p.gaps) for p in parts if p.gaps][:5]
            raise IncompleteData(f"positions missing (pass allow_gaps=True to get zeros there): {bad}")
        return tuple(p.tensor.unsqueeze(0) for p in parts)


def _backend_for(target, database: str, security=None):
    if not isinstance(target, str):
        return ClickHouseBackend(target, database)  # an existing clickhouse-connect client
    if target.startswith(("grpc://", "grpcs://")):
        import dataclasses

        from tensortrace.query.remote import GrpcBackend
        from tensortrace.service.security import ClientSecurity

        sec = security or ClientSecurity()
        if target.startswith("grpcs://"):
            sec = dataclasses.replace(sec, tls=True)
        return GrpcBackend(target.split("://", 1)[1], security=sec)
    if target.startswith(("chdb://", "http://", "https://")):
        from tensortrace.storage.schema import connect

        return ClickHouseBackend(connect(target), database)
    raise InvalidQuery(f"target {target!r}: expected grpc(s)://host:port, http(s)://..., chdb:///path or a client")


class TensorTraceClient:
    """Reads captured requests. Thread-safe for reads when its backend is.

        tt = TensorTraceClient("grpc://127.0.0.1:50052", default_wait_s=2.0)
        tt.requests(trace_id="4bf92f3577b34da6a3ce929d0e0e4736")   # -> [RequestRef, ...]
    """

    def __init__(self, target, database: str = "tensortrace", default_wait_s: float = 0.0,
                 poll_interval_s: float = 0.1, security=None):
        """`security`: a service.security.ClientSecurity for grpc:// targets (TLS, token)."""
        if default_wait_s < 0 or poll_interval_s <= 0:
            raise InvalidQuery("default_wait_s must be >= 0 and poll_interval_s > 0")
        self.backend = _backend_for(target, database, security)
        self.default_wait_s = default_wait_s
        self.poll_interval_s = poll_interval_s

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- lookups ----------------------------------------------------------------------------

    def requests(self, trace_id=None, request_id=None) -> list[RequestRef]:
        """Stored requests matching a trace id and/or request id (possibly none)."""
        tid = validate.trace_id_bytes(trace_id) if trace_id is not None else None
        rid = validate.request_id(request_id) if request_id is not None else None
        if tid is None and rid is None:
            raise InvalidQuery("give trace_id= or request_id=")
        return self.backend.lookup(tid, rid)

    def _resolve(self, trace_id, request_id, wait_s: float) -> RequestRef:
        deadline = time.monotonic() + wait_s
        while True:
            refs = self.requests(trace_id, request_id)
            if len(refs) > 1:
                ids = [r.request_id for r in refs]
                raise AmbiguousRequest(f"trace {refs[0].trace_id.hex()} holds {len(refs)} requests {ids[:10]}; "
                                       f"pass request_id=", ids)
            if refs:
                return refs[0]
            if time.monotonic() >= deadline:
                what = f"trace id {trace_id}" if trace_id is not None else f"request id {request_id!r}"
                if wait_s > 0:
                    raise QueryTimeout(f"no request with {what} appeared within {wait_s:g}s")
                raise NotFound(f"no request with {what} is stored")
            time.sleep(self.poll_interval_s)

    def status(self, trace_id=None, request_id=None, wait_s: float | None = None) -> Completeness:
        """Completeness of one request, without reading tensors."""
        wait_s = self.default_wait_s if wait_s is None else wait_s
        ref = self._resolve(trace_id, request_id, wait_s)
        st = self.backend.status(ref)
        return completeness(st.summaries, st.records_loaded)

    def describe(self, trace_id=None, request_id=None) -> tuple[RequestRef, Completeness, list[HookLayerStats]]:
        """Per (hook, layer) counts, token ranges, bytes and latencies; reads no payloads."""
        ref = self._resolve(trace_id, request_id, 0.0)
        st = self.backend.status(ref)
        return ref, completeness(st.summaries, st.records_loaded), self.backend.describe(ref)

    # -- tensors ----------------------------------------------------------------------------

    def tensors(self, trace_id=None, request_id=None, hooks=None, layers=None, wait_s: float | None = None,
                progress: Callable[[int, int], None] | None = None) -> RequestTensors:
        """The request's tensors per (hook, layer), whole sequences across prefill and decode.

        wait_s: wait up to this long for the request to appear and finish loading (its summary
        present and every captured record stored); after that, return what is there (see
        `.completeness.state`), or raise QueryTimeout if nothing appeared.
        """
        hooks = validate.hooks(hooks)
        layers = validate.layers(layers)
        wait_s = self.default_wait_s if wait_s is None else wait_s
        if wait_s < 0:
            raise InvalidQuery(f"wait_s must be >= 0, got {wait_s}")
        deadline = time.monotonic() + wait_s
        ref = self._resolve(trace_id, request_id, wait_s)
        while True:
            st = self.backend.status(ref)
            comp = completeness(st.summaries, st.records_loaded)
            if comp.state in ("complete", "incomplete") and comp.records_loaded >= comp.records_captured:
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(self.poll_interval_s)
            # Look up again: tensors loaded since the last lookup may have been captured later than
            # its last_capture bound, and the reads prune by those bounds (capture_time BETWEEN).
            ref = self._resolve(ref.trace_id, ref.request_id, 0.0)
        if hasattr(self.backend, "fetch_assembled"):  # grpc://: the server assembles, fewer messages
            tensors = self.backend.fetch_assembled(ref, hooks, layers, progress)
        else:
            tensors = assemble_pages(self.backend.fetch_pages(ref, hooks, layers, progress))
        return RequestTensors(ref.request_id, ref.trace_id.hex(), ref.model, tensors, comp)

    def across_requests(self, hook: str, layer: int, since_s: float, until_s: float | None = None,
                        model: str | None = None, limit: int = 1000) -> dict[str, CapturedTensor]:
        """One (hook, layer) across many requests, e.g. to train a probe: request id -> tensor.

            acts = tt.across_requests("resid_pre", 12, since_s=time.time() - 3600, model="llama-3-8b")

        Two reads, each on a sort order made for it: the by_hook_layer projection finds the
        requests (no payloads), then each request's rows come from the trace-id primary key.
        ClickHouse backends only (not grpc://).
        """
        [hook] = validate.hooks([hook])
        [layer] = validate.layers([layer])
        if not hasattr(self.backend, "scan_hook_layer"):
            raise InvalidQuery("across_requests needs a ClickHouse backend (http(s):// or chdb://), not grpc://")
        if not 1 <= limit <= 100_000:
            raise InvalidQuery(f"limit {limit} not in [1, 100000]")
        if model is not None and (not isinstance(model, str) or len(model) > 256):
            raise InvalidQuery("model must be a string of at most 256 characters")
        t0 = int(since_s * 1e9)
        t1 = int((until_s if until_s is not None else time.time() + 1) * 1e9)
        out: dict[str, CapturedTensor] = {}
        for ref in self.backend.scan_hook_layer(model, hook, layer, t0, t1, limit):
            got = assemble_pages(self.backend.fetch_pages(ref, [hook], [layer]))
            if (hook, layer) in got:
                out[ref.request_id] = got[hook, layer]
        return out

