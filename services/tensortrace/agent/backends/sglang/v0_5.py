"""Every SGLang symbol the TensorTrace plugin touches, for SGLang 0.5.x (pinned and tested: 0.5.23).

One place per SGLang version range (docs/sglang.md lists them): when SGLang moves something, this
module changes and nothing else does. tests/sglang/test_sglang_version_contract.py resolves every entry
below against the installed SGLang and fails naming the symbol that moved.

Nothing here imports SGLang at import time: the plugin resolves the dotted paths lazily, inside
SGLang's own processes.

>>> from tensortrace.agent.backends.sglang import v0_5
>>> v0_5.HOOK_TARGETS["model_runner_forward"]
'sglang.srt.model_executor.model_runner.ModelRunner.forward'
"""

from __future__ import annotations

# The range this module speaks for. Plugins (entry point group `sglang.srt.plugins` + HookRegistry)
# exist from 0.5.10; `ForwardBatch.rids` from 0.5.15 (older: taken from the ScheduleBatch's reqs).
VERSION_RANGE = (">=0.5.10", "<0.6")
PLUGIN_GROUP = "sglang.srt.plugins"

# HookRegistry (sglang/srt/plugins/hook_registry.py): register(target, fn, HookType.X).
HOOK_REGISTRY = "sglang.srt.plugins.hook_registry.HookRegistry"
HOOK_TYPE = "sglang.srt.plugins.hook_registry.HookType"

# Dotted targets the plugin wraps, with the hook type and the signature it relies on.
HOOK_TARGETS = {
    # AFTER, fn(result, self): the model is loaded, CUDA graphs are not captured yet -> place taps.
    "model_runner_load_model": "sglang.srt.model_executor.model_runner.ModelRunner.load_model",
    # AROUND, fn(original, self, forward_batch, *args, **kwargs) -> ModelRunnerOutput.
    "model_runner_forward": "sglang.srt.model_executor.model_runner.ModelRunner.forward",
    # AFTER (classmethod), fn(result, cls, batch: ScheduleBatch, model_runner, **kw): batch.reqs.
    "forward_batch_init_new": "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
    # AFTER, fn(result, self, reqs, return_logprob, skip_req=None): finished requests.
    "stream_output": ("sglang.srt.managers.scheduler_components.output_streamer."
                      "SchedulerOutputStreamer.stream_output"),
    # BEFORE, fn(self, obj: GenerateReqInput, request: fastapi.Request | None): main process.
    "tokenizer_generate_request": "sglang.srt.managers.tokenizer_manager.TokenizerManager.generate_request",
}

# Functions whose frames identify the process a plugin was loaded in (load_plugins() is their
# first statement; processes are spawned, so the parent's patches do not carry over).
PROCESS_ENTRY_FUNCTIONS = {
    "run_scheduler_process": "scheduler",           # sglang/srt/managers/scheduler.py
    "run_detokenizer_process": "detokenizer",       # sglang/srt/managers/detokenizer_manager.py
    "run_data_parallel_controller_process": "dp_controller",  # data_parallel_controller.py
}

# Classes and enums read (not wrapped).
FORWARD_MODE = "sglang.srt.model_executor.forward_batch_info.ForwardMode"
FORWARD_BATCH = "sglang.srt.model_executor.forward_batch_info.ForwardBatch"
MODEL_RUNNER = "sglang.srt.model_executor.model_runner.ModelRunner"
MODEL_RUNNER_OUTPUT = "sglang.srt.model_executor.model_runner.ModelRunnerOutput"
LOGITS_PROCESSOR_OUTPUT = "sglang.srt.layers.logits_processor.LogitsProcessorOutput"
GENERATE_REQ_INPUT = "GenerateReqInput"  # class name of the request object generate_request receives
GENERATE_REQ_INPUT_PATH = "sglang.srt.managers.io_struct.GenerateReqInput"
SCHEDULE_REQ = "sglang.srt.managers.schedule_batch.Req"
SAMPLING_PARAMS = "sglang.srt.sampling.sampling_params.SamplingParams"
RMSNORM = "sglang.srt.layers.layernorm.RMSNorm"
FORWARD_HOOKS_REGISTRAR = "sglang.srt.model_executor.hook_manager.register_forward_hooks"
PARALLEL_STATE = "sglang.srt.runtime_context.get_parallel"  # .tp_rank, .tp_size

# Forward modes by name (ForwardMode members). What the layout adapter does with each:
MODES_CAPTURED = ("EXTEND", "DECODE", "MIXED")
MODES_SKIPPED = {
    "IDLE": "no rows (data-parallel attention worker without requests)",
    "TARGET_VERIFY": "speculative verify: rows are draft candidates, not yet accepted tokens",
    "DRAFT_EXTEND_V2": "draft model forward",
    "PREBUILT": "disaggregated decode: KV cache arrives prebuilt, no model rows",
    "SPLIT_PREFILL": "layer-split prefill (PD multiplexing): one forward spans several calls",
    "DLLM_EXTEND": "diffusion LLM extend",
}

