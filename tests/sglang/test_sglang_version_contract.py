"""The version contract: every SGLang symbol the plugin touches (v0_5.py) exists in the installed
SGLang with the shape the plugin relies on. A failure names the symbol that moved."""

from __future__ import annotations

import dataclasses
import inspect
import pkgutil
import re

import pytest

from sglang_harness import require_sglang
from tensortrace.agent.backends.sglang import v0_5

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module", autouse=True)
def sglang_installed():
    require_sglang()


def resolve(dotted: str):
    try:
        return pkgutil.resolve_name(dotted)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"SGLang symbol {dotted} is gone in this SGLang ({e}); update "
                    f"tensortrace/agent/backends/sglang/v0_5.py or add a module for the new version range")


def test_installed_version_is_in_the_declared_range():
    from importlib.metadata import version

    v = tuple(int(x) for x in version("sglang").split(".")[:3] if x.isdigit())
    lo = tuple(int(x) for x in v0_5.VERSION_RANGE[0].lstrip(">=").split("."))
    hi = tuple(int(x) for x in v0_5.VERSION_RANGE[1].lstrip("<").split("."))
    assert lo <= v < hi, f"sglang {v} outside {v0_5.VERSION_RANGE}"


@pytest.mark.parametrize("name", sorted(v0_5.HOOK_TARGETS))
def test_every_hook_target_resolves_to_a_callable(name):
    target = v0_5.HOOK_TARGETS[name]
    assert callable(resolve(target)), f"{target} is not callable"


