"""The gRPC query service and the `tensortrace show` CLI, over the real chDB engine."""

import json

import pytest
import torch

from tensortrace.query import InvalidQuery, NotFound, TensorTraceClient
from tensortrace.query.server import serve
from tensortrace.service.security import EndpointSecurity
from tensortrace.storage import ThreadSafeClient
from tensortrace.testing.clickhouse import insert_rows
from tensortrace.testing.synthetic import SyntheticRequest

pytestmark = pytest.mark.integration


@pytest.fixture
def query_service(tt_db):
    client, db = tt_db
    server, port = serve(ThreadSafeClient(client), database=db, host="127.0.0.1", port=0,
                         security=EndpointSecurity.loopback_plaintext())
    yield client, db, f"127.0.0.1:{port}"
    server.stop(grace=0).wait()


def test_grpc_backend_returns_the_same_tensors_as_direct_reads(query_service):
    client, db, addr = query_service
    req = SyntheticRequest.make("req-grpc", layers=3, hidden=16, prompt=5, generated=4)
    insert_rows(client, db, req.records, [req.summary])
    seen = []
    with TensorTraceClient(f"grpc://{addr}") as tt:
        got = tt.tensors(trace_id=req.trace_id.hex(), progress=lambda done, total: seen.append((done, total)))
    assert got.completeness.state == "complete"
    for key, want in req.truth.items():
        assert torch.equal(got[key].tensor, want)
    assert seen[0] == (0, len(req.records)) and seen[-1] == (len(req.records), len(req.records))
    assert len(got.hidden_states()) == 4
    # the record-level stream (for consumers that assemble themselves) carries the same bytes
    from tensortrace.query.assemble import assemble

    with TensorTraceClient(f"grpc://{addr}") as tt:
        [ref] = tt.requests(request_id="req-grpc")
        records = list(tt.backend.fetch(ref))
    assert len(records) == len(req.records)
    assert all(torch.equal(assemble(records)[k].tensor, v) for k, v in req.truth.items())


def test_grpc_errors_map_to_the_sdk_exceptions(query_service):
    client, db, addr = query_service
    with TensorTraceClient(f"grpc://{addr}") as tt:
        with pytest.raises(NotFound):
            tt.tensors(trace_id="0af7651916cd43dd8448eb211c80319c")
        with pytest.raises(InvalidQuery):
            tt.tensors(trace_id="' OR 1=1 --")
        # bypass the SDK's own checks: the server validates too
        from tensortrace.v1 import query_pb2 as qpb
        import grpc

        with pytest.raises(grpc.RpcError) as e:
            tt.backend.stub.Fetch(qpb.FetchRequest(request=qpb.RequestRef(trace_id=b"\x01" * 16, request_id="r"),
                                                   hooks=["x' OR 1=1"])).next()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "hook name" in e.value.details()


def test_show_prints_hooks_layers_tokens_and_completeness(query_service, capsys):
    from tensortrace.query.show import main as show

    client, db, addr = query_service
    req = SyntheticRequest.make("req-show", layers=4, hidden=8, prompt=6, generated=3)
    insert_rows(client, db, req.records, [req.summary])
    assert show([req.trace_id.hex(), "--server", addr, "--tensors", "--progress"]) == 0
    out, err = capsys.readouterr()
    assert "req-show" in out and "resid_pre" in out and "0-3" in out and "0-7" in out
    assert "completeness: complete" in out and f"captured {len(req.records)}" in out
    assert "reading [" in err and f"{len(req.records)}/{len(req.records)}" in err
    assert show(["--request-id", "req-show", "--server", addr, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["completeness"]["state"] == "complete" and len(doc["hooks"]) == 5
    assert show(["not-a-trace", "--server", addr]) == 1
    assert "not 32 hex characters" in capsys.readouterr().err
