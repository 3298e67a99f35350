"""The exporter's control endpoint over TLS with tokens: a reader cannot change capture, an
operator with the control role can, and each change is one audit line with the old and the new
document."""

from __future__ import annotations

import json
import logging
import os
import threading

import grpc
import pytest

from security_pki import CONTROL_TOKEN
from tensortrace.exporter import ctl
from tensortrace.exporter.config import ExporterConfig, KafkaConfig
from tensortrace.exporter.service import Exporter
from tensortrace.ring.format import RingIdentity, RingWriter
from tensortrace.service.security import ClientSecurity, EndpointSecurity
from tensortrace.testing.waiting import wait_until
from tensortrace.v1 import control_pb2, control_pb2_grpc

pytestmark = pytest.mark.integration


@pytest.fixture
def exporter(ring_dir, pki):
    sec = EndpointSecurity(tls_cert=pki.path("server.crt"), tls_key=pki.path("server.key"),
                           token_file=pki.path("tokens"))
    cfg = ExporterConfig(ring_dir=ring_dir, kafka=KafkaConfig(bootstrap_servers="127.0.0.1:9"), control_port=0,
                         control_host="127.0.0.1", control_security=sec, allow_flat_rings=True, scan_interval_s=0.05,
                         default_control={"enabled": True, "selection": {"preset": "hidden-states"}})
    exp = Exporter(cfg).start()
    t = threading.Thread(target=exp.run, daemon=True)
    t.start()
    yield exp
    exp.stop()
    t.join(30)


def _ctl(pki, exp, *args, token: str | None) -> int:
    flags = ["--address", f"127.0.0.1:{exp.control_port}", "--tls-ca", pki.path("ca.crt")]
    if token:
        flags += ["--token-file", pki.path(token)]
    return ctl.main([*flags, *args])


def _samples(registry, name: str) -> dict:
    return {tuple(sorted(s.labels.items())): s.value for m in registry.collect() for s in m.samples
            if s.name == name}


def test_a_reader_cannot_change_capture_and_an_operator_can(ring_dir, exporter, pki, capsys, caplog):
    caplog.set_level(logging.INFO, logger="tensortrace.audit")
    w = RingWriter.create(os.path.join(ring_dir, "pod-a-r0.ring"), 1 << 16, RingIdentity(pod="pod-a"))
    assert wait_until(lambda: any(r.state == "attached" for r in exporter.status().rings), 30, 0.02)
    assert w.poll_control() == {"enabled": True, "selection": {"preset": "hidden-states"}}

    assert _ctl(pki, exporter, "set", "--enabled", "false", token=None) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert _ctl(pki, exporter, "set", "--enabled", "false", token="read.token") == 1
    err = capsys.readouterr().err
    assert "PERMISSION_DENIED" in err and "alice may not call SetCapture: it needs role control" in err
    assert w.poll_control() is None                                  # nothing changed
    assert _ctl(pki, exporter, "status", token="read.token") == 0    # a reader may look at the rings
    assert "pod-a-r0.ring" in capsys.readouterr().out

    assert _ctl(pki, exporter, "set", "--selection", '{"hooks": ["resid_pre"]}', "--enabled", "true",
                "--ring", "pod-a", token="control.token") == 0
    assert w.poll_control() == {"enabled": True, "selection": {"hooks": ["resid_pre"]}}
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tensortrace.audit"]
    # the refused attempts are audited too: who tried what (GetStatus is not a change: no line)
    assert [(x["identity"], x["result"], x.get("reason"), x["rings"]) for x in lines] == [
        ("unauthenticated", "UNAUTHENTICATED", "no_token", []), ("alice", "PERMISSION_DENIED", "wrong_role", []),
        ("ops", "OK", None, ["pod-a"])]
    ok = lines[-1]
    assert (ok["audit"], ok["identity"], ok["rpc"], ok["rings"], ok["result"]) == (
        "control", "ops", "SetCapture", ["pod-a"], "OK")
    assert ok["old"] == {"pod-a": {"enabled": True, "selection": {"preset": "hidden-states"}}}
    assert ok["new"] == {"enabled": True, "selection": {"hooks": ["resid_pre"]}}
    assert CONTROL_TOKEN not in caplog.text
    reg = exporter.registry
    changes = _samples(reg, "tensortrace_audit_control_changes_total")
    assert changes[(("endpoint", "control"), ("identity", "ops"), ("result", "OK"), ("rpc", "SetCapture"))] == 1
    fails = _samples(reg, "tensortrace_security_auth_failures_total")
    assert fails[(("endpoint", "control"), ("reason", "no_token"))] == 1
    assert fails[(("endpoint", "control"), ("reason", "wrong_role"))] == 1
    w.close()


def test_a_refused_call_is_refused_before_the_servicer_runs(exporter, pki):
    """A reader's SetCapture with an invalid document gets PERMISSION_DENIED, not the servicer's
    INVALID_ARGUMENT: authorization comes first and says nothing about the document."""
    sec = ClientSecurity(tls_ca=pki.path("ca.crt"), token_file=pki.path("read.token"))
    with sec.channel(f"127.0.0.1:{exporter.control_port}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            control_pb2_grpc.ExporterControlStub(ch).SetCapture(control_pb2.SetCaptureRequest(control_json="[1]"),
                                                                timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_the_exporter_refuses_to_start_its_control_endpoint_in_plaintext_off_loopback(ring_dir):
    from tensortrace.exporter.main import SERVICE
    from tensortrace.service.config import ConfigError

    with pytest.raises(ConfigError) as e:
        SERVICE.parse(["--ring-dir", ring_dir, "--control-host", "0.0.0.0", "--control-plaintext"])
    assert ("control_security.plaintext (--control-security-plaintext): refusing plaintext on 0.0.0.0, which is not "
            "a loopback address") in str(e.value)
    with pytest.raises(ConfigError, match="control endpoint has no TLS"):
        SERVICE.parse(["--ring-dir", ring_dir])
    cfg, _ = SERVICE.parse(["--ring-dir", ring_dir, "--control-host", "0.0.0.0", "--control-plaintext",
                            "--control-plaintext-any-address"])
    assert cfg.control_security.plaintext_any_address
    cfg, _ = SERVICE.parse(["--ring-dir", ring_dir, "--control-port", "-1"])   # no endpoint: nothing to secure
    assert cfg.control_port == -1
