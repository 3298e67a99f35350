"""The tensor-geometry module (agent/_tensorgeom.cpp, built per torch version by agent/geometry.py):
what it reads from a TensorImpl equals what the tensor's own accessors say, it declines every
tensor that is not a plain dense CPU one, and a missing, foreign or failed build is a clear
one-line reason with DLPack taking over."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from tensortrace.agent import AgentConfig, CaptureAgent, Selection, native
from tensortrace.agent import geometry

pytestmark = pytest.mark.unit

CAP, WHY = geometry.load()
MOD = geometry.sys.modules.get(geometry.MODULE)
needs_module = pytest.mark.skipif(CAP is None, reason=f"tensor-geometry module not usable: {WHY}")


def test_setup_built_the_module_for_this_torch_where_a_compiler_is_present():
    """`make setup` runs `python -m tensortrace.agent.geometry build`: with a C++ compiler and
    torch's headers on this machine, the module for this exact torch is there and loads."""
    if geometry.compiler()[0] is None or not geometry.has_headers():
        pytest.skip("no C++ compiler or no torch headers here: the DLPack route is the expected one")
    assert CAP is not None, WHY
    assert MOD.TORCH_VERSION == torch.__version__ and MOD.ABI == geometry.ABI
    assert MOD.TORCH_BUILD == geometry.torch_build(torch) and MOD.SOURCE_SHA == geometry.source_sha()
    assert geometry.main(["status"]) == 0


def _accessors(t):
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.element_size(), t.dtype)


def _plain_tensors():
    base = torch.arange(6 * 5 * 4, dtype=torch.float32).reshape(6, 5, 4)
    yield "contiguous", base
    yield "offset view", base[2:]
    yield "column slice", base[:, 1:4, :]
    yield "transposed", base.transpose(0, 1)
    yield "expanded (stride 0)", torch.ones(1, 4).expand(3, 4)
    yield "scalar", torch.tensor(3.5)
    yield "empty", torch.empty(0, 8)
    yield "ten dims", torch.zeros([1] * 9 + [3])
    yield "parameter", torch.nn.Parameter(torch.randn(3, 2))
    yield "requires grad", torch.randn(2, 2, requires_grad=True)
    with torch.inference_mode():
        yield "inference mode", torch.randn(4, 3)
    for dt in (torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int8, torch.uint8,
               torch.bool, torch.complex64):
        yield str(dt), torch.zeros(3, 2, dtype=dt)


@needs_module
@pytest.mark.parametrize("name,t", list(_plain_tensors()), ids=[n for n, _ in _plain_tensors()])
def test_a_plain_tensor_reads_as_its_accessors_say(name, t):
    assert MOD.describe(t) == _accessors(t)


def _declined():
    class Sub(torch.Tensor):
        pass
    c = torch.randn(3, 2, dtype=torch.complex64)
    yield "subclass", torch.randn(3, 2).as_subclass(Sub)
    yield "conjugate view", c.conj()
    yield "negative view", torch._neg_view(c)
    yield "meta device", torch.empty(3, 2, device="meta")
    yield "functionalization wrapper", torch._to_functional_tensor(torch.randn(3, 2))   # a torch.Tensor, no data of its own
    yield "sparse", torch.eye(3).to_sparse()
    yield "eleven dims", torch.zeros([1] * 10 + [2])
    freed = torch.randn(10)
    view = freed[2:]
    freed.untyped_storage().resize_(0)   # as offloaders and FSDP free a parameter's storage
    yield "a view of a freed storage", view
    shrunk = torch.randn(10)
    tail = shrunk[6:]
    shrunk.untyped_storage().resize_(7 * 4)   # the view's last elements are gone
    yield "a view past its storage's end", tail
    yield "not a tensor", [1.0, 2.0]
    yield "None", None


@needs_module
@pytest.mark.parametrize("name,t", list(_declined()), ids=[n for n, _ in _declined()])
def test_everything_but_a_plain_dense_cpu_tensor_is_declined(name, t):
    """Declined means the tap takes its DLPack/accessor route, where these are handled (or
    handed to the Python path) as before."""
    assert MOD.describe(t) is None


def test_an_unbuilt_module_is_a_reason_naming_the_build_command(tmp_path, monkeypatch):
    monkeypatch.setenv(geometry.ENV_DIR, str(tmp_path))
    cap, why = geometry.load()
    assert cap is None
    assert f"not built for torch {geometry.torch_build(torch)}" in why and "python -m tensortrace.agent.geometry build" in why
    assert torch.__version__ in geometry.torch_build(torch)


