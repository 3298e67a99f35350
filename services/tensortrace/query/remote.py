"""GrpcBackend: the read-back SDK's backend over the query service (grpc://host:port).

    backend = GrpcBackend("127.0.0.1:50052")
    backend.lookup(trace_id=bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736"))
    GrpcBackend("query.tensortrace:50052", security=ClientSecurity(tls_ca="/tls/ca.crt", token_file="/run/token"))

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


def _error(e: grpc.RpcError) -> QueryError:
    code, detail = e.code(), e.details()
    return {grpc.StatusCode.INVALID_ARGUMENT: InvalidQuery, grpc.StatusCode.NOT_FOUND: NotFound,
            grpc.StatusCode.UNAVAILABLE: BackendUnavailable,
            grpc.StatusCode.DEADLINE_EXCEEDED: QueryTimeout}.get(code, QueryError)(f"query service: {code.name}: {detail}")


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
            raise _error(e) from None
        return [_ref(m) for m in r.requests]

    def status(self, ref: RequestRef) -> RequestStatus:
        try:
            r = self.stub.Status(ref_to_pb(ref), timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise _error(e) from None
        return RequestStatus(ref, list(r.summaries), r.records_loaded)

    def describe(self, ref: RequestRef) -> list[HookLayerStats]:
        try:
            r = self.stub.Describe(ref_to_pb(ref), timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise _error(e) from None
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
            raise _error(e) from None

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
            raise _error(e) from None
        return out

