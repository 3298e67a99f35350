"""Control endpoint: `tensortrace exporterctl set/status` -> gRPC -> the control block of each
ring, where the agent reads it between steps (RingWriter.poll_control). Works while Kafka is down:
the control path does not depend on the broker."""

from __future__ import annotations

import json
import os
import threading

import pytest

from tensortrace.exporter import ctl
from tensortrace.exporter.config import ExporterConfig, KafkaConfig
from tensortrace.exporter.service import Exporter
from tensortrace.service.security import EndpointSecurity
from tensortrace.ring.format import RingIdentity, RingWriter
from tensortrace.testing.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def exporter_without_kafka(ring_dir):
    # port 9 (discard) on localhost: nothing listens, so Kafka stays unreachable
    cfg = ExporterConfig(ring_dir=ring_dir, kafka=KafkaConfig(bootstrap_servers="127.0.0.1:9"), control_port=0,
                         control_host="127.0.0.1", control_security=EndpointSecurity.loopback_plaintext(), allow_flat_rings=True,   # the flat layout (development)
                         scan_interval_s=0.05, default_control={"enabled": True, "selection": {"preset": "hidden-states"}})
    exp = Exporter(cfg).start()
    t = threading.Thread(target=exp.run, daemon=True)
    t.start()
    yield exp
    exp.stop()
    t.join(30)


@pytest.fixture
def exporter_http_port(exporter_without_kafka):
    """The port of /healthz, /readyz, /metrics: the service runtime's endpoint over the exporter."""
    from tensortrace.service.endpoint import HttpEndpoint

    endpoint = HttpEndpoint(exporter_without_kafka, "127.0.0.1", 0).start()
    yield endpoint.port
    endpoint.stop()


def _wait_attached(exp, n):
    assert wait_until(lambda: len([r for r in exp.status().rings if r.state == "attached"]) >= n, 30, 0.02)


def test_set_and_status_through_exporterctl_reach_every_ring(ring_dir, exporter_without_kafka, capsys):
    exp = exporter_without_kafka
    wa = RingWriter.create(os.path.join(ring_dir, "pod-a-r0.ring"), 1 << 16, RingIdentity(pod="pod-a"))
    wb = RingWriter.create(os.path.join(ring_dir, "pod-b-r0.ring"), 1 << 16, RingIdentity(pod="pod-b"))
    _wait_attached(exp, 2)
    # a ring gets the node's default document when it is attached
    assert wa.poll_control() == {"enabled": True, "selection": {"preset": "hidden-states"}}
    assert wb.poll_control() == {"enabled": True, "selection": {"preset": "hidden-states"}}
    addr = f"127.0.0.1:{exp.control_port}"
    assert ctl.main(["--address", addr, "set", "--enabled", "false"]) == 0
    assert wa.poll_control() == {"enabled": False} and wb.poll_control() == {"enabled": False}
    # one pod only, by pod name; the other ring keeps its document
    assert ctl.main(["--address", addr, "set", "--selection", '{"hooks": ["logits"], "layers": "0-1"}',
                     "--enabled", "true", "--ring", "pod-b"]) == 0
    assert wb.poll_control() == {"enabled": True, "selection": {"hooks": ["logits"], "layers": "0-1"}}
    assert wa.poll_control() is None   # unchanged since the last poll
    # a complete document is forwarded as is (the agent owns its schema)
    doc = {"version": 1, "enabled": True, "selection": {"preset": "full", "sample": {"every": 4}}}
    assert ctl.main(["--address", addr, "set", "--doc", json.dumps(doc), "--ring", "pod-a-r0.ring"]) == 0
    assert wa.poll_control() == doc
    out = capsys.readouterr().out
    assert "pod-a-r0.ring: written (control seq" in out
    # a ring that appears later gets the last node-wide document
    wc = RingWriter.create(os.path.join(ring_dir, "pod-c-r0.ring"), 1 << 16, RingIdentity(pod="pod-c"))
    _wait_attached(exp, 3)
    assert wc.poll_control() == {"enabled": False}
    # status: rings, generations, Kafka state
    assert ctl.main(["--address", addr, "status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    rings = {r["ring"]: r for r in st["rings"]}
    assert set(rings) == {"pod-a-r0.ring", "pod-b-r0.ring", "pod-c-r0.ring"}
    assert rings["pod-a-r0.ring"]["generation"] == str(wa.header.generation)
    assert json.loads(rings["pod-a-r0.ring"]["control_json"]) == doc
    assert not st.get("kafka_connected", False)
    assert ctl.main(["--address", addr, "status"]) == 0
    assert "kafka: NOT connected" in capsys.readouterr().out
    for w in (wa, wb, wc):
        w.close()


def test_invalid_control_documents_are_rejected_with_the_reason(ring_dir, exporter_without_kafka, capsys):
    addr = f"127.0.0.1:{exporter_without_kafka.control_port}"
    assert ctl.main(["--address", addr, "set", "--doc", "[1, 2]"]) == 1
    assert "INVALID_ARGUMENT: control_json must be a JSON object, got list" in capsys.readouterr().err
    assert ctl.main(["--address", addr, "set", "--selection", "{nope"]) == 1
    assert "selection_json is not JSON" in capsys.readouterr().err
    assert ctl.main(["--address", addr, "set", "--doc", json.dumps({"x": "y" * 5000})]) == 1
    assert "the ring control block holds at most" in capsys.readouterr().err
    assert ctl.main(["--address", addr, "set"]) == 1
    assert "empty request" in capsys.readouterr().err


def test_readiness_is_false_while_kafka_is_unreachable(exporter_http_port):
    import urllib.request
    import urllib.error
    port = exporter_http_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
        assert r.status == 200
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5)
    assert e.value.code == 503 and b"not connected to Kafka" in e.value.read()
