"""Read-back: captured tensors of a request as torch tensors (SDK), the gRPC query service, `tensortrace show`.

    from tensortrace.query import TensorTraceClient
    req = TensorTraceClient("grpc://127.0.0.1:50052").tensors(trace_id="4bf92f3577b34da6a3ce929d0e0e4736")
    req.hidden_states()
"""

from tensortrace.query.assemble import CapturedTensor
from tensortrace.query.backend import ClickHouseBackend, RequestRef
from tensortrace.query.client import RequestTensors, TensorTraceClient
from tensortrace.query.errors import (AmbiguousRequest, BackendUnavailable, IncompleteData, InvalidQuery,
                                      NotFound, QueryError, QueryTimeout)
from tensortrace.wire.completeness import Completeness

__all__ = [
    "TensorTraceClient", "RequestTensors", "CapturedTensor", "Completeness", "RequestRef", "ClickHouseBackend",
    "QueryError", "InvalidQuery", "AmbiguousRequest", "NotFound", "QueryTimeout", "BackendUnavailable",
    "IncompleteData",
]
