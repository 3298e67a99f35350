"""TensorTrace's SGLang backend: the capture agent inside an unmodified SGLang server, as a plugin.

- plugin.py        entry point `sglang.srt.plugins` -> install(); SGLangCapture (per scheduler process)
- batch_layout.py  ForwardBatch -> StepLayout for every forward mode
- taps.py          taps on SGLang's model modules + start-up self-check
- request_options.py  per-request options / traceparent through custom_params
- forward_hooks.py the `--forward-hooks` fallback for SGLang without plugins
- v0_5.py          every SGLang symbol used, for SGLang 0.5.x (the version contract)
- config.py        TENSORTRACE_* environment variables

docs/sglang.md says how to enable it on a fleet.
"""
