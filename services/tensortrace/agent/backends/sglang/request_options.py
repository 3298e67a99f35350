"""Per-request capture options and trace context, carried in SGLang's `sampling_params.custom_params`.

custom_params survives from the HTTP / OpenAI-compatible API to the scheduler in every SGLang
0.5.x version, so it is where a request tells the agent what it wants:

    POST /generate        {"text": ..., "sampling_params": {"custom_params":
                              {"tensortrace": {"capture": true, "preset": "full", "layers": "0-3"}}}}
    POST /v1/completions  {..., "custom_params": {"tensortrace": {"capture": false}}}
                          (openai client: extra_body={"custom_params": {"tensortrace": {...}}})

The plugin's TokenizerManager hook copies the request's W3C `traceparent` header into
custom_params["traceparent"] (unless the client already put one there), and rejects invalid
options with a ValueError, which SGLang answers as HTTP 400 — before the request is scheduled.

>>> options_of({"tensortrace": {"capture": True}, "traceparent": "00-...-01"})
({'capture': True}, '00-...-01')
"""

from __future__ import annotations

from tensortrace.agent.backends.sglang import v0_5
from tensortrace.agent.selection import Selection, SelectionError

def options_of(custom_params) -> tuple[dict | None, str | None]:
    """(capture options or None, traceparent or None) from a request's custom_params."""
    if not isinstance(custom_params, dict):
        return None, None
    opts = custom_params.get(v0_5.CUSTOM_PARAMS_KEY)
    tp = custom_params.get(v0_5.CUSTOM_PARAMS_TRACEPARENT)
    return (dict(opts) if isinstance(opts, dict) else None), (tp if isinstance(tp, str) else None)


def validate_options(options) -> None:
    """Raise ValueError saying what is wrong with a request's custom_params["tensortrace"]
    (the agent's own rules: Selection.for_request)."""
    if options is None:
        return
    try:
        Selection().for_request(options)
    except SelectionError as e:
        raise ValueError(f"custom_params.{v0_5.CUSTOM_PARAMS_KEY}: {e}") from None


def stamp_request(obj, traceparent: str | None) -> None:
    """Main process, before SGLang normalizes a GenerateReqInput: validate our options and copy the
    traceparent header into each sampling_params' custom_params."""
    sp = getattr(obj, "sampling_params", None)
    if sp is None:
        if not traceparent:
            return
        sp = {}
        obj.sampling_params = sp
    for params in (sp if isinstance(sp, list) else [sp]):
        if not isinstance(params, dict):
            continue
        custom = params.get(v0_5.SAMPLING_PARAMS_CUSTOM)
        if custom is not None and not isinstance(custom, dict):
            continue
        if custom is not None:
            validate_options(custom.get(v0_5.CUSTOM_PARAMS_KEY))
        if traceparent and not (custom or {}).get(v0_5.CUSTOM_PARAMS_TRACEPARENT):
            custom = dict(custom or {})
            custom[v0_5.CUSTOM_PARAMS_TRACEPARENT] = traceparent
            params[v0_5.SAMPLING_PARAMS_CUSTOM] = custom
