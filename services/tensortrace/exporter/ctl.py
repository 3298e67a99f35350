"""`tensortrace exporterctl`: talk to an exporter's control endpoint.

    tensortrace exporterctl status [--json]
    tensortrace exporterctl set --enabled true --selection '{"hooks": ["resid_pre"]}' [--ring pod-a-r0.ring]
    tensortrace exporterctl set --doc '{"enabled": false}'
    tensortrace exporterctl --address node-1:50051 --tls-ca ca.crt --token-file control-token status

Connection security as `tensortrace show --server` (service/security.py): TLS to a non-loopback
address, plaintext to loopback (kubectl port-forward) unless --tls, --insecure to force plaintext;
--token-file / TENSORTRACE_TOKEN_FILE: `set` needs a token with the `control` role.
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from tensortrace.service.security import SecurityError, add_client_flags, client_security_from_args
from tensortrace.v1 import control_pb2, control_pb2_grpc


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{s!r} is not true/false")


def format_status(st: control_pb2.ExporterStatus) -> str:
    lines = [f"kafka: {'connected' if st.kafka_connected else 'NOT connected'}  topic {st.topic}  "
             f"in flight {st.inflight_messages} msgs / {st.inflight_bytes} B  errors {st.kafka_errors}",
             f"ring dir {st.ring_dir}  default control {st.default_control_json or '-'}", ""]
    hdr = f"{'ring':<28}{'state':<12}{'gen':>20}{'fill':>7}{'committed':>11}{'released':>10}{'pending':>9}{'prod.drop':>10}{'records':>10}{'rec/s':>9}  drops"
    lines.append(hdr)
    for r in st.rings:
        drops = ",".join(f"{k}={v}" for k, v in sorted(r.frames_dropped_by_reason.items())) or "-"
        lines.append(f"{r.ring:<28}{r.state:<12}{r.generation:>20}{r.fill:>7.1%}{r.frames_committed:>11}"
                     f"{r.frames_released:>10}{r.frames_pending:>9}{r.frames_dropped_by_producer:>10}"
                     f"{r.records_published:>10}{r.records_per_second:>9.0f}  {drops}"
                     + (f"  ({r.reason})" if r.reason else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tensortrace exporterctl", description=__doc__.split("\n")[0])
    p.add_argument("--address", default="127.0.0.1:50051", help="exporter control endpoint host:port")
    p.add_argument("--timeout", type=float, default=10.0)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("status", help="rings, fill, accounting, Kafka state")
    s.add_argument("--json", action="store_true")
    c = sub.add_parser("set", help="change what the agents capture")
    c.add_argument("--doc", help="a complete control document (JSON object)")
    c.add_argument("--enabled", type=_bool)
    c.add_argument("--selection", help="selection as a JSON object")
    c.add_argument("--ring", action="append", default=[], help="ring file name or pod (repeatable); default: all")
    add_client_flags(p)
    a = p.parse_args(argv)
    try:
        ch = client_security_from_args(a).channel(a.address)
    except SecurityError as e:
        print(f"exporterctl: {e}", file=sys.stderr)
        return 2
    with ch:
        stub = control_pb2_grpc.ExporterControlStub(ch)
        try:
            if a.cmd == "status":
                st = stub.GetStatus(control_pb2.GetStatusRequest(), timeout=a.timeout)
                print(json.dumps(MessageToDict(st, preserving_proto_field_name=True), indent=2)
                      if a.json else format_status(st))
                return 0
            req = control_pb2.SetCaptureRequest(control_json=a.doc or "", selection_json=a.selection or "",
                                                rings=a.ring)
            if a.enabled is not None:
                req.enabled = a.enabled
            resp = stub.SetCapture(req, timeout=a.timeout)
        except grpc.RpcError as e:
            print(f"exporterctl: {a.address}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        print(f"control document {resp.control_json}")
        failed = 0
        for r in resp.results:
            if r.error:
                failed += 1
                print(f"  {r.ring}: {r.error}")
            else:
                print(f"  {r.ring}: written (control seq {r.control_seq})")
        if not resp.results:
            print("  no rings attached; it applies to rings that appear later")
        return 0


if __name__ == "__main__":
    sys.exit(main())
