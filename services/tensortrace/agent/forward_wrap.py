"""Module taps without PyTorch hooks: the module's `forward` wrapped, so `_call_impl` stays fast.

A PyTorch forward (pre-)hook puts its module on `nn.Module._call_impl`'s slow path, a Python loop
over the global and per-module hook dicts that runs cache-cold between kernels: on the capture
benchmark's 8-layer CPU model 67 no-op hooks (the `full` preset's modules) cost a decode step
+1.5-1.8%, about 8 µs each, more than the agent's own work for every tap (1%). A wrapper set as
the module's instance attribute `forward` keeps `_call_impl` on its fast path
(`return forward_call(*args, **kwargs)`) and calls the taps itself, with the arguments torch gives
a hook: pre taps `(module, args[, kwargs])`, post taps `(module, args[, kwargs], output)`
(docs/agent.md "Module taps").

    handle = attach(module, fn, pre=False, with_kwargs=True)     # like register_forward_hook
    handle.remove()
    attach(module, fn, pre=True, mechanism="hooks")               # PyTorch's hooks instead

The wrapper is agent/_capture.c's `ForwardWrap` where the native extension is built (one C call:
the pass-through to the original forward is a vectorcall), else `PyForwardWrap` below (same
behaviour, a Python frame more). One wrapper per module carries all its taps; it is removed with
its last tap, restoring whatever `forward` the module had (its class's, or another library's
instance wrapper such as accelerate's). Differences from hooks, by design: a tap's return value is
ignored (taps observe, never replace inputs or outputs); pre taps see the arguments after any
PyTorch pre-hooks of other libraries ran, post taps see the output before their forward hooks run,
i.e. exactly what the module computed. If something else replaced `forward` on top of ours, removal
leaves ours in place as a pass-through (a C call) rather than break the other wrapper.

`mechanism`: "forward" (default) or "hooks" (PyTorch's hooks; AgentConfig.module_taps, environment
TENSORTRACE_MODULE_TAPS), for setups where a module's forward must stay the class's own.
"""

from __future__ import annotations

import weakref

MECHANISMS = ("forward", "hooks")


class PyForwardWrap:
    """The pure-Python wrapper (where agent/_capture.c is not built): same contract as ForwardWrap."""

    __slots__ = ("module", "__wrapped__", "pre", "post", "__weakref__")

    def __init__(self, module, forward):
        if not callable(forward):
            raise TypeError("PyForwardWrap(module, forward): forward must be callable")
        self.module = module
        self.__wrapped__ = forward
        self.pre = ()
        self.post = ()

    def __deepcopy__(self, memo):
        # a copied model is not instrumented: it gets the wrapped forward's copy, untapped
        import copy

        return copy.deepcopy(self.__wrapped__, memo)

    def __call__(self, *args, **kwargs):
        pre, post = self.pre, self.post
        if not pre and not post:
            return self.__wrapped__(*args, **kwargs)
        module = self.module
        for fn, kw in pre:
            fn(module, args, kwargs) if kw else fn(module, args)
        out = self.__wrapped__(*args, **kwargs)
        for fn, kw in post:
            fn(module, args, kwargs, out) if kw else fn(module, args, out)
        return out


def mechanism_of(agent) -> str:
    """How a backend's taps reach their modules for `agent`: its AgentConfig.module_taps
    ("forward" for an agent without a config, e.g. a test double)."""
    return getattr(getattr(agent, "config", None), "module_taps", "forward")


def _wrapper_type():
    from tensortrace.agent import native

    mod, _ = native.load()
    return getattr(mod, "ForwardWrap", None) or PyForwardWrap


# module -> (wrapper, the instance `forward` it replaced or _CLASS when there was none)
_installed: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_CLASS = object()


class ForwardTapHandle:
    """Removes one tap (and the module's wrapper with its last tap). Idempotent, like torch's."""

    __slots__ = ("module_ref", "entry", "pre")

    def __init__(self, module, entry, pre: bool):
        self.module_ref = weakref.ref(module)
        self.entry = entry
        self.pre = pre

    def remove(self) -> None:
        module = self.module_ref()
        entry, self.entry = self.entry, None
        if module is None or entry is None:
            return
        got = _installed.get(module)
        if got is None:
            return
        wrap, previous = got
        if self.pre:
            wrap.pre = tuple(e for e in wrap.pre if e is not entry)
        else:
            wrap.post = tuple(e for e in wrap.post if e is not entry)
        if wrap.pre or wrap.post:
            return
        if module.__dict__.get("forward") is wrap:
            if previous is _CLASS:
                del module.forward
            else:
                module.forward = previous
            del _installed[module]
        # else: another wrapper was set on top of ours; ours stays, empty (a pass-through), and is
        # reused by the next attach


def attach(module, fn, *, pre: bool, with_kwargs: bool = False, mechanism: str = "forward"):
    """Tap `module`'s forward with `fn` (called as a PyTorch forward (pre-)hook would be; its return
    value is ignored). Returns a handle with remove()."""
    if mechanism == "hooks":
        if pre:
            return module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
        return module.register_forward_hook(fn, with_kwargs=with_kwargs)
    if mechanism != "forward":
        raise ValueError(f"module tap mechanism {mechanism!r}: choose from {', '.join(MECHANISMS)}")
    got = _installed.get(module)
    if got is not None and not _reachable(module, got[0]):
        got = None   # something replaced forward without keeping ours underneath: wrap afresh
    if got is None:
        had = module.__dict__.get("forward", _CLASS)
        wrap = _wrapper_type()(module, module.forward)
        module.forward = wrap
        _installed[module] = (wrap, had)
    else:
        wrap = got[0]
    entry = (fn, bool(with_kwargs))
    if pre:
        wrap.pre = wrap.pre + (entry,)
    else:
        wrap.post = wrap.post + (entry,)
    return ForwardTapHandle(module, entry, pre)


def _reachable(module, wrap) -> bool:
    """Whether a call of module.forward still goes through `wrap` (following __wrapped__ links,
    which functools.update_wrapper-style wrappers such as accelerate's set)."""
    f = module.__dict__.get("forward")
    for _ in range(16):
        if f is wrap:
            return True
        f = getattr(f, "__wrapped__", None)
        if f is None:
            return False
    return False


def taps_on(module) -> int:
    """Taps this module's wrapper carries now (0 without one); PyTorch hooks are not counted."""
    got = _installed.get(module)
    if got is None or not _reachable(module, got[0]):
        return 0
    return len(got[0].pre) + len(got[0].post)


def wrapped_modules() -> int:
    """Modules carrying a wrapper now (tests, diagnostics)."""
    return sum(1 for m, (w, _) in list(_installed.items()) if _reachable(m, w))
