"""The exporter's control endpoint: gRPC `tensortrace.v1.ExporterControl` (proto/tensortrace/v1/control.proto).

The exporter forwards control documents into each ring's control block; it checks only that the
document is a JSON object (its schema belongs to the capture agent).

    server, port = serve_control(exporter, "127.0.0.1", 0)
"""

from __future__ import annotations

import json
from concurrent import futures

import grpc

from tensortrace.v1 import control_pb2, control_pb2_grpc


def control_document(req: control_pb2.SetCaptureRequest) -> dict:
    """The control document a SetCapture request asks for. Raises ValueError naming the problem."""
    if req.control_json:
        try:
            doc = json.loads(req.control_json)
        except ValueError as e:
            raise ValueError(f"control_json is not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"control_json must be a JSON object, got {type(doc).__name__}")
        return doc
    doc: dict = {}
    if req.HasField("enabled"):
        doc["enabled"] = req.enabled
    if req.selection_json:
        try:
            sel = json.loads(req.selection_json)
        except ValueError as e:
            raise ValueError(f"selection_json is not JSON: {e}") from None
        if not isinstance(sel, dict):
            raise ValueError(f"selection_json must be a JSON object, got {type(sel).__name__}")
        doc["selection"] = sel
    if not doc:
        raise ValueError("empty request: set control_json, or enabled and/or selection_json")
    return doc


class ExporterControlService(control_pb2_grpc.ExporterControlServicer):
    def __init__(self, exporter):
        self.exporter = exporter

    def SetCapture(self, request, context):  # noqa: N802 (gRPC API)
        try:
            doc = control_document(request)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        body = json.dumps(doc, separators=(",", ":"), sort_keys=True)
        from tensortrace.ring.format import CONTROL_MAX
        if len(body) > CONTROL_MAX:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"control document is {len(body)} bytes; the ring control block holds at most {CONTROL_MAX}")
        results = self.exporter.set_capture(doc, list(request.rings))
        return control_pb2.SetCaptureResponse(results=results, control_json=body)

    def GetStatus(self, request, context):  # noqa: N802
        return self.exporter.status()


def serve_control(exporter, host: str, port: int):
    """Start the gRPC server; returns (server, bound port)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="exporter-control"))
    control_pb2_grpc.add_ExporterControlServicer_to_server(ExporterControlService(exporter), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"control endpoint: cannot listen on {host}:{port}")
    server.start()
    return server, bound
