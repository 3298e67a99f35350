"""The exporter's control endpoint: gRPC `tensortrace.v1.ExporterControl` (proto/tensortrace/v1/control.proto).

The exporter forwards control documents into each ring's control block; it checks only that the
document is a JSON object (its schema belongs to the capture agent).

    server, port = serve_control(exporter, "127.0.0.1", 0)   # security: exporter.cfg.control_security

Secured by the exporter's `--control-*` block (service/security.py, docs/security.md): with a token
file SetCapture needs the `control` role and GetStatus (rings and accounting, no user data) `read`
or `control`; a reader cannot change capture. Each SetCapture is one audit line with the caller,
the rings, the old and the new control document, and counted in
`tensortrace_audit_control_changes_total{identity,rpc,result}`.
"""

from __future__ import annotations

import json
from concurrent import futures

import grpc

from tensortrace.service.security import EndpointGuard, EndpointSecurity, Role, RpcPolicy, audit_note
from tensortrace.v1 import control_pb2, control_pb2_grpc

CONTROL_POLICIES = {
    "SetCapture": RpcPolicy((Role.CONTROL,), "control", lambda r: {"rings": list(r.rings)}),
    "GetStatus": RpcPolicy((Role.READ, Role.CONTROL)),
}


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
        audit_note(old=self._current_controls(list(request.rings)), new=doc)
        results = self.exporter.set_capture(doc, list(request.rings))
        return control_pb2.SetCaptureResponse(results=results, control_json=body)

    def _current_controls(self, rings: list[str]):
        """What the targeted rings had before (for the audit line): the default document when
        every ring is targeted, else {ring or pod: document}."""
        default = getattr(self.exporter, "default_control", None)
        if not rings:
            return default
        own = getattr(self.exporter, "ring_controls", {}) or {}
        return {r: own.get(r, default) for r in rings}

    def GetStatus(self, request, context):  # noqa: N802
        return self.exporter.status()


def serve_control(exporter, host: str, port: int, security: EndpointSecurity | None = None, registry=None):
    """Start the gRPC server; returns (server, bound port). `security`, `registry`: default the
    exporter's (`exporter.cfg.control_security`, `exporter.registry`). Raises SecurityError (a
    ConfigError) for plaintext without the opt-in or off loopback, OSError when it cannot bind."""
    cfg = getattr(exporter, "cfg", None)
    if security is None:
        security = getattr(cfg, "control_security", None) or EndpointSecurity()
    if registry is None:
        registry = getattr(exporter, "registry", None)
    guard = EndpointGuard("control", security, CONTROL_POLICIES, registry=registry)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="exporter-control"),
                         interceptors=[guard.interceptor()])
    control_pb2_grpc.add_ExporterControlServicer_to_server(ExporterControlService(exporter), server)
    bound = guard.add_port(server, host, port)
    server.start()
    server.guard = guard
    return server, bound