# Fields of ForwardBatch the layout adapter reads (all host-side: no device sync).
FORWARD_BATCH_FIELDS = (
    "forward_mode", "batch_size", "input_ids", "seq_lens_cpu", "extend_seq_lens_cpu",
    "extend_prefix_lens_cpu", "rids",
)
# Fields of ModelRunner the plugin reads.
MODEL_RUNNER_FIELDS = ("model", "is_draft_worker", "model_config", "decode_cuda_graph_runner")
# Fields of Req (schedule_batch.Req) the plugin reads.
REQ_FIELDS = ("rid", "origin_input_ids", "output_ids", "sampling_params", "finished_reason")
# Req.finished() is this expression of its fields (the plugin reads the field instead of calling it).
REQ_FINISHED = "self.finished_reason is not None"
# Fields of ModelRunnerOutput / LogitsProcessorOutput.
MODEL_RUNNER_OUTPUT_FIELDS = ("logits_output", "can_run_graph")
LOGITS_OUTPUT_FIELDS = ("next_token_logits",)
# SamplingParams field where per-request options and the trace context ride from the HTTP /
# OpenAI API into the scheduler.
SAMPLING_PARAMS_CUSTOM = "custom_params"
CUSTOM_PARAMS_KEY = "tensortrace"      # custom_params["tensortrace"] = {"capture": true, "preset": ...}
CUSTOM_PARAMS_TRACEPARENT = "traceparent"

# Module names (relative to ModelRunner.model) of the taps, for dense Llama / Qwen2 / Qwen3 and
# Qwen2-MoE / Qwen3-MoE / Mixtral. {L} is the decoder layer index. SGLang's fused add+RMSNorm
# returns (normed, residual): the residual is the stream entering attention (input_layernorm,
# layers > 0) or entering the MLP (post_attention_layernorm).
MODULES = {
    "layers": "model.layers",
    "embed_tokens": "model.embed_tokens",
    "input_layernorm": "model.layers.{L}.input_layernorm",
    "post_attention_layernorm": "model.layers.{L}.post_attention_layernorm",
    "self_attn": "model.layers.{L}.self_attn",
    "qkv_proj": "model.layers.{L}.self_attn.qkv_proj",
    "mlp": "model.layers.{L}.mlp",
    "down_proj": "model.layers.{L}.mlp.down_proj",
    "moe_gate": "model.layers.{L}.mlp.gate",
    "moe_topk": "model.layers.{L}.mlp.topk",
    "final_norm": "model.norm",
}
# Architectures (config.architectures[0]) whose module names above were checked.
ARCHITECTURES = {
    "LlamaForCausalLM": "dense",
    "MistralForCausalLM": "dense",
    "Qwen2ForCausalLM": "dense",
    "Qwen3ForCausalLM": "dense",
    "Qwen2MoeForCausalLM": "moe",
    "Qwen3MoeForCausalLM": "moe",
    "MixtralForCausalLM": "moe",
}

# SGLang's own trace of a request (--enable-trace; sglang/srt/observability/trace.py, req_time_stats.py):
# Req.time_stats (SchedulerReqTimeStats) .trace_ctx is a TraceReqContext (TraceReqContextAsync with
# SGLANG_TRACE_ASYNC=1) when tracing, else a TraceNullContext, whose __getattr__ returns itself for
# any name, so `tracing_enable` (False on it) is checked first. `root_span_context` is an OpenTelemetry
# Context holding the root request span (in the scheduler: rebuilt from the tokenizer's W3C carrier,
# a NonRecordingSpan). Traces SGLang starts itself (no incoming traceparent) have 64-bit ids
# (TraceCustomIdGenerator.generate_trace_id: getrandbits(64), so the upper 8 bytes are zero).
REQ_TIME_STATS = "time_stats"
TIME_STATS_TRACE_CTX = "trace_ctx"
TRACE_CTX_ENABLED = "tracing_enable"
TRACE_CTX_ROOT = "root_span_context"
TRACE_REQ_CONTEXT = "sglang.srt.observability.trace.TraceReqContext"
TRACE_NULL_CONTEXT = "sglang.srt.observability.trace.TraceNullContext"

_get_current_span = None


def engine_root_span(req) -> tuple[int, int] | None:
    """(trace id, span id) of SGLang's root request span for a scheduler `Req`, as integers; None when
    SGLang does not trace this request. Attribute reads and a dict lookup only (runs on the scheduler
    thread once per new request: no I/O, no lock, no device work).

    >>> engine_root_span(object()) is None
    True
    """
    global _get_current_span
    ctx = getattr(getattr(req, REQ_TIME_STATS, None), TIME_STATS_TRACE_CTX, None)
    if ctx is None or getattr(ctx, TRACE_CTX_ENABLED, False) is not True:
        return None
    root = getattr(ctx, TRACE_CTX_ROOT, None)
    if root is None:
        return None
    if _get_current_span is None:
        from opentelemetry.trace import get_current_span   # imported by SGLang already when it traces
        _get_current_span = get_current_span
    sc = _get_current_span(root).get_span_context()
    if not sc.is_valid:
        return None
    return sc.trace_id, sc.span_id
