"""GrpcBackend: the read-back SDK's backend over the query service (grpc://host:port).

    backend = GrpcBackend("127.0.0.1:50052")
    backend.lookup(trace_id=bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736"))
    GrpcBackend("query.tensortrace:50052", security=ClientSecurity(tls_ca="/tls/ca.crt", token_file="/run/token"))

    backend.forget(request_id="chatcmpl-42")     # `tensortrace forget --server` (role forget)

A refused call says what to do: UNAUTHENTICATED (no token, or one the service does not list) and
PERMISSION_DENIED (a known token without the RPC's role) name the role the RPC needs and the
--token-file / TENSORTRACE_TOKEN_FILE option (`access_hint`).

The channel comes from ClientSecurity (service/security.py): TLS to a non-loopback address (or
with any TLS option), plaintext to loopback, the bearer token on every call; unset options come
from TENSORTRACE_TLS_CA / _TLS_CERT / _TLS_KEY / _TLS_SERVER_NAME / _TOKEN_FILE.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterator

import grpc

from tensortrace.query.backend import HookLayerStats, RequestRef, RequestStatus, StoredTensor
from tensortrace.query.errors import BackendUnavailable, InvalidQuery, NotFound, QueryError, QueryTimeout
from tensortrace.query.server import MAX_MESSAGE_BYTES, ref_to_pb
from tensortrace.service.security import ClientSecurity
from tensortrace.v1 import query_pb2 as qpb
from tensortrace.v1 import query_pb2_grpc as qgrpc


def access_hint(code: grpc.StatusCode, rpc: str = "", role: str = "read") -> str:
    """What to do about a refused call ('' for any other code): which token, with which role.
    UNAUTHENTICATED: no token or one the service does not know; PERMISSION_DENIED: a known token
    without the RPC's role (the service's message names the identity and its roles)."""
    what = f"{rpc} needs" if rpc else "this needs"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (f"{what} a bearer token with the `{role}` role that is in the service's token file: give "
                f"--token-file FILE (or TENSORTRACE_TOKEN_FILE), the file holding that token (a rotated token "
                f"stops working once the service's token file no longer lists it)")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return (f"{what} a token with the `{role}` role; the token given is known but lacks it: use another "
                f"--token-file, or add `{role}` to that identity's line in the service's token file "
                f"(docs/security.md)")
    return ""


def _error(e: grpc.RpcError, rpc: str = "", role: str = "read") -> QueryError:
    code, detail = e.code(), e.details()
    hint = access_hint(code, rpc, role)
    return {grpc.StatusCode.INVALID_ARGUMENT: InvalidQuery, grpc.StatusCode.NOT_FOUND: NotFound,
            grpc.StatusCode.UNAVAILABLE: BackendUnavailable,
            grpc.StatusCode.DEADLINE_EXCEEDED: QueryTimeout}.get(code, QueryError)(
        f"query service: {code.name}: {detail}" + (f"\n  {hint}" if hint else ""))


def _ref(m: qpb.RequestRef) -> RequestRef:
    return RequestRef(m.trace_id, m.request_id, m.model, m.first_capture_unix_nano, m.last_capture_unix_nano)


class GrpcBackend:
    def __init__(self, address: str, timeout_s: float = 60.0, security: ClientSecurity | None = None):
        self.security = (security or ClientSecurity()).with_env()
        self.channel = self.security.channel(address, options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        self.stub = qgrpc.QueryServiceStub(self.channel)
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.channel.close()

    def lookup(self, trace_id: bytes | None = None, request_id: str | None = None) -> list[RequestRef]:
        try:
            r = self.stub.Lookup(qpb.LookupRequest(trace_id=trace_id or b"", request_id=request_id or ""),
                                 timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise _error(e, "Lookup") from None
        return [_ref(m) for m in r.requests]

    def status(self, ref: RequestRef) -> RequestStatus:
        try:
            r = self.stub.Status(ref_to_pb(ref), timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise _error(e, "Status") from None
        return RequestStatus(ref, list(r.summaries), r.records_loaded)

    def describe(self, ref: RequestRef) -> list[HookLayerStats]:
        try:
            r = self.stub.Describe(ref_to_pb(ref), timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise _error(e, "Describe") from None
        return [HookLayerStats(h.hook, h.layer, h.records, h.token_start, h.token_end, h.tokens, h.raw_bytes,
                               h.stored_bytes, h.capture_to_export_ms_p50, h.export_to_load_ms_p50,
                               h.capture_to_load_ms_max) for h in r.hooks]

    def fetch(self, ref: RequestRef, hooks=None, layers=None,
              progress: Callable[[int, int], None] | None = None) -> Iterator[StoredTensor]:
        req = qpb.FetchRequest(request=ref_to_pb(ref), hooks=hooks or [], layers=layers or [])
        total, done = 0, 0
        try:
            for m in self.stub.Fetch(req, timeout=self.timeout_s):
                item = m.WhichOneof("item")
                if item == "total_records":
                    total = m.total_records
                    if progress:
                        progress(0, total)
                    continue
                records = m.records.records if item == "records" else [m.record]
                for r in records:
                    yield StoredTensor.from_record(r)
                done += len(records)
                if progress:
                    progress(done, total)
        except grpc.RpcError as e:
            raise _error(e, "Fetch") from None

    def fetch_assembled(self, ref: RequestRef, hooks=None, layers=None,
                        progress: Callable[[int, int], None] | None = None) -> dict:
        """Whole sequences per (hook, layer), assembled by the server: {(hook, layer): CapturedTensor}."""
        import torch

        from tensortrace.query.assemble import CapturedTensor
        from tensortrace.wire import codec

        req = qpb.FetchRequest(request=ref_to_pb(ref), hooks=hooks or [], layers=layers or [], assembled=True)
        out, total, done = {}, 0, 0
        try:
            for m in self.stub.Fetch(req, timeout=self.timeout_s):
                item = m.WhichOneof("item")
                if item == "total_records":
                    total = m.total_records
                    if progress:
                        progress(0, total)
                    continue
                if item != "tensor":
                    continue
                a = m.tensor
                dt = codec.torch_dtype(a.dtype)
                data = a.data   # a new bytes object of our own (the message keeps its copy)
                if data:
                    # No second copy: the tensor wraps this private bytes object. torch warns that
                    # bytes are not writable; nothing else holds a reference, so writes are safe.
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", UserWarning)
                        t = torch.frombuffer(data, dtype=torch.uint8).view(dt).reshape(tuple(a.shape))
                else:
                    t = torch.empty(tuple(a.shape), dtype=dt)
                out[a.hook, a.layer] = CapturedTensor(a.hook, a.layer, t, a.start, a.end,
                                                      list(zip(a.gap_starts, a.gap_ends)),
                                                      list(a.positions) or None, a.records, a.prefill_rows,
                                                      a.decode_rows)
                done += a.records
                if progress:
                    progress(done, total)
        except grpc.RpcError as e:
            raise _error(e, "Fetch") from None
        return out


    def forget(self, trace_id: str | None = None, request_id: str | None = None, dry_run: bool = False,
               timeout_s: float = 600.0):
        """`tensortrace forget --server`: the service forgets in its own process (the Forget RPC,
        role `forget`). Returns storage.forget.ForgetReport; QueryError naming the refusal (and the
        role to ask for), InvalidQuery for a malformed id. `timeout_s`: the deletes are mutations
        that rewrite the parts holding the rows, longer than a read."""
        from tensortrace.query.server import forget_report_from_pb

        try:
            m = self.stub.Forget(qpb.ForgetRequest(trace_id=trace_id or "", request_id=request_id or "",
                                                   dry_run=dry_run), timeout=timeout_s)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise QueryError("query service: it does not serve Forget (an older tensortrace): upgrade it, or "
                                 "stop the loader and forget with --clickhouse") from None
            raise _error(e, "Forget", "forget") from None
        return forget_report_from_pb(m)
