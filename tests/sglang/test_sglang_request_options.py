"""Per-request options and trace context through custom_params (main-process side of the plugin)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tensortrace.agent.backends.sglang.config import SGLangBackendConfig, parse_size
from tensortrace.agent.backends.sglang.request_options import options_of, stamp_request, validate_options

pytestmark = pytest.mark.unit
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_traceparent_header_is_copied_into_custom_params():
    obj = SimpleNamespace(sampling_params={"max_new_tokens": 3})
    stamp_request(obj, TP)
    assert obj.sampling_params == {"max_new_tokens": 3, "custom_params": {"traceparent": TP}}
    assert options_of(obj.sampling_params["custom_params"]) == (None, TP)


def test_existing_custom_params_are_kept_and_a_client_traceparent_wins():
    mine = "00-11111111111111111111111111111111-2222222222222222-01"
    obj = SimpleNamespace(sampling_params={"custom_params": {"traceparent": mine, "x": 1}})
    stamp_request(obj, TP)
    assert obj.sampling_params["custom_params"] == {"traceparent": mine, "x": 1}


def test_batch_requests_stamp_every_sampling_params_and_none_gets_created():
    obj = SimpleNamespace(sampling_params=[{}, {"custom_params": {"tensortrace": {"capture": True}}}])
    stamp_request(obj, TP)
    assert [p["custom_params"]["traceparent"] for p in obj.sampling_params] == [TP, TP]
    assert obj.sampling_params[1]["custom_params"]["tensortrace"] == {"capture": True}
    empty = SimpleNamespace(sampling_params=None)
    stamp_request(empty, TP)
    assert empty.sampling_params == {"custom_params": {"traceparent": TP}}
    untouched = SimpleNamespace(sampling_params=None)
    stamp_request(untouched, None)
    assert untouched.sampling_params is None


@pytest.mark.parametrize("options, message", [
    ({"preset": "nope"}, "unknown preset 'nope'"),
    ({"capture": "yes"}, "capture must be true or false"),
    ({"layers": "3-1"}, "layers"),
    ({"colour": "red"}, "unknown keys"),
    ("full", "must be a dict"),
])
def test_bad_options_raise_value_error_naming_the_problem(options, message):
    obj = SimpleNamespace(sampling_params={"custom_params": {"tensortrace": options}})
    with pytest.raises(ValueError, match=message):
        stamp_request(obj, None)


def test_good_options_pass():
    validate_options({"capture": True, "preset": "full", "layers": "0-1", "positions": "last"})
    assert options_of({"tensortrace": {"capture": False}}) == ({"capture": False}, None)
    assert options_of(None) == (None, None)


def test_env_config_parses_and_validates():
    cfg = SGLangBackendConfig.from_env({"TENSORTRACE_RING_DIR": "/tmp/x", "TENSORTRACE_RING_CAPACITY": "64M",
                                        "TENSORTRACE_SELECTION": '{"preset": "logits", "layers": "0-3"}'})
    cfg.validate()
    assert cfg.ring_capacity == 64 << 20
    assert cfg.selection_doc() == {"selection": {"preset": "logits", "layers": "0-3"}}
    assert parse_size("1G") == 1 << 30 and parse_size("4096") == 4096
    bad = SGLangBackendConfig.from_env({"TENSORTRACE_OVERFLOW": "explode", "TENSORTRACE_CUDA_GRAPH": "maybe",
                                        "TENSORTRACE_SELECTION": "no-such-preset"})
    with pytest.raises(ValueError) as e:
        bad.validate()
    for part in ("TENSORTRACE_OVERFLOW 'explode'", "TENSORTRACE_CUDA_GRAPH 'maybe'", "no-such-preset"):
        assert part in str(e.value)
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")