# (target, parameter names the plugin's hook function relies on, in order after self/cls)
SIGNATURES = {
    "model_runner_forward": ["forward_batch"],
    "forward_batch_init_new": ["batch", "model_runner"],
    "stream_output": ["reqs", "return_logprob"],
    "tokenizer_generate_request": ["obj", "request"],
    "model_runner_load_model": [],
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_hook_targets_take_the_arguments_the_plugin_reads(name):
    fn = resolve(v0_5.HOOK_TARGETS[name])
    params = [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]
    want = SIGNATURES[name]
    assert params[:len(want)] == want, f"{v0_5.HOOK_TARGETS[name]}{inspect.signature(fn)}: expected leading {want}"


def test_hook_registry_api():
    reg, hook_type = resolve(v0_5.HOOK_REGISTRY), resolve(v0_5.HOOK_TYPE)
    for member in ("BEFORE", "AFTER", "AROUND"):
        assert hasattr(hook_type, member), f"{v0_5.HOOK_TYPE}.{member} missing"
    assert list(inspect.signature(reg.register).parameters)[:3] == ["target", "hook", "hook_type"], \
        f"{v0_5.HOOK_REGISTRY}.register{inspect.signature(reg.register)}"
    import sglang.srt.plugins as plugins

    assert plugins.GENERAL_PLUGINS_GROUP == v0_5.PLUGIN_GROUP


def test_process_entry_functions_exist_and_load_plugins_first():
    import sglang.srt.managers.detokenizer_manager as detok
    import sglang.srt.managers.scheduler as sched

    for mod, fn in ((sched, "run_scheduler_process"), (detok, "run_detokenizer_process")):
        assert fn in v0_5.PROCESS_ENTRY_FUNCTIONS
        src = inspect.getsource(getattr(mod, fn))
        assert "load_plugins()" in src, f"{mod.__name__}.{fn} no longer calls load_plugins()"


def assigns(src: str, attr: str) -> bool:
    """`self.attr = ...`, `self.attr: T = ...` or `self.attr, self.other = ...` somewhere in src."""
    return re.search(rf"self\.{attr}\b[^\n=]*=(?!=)", src) is not None


def _field_names(cls):
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def test_forward_hooks_registrar_exists():
    """The `--forward-hooks` fallback (forward_hooks.py) is registered through SGLang's hook manager."""
    assert callable(resolve(v0_5.FORWARD_HOOKS_REGISTRAR))


def test_forward_batch_fields():
    fb = resolve(v0_5.FORWARD_BATCH)
    missing = set(v0_5.FORWARD_BATCH_FIELDS) - _field_names(fb)
    assert not missing, f"ForwardBatch lost fields {sorted(missing)}"


def test_forward_modes():
    fm = resolve(v0_5.FORWARD_MODE)
    for name in (*v0_5.MODES_CAPTURED, "IDLE", "TARGET_VERIFY"):
        assert hasattr(fm, name), f"ForwardMode.{name} is gone"


def test_model_runner_output_fields():
    assert set(v0_5.MODEL_RUNNER_OUTPUT_FIELDS) <= _field_names(resolve(v0_5.MODEL_RUNNER_OUTPUT))
    assert set(v0_5.LOGITS_OUTPUT_FIELDS) <= _field_names(resolve(v0_5.LOGITS_PROCESSOR_OUTPUT))


def test_model_runner_fields_are_set_in_its_source():
    src = inspect.getsource(resolve(v0_5.MODEL_RUNNER))
    for f in v0_5.MODEL_RUNNER_FIELDS:
        assert assigns(src, f), f"ModelRunner no longer sets self.{f}"


def test_req_fields_and_methods():
    req = resolve(v0_5.SCHEDULE_REQ)
    src = inspect.getsource(req.__init__)
    for f in v0_5.REQ_FIELDS:
        assert assigns(src, f), f"Req.__init__ no longer sets self.{f}"
    # the plugin reads finished_reason where SGLang asks finished(): the two must mean the same
    body = inspect.getsource(req.finished)
    assert f"return {v0_5.REQ_FINISHED}" in body, f"Req.finished() is no longer `{v0_5.REQ_FINISHED}`:\n{body}"


def test_custom_params_rides_in_sampling_params():
    sp = resolve(v0_5.SAMPLING_PARAMS)
    fields = getattr(sp, "__struct_fields__", None) or tuple(inspect.signature(sp).parameters)
    assert v0_5.SAMPLING_PARAMS_CUSTOM in fields, f"SamplingParams has no {v0_5.SAMPLING_PARAMS_CUSTOM}"


def test_tapped_modules_exist_in_sglang_model_classes():
    """The module attribute names of v0_5.MODULES are assigned in SGLang's model sources."""
    import sglang.srt.models.llama as llama
    import sglang.srt.models.qwen2 as qwen2
    import sglang.srt.models.qwen2_moe as qwen2_moe
    import sglang.srt.models.qwen3 as qwen3

    # Qwen3's model class reuses Qwen2's (it subclasses it): read both sources for it.
    for mod, srcs in ((llama, (llama,)), (qwen3, (qwen2, qwen3)), (qwen2_moe, (qwen2_moe,))):
        src = "".join(inspect.getsource(m) for m in srcs)
        for attr in ("layers", "embed_tokens", "input_layernorm", "post_attention_layernorm", "self_attn",
                     "qkv_proj", "mlp", "down_proj", "norm"):
            assert assigns(src, attr), f"{mod.__name__} no longer assigns self.{attr}"
    moe_src = inspect.getsource(qwen2_moe)
    for attr in ("gate", "topk"):
        assert assigns(moe_src, attr), f"{qwen2_moe.__name__} no longer assigns self.{attr}"


def test_rmsnorm_returns_normed_and_residual():
    """The taps read SGLang's fused add+RMSNorm output as (normed, residual)."""
    import torch

    rms = resolve(v0_5.RMSNORM)(8, eps=1e-6)
    x, r = torch.randn(3, 8), torch.randn(3, 8)
    out = rms.forward_native(x.clone(), r.clone())
    assert isinstance(out, tuple) and len(out) == 2
    torch.testing.assert_close(out[1], x + r)


def test_entry_point_is_registered_in_the_plugin_group():
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group=v0_5.PLUGIN_GROUP)}
    assert eps.get("tensortrace") == "tensortrace.agent.backends.sglang.plugin:install", eps


def test_a_moved_symbol_fails_naming_it():
    moved = "sglang.srt.model_executor.model_runner.ModelRunner.forward_that_moved"
    with pytest.raises(pytest.fail.Exception, match="forward_that_moved is gone"):
        resolve(moved)


def test_generate_request_input_class_name():
    cls = resolve(v0_5.GENERATE_REQ_INPUT_PATH)
    assert cls.__name__ == v0_5.GENERATE_REQ_INPUT
    assert "sampling_params" in _field_names(cls), "GenerateReqInput has no sampling_params"
