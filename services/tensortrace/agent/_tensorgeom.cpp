// A tensor's geometry read straight from its TensorImpl, for the native taps (agent/_capture.c).
//
// A tap needs a tensor's data pointer, shape, strides, element size and dtype. Without this module
// _capture.c asks torch for them through torch._C._to_dlpack: one call, but one that allocates an
// export (a shared reference to the tensor, copied shape and strides, a capsule) and frees it again,
// ~9 us when the caches are cold, as they are between a model's kernels (docs/agent.md, "Tensor
// geometry without a torch call"). Here the same facts are plain loads from the THPVariable and its
// TensorImpl, through torch's own inline accessors: the layouts come from the headers of the torch
// this module is compiled against, never from offsets guessed at run time. That is also why the
// module is built per torch version (agent/geometry.py) and refuses to load under another.
//
// The function answers only the plain case: an exact torch.Tensor or Parameter (no subclass), dense,
// strided, on the CPU, with only the dispatch keys a plain CPU tensor has (so no conjugate/negative
// view, no Python dispatch, no functionalization wrapper), at most TT_GEOMETRY_MAX_DIMS dimensions,
// and an allocated storage that holds every element the view can reach. Everything else answers 0
// and the caller takes its DLPack/accessor path.
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/DynamicTypes.h>

#include "tensorgeom.h"

namespace {

const c10::DispatchKeySet kPlainCpuKeys({c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView,
                                          c10::DispatchKey::AutogradCPU, c10::DispatchKey::AutocastCPU});

int geometry(PyObject *obj, TTGeometry *g) noexcept {
    if (!THPVariable_CheckExact(obj)) return 0;
    try {
        const at::Tensor &t = THPVariable_Unpack(obj);
        const c10::TensorImpl *impl = t.unsafeGetTensorImpl();
        if (impl == nullptr || !impl->is_cpu() || impl->layout() != c10::kStrided) return 0;
        if (impl->is_python_dispatch() || impl->is_conj() || impl->is_neg() || !impl->has_storage()) return 0;
        // Only the keys a plain CPU tensor carries: any other (Functionalize, a wrapper's, a
        // backend's) means the TensorImpl is not the data's owner and the pointer may not be real.
        // (bitwise: DispatchKeySet's `-` keeps backend bits, so a subset test on the raw bits)
        if ((impl->key_set().raw_repr() & ~kPlainCpuKeys.raw_repr()) != 0) return 0;
        const int64_t nd = impl->dim();
        if (nd < 0 || nd > TT_GEOMETRY_MAX_DIMS) return 0;
        c10::IntArrayRef sizes = impl->sizes(), strides = impl->strides();
        const int64_t itemsize = (int64_t)impl->itemsize();
        // The elements the view can reach, from its first: 1 + sum((size - 1) * stride).
        int64_t extent = 1;
        for (int64_t i = 0; i < nd; i++) {
            g->sizes[i] = sizes[i];
            g->strides[i] = strides[i];
            if (sizes[i] == 0) extent = 0;
            int64_t step = 0;
            if (strides[i] < 0 || __builtin_mul_overflow(sizes[i] > 0 ? sizes[i] - 1 : 0, strides[i], &step) ||
                (extent != 0 && __builtin_add_overflow(extent, step, &extent))) return 0;
        }
        g->ndim = (int)nd;
        if (extent != 0) {
            // A storage that was freed (resize_(0), as offloaders and FSDP do) or is too small for
            // the view: data() would still return base + offset; the accessors' data_ptr() raises,
            // and so the tap takes the general route, which handles it.
            if (!impl->storage_initialized()) return 0;
            int64_t end = 0;
            if (__builtin_add_overflow(impl->storage_offset(), extent, &end) ||
                __builtin_mul_overflow(end, itemsize, &end) || (uint64_t)end > impl->storage().nbytes()) return 0;
        }
        // data() const: the pointer with the storage offset applied, without materialising a
        // copy-on-write storage (mutable access would); the tap only reads.
        g->data = impl->data();
        if (g->data == nullptr && extent != 0) return 0;
        g->elem = (int)itemsize;
        // torch's own table of torch.dtype objects (borrowed references, alive as long as torch)
        g->dtype = reinterpret_cast<PyObject *>(torch::getTHPDtype(impl->dtype().toScalarType()));
        return g->dtype != nullptr;
    } catch (...) {
        return 0;
    }
}

// describe(tensor): what geometry() reads, as Python values, or None where it declines (tests
// compare it with the tensor's own accessors; the taps use the capsule).
PyObject *describe(PyObject *, PyObject *obj) {
    TTGeometry g;
    if (!geometry(obj, &g)) Py_RETURN_NONE;
    PyObject *sizes = PyTuple_New(g.ndim), *strides = PyTuple_New(g.ndim);
    if (sizes == nullptr || strides == nullptr) {
        Py_XDECREF(sizes);
        Py_XDECREF(strides);
        return nullptr;
    }
    for (int i = 0; i < g.ndim; i++) {
        PyTuple_SET_ITEM(sizes, i, PyLong_FromLongLong(g.sizes[i]));
        PyTuple_SET_ITEM(strides, i, PyLong_FromLongLong(g.strides[i]));
    }
    return Py_BuildValue("(KNNiO)", (unsigned long long)(uintptr_t)g.data, sizes, strides, g.elem, g.dtype);
}

PyMethodDef methods[] = {
    {"describe", describe, METH_O, "describe(tensor) -> (data_ptr, sizes, strides, element_size, dtype) or None"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_tensorgeom",
                      "A tensor's geometry from its TensorImpl (agent/_tensorgeom.cpp); built per torch version.",
                      -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__tensorgeom(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == nullptr) return nullptr;
    PyObject *cap = PyCapsule_New(reinterpret_cast<void *>(&geometry), TT_GEOMETRY_CAPSULE, nullptr);
    if (cap == nullptr || PyModule_AddObject(m, "geometry", cap) < 0) {
        Py_XDECREF(cap);
        Py_DECREF(m);
        return nullptr;
    }
    if (PyModule_AddStringConstant(m, "TORCH_VERSION", TT_TORCH_VERSION) < 0 ||
        PyModule_AddStringConstant(m, "TORCH_BUILD", TT_TORCH_BUILD) < 0 ||
        PyModule_AddStringConstant(m, "SOURCE_SHA", TT_SOURCE_SHA) < 0 ||
        PyModule_AddIntConstant(m, "ABI", TT_GEOMETRY_ABI) < 0) {
        Py_DECREF(m);
        return nullptr;
    }
    return m;
}