@needs_module
def test_a_build_from_other_sources_is_stale_and_refused(monkeypatch):
    """A module compiled from an earlier _tensorgeom.cpp may accept tensors the current one
    declines: it is refused until rebuilt, even for the right torch."""
    monkeypatch.setattr(geometry, "source_sha", lambda: "0" * 16)
    cap, why = geometry.load()
    assert cap is None
    assert f"from sources {MOD.SOURCE_SHA}" in why and "0" * 16 in why and "rebuild" in why


def test_loading_never_raises_into_the_agent(monkeypatch):
    def broken():
        raise PermissionError("/opt/geom: permission denied")
    monkeypatch.setattr(geometry, "_load", broken)
    assert geometry.load() == (None, "the tensor-geometry module could not be loaded "
                                     "(PermissionError: /opt/geom: permission denied)")
    assert geometry.main(["status"]) == 1


def test_a_build_that_cannot_write_says_where_and_how_to_move_it(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(geometry.ENV_DIR, str(blocker / "geom"))   # under a file: no folder can be made
    path, why = geometry.build()
    assert path is None
    assert "cannot write the build under" in why and geometry.ENV_DIR in why


def test_the_environment_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv(geometry.ENV, "off")
    assert geometry.load() == (None, f"disabled by {geometry.ENV}=off")


@needs_module
def test_a_build_for_another_torch_refuses_to_load(tmp_path, monkeypatch):
    """A module compiled against torch A reads torch A's struct layouts: under torch B it must not
    be used, even if the file sits where B's build belongs."""
    monkeypatch.setenv(geometry.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(torch, "__version__", "9.9.9+other")
    dest = geometry.module_path(geometry.torch_build(torch))
    dest.parent.mkdir(parents=True)
    shutil.copy(MOD.__file__, dest)
    saved = geometry.sys.modules.pop(geometry.MODULE)
    try:
        cap, why = geometry.load()
    finally:
        geometry.sys.modules[geometry.MODULE] = saved
    assert cap is None
    assert f"built for torch {saved.TORCH_BUILD}" in why and "9.9.9+other" in why and "rebuild" in why


def test_a_file_that_is_not_the_module_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv(geometry.ENV_DIR, str(tmp_path))
    dest = geometry.module_path(geometry.torch_build(torch))
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"not an ELF file")
    saved = geometry.sys.modules.pop(geometry.MODULE, None)
    try:
        cap, why = geometry.load()
    finally:
        if saved is not None:
            geometry.sys.modules[geometry.MODULE] = saved
    assert cap is None and "does not load" in why and "rebuild" in why


@pytest.mark.parametrize("cxx,expect", [("/nonexistent/c++", "no C++ compiler"), ("/bin/false", "the compiler failed")])
def test_a_build_without_a_working_compiler_says_why_and_exits_zero(tmp_path, monkeypatch, capsys, cxx, expect):
    if expect == "the compiler failed" and not geometry.has_headers():
        pytest.skip("this torch ships no headers: the build stops before the compiler")
    monkeypatch.setenv(geometry.ENV_DIR, str(tmp_path))
    monkeypatch.setenv("CXX", cxx)
    path, why = geometry.build()
    assert path is None and expect in why
    assert not any(tmp_path.rglob("*.so*"))   # nothing half-written is left to load
    assert geometry.main(["build"]) == 0
    out = capsys.readouterr().out
    assert "not built" in out and expect in out and "DLPack" in out


@pytest.mark.skipif(native.load(required=True)[0] is None, reason="native path not built")
def test_the_capture_module_refuses_a_foreign_capsule():
    mod = native.load(required=True)[0]
    import datetime   # any capsule of another name: datetime's C API
    with pytest.raises(ValueError, match="tensortrace.agent._tensorgeom.geometry.v1|name"):
        mod.use_geometry(datetime.datetime_CAPI)
    if CAP is not None:
        mod.use_geometry(CAP)


def test_an_agent_says_which_route_it_reads_geometry_by(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(geometry.ENV_DIR, str(tmp_path))   # nothing built here
    caplog.set_level(logging.INFO, "tensortrace.agent")
    geometry._logged.clear()
    agent = CaptureAgent(AgentConfig(ring_dir=str(tmp_path / "r"), model_id="m", pod="p", ring_capacity=1 << 16),
                         Selection(hooks=frozenset({"resid_pre"})))
    try:
        if agent.capture_path != "native":
            assert agent.geometry_reason.startswith("the Python path")
            return
        assert "not built" in agent.geometry_reason
        assert sum("tensor geometry through DLPack" in r.getMessage() for r in caplog.records) == 1
    finally:
        agent.close()
