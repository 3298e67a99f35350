/* tensortrace.agent._capture — the capture agent's native fast path (CPython C API, no torch headers).
 *
 * What runs here, once per tap per step, on the inference thread: the selection check (cached per
 * step), extraction of the tapped tensor from the torch hook's arguments (input / output / first
 * output, flattened [B, S, ...] -> [B*S, ...] by address arithmetic, no view built), the ring
 * reservation (PAD frame at the wrap, exactly as ring/format.py's RingWriter.reserve), the frame
 * header and meta (pre-serialised per plan: step field + static fields + capture time + the step's
 * parts), the row copy (one memcpy per contiguous run; strided rows one memcpy per row), the commit
 * (head store) and the accounting (per plan and per part group, folded into AgentStats by
 * core.py). Once per step: the STEP frame (Core.write_step), the part groups' positions of a repeat
 * step (Group.shift; docs/agent.md "Repeat steps"), the heartbeat and thread-time stores.
 * Everything unusual (a CUDA tensor, a row count of neither domain, a full ring, a
 * disabled tap, a non-contiguous row, an exception) goes to the Python path, `CaptureAgent._tap_body`,
 * which is the oracle: tests/agent/test_native_capture.py checks the two write identical ring bytes.
 *
 * The ring format is ring/format.py's; the reservation state (_reserved, _seq) stays on the
 * RingWriter object (read and written back here), so Python frames (STEP, SUMMARY, the overflow
 * policies) and native frames interleave on one writer.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "tensorgeom.h"   /* the interface of agent/_tensorgeom.cpp (built per torch version) */

#define HEADER_SIZE 4096
#define ALIGN_MASK 63
#define FRAME_HEADER_SIZE 40
#define FRAME_MAGIC 0x54544652u
#define KIND_SLAB 2
#define KIND_STEP 1
#define KIND_PAD 0xFFFF
#define OFF_HEAD 256
#define OFF_TAIL 320
#define OFF_FRAMES_COMMITTED (384 + 8)
#define OFF_BYTES_COMMITTED (384 + 24)
#define OFF_HEARTBEAT 384
#define OFF_THREAD_NS (384 + 40)
#define MAX_ENTRIES 4
#define MAX_ROW_DIMS 8

/* extraction kinds (core.py mirrors them as TAP_* constants) */
enum { K_INPUT = 0, K_PLAIN_INPUT = 1, K_OUTPUT = 2, K_FIRST_OUTPUT = 3, K_CALL = 4, K_ROWS = 5,
       /* hook arguments without kwargs ((module, args) / (module, args, output)), tensors already
        * [tokens, ...] (no flattening; SGLang's taps). A value that is not a tensor of >= 2 dims goes
        * to the Python path, whose extractor decides (None: nothing; 1-D: one column). */
       K_ROWS_OUT0 = 6,          /* output, or its element 0 when a tuple / list */
       K_ROWS_OUT1_OR_IN0 = 7,   /* output[1] when the output is a tuple, else args[0] */
       K_ROWS_OUT1 = 8,          /* output[1] when the output is a tuple (else the Python path) */
       K_ROWS_IN0 = 9,           /* args[0] (a pre-hook) */
       K_ROWS_OUT0_COLS = 10 };  /* K_ROWS_OUT0's columns [col_lo, col_lo + col_n) (a fused projection's part) */
/* per-step selection state of an entry */
enum { W_UNKNOWN = 0, W_NO = 1, W_NATIVE = 2, W_SLOW = 3 };

static uint32_t crc_table[8][256];

static void crc_init(void) {   /* zlib's CRC-32 (reflected 0xEDB88320), slicing-by-8 tables */
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
}

static uint32_t crc32_of(const unsigned char *p, size_t n) {   /* == zlib.crc32(bytes) */
    uint32_t c = 0xFFFFFFFFu;
    if (n < 256) {
        /* a short meta (one tap of a small batch: ~50-200 bytes): one table (16 cache lines) instead
         * of eight (128). Between the model's kernels every line is a cache miss, which costs more
         * than the 8x fewer steps; longer metas (many requests' parts, e.g. the post-replay step's
         * back-to-back buffers, whose tables stay warm) take slicing-by-8 */
        while (n--) c = crc_table[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
        return c ^ 0xFFFFFFFFu;
    }
    while (n >= 8) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4);
        memcpy(&hi, p + 4, 4);
        lo ^= c;
        c = crc_table[7][lo & 0xFF] ^ crc_table[6][(lo >> 8) & 0xFF] ^ crc_table[5][(lo >> 16) & 0xFF] ^
            crc_table[4][lo >> 24] ^ crc_table[3][hi & 0xFF] ^ crc_table[2][(hi >> 8) & 0xFF] ^
            crc_table[1][(hi >> 16) & 0xFF] ^ crc_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) c = crc_table[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

static inline int64_t now_ns(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static PyObject *s_element_size;
static PyObject *s_forward_mode, *s_batch_size, *s_rids, *s_input_ids, *s_shape, *s_seq_lens_cpu, *s_tolist,
    *s_mode, *s_last_seq_lens, *s_last, *s_all_decode, *s_made;
static PyObject *s_reserved, *s_seq, *s_is_cpu, *s_size, *s_stride, *s_data_ptr, *s_dtype, *s_hidden_states,
    *s_input, *s_native_wants, *s_native_group, *s_native_plan, *s_tap_body, *s_tap_failed, *s_native_step_frame;

/* ---------------------------------------------------------------- Plan ---------------------- */
typedef struct {
    PyObject_HEAD
    PyObject *static_meta;     /* bytes: RingSlab fields 2-7 */
    PyObject *hook;
    Py_ssize_t row_bytes;
    Py_ssize_t elem;
    long long produced, written, bytes_written;
} Plan;

static int Plan_init(Plan *self, PyObject *args, PyObject *kw) {
    PyObject *meta, *hook;
    Py_ssize_t row_bytes, elem;
    if (!PyArg_ParseTuple(args, "SUnn", &meta, &hook, &row_bytes, &elem)) return -1;
    Py_INCREF(meta); Py_XSETREF(self->static_meta, meta);
    Py_INCREF(hook); Py_XSETREF(self->hook, hook);
    self->row_bytes = row_bytes;
    self->elem = elem;
    return 0;
}

static void Plan_dealloc(Plan *self) {
    Py_XDECREF(self->static_meta);
    Py_XDECREF(self->hook);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Plan_counts(Plan *self, PyObject *unused) {
    return Py_BuildValue("(LLL)", self->produced, self->written, self->bytes_written);
}

static PyObject *Plan_get_hook(Plan *self, void *c) { Py_INCREF(self->hook); return self->hook; }
static PyGetSetDef Plan_getset[] = {
    {"hook", (getter)Plan_get_hook, NULL, "the catalog hook", NULL},
    {NULL}};

static PyMethodDef Plan_methods[] = {
    {"counts", (PyCFunction)Plan_counts, METH_NOARGS, "(produced, written, bytes_written) written natively"},
    {NULL}};

static PyTypeObject PlanType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tensortrace.agent._capture.Plan",
    .tp_basicsize = sizeof(Plan),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Plan_init,
    .tp_dealloc = (destructor)Plan_dealloc,
    .tp_methods = Plan_methods,
    .tp_getset = Plan_getset,
    .tp_doc = "Plan(static_meta, hook, row_bytes, elem): one (hook, layer, dtype, row shape)",
};

/* ---------------------------------------------------------------- Group --------------------- */
typedef struct {
    PyObject_HEAD
    PyObject *parts_bytes;     /* bytes: serialized `repeated SlabPart parts` */
    PyObject *hooks;           /* set of hook names written */
    Py_ssize_t nruns, nrows, nparts;
    long long *runs;           /* (src_row, dst_row, count) * nruns */
    long long *fields;         /* (request_index, slab_row_start, row_count, position_start) * nparts, or NULL */
    long long max_src_row;     /* rows the tensor must have */
    long long written_slabs, written_row_bytes;
} Group;

static int Group_init(Group *self, PyObject *args, PyObject *kw) {
    PyObject *parts, *runs, *fields = NULL;
    Py_ssize_t nrows, nparts;
    if (!PyArg_ParseTuple(args, "SOnn|O", &parts, &runs, &nrows, &nparts, &fields)) return -1;
    long long *fv = NULL;
    if (fields && fields != Py_None) {   /* the parts' fields: shift() re-encodes them */
        PyObject *fs = PySequence_Fast(fields, "fields must be a sequence of 4-tuples");
        if (!fs) return -1;
        if (PySequence_Fast_GET_SIZE(fs) != nparts) {
            Py_DECREF(fs);
            PyErr_Format(PyExc_ValueError, "Group: %zd fields for %zd parts", PySequence_Fast_GET_SIZE(fs), nparts);
            return -1;
        }
        fv = PyMem_Calloc(nparts ? (size_t)nparts * 4 : 1, sizeof(long long));
        if (!fv) { Py_DECREF(fs); PyErr_NoMemory(); return -1; }
        for (Py_ssize_t i = 0; i < nparts; i++) {
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fs, i), "LLLL", &fv[4 * i], &fv[4 * i + 1],
                                  &fv[4 * i + 2], &fv[4 * i + 3])) {
                PyMem_Free(fv); Py_DECREF(fs); return -1;
            }
        }
        Py_DECREF(fs);
    }
    PyMem_Free(self->fields);
    self->fields = fv;
    PyObject *seq = PySequence_Fast(runs, "runs must be a sequence of (src, dst, count)");
    if (!seq) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    long long *r = PyMem_Calloc(n ? (size_t)n * 3 : 1, sizeof(long long));
    if (!r) { Py_DECREF(seq); PyErr_NoMemory(); return -1; }
    long long max_src = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyArg_ParseTuple(t, "LLL", &r[3 * i], &r[3 * i + 1], &r[3 * i + 2])) {
            PyMem_Free(r); Py_DECREF(seq); return -1;
        }
        if (r[3 * i] + r[3 * i + 2] > max_src) max_src = r[3 * i] + r[3 * i + 2];
    }
    Py_DECREF(seq);
    PyMem_Free(self->runs);
    self->runs = r;
    self->nruns = n;
    self->max_src_row = max_src;
    Py_INCREF(parts); Py_XSETREF(self->parts_bytes, parts);
    PyObject *hooks = PySet_New(NULL);
    if (!hooks) return -1;
    Py_XSETREF(self->hooks, hooks);
    self->nrows = nrows;
    self->nparts = nparts;
    self->written_slabs = self->written_row_bytes = 0;
    return 0;
}

static void Group_dealloc(Group *self) {
    Py_XDECREF(self->parts_bytes);
    Py_XDECREF(self->hooks);
    PyMem_Free(self->runs);
    PyMem_Free(self->fields);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Group_get_slabs(Group *self, void *c) { return PyLong_FromLongLong(self->written_slabs); }
static PyObject *Group_get_row_bytes(Group *self, void *c) { return PyLong_FromLongLong(self->written_row_bytes); }
static PyObject *Group_get_hooks(Group *self, void *c) { Py_INCREF(self->hooks); return self->hooks; }

static PyObject *Group_reset(Group *self, PyObject *args) {
    if (Group_init(self, args, NULL) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *encode_parts_of(const long long *f, Py_ssize_t n, long long delta);

/* shift(delta): the next step of the same request rows, every position `delta` further on: the
 * parts are re-encoded (the copy runs and the counters stay; end_step's accounting folds them) */
static PyObject *Group_shift(Group *self, PyObject *arg) {
    long long delta = PyLong_AsLongLong(arg);
    if (delta == -1 && PyErr_Occurred()) return NULL;
    if (!self->fields) {
        PyErr_SetString(PyExc_ValueError, "Group.shift: this group was built without its fields");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < self->nparts; i++) {
        if (self->fields[4 * i + 3] + delta < 0) {
            PyErr_Format(PyExc_ValueError, "Group.shift(%lld): part %zd would have position %lld", delta, i,
                         self->fields[4 * i + 3] + delta);
            return NULL;
        }
    }
    PyObject *b = encode_parts_of(self->fields, self->nparts, delta);
    if (!b) return NULL;
    for (Py_ssize_t i = 0; i < self->nparts; i++) self->fields[4 * i + 3] += delta;
    Py_XSETREF(self->parts_bytes, b);
    Py_INCREF(b);
    return b;
}

/* clear(): the counters, once end_step (or a later fold) has accounted them */
static PyObject *Group_clear(Group *self, PyObject *unused) {
    self->written_slabs = self->written_row_bytes = 0;
    if (PySet_GET_SIZE(self->hooks) && PySet_Clear(self->hooks)) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Group_get_parts_bytes(Group *self, void *c) { Py_INCREF(self->parts_bytes); return self->parts_bytes; }

static PyMethodDef Group_methods[] = {
    {"reset", (PyCFunction)Group_reset, METH_VARARGS,
     "reset(parts_bytes, runs, nrows, nparts[, fields]): this step's parts"},
    {"shift", (PyCFunction)Group_shift, METH_O, "shift(delta) -> the parts' bytes, every position + delta"},
    {"clear", (PyCFunction)Group_clear, METH_NOARGS, "zero the written counters"},
    {NULL}};

static PyGetSetDef Group_getset[] = {
    {"written_slabs", (getter)Group_get_slabs, NULL, "slabs of this group written natively", NULL},
    {"written_row_bytes", (getter)Group_get_row_bytes, NULL, "bytes per row, summed over those slabs", NULL},
    {"hooks", (getter)Group_get_hooks, NULL, "hook names written natively", NULL},
    {"parts_bytes", (getter)Group_get_parts_bytes, NULL, "the serialized parts", NULL},
    {NULL}};

static PyTypeObject GroupType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tensortrace.agent._capture.Group",
    .tp_basicsize = sizeof(Group),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Group_init,
    .tp_dealloc = (destructor)Group_dealloc,
    .tp_getset = Group_getset,
    .tp_methods = Group_methods,
    .tp_doc = "Group(parts_bytes, runs, nrows, nparts[, fields]): the parts one tap produces in one step",
};

/* ---------------------------------------------------------------- Core ---------------------- */
typedef struct {
    PyObject_HEAD
    unsigned char *base;       /* the ring mapping: header at 0, data area at HEADER_SIZE */
    unsigned long long capacity;
    PyObject *writer;          /* RingWriter: _reserved and _seq live there */
    PyObject *agent;           /* CaptureAgent: resolvers and the Python path */
    PyObject *clock;           /* None: CLOCK_REALTIME; else a callable -> int ns (tests) */
    PyObject *step_field;      /* bytes: RingSlab.step of the current step */
    PyObject *is_compiling;    /* None or torch.compiler.is_compiling */
    PyObject *taps;            /* dict (hook, layer) -> Tap, for the generic tap()/capture() calls */
    int open;
    int step_frame_ok;         /* the step's STEP frame is in the ring */
    unsigned long long gen;    /* bumped by the agent whenever cached per-step answers go stale */
    long long total_rows, num_seqs;
    long long thread_ns;
    unsigned long long tap_calls;      /* Tap calls ever (a backend tells a forward that ran its taps from a replay) */
    unsigned long long control_seen;   /* the control block's seq the agent last read */
    PyObject *step_model;      /* bytes: RingStep.model_id (field 2), for write_step */
    PyObject *step_tp;         /* bytes: RingStep.tp_size (field 5) */
    PyObject *step_items;      /* a repeat step's STEP frame requests (begin's items), or NULL: the agent writes it */
    PyObject *wdict;           /* the writer's instance dict holding _reserved/_seq, or NULL (attribute access) */
    long long step_delta;      /* their positions' shift this step */
    /* begin_step's repeat case in C (bind()): */
    PyObject *shifted_t;       /* agent/layout.py ShiftedRows */
    PyObject *seq_domain;      /* RowDomain.SEQUENCES */
    PyObject *step_py;         /* CaptureAgent.begin_step (the Python method: every other case) */
    PyObject *idle_py, *end_py;   /* CaptureAgent.idle_step, .end_step (likewise) */
    PyObject *identity;        /* capture()'s extractor when called with three arguments */
    PyObject *adict;           /* the agent's instance dict (attributes read and set directly), or NULL */
} Core;

/* The rows of a tensor: row r lives at ptr + ((r / inner_n) * sa + (r % inner_n) * sb) elements. */
typedef struct {
    unsigned char *ptr;
    long long outer_n, inner_n, sa, sb;   /* strides in elements */
    int nd;
    long long dims[MAX_ROW_DIMS];
    PyObject *dtype;                      /* new reference */
    int elem;                             /* bytes per element (0: unknown) */
} RowsView;

typedef struct {
    PyObject *hook;
    int layer;
    int kind;
    PyObject *extract;          /* the Python extractor (K_CALL; the Python path for every kind) */
    unsigned long long gen;
    int wants;
    PyObject *group[2];         /* tokens, sequences: Group, Py_None (nothing), NULL (unknown) */
    PyObject *plan_dtype;
    int plan_nd;
    long long plan_dims[MAX_ROW_DIMS];
    Plan *plan;
    PyObject *static_buf;       /* capture_static: the buffer whose view is cached below */
    RowsView static_view;
    long long col_lo, col_n;    /* K_ROWS_OUT0_COLS */
} Entry;

typedef struct {
    PyObject_HEAD
    Core *core;
    int n;
    Entry e[MAX_ENTRIES];
    vectorcallfunc vectorcall;
    PyObject *fallback;         /* called instead while dynamo traces (core.is_compiling() is True) */
} Tap;

static PyTypeObject TapType;

static int Core_init(Core *self, PyObject *args, PyObject *kw) {
    unsigned long long base, cap;
    PyObject *writer, *agent;
    if (!PyArg_ParseTuple(args, "KKOO", &base, &cap, &writer, &agent)) return -1;
    self->base = (unsigned char *)(uintptr_t)base;
    self->capacity = cap;
    Py_INCREF(writer); Py_XSETREF(self->writer, writer);
    Py_INCREF(agent); Py_XSETREF(self->agent, agent);
    Py_CLEAR(self->wdict);
    if (!_PyType_Lookup(Py_TYPE(writer), s_reserved) && !_PyType_Lookup(Py_TYPE(writer), s_seq)) {
        /* plain instance attributes: use the instance dict (NULL when the writer has none) */
        PyObject *d = PyObject_GenericGetDict(writer, NULL);
        if (d && PyDict_Check(d) && PyDict_Contains(d, s_reserved) == 1 && PyDict_Contains(d, s_seq) == 1) self->wdict = d;
        else Py_XDECREF(d);
        PyErr_Clear();
    }
    Py_INCREF(Py_None); Py_XSETREF(self->clock, Py_None);
    Py_INCREF(Py_None); Py_XSETREF(self->is_compiling, Py_None);
    PyObject *sf = PyBytes_FromStringAndSize("", 0);
    if (!sf) return -1;
    Py_XSETREF(self->step_field, sf);
    PyObject *taps = PyDict_New();
    if (!taps) return -1;
    Py_XSETREF(self->taps, taps);
    self->open = 0;
    self->gen = 1;
    return 0;
}

static int Core_traverse(Core *self, visitproc visit, void *arg) {
    Py_VISIT(self->writer); Py_VISIT(self->agent); Py_VISIT(self->clock); Py_VISIT(self->taps);
    Py_VISIT(self->is_compiling); Py_VISIT(self->step_items); Py_VISIT(self->wdict);
    Py_VISIT(self->shifted_t); Py_VISIT(self->seq_domain); Py_VISIT(self->step_py); Py_VISIT(self->idle_py); Py_VISIT(self->end_py); Py_VISIT(self->identity);
    Py_VISIT(self->adict);
    return 0;
}

static int Core_clear(Core *self) {
    Py_CLEAR(self->writer); Py_CLEAR(self->agent); Py_CLEAR(self->clock); Py_CLEAR(self->taps);
    Py_CLEAR(self->is_compiling); Py_CLEAR(self->step_items); Py_CLEAR(self->wdict);
    Py_CLEAR(self->shifted_t); Py_CLEAR(self->seq_domain); Py_CLEAR(self->step_py); Py_CLEAR(self->idle_py); Py_CLEAR(self->end_py); Py_CLEAR(self->identity);
    Py_CLEAR(self->adict);
    return 0;
}

static void Core_dealloc(Core *self) {
    PyObject_GC_UnTrack(self);
    Core_clear(self);
    Py_XDECREF(self->step_field);
    Py_XDECREF(self->step_model);
    Py_XDECREF(self->step_tp);
    Py_XDECREF(self->step_items);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static unsigned char *put_varint(unsigned char *p, unsigned long long v);

/* begin(step, total_rows, num_sequences, keep[, items, delta]) -> the step field (RingSlab.step =
 * step, serialized): a step that captures something starts; keep: the same selection answers and
 * groups (reset or shifted in place by the agent). items, delta (a repeat step of a plan whose
 * STEP frame requests are known, as write_step takes them; items None: not known): the first slab
 * writes the STEP frame here, without asking the agent (_native_step_frame) */
static PyObject *begin_step_field(Core *self, unsigned long long step, long long tr, long long ns, int keep,
                                  PyObject *items, long long delta) {   /* begin()'s work; items: a list or NULL */
    Py_XSETREF(self->step_items, Py_XNewRef(items));
    self->step_delta = delta;
    unsigned char buf[11], *p = buf;
    *p++ = 0x08;
    p = put_varint(p, step);
    PyObject *sf = PyBytes_FromStringAndSize((const char *)buf, p - buf);
    if (!sf) return NULL;
    Py_XSETREF(self->step_field, sf);
    self->total_rows = tr;
    self->num_seqs = ns;
    if (!keep) self->gen++;
    self->step_frame_ok = 0;
    self->open = 1;
    Py_INCREF(sf);
    return sf;
}

static PyObject *Core_begin(PyObject *self_, PyObject *const *args, Py_ssize_t nargs) {
    Core *self = (Core *)self_;
    if (nargs != 4 && nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "begin(step, total_rows, num_sequences, keep[, items, delta])");
        return NULL;
    }
    unsigned long long step = PyLong_AsUnsignedLongLong(args[0]);
    long long tr = PyLong_AsLongLong(args[1]), ns = PyLong_AsLongLong(args[2]);
    int keep = PyObject_IsTrue(args[3]);
    long long delta = nargs == 6 ? PyLong_AsLongLong(args[5]) : 0;
    if (PyErr_Occurred()) return NULL;
    PyObject *items = nargs == 6 && args[4] != Py_None ? args[4] : NULL;
    if (items && !PyList_Check(items)) { PyErr_SetString(PyExc_TypeError, "begin: items must be a list or None"); return NULL; }
    return begin_step_field(self, step, tr, ns, keep, items, delta);
}

/* heartbeat() -> True when the control block's seq moved since control_seen (the agent then
 * polls it in Python): the producer heartbeat store and the control check of every begin_step */
static int heartbeat_moved(Core *c) {   /* (c->base set) the heartbeat stored; the control block moved? */
    __atomic_store_n((unsigned long long *)(c->base + OFF_HEARTBEAT), (unsigned long long)now_ns(CLOCK_REALTIME),
                     __ATOMIC_RELAXED);
    return __atomic_load_n((unsigned long long *)(c->base + 512), __ATOMIC_ACQUIRE) != c->control_seen;
}

static PyObject *Core_heartbeat(Core *self, PyObject *unused) {
    if (!self->base) Py_RETURN_FALSE;
    return PyBool_FromLong(heartbeat_moved(self));
}

/* The step ends: thread_ns += now - t0 (CLOCK_MONOTONIC = time.perf_counter_ns), stored in the ring
 * header (the exporter's metric); the step is closed. finish(), and the C idle_step / end_step. */
static void close_step(Core *c, int64_t t0) {
    c->open = 0;
    c->thread_ns += now_ns(CLOCK_MONOTONIC) - t0;
    if (c->base)
        __atomic_store_n((unsigned long long *)(c->base + OFF_THREAD_NS), (unsigned long long)c->thread_ns,
                         __ATOMIC_RELAXED);
}

/* ---- begin_step's repeat case (CaptureAgent._begin_step, "Repeat steps" in docs/agent.md) ----
 * bind(ShiftedRows, RowDomain.SEQUENCES, CaptureAgent.begin_step, identity): the agent then calls
 * core.begin_step(layout) for its begin_step. The repeat case — a layout advanced from the previous
 * step's while nothing the plan depends on changed — runs here, reading and setting the agent's
 * attributes in its instance dict, as _begin_step's Python does; every other case (and an agent
 * whose class defines any of those names as a descriptor) calls the Python method, which stays the
 * oracle (tests/agent/test_native_capture.py runs the same steps both ways). */
static PyObject *s_a_pending, *s_a_repeat, *s_a_layout, *s_a_epoch, *s_a_selection, *s_a_disabled, *s_a_counters,
    *s_a_scalars, *s_a_step, *s_a_plan_unknown, *s_a_plan_entries, *s_a_native_groups, *s_a_frame_state,
    *s_a_entries, *s_a_groups, *s_a_step_open, *s_a_step_delta, *s_a_step_items, *s_a_step_field, *s_l_requests,
    *s_l_total_rows, *s_l_num_sequences, *s_r_base, *s_r_delta, *s_g_native, *s_g_parts_bytes, *s_c_steps,
    *s_c_repeat_steps, *s_c_unknown_rows, *s_a_closed, *s_a_sampled_live, *s_a_staging, *s_g_written_slabs, *s_c_idle_steps;

static PyObject *Core_bind(PyObject *self_, PyObject *args) {
    Core *c = (Core *)self_;
    PyObject *shifted, *seq_domain, *step_py, *identity, *idle_py, *end_py;
    if (!PyArg_ParseTuple(args, "O!OOOOO", &PyType_Type, &shifted, &seq_domain, &step_py, &identity, &idle_py, &end_py))
        return NULL;
    if (!PyCallable_Check(step_py) || !PyCallable_Check(identity) || !PyCallable_Check(idle_py) ||
        !PyCallable_Check(end_py)) {
        PyErr_SetString(PyExc_TypeError, "bind: begin_step, identity, idle_step and end_step must be callable");
        return NULL;
    }
    Py_CLEAR(c->adict);
    PyObject *names[] = {s_a_pending, s_a_repeat, s_a_layout, s_a_epoch, s_a_selection, s_a_disabled, s_a_counters,
                         s_a_step, s_a_plan_unknown, s_a_plan_entries, s_a_native_groups, s_a_frame_state, s_a_entries,
                         s_a_groups, s_a_step_open, s_a_step_delta, s_a_step_items, s_a_step_field, s_a_closed,
                         s_a_sampled_live, s_a_staging};
    int plain = c->agent != NULL;
    for (size_t i = 0; plain && i < sizeof(names) / sizeof(names[0]); i++)
        if (_PyType_Lookup(Py_TYPE(c->agent), names[i])) plain = 0;   /* a class attribute: not the dict's */
    if (plain) {
        PyObject *d = PyObject_GenericGetDict(c->agent, NULL);
        if (d && PyDict_Check(d)) c->adict = d;
        else Py_XDECREF(d);
        PyErr_Clear();
    }
    Py_INCREF(shifted); Py_XSETREF(c->shifted_t, shifted);
    Py_INCREF(seq_domain); Py_XSETREF(c->seq_domain, seq_domain);
    Py_INCREF(step_py); Py_XSETREF(c->step_py, step_py);
    Py_INCREF(identity); Py_XSETREF(c->identity, identity);
    Py_INCREF(idle_py); Py_XSETREF(c->idle_py, idle_py);
    Py_INCREF(end_py); Py_XSETREF(c->end_py, end_py);
    return PyBool_FromLong(c->adict != NULL);
}

static int dict_add(PyObject *d, PyObject *key, long long n) {   /* d[key] += n (a missing key: 0) */
    PyObject *v = PyDict_GetItemWithError(d, key);
    if (!v && PyErr_Occurred()) return -1;
    long long x = v ? PyLong_AsLongLong(v) : 0;
    if (x == -1 && PyErr_Occurred()) return -1;
    PyObject *nv = PyLong_FromLongLong(x + n);
    if (!nv) return -1;
    int rc = PyDict_SetItem(d, key, nv);
    Py_DECREF(nv);
    return rc;
}

/* The (base, delta) a layout's requests stand for: a ShiftedRows' own, else the tuple itself, 0. */
static int rows_base(Core *c, PyObject *layout, PyObject **base, long long *delta) {
    PyObject *rows = PyObject_GetAttr(layout, s_l_requests);
    if (!rows) return -1;
    if ((PyObject *)Py_TYPE(rows) != c->shifted_t) { *base = rows; *delta = 0; return 0; }
    PyObject *b = PyObject_GetAttr(rows, s_r_base), *d = b ? PyObject_GetAttr(rows, s_r_delta) : NULL;
    Py_DECREF(rows);
    if (!d) { Py_XDECREF(b); return -1; }
    *delta = PyLong_AsLongLong(d);
    Py_DECREF(d);
    if (*delta == -1 && PyErr_Occurred()) { Py_DECREF(b); return -1; }
    *base = b;
    return 0;
}

/* begin_step(layout) -> True (a repeat step) / False: CaptureAgent.begin_step's contract */
static PyObject *Core_begin_step(PyObject *self_, PyObject *layout) {
    Core *c = (Core *)self_;
    int64_t t0 = now_ns(CLOCK_MONOTONIC);
    PyObject *d = c->adict;
    if (!d || !c->base) goto python;
    /* -- every condition first, nothing changed yet (a miss: the Python method decides) -- */
    PyObject *v = PyDict_GetItemWithError(d, s_a_disabled);   /* borrowed references from here */
    if (!v || PyObject_IsTrue(v) != 0) goto python;
    v = PyDict_GetItemWithError(d, s_a_pending);
    if (!v || PyObject_IsTrue(v) != 0) goto python;
    PyObject *repeat = PyDict_GetItemWithError(d, s_a_repeat), *prev = PyDict_GetItemWithError(d, s_a_layout);
    if (!repeat || !PyTuple_CheckExact(repeat) || PyTuple_GET_SIZE(repeat) != 2 || !prev || prev == Py_None) goto python;
    PyObject *epoch = PyDict_GetItemWithError(d, s_a_epoch), *sel = PyDict_GetItemWithError(d, s_a_selection);
    if (!epoch || !sel || PyTuple_GET_ITEM(repeat, 1) != sel) goto python;
    if (PyObject_RichCompareBool(PyTuple_GET_ITEM(repeat, 0), epoch, Py_EQ) != 1) goto python;
    if (heartbeat_moved(c)) goto python;   /* the control block moved: the Python way polls it */
    PyObject *shape = PyObject_GetAttr(layout, s_shape), *pshape = shape ? PyObject_GetAttr(prev, s_shape) : NULL;
    int same_shape = pshape && shape != Py_None && shape == pshape;
    Py_XDECREF(shape); Py_XDECREF(pshape);
    if (!same_shape) goto python;
    PyObject *base, *pbase;
    long long delta, pdelta;
    if (rows_base(c, layout, &base, &delta) < 0) goto python;
    if (rows_base(c, prev, &pbase, &pdelta) < 0) { Py_DECREF(base); goto python; }
    int same_base = base == pbase && PyTuple_CheckExact(base) && PyTuple_GET_SIZE(base) > 0;
    Py_DECREF(base); Py_DECREF(pbase);
    if (!same_base || delta < pdelta) goto python;
    delta -= pdelta;
    PyObject *tro = PyObject_GetAttr(layout, s_l_total_rows), *nso = tro ? PyObject_GetAttr(layout, s_l_num_sequences) : NULL;
    long long tr = tro ? PyLong_AsLongLong(tro) : -1, ns = nso ? PyLong_AsLongLong(nso) : -1;
    Py_XDECREF(tro); Py_XDECREF(nso);
    if (PyErr_Occurred()) goto python;
    PyObject *counters = PyDict_GetItemWithError(d, s_a_counters);
    PyObject *scalars = counters ? PyObject_GetAttr(counters, s_a_scalars) : NULL;   /* new reference */
    if (!scalars) goto python;
    if (!PyDict_Check(scalars)) { Py_DECREF(scalars); goto python; }
    PyObject *step = PyDict_GetItemWithError(d, s_a_step), *unknown = PyDict_GetItemWithError(d, s_a_plan_unknown),
             *entries = PyDict_GetItemWithError(d, s_a_plan_entries),
             *ngroups = PyDict_GetItemWithError(d, s_a_native_groups),
             *sdelta = PyDict_GetItemWithError(d, s_a_step_delta), *items = PyDict_GetItemWithError(d, s_a_step_items);
    if (!step || !unknown || !entries || !ngroups || !PyDict_Check(ngroups) || !sdelta || !items) {
        Py_DECREF(scalars);
        goto python;
    }
    long long stepn = PyLong_AsLongLong(step), unk = PyLong_AsLongLong(unknown), sd = PyLong_AsLongLong(sdelta);
    int has_entries = PyObject_IsTrue(entries);
    if (PyErr_Occurred() || has_entries < 0) { Py_DECREF(scalars); goto python; }
    /* -- a repeat step: the agent's state as _begin_step's repeat branch leaves it (an error from
     * here on disables the agent, as an exception in _begin_step does) -- */
    Py_INCREF(entries); Py_INCREF(ngroups); Py_INCREF(items); Py_INCREF(layout);
    PyObject *groups = NULL, *o = NULL, *sf = NULL;
    if (!(o = PyLong_FromLongLong(stepn + 1)) || PyDict_SetItem(d, s_a_step, o) < 0) goto fail;
    if (dict_add(scalars, s_c_steps, 1) < 0 || dict_add(scalars, s_c_repeat_steps, 1) < 0) goto fail;
    if (unk && dict_add(scalars, s_c_unknown_rows, unk) < 0) goto fail;
    if (PyDict_SetItem(d, s_a_layout, layout) < 0 || PyDict_SetItem(d, s_a_frame_state, Py_None) < 0 ||
        PyDict_SetItem(d, s_a_entries, entries) < 0)
        goto fail;
    if (!(groups = PyDict_New())) goto fail;
    {
        PyObject *key, *group, *dl = PyLong_FromLongLong(delta);
        Py_ssize_t pos = 0;
        if (!dl) goto fail;
        while (PyDict_Next(ngroups, &pos, &key, &group)) {
            if (tr == ns && PyTuple_Check(key) && PyTuple_GET_SIZE(key) > 0 && PyTuple_GET_ITEM(key, 0) == c->seq_domain)
                continue;   /* as the full path: not reachable by the native taps this step */
            PyObject *ng = PyObject_GetAttr(group, s_g_native), *pb = NULL;
            if (ng && Py_TYPE(ng) == &GroupType) pb = Group_shift((Group *)ng, dl);
            else if (ng) PyErr_SetString(PyExc_TypeError, "begin_step: a native group without its _capture.Group");
            Py_XDECREF(ng);
            int rc = pb ? PyObject_SetAttr(group, s_g_parts_bytes, pb) : -1;
            Py_XDECREF(pb);
            if (rc < 0 || PyDict_SetItem(groups, key, group) < 0) { Py_DECREF(dl); goto fail; }
        }
        Py_DECREF(dl);
    }
    if (PyDict_SetItem(d, s_a_groups, groups) < 0 || PyDict_SetItem(d, s_a_step_open, has_entries ? Py_True : Py_False) < 0)
        goto fail;
    Py_SETREF(o, PyLong_FromLongLong(sd + delta));
    if (!o || PyDict_SetItem(d, s_a_step_delta, o) < 0) goto fail;
    if (items != Py_None && !PyList_Check(items)) {
        PyErr_SetString(PyExc_TypeError, "begin_step: _step_items must be a list or None");
        goto fail;
    }
    sf = begin_step_field(c, (unsigned long long)(stepn + 1), tr, ns, 1, items == Py_None ? NULL : items, sd + delta);
    if (!sf || PyDict_SetItem(d, s_a_step_field, sf) < 0) goto fail;
    Py_DECREF(sf); Py_DECREF(o); Py_DECREF(groups); Py_DECREF(scalars);
    Py_DECREF(entries); Py_DECREF(ngroups); Py_DECREF(items); Py_DECREF(layout);
    c->thread_ns += now_ns(CLOCK_MONOTONIC) - t0;
    Py_RETURN_TRUE;
fail:
    Py_XDECREF(sf); Py_XDECREF(o); Py_XDECREF(groups); Py_DECREF(scalars);
    Py_DECREF(entries); Py_DECREF(ngroups); Py_DECREF(items); Py_DECREF(layout);
    {
        PyObject *et, *exc, *tb;   /* _disable_agent(error), as begin_step's except does */
        PyErr_Fetch(&et, &exc, &tb);
        PyErr_NormalizeException(&et, &exc, &tb);
        PyObject *r = exc ? PyObject_CallMethod(c->agent, "_disable_agent", "O", exc) : NULL;
        Py_XDECREF(et); Py_XDECREF(exc); Py_XDECREF(tb);
        if (!r) PyErr_Clear();   /* never raises */
        Py_XDECREF(r);
    }
    c->thread_ns += now_ns(CLOCK_MONOTONIC) - t0;
    Py_RETURN_FALSE;
python:
    if (PyErr_Occurred()) PyErr_Clear();
    if (!c->step_py) { PyErr_SetString(PyExc_RuntimeError, "begin_step: bind() was not called"); return NULL; }
    PyObject *pargs[2] = {c->agent, layout};
    return PyObject_Vectorcall(c->step_py, pargs, 2, NULL);
}

/* idle_step() -> bool, CaptureAgent.idle_step's two common cases without its frame: False while a
 * live request is sampled (the agent open, not disabled), and True for a forward with none, when no
 * summary is pending, the control block did not move and no plan's counters wait to be folded (the
 * step counted as an idle step, its time closed). Every other case is the Python method's. */
static PyObject *Core_idle_step(PyObject *self_, PyObject *unused) {
    Core *c = (Core *)self_;
    PyObject *d = c->adict;
    if (d && c->idle_py && c->base) {
        int64_t t0 = now_ns(CLOCK_MONOTONIC);
        PyObject *dis = PyDict_GetItemWithError(d, s_a_disabled), *closed = PyDict_GetItemWithError(d, s_a_closed),
                 *live = PyDict_GetItemWithError(d, s_a_sampled_live);
        if (dis && closed == Py_False && live && PyLong_CheckExact(live) && PyObject_IsTrue(dis) == 0) {
            long long n = PyLong_AsLongLong(live);
            if (n > 0) Py_RETURN_FALSE;
            PyObject *pending = PyDict_GetItemWithError(d, s_a_pending), *repeat = PyDict_GetItemWithError(d, s_a_repeat),
                     *step = PyDict_GetItemWithError(d, s_a_step), *counters = PyDict_GetItemWithError(d, s_a_counters);
            if (n == 0 && pending && PyObject_IsTrue(pending) == 0 && repeat == Py_None && step &&
                PyLong_CheckExact(step) && counters) {
                PyObject *scalars = NULL;
                if (!heartbeat_moved(c) && (scalars = PyObject_GetAttr(counters, s_a_scalars)) && PyDict_Check(scalars)) {
                    long long sn = PyLong_AsLongLong(step);
                    PyObject *o = sn == -1 && PyErr_Occurred() ? NULL : PyLong_FromLongLong(sn + 1);
                    int rc = !o || PyDict_SetItem(d, s_a_step, o) < 0 || dict_add(scalars, s_c_steps, 1) < 0 ||
                             PyDict_SetItem(d, s_a_layout, Py_None) < 0 || dict_add(scalars, s_c_idle_steps, 1) < 0;
                    Py_XDECREF(o);
                    Py_DECREF(scalars);
                    if (!rc) {
                        close_step(c, t0);
                        Py_RETURN_TRUE;
                    }
                    /* (out of memory mid-way: the Python method's own error handling decides) */
                } else {
                    Py_XDECREF(scalars);
                }
            }
        }
        PyErr_Clear();
    }
    if (!c->idle_py) { PyErr_SetString(PyExc_RuntimeError, "idle_step: bind() was not called"); return NULL; }
    return PyObject_CallOneArg(c->idle_py, c->agent);
}

/* end_step(): CaptureAgent.end_step for a step of a plan the next step may repeat (its native
 * groups' counters keep adding up; nothing written by the Python path to fold, no CUDA staging):
 * the step's state reset and its time closed. Every other case is the Python method's. */
static PyObject *Core_end_step(PyObject *self_, PyObject *unused) {
    Core *c = (Core *)self_;
    int64_t t0 = now_ns(CLOCK_MONOTONIC);
    PyObject *d = c->adict;
    if (!d || !c->end_py) goto python;
    PyObject *dis = PyDict_GetItemWithError(d, s_a_disabled), *repeat = PyDict_GetItemWithError(d, s_a_repeat),
             *staging = PyDict_GetItemWithError(d, s_a_staging), *groups = PyDict_GetItemWithError(d, s_a_groups);
    if (!dis || !repeat || repeat == Py_None || staging != Py_None || !groups || !PyDict_CheckExact(groups) ||
        PyObject_IsTrue(dis) != 0)
        goto python;
    PyObject *key, *group;
    Py_ssize_t pos = 0;
    while (PyDict_Next(groups, &pos, &key, &group)) {   /* slabs the Python path wrote: folded in Python */
        PyObject *w = PyObject_GetAttr(group, s_g_written_slabs);
        int some = w ? PyObject_IsTrue(w) : -1;
        Py_XDECREF(w);
        if (some != 0) goto python;
    }
    PyObject *ng = PyDict_New(), *ne = ng ? PyList_New(0) : NULL;
    int rc = !ne || PyDict_SetItem(d, s_a_step_open, Py_False) < 0 || PyDict_SetItem(d, s_a_groups, ng) < 0 ||
             PyDict_SetItem(d, s_a_entries, ne) < 0;
    Py_XDECREF(ng); Py_XDECREF(ne);
    close_step(c, t0);
    if (rc) PyErr_Clear();   /* (out of memory resetting three attributes: the next begin_step sets them) */
    Py_RETURN_NONE;
python:
    PyErr_Clear();
    if (!c->end_py) { PyErr_SetString(PyExc_RuntimeError, "end_step: bind() was not called"); return NULL; }
    return PyObject_CallOneArg(c->end_py, c->agent);
}

/* finish(t0): end of the step: thread_ns += now - t0 (CLOCK_MONOTONIC = time.perf_counter_ns),
 * stored in the ring header (the exporter's metric); the step is closed */
static PyObject *Core_finish(Core *self, PyObject *arg) {
    long long t0 = PyLong_AsLongLong(arg);
    if (t0 == -1 && PyErr_Occurred()) return NULL;
    close_step(self, t0);
    Py_RETURN_NONE;
}

/* add_ns(t0): thread_ns += now - t0 */
static PyObject *Core_add_ns(Core *self, PyObject *arg) {
    long long t0 = PyLong_AsLongLong(arg);
    if (t0 == -1 && PyErr_Occurred()) return NULL;
    self->thread_ns += now_ns(CLOCK_MONOTONIC) - t0;
    Py_RETURN_NONE;
}

static PyObject *Core_end(Core *self, PyObject *unused) {
    self->open = 0;
    Py_RETURN_NONE;
}

static PyObject *Core_invalidate(Core *self, PyObject *unused) {
    self->gen++;
    Py_RETURN_NONE;
}

static PyObject *Core_close(Core *self, PyObject *unused) {
    self->open = 0;
    self->base = NULL;
    self->gen++;
    PyDict_Clear(self->taps);
    Py_RETURN_NONE;
}

static PyObject *Core_get_thread_ns(Core *self, void *c) { return PyLong_FromLongLong(self->thread_ns); }
static int Core_set_thread_ns(Core *self, PyObject *v, void *c) {
    long long x = PyLong_AsLongLong(v);
    if (x == -1 && PyErr_Occurred()) return -1;
    self->thread_ns = x;
    return 0;
}
static PyObject *Core_get_open(Core *self, void *c) { return PyBool_FromLong(self->open); }
static PyObject *Core_get_step_frame_ok(Core *self, void *c) { return PyBool_FromLong(self->step_frame_ok); }
static PyObject *Core_get_tap_calls(Core *self, void *c) { return PyLong_FromUnsignedLongLong(self->tap_calls); }
static PyObject *Core_get_control_seen(Core *self, void *c) { return PyLong_FromUnsignedLongLong(self->control_seen); }
static int Core_set_control_seen(Core *self, PyObject *v, void *c) {
    unsigned long long x = v ? PyLong_AsUnsignedLongLong(v) : 0;
    if (PyErr_Occurred()) return -1;
    self->control_seen = x;
    return 0;
}
static PyObject *Core_get_clock(Core *self, void *c) { Py_INCREF(self->clock); return self->clock; }
static int Core_set_clock(Core *self, PyObject *v, void *c) {
    if (!v) v = Py_None;
    Py_INCREF(v); Py_XSETREF(self->clock, v);
    return 0;
}
static PyObject *Core_get_is_compiling(Core *self, void *c) { Py_INCREF(self->is_compiling); return self->is_compiling; }
static int Core_set_is_compiling(Core *self, PyObject *v, void *c) {
    if (!v) v = Py_None;
    Py_INCREF(v); Py_XSETREF(self->is_compiling, v);
    return 0;
}

/* ---- the write path ---- */

/* Reserve a SLAB frame with `meta` pieces and payload_len bytes. Returns the payload pointer and
 * sets *end_pos, or NULL when the ring has no room (nothing written; the Python path decides). */
/* The RingWriter's reservation state (_reserved, _seq: the Python path reserves frames too). Read
 * from its instance dict when Core_init found them plain instance attributes (no descriptor on its
 * class): two dict lookups, not two attribute lookups through the class's MRO. */
static int writer_state(Core *c, unsigned long long *pos, unsigned long long *seq) {
    PyObject *ro, *so;
    if (c->wdict) {
        ro = PyDict_GetItemWithError(c->wdict, s_reserved);
        so = ro ? PyDict_GetItemWithError(c->wdict, s_seq) : NULL;
        if (!ro || !so) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "RingWriter lost its _reserved/_seq");
            return -1;
        }
        *pos = PyLong_AsUnsignedLongLong(ro);
        *seq = PyLong_AsUnsignedLongLong(so);
        return PyErr_Occurred() ? -1 : 0;
    }
    ro = PyObject_GetAttr(c->writer, s_reserved);
    if (!ro) return -1;
    *pos = PyLong_AsUnsignedLongLong(ro);
    Py_DECREF(ro);
    if (PyErr_Occurred()) return -1;
    so = PyObject_GetAttr(c->writer, s_seq);
    if (!so) return -1;
    *seq = PyLong_AsUnsignedLongLong(so);
    Py_DECREF(so);
    return PyErr_Occurred() ? -1 : 0;
}

static unsigned char *reserve_frame(Core *c, uint16_t frame_kind, PyObject *const *pieces, int npieces,
                                    const unsigned char *tbytes, size_t payload_len, unsigned long long *end_pos,
                                    unsigned long long *new_seq, unsigned long long *pos_after) {
    size_t meta_len = 0;
    for (int i = 0; i < npieces; i++) meta_len += pieces[i] ? (size_t)PyBytes_GET_SIZE(pieces[i]) : 9;
    size_t head_len = (FRAME_HEADER_SIZE + meta_len + ALIGN_MASK) & ~(size_t)ALIGN_MASK;
    unsigned long long size = head_len + ((payload_len + ALIGN_MASK) & ~(size_t)ALIGN_MASK);
    unsigned long long cap = c->capacity;
    if (size > cap / 2) return NULL;
    unsigned long long pos, seq;
    if (writer_state(c, &pos, &seq)) return NULL;
    unsigned char *base = c->base;
    unsigned long long phys = pos % cap;
    unsigned long long pad = phys + size > cap ? cap - phys : 0;
    unsigned long long tail = __atomic_load_n((unsigned long long *)(base + OFF_TAIL), __ATOMIC_ACQUIRE);
    if (cap - (pos - tail) < pad + size) return NULL;
    if (pad) {
        unsigned char *f = base + HEADER_SIZE + phys;
        uint32_t magic = FRAME_MAGIC, total = (uint32_t)pad, zero32 = 0;
        uint16_t kind = KIND_PAD, zero16 = 0;
        uint64_t zero64 = 0, s64 = seq;
        memcpy(f, &magic, 4); memcpy(f + 4, &kind, 2); memcpy(f + 6, &zero16, 2); memcpy(f + 8, &total, 4);
        memcpy(f + 12, &zero32, 4); memcpy(f + 16, &zero64, 8); memcpy(f + 24, &s64, 8);
        memcpy(f + 32, &zero32, 4); memcpy(f + 36, &zero32, 4);
        seq++;
        pos += pad;
        phys = 0;
    }
    unsigned char *f = base + HEADER_SIZE + phys;
    unsigned char *m = f + FRAME_HEADER_SIZE;
    for (int i = 0; i < npieces; i++) {
        if (pieces[i]) {
            Py_ssize_t n = PyBytes_GET_SIZE(pieces[i]);
            memcpy(m, PyBytes_AS_STRING(pieces[i]), (size_t)n);
            m += n;
        } else {
            memcpy(m, tbytes, 9);
            m += 9;
        }
    }
    uint32_t magic = FRAME_MAGIC, total = (uint32_t)size, ml = (uint32_t)meta_len, zero32 = 0;
    uint32_t crc = crc32_of(f + FRAME_HEADER_SIZE, meta_len);
    uint16_t kind = frame_kind, zero16 = 0;
    uint64_t pl = payload_len, s64 = seq;
    memcpy(f, &magic, 4); memcpy(f + 4, &kind, 2); memcpy(f + 6, &zero16, 2); memcpy(f + 8, &total, 4);
    memcpy(f + 12, &ml, 4); memcpy(f + 16, &pl, 8); memcpy(f + 24, &s64, 8); memcpy(f + 32, &crc, 4);
    memcpy(f + 36, &zero32, 4);
    *new_seq = seq + 1;
    *end_pos = pos + size;
    *pos_after = pos + size;
    return base + HEADER_SIZE + phys + head_len;
}

/* The payload copy into the ring. Rows of 1 KiB and more go with non-temporal stores: the ring's
 * memory is written once and read by another process, so loading its lines into this core's
 * caches first (a plain memcpy's read-for-ownership) only costs the inference thread time and
 * evicts the model's own data. The head store after it is preceded by an sfence (copy_fence). */
static inline int copy_out(unsigned char *dst, const unsigned char *src, size_t n) {
#if defined(__SSE2__)
    if (n >= 1024 && ((uintptr_t)dst & 15) == 0) {
        size_t k = n & ~(size_t)63;
        for (size_t i = 0; i < k; i += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
            __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
            _mm_stream_si128((__m128i *)(dst + i), a);
            _mm_stream_si128((__m128i *)(dst + i + 16), b);
            _mm_stream_si128((__m128i *)(dst + i + 32), c);
            _mm_stream_si128((__m128i *)(dst + i + 48), d);
        }
        if (n > k) memcpy(dst + k, src + k, n - k);
        return 1;
    }
#endif
    memcpy(dst, src, n);
    return 0;
}

static inline void copy_fence(void) {
#if defined(__SSE2__)
    _mm_sfence();   /* the streamed payload is visible before the head store that publishes it */
#endif
}

static int store_writer_state(Core *c, unsigned long long reserved, unsigned long long seq) {
    PyObject *r = PyLong_FromUnsignedLongLong(reserved);
    if (!r) return -1;
    int rc = c->wdict ? PyDict_SetItem(c->wdict, s_reserved, r) : PyObject_SetAttr(c->writer, s_reserved, r);
    Py_DECREF(r);
    if (rc) return -1;
    PyObject *s = PyLong_FromUnsignedLongLong(seq);
    if (!s) return -1;
    rc = c->wdict ? PyDict_SetItem(c->wdict, s_seq, s) : PyObject_SetAttr(c->writer, s_seq, s);
    Py_DECREF(s);
    return rc;
}



/* The row geometry of a tensor of `nd` dims (sizes sz, strides st in elements): 1 when its rows
 * are each contiguous (the native path copies them), else 0. */
static int fill_view(RowsView *v, Py_ssize_t nd, const long long *sz, const long long *st, int flatten,
                     long long limit) {
    int first_row_dim;
    if (nd < 1 || nd > MAX_ROW_DIMS + 1) return 0;
    if (flatten && nd >= 2) {
        v->outer_n = sz[0]; v->inner_n = sz[1]; v->sa = st[0]; v->sb = st[1];
        first_row_dim = 2;
    } else {
        v->outer_n = sz[0]; v->inner_n = 1; v->sa = st[0]; v->sb = 0;
        first_row_dim = 1;
    }
    if (limit >= 0) {                   /* static buffers: only the step's first `limit` rows */
        if (v->inner_n != 1 || limit > v->outer_n) return 0;
        v->outer_n = limit;
    }
    v->nd = (int)(nd - first_row_dim);
    if (v->nd > MAX_ROW_DIMS) return 0;
    long long expect = 1;
    for (Py_ssize_t i = nd - 1; i >= first_row_dim; i--) {
        v->dims[i - first_row_dim] = sz[i];
        if (sz[i] != 1 && st[i] != expect) return 0;   /* a row is not contiguous: Python path */
        expect *= sz[i];
    }
    return 1;
}

/* DLPack (dlpack.h, a stable C ABI): torch._C._to_dlpack(tensor) hands data pointer, device, shape
 * and strides in one call, where the tensor's accessors take four (is_cpu, size(), stride(),
 * data_ptr()), each a separate path through libtorch; between the model's kernels every path is
 * cache-cold, so one call instead of four is most of a tap's cost. The capsule is released at
 * once (its destructor frees the export; the tensor itself is held by the caller). */
typedef struct { int32_t device_type, device_id; } DLDevice_;
typedef struct { uint8_t code, bits; uint16_t lanes; } DLDataType_;
typedef struct {
    void *data;
    DLDevice_ device;
    int32_t ndim;
    DLDataType_ dtype;
    int64_t *shape, *strides;
    uint64_t byte_offset;
} DLTensor_;
typedef struct DLManagedTensor_ {
    DLTensor_ dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensor_ *);
} DLManagedTensor_;
static PyObject *g_to_dlpack;   /* torch._C._to_dlpack, or NULL: the accessors (use_dlpack()) */
/* agent/_tensorgeom.cpp's reader, or NULL (use_geometry()): a plain dense CPU tensor's geometry as
 * loads from its TensorImpl, no torch call and no export; it declines everything else (DLPack then). */
static TTGeometryFn g_geometry;
static PyObject *g_int64;   /* torch.int64, while g_geometry is set (next_decode reads seq_lens_cpu in place) */
static PyObject *g_geometry_cap;   /* the capsule, held while g_geometry is set (the module that made it
                                     stays in sys.modules: extension modules are never unloaded) */

static int rows_view_attrs(PyObject *t, int flatten, long long limit, RowsView *v);

/* torch.dtype objects by DLPack type, learnt from the first tensor of each (new references, kept):
 * a tap then reads its tensor's dtype from the export it already has instead of a tensor.dtype
 * lookup. Only types DLPack names unambiguously: int (code 0) 8-64 bits, float (2) 16-64,
 * bfloat (4) 16; every other type (bool, uint, float8, complex) asks the tensor each time. */
static PyObject *g_dl_dtype[5][4];

static int dl_dtype_slot(const DLDataType_ *t, int *code, int *k) {
    if (t->lanes != 1) return 0;
    int kk = t->bits == 8 ? 0 : t->bits == 16 ? 1 : t->bits == 32 ? 2 : t->bits == 64 ? 3 : -1;
    if (kk < 0) return 0;
    if (t->code == 0 || (t->code == 2 && kk >= 1) || (t->code == 4 && kk == 1)) { *code = t->code; *k = kk; return 1; }
    return 0;
}
static int write_step_frame(Core *c, PyObject *items, long long delta);

/* 1: view filled; 0: not a case for the native path (use the Python path); -1: error set. */
static int rows_view(PyObject *t, int flatten, long long limit, RowsView *v) {
    v->dtype = NULL;
    if (g_geometry) {
        TTGeometry g;
        if (g_geometry(t, &g)) {
            if (g.ndim < 1 || g.ndim > MAX_ROW_DIMS + 1) return 0;
            long long sz[MAX_ROW_DIMS + 2], st[MAX_ROW_DIMS + 2];
            for (int i = 0; i < g.ndim; i++) { sz[i] = g.sizes[i]; st[i] = g.strides[i]; }
            if (!fill_view(v, g.ndim, sz, st, flatten, limit)) return 0;
            v->ptr = (unsigned char *)g.data;
            v->elem = g.elem;
            v->dtype = Py_NewRef(g.dtype);
            return 1;
        }
    }
    if (!g_to_dlpack) return rows_view_attrs(t, flatten, limit, v);
    PyObject *cap = PyObject_CallOneArg(g_to_dlpack, t);
    if (!cap) { PyErr_Clear(); return rows_view_attrs(t, flatten, limit, v); }
    DLManagedTensor_ *m = PyCapsule_GetPointer(cap, "dltensor");
    if (!m) { PyErr_Clear(); Py_DECREF(cap); return rows_view_attrs(t, flatten, limit, v); }
    DLTensor_ *d = &m->dl_tensor;
    int ok = 0;
    if (d->device.device_type == 1 /* kDLCPU */ && d->ndim >= 1 && d->ndim <= MAX_ROW_DIMS + 1) {
        long long sz[MAX_ROW_DIMS + 2], st[MAX_ROW_DIMS + 2];
        long long expect = 1;
        for (int i = d->ndim - 1; i >= 0; i--) {
            sz[i] = d->shape[i];
            st[i] = d->strides ? d->strides[i] : expect;   /* NULL strides: compact row-major */
            expect *= sz[i];
        }
        ok = fill_view(v, d->ndim, sz, st, flatten, limit);
        v->ptr = (unsigned char *)d->data + d->byte_offset;
        v->elem = (d->dtype.bits % 8 == 0 && d->dtype.lanes == 1) ? d->dtype.bits / 8 : 0;
    }
    int code = 0, k = 0, known = ok && dl_dtype_slot(&d->dtype, &code, &k);
    Py_DECREF(cap);
    if (!ok) return 0;
    if (known && g_dl_dtype[code][k]) {
        v->dtype = Py_NewRef(g_dl_dtype[code][k]);
        return 1;
    }
    v->dtype = PyObject_GetAttr(t, s_dtype);
    if (!v->dtype) { PyErr_Clear(); return 0; }
    if (known) g_dl_dtype[code][k] = Py_NewRef(v->dtype);
    return 1;
}

static PyObject *mod_use_dlpack(PyObject *m, PyObject *fn) {
    if (fn == Py_None) {
        Py_CLEAR(g_to_dlpack);
    } else {
        Py_INCREF(fn);
        Py_XSETREF(g_to_dlpack, fn);
    }
    Py_RETURN_NONE;
}

static PyObject *mod_use_geometry(PyObject *m, PyObject *cap) {
    if (cap == Py_None) {
        g_geometry = NULL;
        Py_CLEAR(g_geometry_cap);
        Py_CLEAR(g_int64);
        Py_RETURN_NONE;
    }
    void *fn = PyCapsule_GetPointer(cap, TT_GEOMETRY_CAPSULE);
    if (!fn) return NULL;   /* not the capsule of this interface version: PyCapsule's error says which */
    PyObject *torch = PyImport_ImportModule("torch");   /* (loaded: the capsule's module links it) */
    PyObject *i64 = torch ? PyObject_GetAttrString(torch, "int64") : NULL;
    Py_XDECREF(torch);
    if (!i64) return NULL;
    Py_XSETREF(g_int64, i64);
    g_geometry = (TTGeometryFn)fn;
    Py_INCREF(cap);
    Py_XSETREF(g_geometry_cap, cap);
    Py_RETURN_NONE;
}

/* The same, through the tensor's accessors (no DLPack export, or it failed). */
static int rows_view_attrs(PyObject *t, int flatten, long long limit, RowsView *v) {
    v->dtype = NULL;
    PyObject *o = PyObject_GetAttr(t, s_is_cpu);
    if (!o) { PyErr_Clear(); return 0; }
    int cpu = o == Py_True;
    Py_DECREF(o);
    if (!cpu) return 0;
    PyObject *size = PyObject_CallMethodNoArgs(t, s_size);
    if (!size) { PyErr_Clear(); return 0; }
    PyObject *stride = PyObject_CallMethodNoArgs(t, s_stride);
    if (!stride) { Py_DECREF(size); PyErr_Clear(); return 0; }
    int ok = 0;
    if (!PyTuple_Check(size) || !PyTuple_Check(stride)) goto done;
    Py_ssize_t nd = PyTuple_GET_SIZE(size);
    if (nd != PyTuple_GET_SIZE(stride) || nd < 1) goto done;
    long long sz[MAX_ROW_DIMS + 2], st[MAX_ROW_DIMS + 2];
    if (nd > MAX_ROW_DIMS + 1) goto done;
    for (Py_ssize_t i = 0; i < nd; i++) {
        sz[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(size, i));
        st[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(stride, i));
    }
    if (PyErr_Occurred()) { PyErr_Clear(); goto done; }
    if (!fill_view(v, nd, sz, st, flatten, limit)) goto done;
    PyObject *dp = PyObject_CallMethodNoArgs(t, s_data_ptr);
    if (!dp) { PyErr_Clear(); goto done; }
    v->ptr = (unsigned char *)(uintptr_t)PyLong_AsUnsignedLongLong(dp);
    Py_DECREF(dp);
    if (PyErr_Occurred()) { PyErr_Clear(); goto done; }
    v->dtype = PyObject_GetAttr(t, s_dtype);
    if (!v->dtype) { PyErr_Clear(); goto done; }
    PyObject *es = PyObject_CallMethodNoArgs(t, s_element_size);
    if (!es) { PyErr_Clear(); v->elem = 0; }
    else { long n = PyLong_AsLong(es); Py_DECREF(es); if (n < 0 || PyErr_Occurred()) { PyErr_Clear(); n = 0; } v->elem = (int)n; }
    ok = 1;
done:
    Py_DECREF(size);
    Py_DECREF(stride);
    return ok;
}

static int run_slow(Tap *tap, Entry *e, PyObject *extract, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *tup = PyTuple_New(nargs);
    if (!tup) return -1;
    for (Py_ssize_t i = 0; i < nargs; i++) { Py_INCREF(args[i]); PyTuple_SET_ITEM(tup, i, args[i]); }
    PyObject *layer = PyLong_FromLong(e->layer);
    if (!layer) { Py_DECREF(tup); return -1; }
    PyObject *r = PyObject_CallMethodObjArgs(tap->core->agent, s_tap_body, e->hook, layer, extract, tup, NULL);
    Py_DECREF(layer);
    Py_DECREF(tup);
    e->gen = 0;   /* the Python path may have changed what this step's answers are */
    if (!r) return -1;
    Py_DECREF(r);
    return 0;
}

static void report_failure(Tap *tap, Entry *e) {
    PyObject *et, *exc, *tb;
    PyErr_Fetch(&et, &exc, &tb);
    if (!et) return;
    PyErr_NormalizeException(&et, &exc, &tb);
    if (tb && exc) PyException_SetTraceback(exc, tb);
    Py_XDECREF(et);
    Py_XDECREF(tb);
    if (!exc) { Py_INCREF(Py_None); exc = Py_None; }
    PyObject *layer = PyLong_FromLong(e->layer);
    PyObject *r = layer ? PyObject_CallMethodObjArgs(tap->core->agent, s_tap_failed, e->hook, layer, exc, NULL) : NULL;
    Py_XDECREF(layer);
    Py_DECREF(exc);
    if (!r) PyErr_Clear();   /* tap_failed never raises; if it did, the model must still run */
    Py_XDECREF(r);
    e->gen = 0;
}

/* One entry of a tap: 0 done (captured, skipped or handed to the Python path), -1 error set. */
static int run_entry(Tap *tap, Entry *e, PyObject *extract, PyObject *const *args, Py_ssize_t nargs,
                     PyObject *given, long long limit) {
    Core *c = tap->core;
    if (e->gen != c->gen) {
        e->gen = c->gen;
        e->wants = W_UNKNOWN;
        Py_CLEAR(e->group[0]);
        Py_CLEAR(e->group[1]);
    }
    if (e->wants == W_UNKNOWN) {
        PyObject *layer = PyLong_FromLong(e->layer);
        if (!layer) return -1;
        PyObject *w = PyObject_CallMethodObjArgs(c->agent, s_native_wants, e->hook, layer, NULL);
        Py_DECREF(layer);
        if (!w) return -1;
        long v = PyLong_AsLong(w);
        Py_DECREF(w);
        if (v == -1 && PyErr_Occurred()) return -1;
        e->wants = (int)v;
    }
    if (e->wants == W_NO) return 0;
    int64_t t0 = now_ns(CLOCK_MONOTONIC);
    int rc = 0;
    PyObject *rows = NULL;
    RowsView v = {0};
    if (e->wants == W_SLOW) goto slow;
    int flatten = 1;
    switch (e->kind) {
    case K_INPUT:
    case K_PLAIN_INPUT:
        if (nargs < 3 || !PyTuple_Check(args[1])) goto slow;
        if (PyTuple_GET_SIZE(args[1]) > 0) {
            rows = PyTuple_GET_ITEM(args[1], 0);
        } else if (PyDict_Check(args[2])) {
            if (e->kind == K_INPUT) rows = PyDict_GetItemWithError(args[2], s_hidden_states);
            if (!rows && !PyErr_Occurred()) rows = PyDict_GetItemWithError(args[2], s_input);
            if (!rows) { PyErr_Clear(); goto slow; }
        } else {
            goto slow;
        }
        Py_INCREF(rows);
        break;
    case K_OUTPUT:
    case K_FIRST_OUTPUT:
        if (nargs < 4) goto slow;
        rows = args[3];
        if (e->kind == K_FIRST_OUTPUT && (PyTuple_Check(rows) || PyList_Check(rows))) {
            if (PySequence_Fast_GET_SIZE(rows) < 1) goto slow;
            rows = PySequence_Fast_GET_ITEM(rows, 0);
        }
        Py_INCREF(rows);
        break;
    case K_ROWS_OUT0:
    case K_ROWS_OUT0_COLS:
    case K_ROWS_OUT1_OR_IN0:
    case K_ROWS_OUT1:
    {
        if (nargs != 3) goto slow;
        PyObject *r = args[2];   /* borrowed until rows takes it */
        if (e->kind == K_ROWS_OUT0 || e->kind == K_ROWS_OUT0_COLS) {
            if (PyTuple_Check(r) || PyList_Check(r)) {
                if (PySequence_Fast_GET_SIZE(r) < 1) goto slow;
                r = PySequence_Fast_GET_ITEM(r, 0);
            }
        } else if (PyTuple_Check(r)) {
            if (PyTuple_GET_SIZE(r) < 2) goto slow;
            r = PyTuple_GET_ITEM(r, 1);
        } else if (e->kind == K_ROWS_OUT1_OR_IN0 && PyTuple_Check(args[1]) && PyTuple_GET_SIZE(args[1]) > 0) {
            r = PyTuple_GET_ITEM(args[1], 0);
        } else {
            goto slow;
        }
        Py_INCREF(r);
        rows = r;
    }
        flatten = 0;
        break;
    case K_ROWS_IN0:
        if (nargs != 2 || !PyTuple_Check(args[1]) || PyTuple_GET_SIZE(args[1]) < 1) goto slow;
        rows = PyTuple_GET_ITEM(args[1], 0);
        Py_INCREF(rows);
        flatten = 0;
        break;
    case K_CALL:
        rows = PyObject_Vectorcall(extract, args, nargs, NULL);
        if (!rows) { rc = -1; goto out; }
        if (rows == Py_None) goto out;
        flatten = 0;
        break;
    case K_ROWS:
        if (!given) goto slow;
        rows = given;
        Py_INCREF(rows);
        flatten = 0;
        break;
    default:
        goto slow;
    }
    int ok;
    if (limit >= 0 && e->static_buf == rows && e->static_view.outer_n >= limit) {
        /* a static buffer (CUDA-graph output): its storage, shape and dtype are fixed by the graph
         * that writes it, so its view is read once, not per step */
        v = e->static_view;
        v.outer_n = limit;
        Py_INCREF(v.dtype);
        ok = 1;
    } else {
        ok = rows_view(rows, flatten, -1, &v);
        if (ok > 0 && limit >= 0) {
            if (v.inner_n != 1 || limit > v.outer_n) {
                ok = 0;
            } else {
                Py_XDECREF(e->static_view.dtype);
                Py_XSETREF(e->static_buf, rows);
                Py_INCREF(rows);
                e->static_view = v;
                Py_INCREF(v.dtype);   /* held by the cache */
                v.outer_n = limit;
            }
        }
    }
    if (ok <= 0) {
        if (ok < 0) { rc = -1; goto out; }
        goto slow;
    }
    if (e->kind >= K_ROWS_OUT0 && v.nd < 1) goto slow;   /* a 1-D value: the extractor makes it a column */
    if (e->kind == K_ROWS_OUT0_COLS) {
        /* rows of [tokens, width] -> their columns [col_lo, col_lo + col_n): the same rows, each
         * starting col_lo elements further in (a row's elements are contiguous: fill_view checked),
         * col_n wide (the copy then takes one run per row) */
        if (v.nd != 1 || v.inner_n != 1 || !v.elem || e->col_lo < 0 || e->col_n < 1 ||
            e->col_lo + e->col_n > v.dims[0])
            goto slow;
        v.ptr += e->col_lo * v.elem;
        v.dims[0] = e->col_n;
    }
    long long nrows = v.outer_n * v.inner_n;
    int dom;
    if (nrows == c->total_rows) dom = 0;
    else if (nrows == c->num_seqs) dom = 1;
    else goto slow;   /* the Python path raises the domain error */
    PyObject *g = e->group[dom];
    if (!g) {
        PyObject *nr = PyLong_FromLongLong(nrows);
        PyObject *layer = nr ? PyLong_FromLong(e->layer) : NULL;
        g = layer ? PyObject_CallMethodObjArgs(c->agent, s_native_group, e->hook, layer, nr, NULL) : NULL;
        Py_XDECREF(nr);
        Py_XDECREF(layer);
        if (!g) { rc = -1; goto out; }
        if (g == Py_False) { Py_DECREF(g); goto slow; }
        if (g != Py_None && !PyObject_TypeCheck(g, &GroupType)) {
            Py_DECREF(g);
            PyErr_SetString(PyExc_TypeError, "internal: _native_group must return a Group, None or False");
            rc = -1; goto out;
        }
        e->group[dom] = g;
    }
    if (g == Py_None) goto out;
    Group *grp = (Group *)g;
    if (grp->max_src_row > nrows) goto slow;
    /* the plan: (dtype, row shape) */
    if (!e->plan || e->plan_dtype != v.dtype || e->plan_nd != v.nd ||
        memcmp(e->plan_dims, v.dims, sizeof(long long) * (size_t)v.nd) != 0) {
        PyObject *shape = PyTuple_New(v.nd);
        if (!shape) { rc = -1; goto out; }
        for (int i = 0; i < v.nd; i++) PyTuple_SET_ITEM(shape, i, PyLong_FromLongLong(v.dims[i]));
        PyObject *layer = PyLong_FromLong(e->layer);
        PyObject *p = layer ? PyObject_CallMethodObjArgs(c->agent, s_native_plan, e->hook, layer, v.dtype, shape, NULL)
                            : NULL;
        Py_XDECREF(layer);
        Py_DECREF(shape);
        if (!p) { rc = -1; goto out; }
        if (!PyObject_TypeCheck(p, &PlanType)) { Py_DECREF(p); goto slow; }
        Py_XSETREF(e->plan, (Plan *)p);
        Py_INCREF(v.dtype);
        Py_XSETREF(e->plan_dtype, v.dtype);
        e->plan_nd = v.nd;
        memcpy(e->plan_dims, v.dims, sizeof(long long) * (size_t)v.nd);
    }
    Plan *plan = e->plan;
    if (!c->base) goto slow;
    if (!c->step_frame_ok && c->step_items) {   /* a repeat step: its requests are known here */
        if (write_step_frame(c, c->step_items, c->step_delta) < 0) { rc = -1; goto out; }
    }
    if (!c->step_frame_ok) {   /* (no room above: the agent applies its overflow policy) */
        PyObject *ok = PyObject_CallMethodNoArgs(c->agent, s_native_step_frame);
        if (!ok) { rc = -1; goto out; }
        int good = ok == Py_True;
        Py_DECREF(ok);
        if (!good) goto slow;
        c->step_frame_ok = 1;
    }
    size_t row_bytes = (size_t)plan->row_bytes;
    size_t nbytes = (size_t)grp->nrows * row_bytes;
    /* meta: step field, static fields, capture time (field 9, fixed64), parts */
    unsigned char tb[9];
    tb[0] = (9 << 3) | 1;
    uint64_t tnow;
    if (c->clock == Py_None) {
        tnow = (uint64_t)now_ns(CLOCK_REALTIME);
    } else {
        PyObject *tv = PyObject_CallNoArgs(c->clock);
        if (!tv) { rc = -1; goto out; }
        tnow = PyLong_AsUnsignedLongLong(tv);
        Py_DECREF(tv);
        if (PyErr_Occurred()) { rc = -1; goto out; }
    }
    memcpy(tb + 1, &tnow, 8);
    PyObject *pieces[4] = {c->step_field, plan->static_meta, NULL, grp->parts_bytes};
    unsigned long long end_pos, new_seq, pos_after;
    unsigned char *dst = reserve_frame(c, KIND_SLAB, pieces, 4, tb, nbytes, &end_pos, &new_seq, &pos_after);
    if (!dst) {
        if (PyErr_Occurred()) { rc = -1; goto out; }
        goto slow;   /* full / too large: the overflow policy is the Python path's */
    }
    size_t elem = (size_t)plan->elem;
    long long inner = v.inner_n;
    int streamed = 0;
    int uniform = (inner == 1 && (size_t)v.sa * elem == row_bytes) ||
                  ((size_t)v.sb * elem == row_bytes && v.sa == inner * v.sb);
    for (Py_ssize_t i = 0; i < grp->nruns; i++) {
        long long src = grp->runs[3 * i], d = grp->runs[3 * i + 1], count = grp->runs[3 * i + 2];
        if (uniform) {
            long long a = src / inner, b = src % inner;
            streamed |= copy_out(dst + d * row_bytes, v.ptr + (a * v.sa + b * v.sb) * (long long)elem,
                                 (size_t)count * row_bytes);
        } else {
            for (long long r = 0; r < count; r++) {
                long long s = src + r, a = s / inner, b = s % inner;
                streamed |= copy_out(dst + (d + r) * row_bytes, v.ptr + (a * v.sa + b * v.sb) * (long long)elem,
                                     row_bytes);
            }
        }
    }
    if (store_writer_state(c, pos_after, new_seq)) { rc = -1; goto out; }
    if (streamed) copy_fence();   /* (plain stores are ordered by the release store itself) */
    __atomic_store_n((unsigned long long *)(c->base + OFF_HEAD), end_pos, __ATOMIC_RELEASE);
    *(unsigned long long *)(c->base + OFF_FRAMES_COMMITTED) += 1;
    *(unsigned long long *)(c->base + OFF_BYTES_COMMITTED) += nbytes;
    grp->written_slabs += 1;
    grp->written_row_bytes += (long long)row_bytes;
    if (PySet_Add(grp->hooks, e->hook)) { rc = -1; goto out; }
    plan->produced += grp->nparts;
    plan->written += grp->nparts;
    plan->bytes_written += (long long)nbytes;
    goto out;
slow:
    if (e->kind == K_ROWS) {
        /* capture(): the Python path takes the rows themselves */
        PyObject *a[1] = {given};
        PyObject *ident = extract;   /* core.py passes an identity extractor for K_ROWS */
        if (limit >= 0) {
            /* static buffer: its first `limit` rows */
            PyObject *stop = PyLong_FromLongLong(limit);
            PyObject *sl = stop ? PySlice_New(NULL, stop, NULL) : NULL;
            Py_XDECREF(stop);
            if (!sl) { rc = -1; goto out; }
            PyObject *part = PyObject_GetItem(given, sl);
            Py_DECREF(sl);
            if (!part) { rc = -1; goto out; }
            a[0] = part;
            rc = run_slow(tap, e, ident, a, 1);
            Py_DECREF(part);
        } else {
            rc = run_slow(tap, e, ident, a, 1);
        }
    } else {
        rc = run_slow(tap, e, extract, args, nargs);
    }
out:
    Py_XDECREF(rows);
    Py_XDECREF(v.dtype);
    c->thread_ns += now_ns(CLOCK_MONOTONIC) - t0;
    return rc;
}

static PyObject *Tap_vectorcall(PyObject *self_, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Tap *tap = (Tap *)self_;
    Core *c = tap->core;
    c->tap_calls++;
    if (!c->open) Py_RETURN_NONE;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (c->is_compiling != Py_None) {
        /* core.is_compiling: torch's get_eval_frame_callback (C; ~50 ns): not None while dynamo
         * traces or runs a compiled region, where a Python frame this tap calls (the Python path,
         * the per-step questions) would be compiled by dynamo. There the tap runs its fallback:
         * the Python taps wrapped in torch.compiler.disable (backends/hf/backend.py). */
        PyObject *r = PyObject_CallNoArgs(c->is_compiling);
        if (!r) return NULL;
        int compiling = r != Py_None && r != Py_False;
        Py_DECREF(r);
        if (compiling) {
            if (tap->fallback && tap->fallback != Py_None)
                return PyObject_Vectorcall(tap->fallback, args, nargsf, kwnames);
            Py_RETURN_NONE;
        }
    }
    for (int i = 0; i < tap->n; i++) {
        Entry *e = &tap->e[i];
        if (run_entry(tap, e, e->extract, args, nargs, NULL, -1) < 0) {
            int64_t t0 = now_ns(CLOCK_MONOTONIC);
            report_failure(tap, e);
            c->thread_ns += now_ns(CLOCK_MONOTONIC) - t0;
        }
    }
    Py_RETURN_NONE;
}

static PyObject *Tap_new(PyTypeObject *type, PyObject *args, PyObject *kw);

static int Tap_traverse(Tap *self, visitproc visit, void *arg) {
    Py_VISIT(self->core);
    Py_VISIT(self->fallback);
    for (int i = 0; i < self->n; i++) {
        Py_VISIT(self->e[i].extract);
        Py_VISIT(self->e[i].group[0]);
        Py_VISIT(self->e[i].group[1]);
    }
    return 0;
}

static int Tap_clear(Tap *self) {
    Py_CLEAR(self->core);
    Py_CLEAR(self->fallback);
    for (int i = 0; i < self->n; i++) {
        Entry *e = &self->e[i];
        Py_CLEAR(e->hook); Py_CLEAR(e->extract); Py_CLEAR(e->group[0]); Py_CLEAR(e->group[1]);
        Py_CLEAR(e->plan_dtype); Py_CLEAR(e->plan);
        Py_CLEAR(e->static_buf); Py_CLEAR(e->static_view.dtype);
    }
    self->n = 0;
    return 0;
}

static void Tap_dealloc(Tap *self) {
    PyObject_GC_UnTrack(self);
    Tap_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject CoreType;

static PyObject *Tap_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *core, *entries;
    if (!PyArg_ParseTuple(args, "O!O:Tap", &CoreType, &core, &entries)) return NULL;
    PyObject *seq = PySequence_Fast(entries, "entries must be a sequence of (hook, layer, kind, extract)");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > MAX_ENTRIES) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "a native tap takes 1 to %d entries, got %zd", MAX_ENTRIES, n);
        return NULL;
    }
    Tap *self = (Tap *)type->tp_alloc(type, 0);
    if (!self) { Py_DECREF(seq); return NULL; }
    self->vectorcall = Tap_vectorcall;
    Py_INCREF(core);
    self->core = (Core *)core;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *hook, *extract;
        int layer, kind;
        long long col_lo = 0, col_n = 0;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "UiiO|LL", &hook, &layer, &kind, &extract,
                              &col_lo, &col_n)) {
            Py_DECREF(seq); Py_DECREF(self); return NULL;
        }
        if (kind < K_INPUT || kind > K_ROWS_OUT0_COLS) {
            Py_DECREF(seq); Py_DECREF(self);
            PyErr_Format(PyExc_ValueError, "unknown tap kind %d", kind);
            return NULL;
        }
        Entry *e = &self->e[i];
        memset(e, 0, sizeof(*e));
        Py_INCREF(hook); e->hook = hook;
        Py_INCREF(extract); e->extract = extract;
        e->layer = layer;
        e->kind = kind;
        e->col_lo = col_lo;
        e->col_n = col_n;
        self->n = (int)i + 1;
    }
    Py_DECREF(seq);
    return (PyObject *)self;
}

static PyObject *Tap_get_fallback(Tap *self, void *c) {
    PyObject *f = self->fallback ? self->fallback : Py_None;
    Py_INCREF(f);
    return f;
}
static int Tap_set_fallback(Tap *self, PyObject *v, void *c) {
    Py_XINCREF(v);
    Py_XSETREF(self->fallback, v);
    return 0;
}
static PyGetSetDef Tap_getset[] = {
    {"fallback", (getter)Tap_get_fallback, (setter)Tap_set_fallback, "the hook while dynamo traces", NULL},
    {NULL}};

static PyTypeObject TapType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tensortrace.agent._capture.Tap",
    .tp_basicsize = sizeof(Tap),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Tap, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = Tap_new,
    .tp_traverse = (traverseproc)Tap_traverse,
    .tp_clear = (inquiry)Tap_clear,
    .tp_dealloc = (destructor)Tap_dealloc,
    .tp_getset = Tap_getset,
    .tp_doc = "Tap(core, [(hook, layer, kind, extract), ...]): a torch hook that captures natively",
};


/* ---- ForwardWrap: a module's forward with its taps, instead of PyTorch's hooks ------------------
 * A torch hook puts its module on nn.Module._call_impl's slow path: a Python loop over the global
 * and per-module hook dicts, cache-cold between kernels (measured: 67 no-op hooks cost a 30 ms CPU
 * decode step +1.5-1.8%, ~8 us each). Set as the module's instance attribute `forward`, this object
 * keeps _call_impl on its fast path (`return forward_call(*args, **kwargs)`) and calls the taps
 * itself: pre taps with (module, args[, kwargs]), then the original forward (vectorcall, the
 * arguments passed through untouched), then post taps with (module, args[, kwargs], output) —
 * the arguments torch gives a hook. A tap's return value is ignored (taps observe; they never
 * replace inputs or outputs). agent/forward_wrap.py installs, chains and removes it. */
#define MAX_WRAP_TAPS 8
typedef struct {
    PyObject_HEAD
    PyObject *module;
    PyObject *orig;                      /* the forward this one wraps (bound method or another wrapper) */
    int npre, npost;
    PyObject *pre[MAX_WRAP_TAPS];
    PyObject *post[MAX_WRAP_TAPS];
    int pre_kw[MAX_WRAP_TAPS], post_kw[MAX_WRAP_TAPS];
    PyObject *pre_spec, *post_spec;      /* the tuples they were set from (returned by the getters) */
    vectorcallfunc vectorcall;
} ForwardWrap;

static int call_wrap_tap(PyObject *fn, int kw, PyObject *module, PyObject *argt, PyObject **kwargs,
                         PyObject *kwnames, PyObject *const *args, Py_ssize_t nargs, PyObject *out) {
    PyObject *a[4];
    int n = 0;
    a[n++] = module;
    a[n++] = argt;
    if (kw) {
        if (!*kwargs) {
            *kwargs = PyDict_New();
            if (!*kwargs) return -1;
            Py_ssize_t nk = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
            for (Py_ssize_t i = 0; i < nk; i++)
                if (PyDict_SetItem(*kwargs, PyTuple_GET_ITEM(kwnames, i), args[nargs + i]) < 0) return -1;
        }
        a[n++] = *kwargs;
    }
    if (out) a[n++] = out;
    PyObject *r = PyObject_Vectorcall(fn, a, n, NULL);
    if (!r) return -1;
    Py_DECREF(r);
    return 0;
}

static PyObject *ForwardWrap_vectorcall(PyObject *self_, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    ForwardWrap *w = (ForwardWrap *)self_;
    if (w->npre == 0 && w->npost == 0) return PyObject_Vectorcall(w->orig, args, nargsf, kwnames);
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *argt = PyTuple_New(nargs), *kwargs = NULL, *out = NULL;
    if (!argt) return NULL;
    for (Py_ssize_t i = 0; i < nargs; i++) { Py_INCREF(args[i]); PyTuple_SET_ITEM(argt, i, args[i]); }
    Py_INCREF(w);   /* a tap may remove this wrapper (and drop the module's reference to it) */
    int npre = w->npre;
    for (int i = 0; i < npre && i < w->npre; i++)
        if (call_wrap_tap(w->pre[i], w->pre_kw[i], w->module, argt, &kwargs, kwnames, args, nargs, NULL) < 0)
            goto fail;
    out = PyObject_Vectorcall(w->orig, args, nargsf, kwnames);
    if (!out) goto fail;
    int npost = w->npost;
    for (int i = 0; i < npost && i < w->npost; i++)
        if (call_wrap_tap(w->post[i], w->post_kw[i], w->module, argt, &kwargs, kwnames, args, nargs, out) < 0)
            goto fail;
    Py_DECREF(argt);
    Py_XDECREF(kwargs);
    Py_DECREF(w);
    return out;
fail:
    Py_DECREF(argt);
    Py_XDECREF(kwargs);
    Py_XDECREF(out);
    Py_DECREF(w);
    return NULL;
}

static void ForwardWrap_clear_taps(PyObject **fns, int *n) {
    for (int i = 0; i < *n; i++) Py_CLEAR(fns[i]);
    *n = 0;
}

/* spec: a tuple of (callable, with_kwargs) pairs */
static int ForwardWrap_set_taps(ForwardWrap *w, PyObject *spec, int post) {
    if (!spec || spec == Py_None) spec = NULL;
    else if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) > MAX_WRAP_TAPS) {
        PyErr_Format(PyExc_ValueError, "taps: a tuple of at most %d (callable, with_kwargs) pairs", MAX_WRAP_TAPS);
        return -1;
    }
    Py_ssize_t n = spec ? PyTuple_GET_SIZE(spec) : 0;
    PyObject *fns[MAX_WRAP_TAPS];
    int kws[MAX_WRAP_TAPS];
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(spec, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 || !PyCallable_Check(PyTuple_GET_ITEM(item, 0))) {
            PyErr_SetString(PyExc_ValueError, "taps: each one a (callable, with_kwargs) pair");
            return -1;
        }
        int kw = PyObject_IsTrue(PyTuple_GET_ITEM(item, 1));
        if (kw < 0) return -1;
        fns[i] = PyTuple_GET_ITEM(item, 0);
        kws[i] = kw;
    }
    PyObject **dst = post ? w->post : w->pre;
    int *dkw = post ? w->post_kw : w->pre_kw;
    int *dn = post ? &w->npost : &w->npre;
    PyObject *old[MAX_WRAP_TAPS];
    int nold = *dn;
    for (int i = 0; i < nold; i++) old[i] = dst[i];
    *dn = 0;   /* a call in progress stops at its next check */
    for (Py_ssize_t i = 0; i < n; i++) { Py_INCREF(fns[i]); dst[i] = fns[i]; dkw[i] = kws[i]; }
    *dn = (int)n;
    for (int i = 0; i < nold; i++) Py_DECREF(old[i]);
    Py_XINCREF(spec);
    if (post) Py_XSETREF(w->post_spec, spec); else Py_XSETREF(w->pre_spec, spec);
    return 0;
}

static PyObject *ForwardWrap_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *module, *orig;
    if (!PyArg_ParseTuple(args, "OO:ForwardWrap", &module, &orig)) return NULL;
    if (!PyCallable_Check(orig)) {
        PyErr_SetString(PyExc_TypeError, "ForwardWrap(module, forward): forward must be callable");
        return NULL;
    }
    ForwardWrap *w = (ForwardWrap *)type->tp_alloc(type, 0);
    if (!w) return NULL;
    w->vectorcall = ForwardWrap_vectorcall;
    Py_INCREF(module); w->module = module;
    Py_INCREF(orig); w->orig = orig;
    return (PyObject *)w;
}

static int ForwardWrap_traverse(ForwardWrap *w, visitproc visit, void *arg) {
    Py_VISIT(w->module);
    Py_VISIT(w->orig);
    for (int i = 0; i < w->npre; i++) Py_VISIT(w->pre[i]);
    for (int i = 0; i < w->npost; i++) Py_VISIT(w->post[i]);
    Py_VISIT(w->pre_spec);
    Py_VISIT(w->post_spec);
    return 0;
}

static int ForwardWrap_clear(ForwardWrap *w) {
    Py_CLEAR(w->module);
    Py_CLEAR(w->orig);
    ForwardWrap_clear_taps(w->pre, &w->npre);
    ForwardWrap_clear_taps(w->post, &w->npost);
    Py_CLEAR(w->pre_spec);
    Py_CLEAR(w->post_spec);
    return 0;
}

static void ForwardWrap_dealloc(ForwardWrap *w) {
    PyObject_GC_UnTrack(w);
    ForwardWrap_clear(w);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyObject *ForwardWrap_get_pre(ForwardWrap *w, void *c) {
    PyObject *v = w->pre_spec ? w->pre_spec : PyTuple_New(0);
    if (w->pre_spec) Py_INCREF(v);
    return v;
}
static PyObject *ForwardWrap_get_post(ForwardWrap *w, void *c) {
    PyObject *v = w->post_spec ? w->post_spec : PyTuple_New(0);
    if (w->post_spec) Py_INCREF(v);
    return v;
}
static int ForwardWrap_set_pre(ForwardWrap *w, PyObject *v, void *c) { return ForwardWrap_set_taps(w, v, 0); }
static int ForwardWrap_set_post(ForwardWrap *w, PyObject *v, void *c) { return ForwardWrap_set_taps(w, v, 1); }
static PyObject *ForwardWrap_get_wrapped(ForwardWrap *w, void *c) {
    if (!w->orig) Py_RETURN_NONE;
    Py_INCREF(w->orig);
    return w->orig;
}
static PyObject *ForwardWrap_get_module(ForwardWrap *w, void *c) {
    if (!w->module) Py_RETURN_NONE;
    Py_INCREF(w->module);
    return w->module;
}
static PyGetSetDef ForwardWrap_getset[] = {
    {"pre", (getter)ForwardWrap_get_pre, (setter)ForwardWrap_set_pre, "((tap, with_kwargs), ...) run before forward", NULL},
    {"post", (getter)ForwardWrap_get_post, (setter)ForwardWrap_set_post, "((tap, with_kwargs), ...) run after forward", NULL},
    {"__wrapped__", (getter)ForwardWrap_get_wrapped, NULL, "the forward this one wraps (inspect.signature follows it)", NULL},
    {"module", (getter)ForwardWrap_get_module, NULL, "the module", NULL},
    {NULL}};

/* copy.deepcopy(model) while tapped: the copy gets the wrapped forward's copy, untapped (a copied
 * model is not instrumented; its own call stays what it was before the tap) */
static PyObject *ForwardWrap_deepcopy(ForwardWrap *w, PyObject *memo) {
    PyObject *copy = PyImport_ImportModule("copy");
    if (!copy) return NULL;
    PyObject *r = PyObject_CallMethod(copy, "deepcopy", "OO", w->orig ? w->orig : Py_None, memo);
    Py_DECREF(copy);
    return r;
}
static PyMethodDef ForwardWrap_methods[] = {
    {"__deepcopy__", (PyCFunction)ForwardWrap_deepcopy, METH_O, "the wrapped forward's deep copy (untapped)"},
    {NULL}};

static PyTypeObject ForwardWrapType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tensortrace.agent._capture.ForwardWrap",
    .tp_basicsize = sizeof(ForwardWrap),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(ForwardWrap, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = ForwardWrap_new,
    .tp_traverse = (traverseproc)ForwardWrap_traverse,
    .tp_clear = (inquiry)ForwardWrap_clear,
    .tp_dealloc = (destructor)ForwardWrap_dealloc,
    .tp_getset = ForwardWrap_getset,
    .tp_methods = ForwardWrap_methods,
    .tp_doc = "ForwardWrap(module, forward): the module's forward, calling its taps (agent/forward_wrap.py)",
};

static Tap *tap_for(Core *c, PyObject *hook, PyObject *layer, int kind, PyObject *extract) {
    /* keyed by kind too: tap() (K_CALL) and capture() (K_ROWS) of one (hook, layer) are two taps */
    PyObject *k = PyLong_FromLong(kind);
    PyObject *key = k ? PyTuple_Pack(3, hook, layer, k) : NULL;
    Py_XDECREF(k);
    if (!key) return NULL;
    PyObject *t = PyDict_GetItemWithError(c->taps, key);
    if (t) { Py_DECREF(key); return (Tap *)t; }
    if (PyErr_Occurred()) { Py_DECREF(key); return NULL; }
    PyObject *ent = Py_BuildValue("[(OOiO)]", hook, layer, kind, extract);
    PyObject *a = ent ? PyTuple_Pack(2, (PyObject *)c, ent) : NULL;
    Py_XDECREF(ent);
    t = a ? Tap_new(&TapType, a, NULL) : NULL;
    Py_XDECREF(a);
    if (!t || PyDict_SetItem(c->taps, key, t)) { Py_XDECREF(t); Py_DECREF(key); return NULL; }
    Py_DECREF(key);
    Py_DECREF(t);   /* the dict holds it */
    return (Tap *)t;
}

/* core.tap(hook, layer, extract, *args): the generic tap (SGLang); extract(*args) -> rows */
static PyObject *Core_tap(PyObject *self_, PyObject *const *args, Py_ssize_t nargs) {
    Core *c = (Core *)self_;
    if (!c->open) Py_RETURN_NONE;
    if (nargs < 3) { PyErr_SetString(PyExc_TypeError, "tap(hook, layer, extract, *args)"); return NULL; }
    Tap *t = tap_for(c, args[0], args[1], K_CALL, args[2]);
    if (!t) return NULL;
    Entry *e = &t->e[0];
    if (run_entry(t, e, args[2], args + 3, nargs - 3, NULL, -1) < 0) {
        int64_t t0 = now_ns(CLOCK_MONOTONIC);
        report_failure(t, e);
        c->thread_ns += now_ns(CLOCK_MONOTONIC) - t0;
    }
    Py_RETURN_NONE;
}

/* core.capture(hook, layer, rows, identity): rows the backend holds */
static PyObject *Core_capture(PyObject *self_, PyObject *const *args, Py_ssize_t nargs) {
    Core *c = (Core *)self_;
    if (!c->open) Py_RETURN_NONE;
    PyObject *ident = nargs == 4 ? args[3] : nargs == 3 ? c->identity : NULL;   /* 3: bind()'s identity */
    if (!ident) { PyErr_SetString(PyExc_TypeError, "capture(hook, layer, rows[, identity])"); return NULL; }
    Tap *t = tap_for(c, args[0], args[1], K_ROWS, ident);
    if (!t) return NULL;
    Entry *e = &t->e[0];
    if (run_entry(t, e, ident, NULL, 0, args[2], -1) < 0) {
        int64_t t0 = now_ns(CLOCK_MONOTONIC);
        report_failure(t, e);
        c->thread_ns += now_ns(CLOCK_MONOTONIC) - t0;
    }
    Py_RETURN_NONE;
}

/* core.capture_static([(hook, layer, buffer), ...], rows, identity): after a CUDA-graph replay,
 * the first `rows` rows of each static buffer, in one call */
static PyObject *Core_capture_static(PyObject *self_, PyObject *const *args, Py_ssize_t nargs) {
    Core *c = (Core *)self_;
    if (!c->open) Py_RETURN_NONE;
    if (nargs != 3) { PyErr_SetString(PyExc_TypeError, "capture_static(items, rows, identity)"); return NULL; }
    long long limit = PyLong_AsLongLong(args[1]);
    if (limit == -1 && PyErr_Occurred()) return NULL;
    PyObject *seq = PySequence_Fast(args[0], "items must be a sequence of (hook, layer, buffer)");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(it) || PyTuple_GET_SIZE(it) != 3) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_TypeError, "capture_static: each item is (hook, layer, buffer)");
            return NULL;
        }
        Tap *t = tap_for(c, PyTuple_GET_ITEM(it, 0), PyTuple_GET_ITEM(it, 1), K_ROWS, args[2]);
        if (!t) { Py_DECREF(seq); return NULL; }
        Entry *e = &t->e[0];
        if (run_entry(t, e, args[2], NULL, 0, PyTuple_GET_ITEM(it, 2), limit) < 0) {
            int64_t t0 = now_ns(CLOCK_MONOTONIC);
            report_failure(t, e);
            c->thread_ns += now_ns(CLOCK_MONOTONIC) - t0;
        }
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

static PyObject *Core_noop(PyObject *self_, PyObject *const *args, Py_ssize_t nargs) { Py_RETURN_NONE; }
static PyObject *Core_write_step(PyObject *self_, PyObject *const *args, Py_ssize_t nargs);
static PyObject *Core_step_fields(PyObject *self_, PyObject *args);

static PyMethodDef Core_methods[] = {
    {"begin", (PyCFunction)(void (*)(void))Core_begin, METH_FASTCALL,
     "begin(step, total_rows, num_sequences, keep) -> the step field"},
    {"end", (PyCFunction)Core_end, METH_NOARGS, "the step ended"},
    {"heartbeat", (PyCFunction)Core_heartbeat, METH_NOARGS, "heartbeat store; True when the control block moved"},
    {"finish", (PyCFunction)Core_finish, METH_O, "finish(t0): the step ended; thread_ns += now - t0, reported"},
    {"add_ns", (PyCFunction)Core_add_ns, METH_O, "add_ns(t0): thread_ns += now - t0"},
    {"write_step", (PyCFunction)(void (*)(void))Core_write_step, METH_FASTCALL,
     "write_step(items, delta) -> the STEP frame committed (False: no room)"},
    {"step_fields", (PyCFunction)Core_step_fields, METH_VARARGS, "step_fields(model_field, tp_field)"},
    {"invalidate", (PyCFunction)Core_invalidate, METH_NOARGS, "forget the step's cached answers"},
    {"close", (PyCFunction)Core_close, METH_NOARGS, "the ring is about to be unmapped"},
    {"tap", (PyCFunction)(void (*)(void))Core_tap, METH_FASTCALL, "tap(hook, layer, extract, *args)"},
    {"capture", (PyCFunction)(void (*)(void))Core_capture, METH_FASTCALL,
     "capture(hook, layer, rows[, identity]): rows the backend holds (identity: bind()'s when left out)"},
    {"bind", (PyCFunction)Core_bind, METH_VARARGS,
     "bind(ShiftedRows, RowDomain.SEQUENCES, CaptureAgent.begin_step, identity, CaptureAgent.idle_step, "
     "CaptureAgent.end_step) -> whether their common cases run in C"},
    {"begin_step", (PyCFunction)Core_begin_step, METH_O, "begin_step(layout) -> True for a repeat step (CaptureAgent.begin_step)"},
    {"idle_step", (PyCFunction)Core_idle_step, METH_NOARGS, "idle_step() -> bool (CaptureAgent.idle_step)"},
    {"end_step", (PyCFunction)Core_end_step, METH_NOARGS, "end_step() (CaptureAgent.end_step)"},
    {"capture_static", (PyCFunction)(void (*)(void))Core_capture_static, METH_FASTCALL,
     "capture_static([(hook, layer, buffer)], rows, identity)"},
    {"noop", (PyCFunction)(void (*)(void))Core_noop, METH_FASTCALL, "does nothing (call-overhead benchmark)"},
    {NULL}};

static PyGetSetDef Core_getset[] = {
    {"thread_ns", (getter)Core_get_thread_ns, (setter)Core_set_thread_ns, "inference-thread ns of the agent", NULL},
    {"open", (getter)Core_get_open, NULL, "a step that captures is open", NULL},
    {"step_frame_ok", (getter)Core_get_step_frame_ok, NULL, "the open step's STEP frame is in the ring", NULL},
    {"tap_calls", (getter)Core_get_tap_calls, NULL, "calls of this core's taps, ever", NULL},
    {"control_seen", (getter)Core_get_control_seen, (setter)Core_set_control_seen,
     "the control block seq the agent last read", NULL},
    {"clock", (getter)Core_get_clock, (setter)Core_set_clock, "None (CLOCK_REALTIME) or a callable -> ns", NULL},
    {"is_compiling", (getter)Core_get_is_compiling, (setter)Core_set_is_compiling, "None or a callable", NULL},
    {NULL}};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tensortrace.agent._capture.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_traverse = (traverseproc)Core_traverse,
    .tp_clear = (inquiry)Core_clear,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
    .tp_getset = Core_getset,
    .tp_doc = "Core(ring_base_address, capacity, writer, agent): the native side of one CaptureAgent",
};

/* ---------------------------------------------------------------- Timer --------------------- */
/* Timer(core): what `with agent.timed():` enters on the native path. The block's wall time on
 * this thread is the agent's: on exit core.thread_ns becomes its value at entry plus the block's
 * duration, so agent calls inside the block that time themselves count once (as core.py's _Timed).
 * One reusable object per agent, nestable (a stack of TIMER_DEPTH levels; a deeper block is
 * covered by the enclosing one's time); __enter__ and __exit__ are C, so a block costs no Python
 * frame and no allocation — a backend runs several a step, each cache-cold between kernels. */
#define TIMER_DEPTH 16
typedef struct {
    PyObject_HEAD
    Core *core;
    int depth;
    long long ns0[TIMER_DEPTH], t0[TIMER_DEPTH];
} Timer;

static int Timer_init(Timer *self, PyObject *args, PyObject *kw) {
    PyObject *core;
    if (!PyArg_ParseTuple(args, "O!", &CoreType, &core)) return -1;
    Py_INCREF(core);
    Py_XSETREF(self->core, (Core *)core);
    self->depth = 0;
    return 0;
}

static int Timer_traverse(Timer *self, visitproc visit, void *arg) { Py_VISIT(self->core); return 0; }
static int Timer_clear(Timer *self) { Py_CLEAR(self->core); return 0; }
static void Timer_dealloc(Timer *self) {
    PyObject_GC_UnTrack(self);
    Timer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Timer_enter(Timer *self, PyObject *unused) {
    if (!self->core) { PyErr_SetString(PyExc_RuntimeError, "Timer: no core"); return NULL; }
    if (self->depth < TIMER_DEPTH) {
        self->ns0[self->depth] = self->core->thread_ns;
        self->t0[self->depth] = now_ns(CLOCK_MONOTONIC);
    }
    self->depth++;
    return Py_NewRef(self);
}

static PyObject *Timer_exit(Timer *self, PyObject *const *args, Py_ssize_t nargs) {
    if (self->depth > 0 && self->core) {
        int d = --self->depth;
        if (d < TIMER_DEPTH) self->core->thread_ns = self->ns0[d] + (now_ns(CLOCK_MONOTONIC) - self->t0[d]);
    }
    Py_RETURN_FALSE;   /* an exception in the block propagates */
}

static PyObject *Timer_get_depth(Timer *self, void *c) { return PyLong_FromLong(self->depth); }

static PyMethodDef Timer_methods[] = {
    {"__enter__", (PyCFunction)Timer_enter, METH_NOARGS, "the block starts"},
    {"__exit__", (PyCFunction)(void (*)(void))Timer_exit, METH_FASTCALL, "the block ended: its time is the agent's"},
    {NULL}};

static PyGetSetDef Timer_getset[] = {
    {"depth", (getter)Timer_get_depth, NULL, "blocks open now", NULL},
    {NULL}};

static PyTypeObject TimerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tensortrace.agent._capture.Timer",
    .tp_basicsize = sizeof(Timer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Timer_init,
    .tp_traverse = (traverseproc)Timer_traverse,
    .tp_clear = (inquiry)Timer_clear,
    .tp_dealloc = (destructor)Timer_dealloc,
    .tp_methods = Timer_methods,
    .tp_getset = Timer_getset,
    .tp_doc = "Timer(core): `with timer:` adds the block's wall time to core.thread_ns (agent.timed())",
};

static PyObject *mod_crc32(PyObject *m, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE)) return NULL;
    uint32_t c = crc32_of(b.buf, (size_t)b.len);
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLong(c);
}

static PyObject *mod_noop(PyObject *m, PyObject *const *args, Py_ssize_t nargs) { Py_RETURN_NONE; }

/* ------------------------------------------------------- the SGLang plugin's repeat check ----- */

/* next_decode(fb, shape, total_rows) -> the new seq_lens list when the SGLang ForwardBatch `fb` is
 * the DECODE forward right after the one `shape` (batch_layout._DecodeShape) last described: the
 * same ForwardMode object, batch_size and request ids (a list equal to shape.rids), `total_rows`
 * input rows, and every seq_len one more than shape.last_seq_lens. Else None: the caller then runs
 * plan_step's Python, which decides every case (and raises LayoutError on inconsistent fields).
 * What plan_step's repeat path reads, in one C call: it runs before every steady decode step. With
 * the TensorImpl reader (use_geometry), a CPU input_ids' rows and an int64 seq_lens_cpu are read in
 * place: no torch.Size and no tolist() dispatch on the step (every other case asks torch). */
static PyObject *next_decode_of(PyObject *fb, PyObject *shape, long long total_rows);

static PyObject *mod_next_decode(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "next_decode(forward_batch, shape, total_rows)");
        return NULL;
    }
    long long total_rows = PyLong_AsLongLong(args[2]);
    if (total_rows == -1 && PyErr_Occurred()) return NULL;
    return next_decode_of(args[0], args[1], total_rows);
}

static PyObject *next_decode_of(PyObject *fb, PyObject *shape, long long total_rows) {
    PyObject *out = NULL, *mode = NULL, *smode = NULL, *srids = NULL, *bso = NULL, *rids = NULL, *ii = NULL,
             *shp = NULL, *sl = NULL, *lst = NULL, *last = NULL;
    /* a missing attribute or an unexpected type is a miss (the Python path answers), never an error */
#define TAKE(var, obj, name) if (!(var = PyObject_GetAttr(obj, name))) goto miss
    TAKE(mode, fb, s_forward_mode);
    TAKE(smode, shape, s_mode);
    if (mode != smode) goto miss;
    TAKE(srids, shape, s_rids);
    if (!PyList_CheckExact(srids) || PyList_GET_SIZE(srids) == 0) goto miss;
    Py_ssize_t bs = PyList_GET_SIZE(srids);
    TAKE(bso, fb, s_batch_size);
    if (!PyLong_Check(bso) || PyLong_AsLongLong(bso) != bs) goto miss;
    TAKE(rids, fb, s_rids);
    if (!PyList_CheckExact(rids)) goto miss;
    int eq = PyObject_RichCompareBool(rids, srids, Py_EQ);
    if (eq <= 0) goto miss;
    TAKE(ii, fb, s_input_ids);
    TTGeometry g;
    if (g_geometry && g_geometry(ii, &g)) {   /* a CPU tensor: its rows from the TensorImpl, no torch.Size */
        if (g.ndim < 1 || g.sizes[0] != total_rows) goto miss;
    } else {
        TAKE(shp, ii, s_shape);
        if (!PyTuple_Check(shp) || PyTuple_GET_SIZE(shp) < 1 ||
            PyLong_AsLongLong(PyTuple_GET_ITEM(shp, 0)) != total_rows)
            goto miss;
    }
    TAKE(sl, fb, s_seq_lens_cpu);
    TAKE(last, shape, s_last_seq_lens);
    if (!PyList_CheckExact(last) || PyList_GET_SIZE(last) != bs) goto miss;
    if (g_geometry && g_int64 && g_geometry(sl, &g) && g.dtype == g_int64 && g.ndim == 1 && g.sizes[0] >= bs) {
        /* seq_lens_cpu read in place (the reader checked its storage holds the view): the first bs
         * entries of the list tolist() would make, without torch's dispatch */
        const int64_t *d = (const int64_t *)g.data;
        if (!(lst = PyList_New(bs))) goto miss;
        for (Py_ssize_t i = 0; i < bs; i++) {
            PyObject *v = PyLong_FromLongLong((long long)d[i * g.strides[0]]);
            if (!v) goto miss;
            PyList_SET_ITEM(lst, i, v);
        }
    } else if (!(lst = PyObject_CallMethodNoArgs(sl, s_tolist))) {
        goto miss;
    }
    if (!PyList_CheckExact(lst) || PyList_GET_SIZE(lst) < bs) goto miss;
    for (Py_ssize_t i = 0; i < bs; i++) {
        PyObject *a = PyList_GET_ITEM(lst, i), *b = PyList_GET_ITEM(last, i);
        if (!PyLong_CheckExact(a) || !PyLong_CheckExact(b)) goto miss;
        long long x = PyLong_AsLongLong(a), y = PyLong_AsLongLong(b);
        if ((x == -1 || y == -1) && PyErr_Occurred()) goto miss;
        if (y == LLONG_MAX || x != y + 1) goto miss;
    }
    out = PyList_GET_SIZE(lst) == bs ? Py_NewRef(lst) : PyList_GetSlice(lst, 0, bs);
    goto done;
miss:
    PyErr_Clear();
    out = Py_NewRef(Py_None);
done:
#undef TAKE
    Py_XDECREF(mode); Py_XDECREF(smode); Py_XDECREF(srids); Py_XDECREF(bso); Py_XDECREF(rids); Py_XDECREF(ii);
    Py_XDECREF(shp); Py_XDECREF(sl); Py_XDECREF(lst); Py_XDECREF(last);
    return out;
}

/* layout_types(StepLayout, ShiftedRows, _DecodeShape): the classes advance_decode makes and reads */
static PyObject *g_layout_t, *g_shifted_t, *g_shape_t, *g_empty;

static PyObject *mod_layout_types(PyObject *m, PyObject *args) {
    PyObject *lt, *st, *dt;
    if (!PyArg_ParseTuple(args, "O!O!O!", &PyType_Type, &lt, &PyType_Type, &st, &PyType_Type, &dt)) return NULL;
    Py_INCREF(lt); Py_XSETREF(g_layout_t, lt);
    Py_INCREF(st); Py_XSETREF(g_shifted_t, st);
    Py_INCREF(dt); Py_XSETREF(g_shape_t, dt);
    Py_RETURN_NONE;
}

/* advance_decode(fb, previous) -> previous.advanced(1), recorded as its shape's newest layout (with
 * the new seq_lens), when `fb` is the steady decode step after `previous` (a layout plan_step built
 * or advanced, whose shape is a _DecodeShape of rows all past their prompts, and next_decode's
 * answer is yes); else None, and plan_step's Python decides. plan_step's steady case whole, so
 * the SGLang plugin calls it before plan_step: no Python frame on such a step. */
static PyObject *mod_advance_decode(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) { PyErr_SetString(PyExc_TypeError, "advance_decode(forward_batch, previous)"); return NULL; }
    PyObject *fb = args[0], *prev = args[1];
    if (!g_layout_t || (PyObject *)Py_TYPE(prev) != g_layout_t) Py_RETURN_NONE;
    PyObject *shape = NULL, *last = NULL, *all = NULL, *tro = NULL, *seq = NULL, *rows = NULL, *base = NULL,
             *dl = NULL, *view = NULL, *made = NULL, *out = NULL, *od = NULL, *res = NULL;
    if (!(shape = PyObject_GetAttr(prev, s_shape)) || (PyObject *)Py_TYPE(shape) != g_shape_t) goto miss;
    if (!(last = PyObject_GetAttr(shape, s_last)) || last != prev) goto miss;
    if (!(all = PyObject_GetAttr(shape, s_all_decode)) || all != Py_True) goto miss;
    if (!(tro = PyObject_GetAttr(prev, s_l_total_rows)) || !PyLong_CheckExact(tro)) goto miss;
    long long tr = PyLong_AsLongLong(tro);
    if (tr == -1 && PyErr_Occurred()) goto miss;
    if (!(seq = next_decode_of(fb, shape, tr)) || seq == Py_None) goto miss;
    if (!(rows = PyObject_GetAttr(prev, s_l_requests))) goto miss;
    long long delta = 1;
    if ((PyObject *)Py_TYPE(rows) == g_shifted_t) {
        PyObject *d0 = PyObject_GetAttr(rows, s_r_delta);
        delta = d0 ? PyLong_AsLongLong(d0) : -1;
        Py_XDECREF(d0);
        if (delta < 0 || !(base = PyObject_GetAttr(rows, s_r_base))) goto miss;
        delta += 1;
    } else {
        base = Py_NewRef(rows);
    }
    /* ShiftedRows(base, delta) and the StepLayout, made as StepLayout.advanced makes them */
    PyTypeObject *vt = (PyTypeObject *)g_shifted_t, *lt = (PyTypeObject *)g_layout_t;
    if (!(dl = PyLong_FromLongLong(delta)) || !(made = PyDict_New())) goto fail;
    if (!g_empty && !(g_empty = PyTuple_New(0))) goto fail;
    /* object.__new__(cls), as StepLayout.advanced calls it (its instance dict set up as Python's) */
    if (!(view = PyBaseObject_Type.tp_new(vt, g_empty, NULL))) goto fail;
    if (PyObject_SetAttr(view, s_r_base, base) < 0 || PyObject_SetAttr(view, s_r_delta, dl) < 0 ||
        PyObject_SetAttr(view, s_made, made) < 0)
        goto fail;
    if (!(out = PyBaseObject_Type.tp_new(lt, g_empty, NULL)) || !(od = PyObject_GenericGetDict(out, NULL))) goto fail;
    PyObject *nso = PyObject_GetAttr(prev, s_l_num_sequences);
    if (!nso) goto fail;
    int rc = PyDict_SetItem(od, s_l_requests, view) < 0 || PyDict_SetItem(od, s_l_total_rows, tro) < 0 ||
             PyDict_SetItem(od, s_l_num_sequences, nso) < 0 || PyDict_SetItem(od, s_shape, shape) < 0;
    Py_DECREF(nso);
    if (rc) goto fail;
    if (PyObject_SetAttr(shape, s_last, out) < 0 || PyObject_SetAttr(shape, s_last_seq_lens, seq) < 0) goto fail;
    res = Py_NewRef(out);
    goto done;
miss:
    PyErr_Clear();   /* a missing attribute or an unexpected type: the Python way decides */
    res = Py_NewRef(Py_None);
    goto done;
fail:
    res = NULL;   /* out of memory, or a class that refuses its own attributes: raised */
done:
    Py_XDECREF(shape); Py_XDECREF(last); Py_XDECREF(all); Py_XDECREF(tro); Py_XDECREF(seq); Py_XDECREF(rows);
    Py_XDECREF(base); Py_XDECREF(dl); Py_XDECREF(view); Py_XDECREF(made); Py_XDECREF(out); Py_XDECREF(od);
    return res;
}

/* ---- protobuf encoders for the per-step messages (the same bytes as upb's SerializeToString:
 * fields in number order, proto3 zero values omitted; tests/agent/test_native_capture.py) ---- */
static unsigned char *put_varint(unsigned char *p, unsigned long long v) {
    while (v >= 0x80) { *p++ = (unsigned char)(v | 0x80); v >>= 7; }
    *p++ = (unsigned char)v;
    return p;
}

static unsigned char *put_field(unsigned char *p, int tag, unsigned long long v) {
    if (!v) return p;
    *p++ = (unsigned char)tag;
    return put_varint(p, v);
}

static PyObject *encode_parts_of(const long long *f, Py_ssize_t n, long long delta) {
    unsigned char *buf = PyMem_Malloc((size_t)n * 48 + 1), *p = buf;
    if (!buf) return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char body[44], *b = body;
        b = put_field(b, 0x08, (unsigned long long)f[4 * i]); b = put_field(b, 0x10, (unsigned long long)f[4 * i + 1]);
        b = put_field(b, 0x18, (unsigned long long)f[4 * i + 2]);
        b = put_field(b, 0x20, (unsigned long long)(f[4 * i + 3] + delta));
        *p++ = 0x42;
        p = put_varint(p, (unsigned long long)(b - body));
        memcpy(p, body, (size_t)(b - body));
        p += b - body;
    }
    PyObject *r = PyBytes_FromStringAndSize((const char *)buf, p - buf);
    PyMem_Free(buf);
    return r;
}

/* encode_parts([(request_index, slab_row_start, row_count, position_start), ...]) -> bytes of
 * `repeated SlabPart parts = 8` (RingSlab) */
static PyObject *mod_encode_parts(PyObject *m, PyObject *arg) {
    PyObject *seq = PySequence_Fast(arg, "parts must be a sequence of 4-tuples");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    unsigned char *buf = PyMem_Malloc((size_t)n * 48 + 1), *p = buf;
    if (!buf) { Py_DECREF(seq); return PyErr_NoMemory(); }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long v[4];
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KKKK", &v[0], &v[1], &v[2], &v[3])) {
            PyMem_Free(buf); Py_DECREF(seq); return NULL;
        }
        unsigned char body[44], *b = body;
        b = put_field(b, 0x08, v[0]); b = put_field(b, 0x10, v[1]); b = put_field(b, 0x18, v[2]);
        b = put_field(b, 0x20, v[3]);
        *p++ = 0x42;
        p = put_varint(p, (unsigned long long)(b - body));
        memcpy(p, body, (size_t)(b - body));
        p += b - body;
    }
    Py_DECREF(seq);
    PyObject *r = PyBytes_FromStringAndSize((const char *)buf, p - buf);
    PyMem_Free(buf);
    return r;
}

/* encode_requests([(prefix, row_start, row_count, position_start, phase), ...][, delta]) -> bytes of
 * `repeated RequestRows requests = 3` (RingStep); prefix = the serialized fields 1-3; every
 * position_start + delta */
static PyObject *encode_requests_of(PyObject *arg, long long delta) {
    PyObject *seq = PySequence_Fast(arg, "requests must be a sequence of 5-tuples");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 5 || !PyBytes_Check(PyTuple_GET_ITEM(t, 0))) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_TypeError, "each request is (prefix bytes, row_start, row_count, position_start, phase)");
            return NULL;
        }
        total += PyBytes_GET_SIZE(PyTuple_GET_ITEM(t, 0)) + 64;
    }
    unsigned char *buf = PyMem_Malloc((size_t)total + 1), *p = buf;
    if (!buf) { Py_DECREF(seq); return PyErr_NoMemory(); }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(seq, i), *prefix = PyTuple_GET_ITEM(t, 0);
        unsigned long long v[4];
        for (int k = 0; k < 4; k++) v[k] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(t, k + 1));
        if (PyErr_Occurred()) { PyMem_Free(buf); Py_DECREF(seq); return NULL; }
        v[2] += (unsigned long long)delta;
        unsigned char tail[48], *b = tail;
        b = put_field(b, 0x20, v[0]); b = put_field(b, 0x28, v[1]); b = put_field(b, 0x30, v[2]);
        b = put_field(b, 0x38, v[3]);
        Py_ssize_t plen = PyBytes_GET_SIZE(prefix);
        *p++ = 0x1a;
        p = put_varint(p, (unsigned long long)(plen + (b - tail)));
        memcpy(p, PyBytes_AS_STRING(prefix), (size_t)plen);
        p += plen;
        memcpy(p, tail, (size_t)(b - tail));
        p += b - tail;
    }
    Py_DECREF(seq);
    PyObject *r = PyBytes_FromStringAndSize((const char *)buf, p - buf);
    PyMem_Free(buf);
    return r;
}

static PyObject *mod_encode_requests(PyObject *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) { PyErr_SetString(PyExc_TypeError, "encode_requests(items[, delta])"); return NULL; }
    long long delta = nargs == 2 ? PyLong_AsLongLong(args[1]) : 0;
    if (delta == -1 && PyErr_Occurred()) return NULL;
    return encode_requests_of(args[0], delta);
}

/* core.write_step(items, delta) -> True once the step's STEP frame is committed: RingStep fields in
 * number order, step (the field begin() made) | model_id | requests (items, positions + delta) |
 * capture time | tp_size, the same bytes as core.py's Python path. False: no room (nothing written). */
/* The STEP frame of the open step, committed: 1; 0 no room (nothing written); -1 error set. */
static int write_step_frame(Core *c, PyObject *items, long long delta) {
    if (!c->step_model || !c->step_tp) { PyErr_SetString(PyExc_RuntimeError, "write_step: step_fields not set"); return -1; }
    if (!c->base) return 0;
    PyObject *reqs = encode_requests_of(items, delta);
    if (!reqs) return -1;
    unsigned char tb[9];
    tb[0] = (4 << 3) | 1;   /* RingStep.capture_time_unix_nano: field 4, fixed64 */
    uint64_t tnow;
    if (c->clock == Py_None) {
        tnow = (uint64_t)now_ns(CLOCK_REALTIME);
    } else {
        PyObject *tv = PyObject_CallNoArgs(c->clock);
        if (!tv) { Py_DECREF(reqs); return -1; }
        tnow = PyLong_AsUnsignedLongLong(tv);
        Py_DECREF(tv);
        if (PyErr_Occurred()) { Py_DECREF(reqs); return -1; }
    }
    memcpy(tb + 1, &tnow, 8);
    PyObject *pieces[5] = {c->step_field, c->step_model, reqs, NULL, c->step_tp};
    PyObject *no_time[4] = {c->step_field, c->step_model, reqs, c->step_tp};   /* proto3: a zero time is omitted */
    unsigned long long end_pos, new_seq, pos_after;
    unsigned char *r = tnow ? reserve_frame(c, KIND_STEP, pieces, 5, tb, 0, &end_pos, &new_seq, &pos_after)
                            : reserve_frame(c, KIND_STEP, no_time, 4, tb, 0, &end_pos, &new_seq, &pos_after);
    Py_DECREF(reqs);
    if (!r) return PyErr_Occurred() ? -1 : 0;
    if (store_writer_state(c, pos_after, new_seq)) return -1;
    __atomic_store_n((unsigned long long *)(c->base + OFF_HEAD), end_pos, __ATOMIC_RELEASE);
    *(unsigned long long *)(c->base + OFF_FRAMES_COMMITTED) += 1;
    c->step_frame_ok = 1;
    return 1;
}

static PyObject *Core_write_step(PyObject *self_, PyObject *const *args, Py_ssize_t nargs) {
    Core *c = (Core *)self_;
    if (nargs != 2) { PyErr_SetString(PyExc_TypeError, "write_step(items, delta)"); return NULL; }
    long long delta = PyLong_AsLongLong(args[1]);
    if (delta == -1 && PyErr_Occurred()) return NULL;
    int rc = write_step_frame(c, args[0], delta);
    if (rc < 0) return NULL;
    return PyBool_FromLong(rc);
}

/* core.step_fields(model_field, tp_field): RingStep's constant fields, serialized once */
static PyObject *Core_step_fields(PyObject *self_, PyObject *args) {
    Core *c = (Core *)self_;
    PyObject *mf, *tf;
    if (!PyArg_ParseTuple(args, "SS", &mf, &tf)) return NULL;
    Py_INCREF(mf); Py_XSETREF(c->step_model, mf);
    Py_INCREF(tf); Py_XSETREF(c->step_tp, tf);
    Py_RETURN_NONE;
}

static PyMethodDef mod_methods[] = {
    {"crc32", (PyCFunction)mod_crc32, METH_O, "zlib.crc32 of a buffer (self-test)"},
    {"use_geometry", (PyCFunction)mod_use_geometry, METH_O,
     "use_geometry(agent._tensorgeom.geometry capsule or None): taps read a plain tensor's geometry from its TensorImpl"},
    {"use_dlpack", (PyCFunction)mod_use_dlpack, METH_O,
     "use_dlpack(torch._C._to_dlpack or None): how taps read a tensor's geometry (None: its accessors)"},
    {"noop", (PyCFunction)(void (*)(void))mod_noop, METH_FASTCALL, "does nothing (call-overhead benchmark)"},
    {"next_decode", (PyCFunction)(void (*)(void))mod_next_decode, METH_FASTCALL,
     "next_decode(forward_batch, shape, total_rows) -> seq_lens when the forward is shape's next decode step, else None"},
    {"layout_types", (PyCFunction)mod_layout_types, METH_VARARGS,
     "layout_types(StepLayout, ShiftedRows, _DecodeShape): the classes advance_decode makes and reads"},
    {"advance_decode", (PyCFunction)(void (*)(void))mod_advance_decode, METH_FASTCALL,
     "advance_decode(forward_batch, previous) -> previous.advanced(1) for the steady decode step, else None"},
    {"encode_parts", (PyCFunction)mod_encode_parts, METH_O, "RingSlab.parts (field 8) of [(idx, dst, count, pos)]"},
    {"encode_requests", (PyCFunction)(void (*)(void))mod_encode_requests, METH_FASTCALL,
     "RingStep.requests (field 3) of [(prefix, row_start, row_count, position_start, phase)][, delta]"},
    {NULL}};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_capture",
                                    "The capture agent's native fast path (agent/_capture.c).", -1, mod_methods, NULL, NULL, NULL, NULL};

/* the attribute names the module reads and sets, interned once */
static const struct { PyObject **var; const char *name; } INTERNED[] = {
    {&s_element_size, "element_size"}, {&s_reserved, "_reserved"}, {&s_seq, "_seq"}, {&s_is_cpu, "is_cpu"},
    {&s_size, "size"}, {&s_stride, "stride"}, {&s_data_ptr, "data_ptr"}, {&s_dtype, "dtype"},
    {&s_hidden_states, "hidden_states"}, {&s_input, "input"}, {&s_native_wants, "_native_wants"},
    {&s_native_group, "_native_group"}, {&s_native_plan, "_native_plan"}, {&s_tap_body, "_tap_body"},
    {&s_tap_failed, "tap_failed"}, {&s_native_step_frame, "_native_step_frame"}, {&s_forward_mode, "forward_mode"},
    {&s_batch_size, "batch_size"}, {&s_rids, "rids"}, {&s_input_ids, "input_ids"}, {&s_shape, "shape"},
    {&s_seq_lens_cpu, "seq_lens_cpu"}, {&s_tolist, "tolist"}, {&s_mode, "mode"},
    {&s_last_seq_lens, "last_seq_lens"}, {&s_a_pending, "_pending_summaries"}, {&s_a_repeat, "_repeat"},
    {&s_a_layout, "_layout"}, {&s_a_epoch, "_epoch"}, {&s_a_selection, "selection"},
    {&s_a_disabled, "disabled_reason"}, {&s_a_counters, "_counters"}, {&s_a_scalars, "scalars"},
    {&s_a_step, "_step"}, {&s_a_plan_unknown, "_plan_unknown"}, {&s_a_plan_entries, "_plan_entries"},
    {&s_a_native_groups, "_native_groups"}, {&s_a_frame_state, "_step_frame_state"}, {&s_a_entries, "_entries"},
    {&s_a_groups, "_groups"}, {&s_a_step_open, "_step_open"}, {&s_a_step_delta, "_step_delta"},
    {&s_a_step_items, "_step_items"}, {&s_a_step_field, "_step_field"}, {&s_l_requests, "requests"},
    {&s_l_total_rows, "total_rows"}, {&s_l_num_sequences, "num_sequences"}, {&s_r_base, "base"},
    {&s_r_delta, "delta"}, {&s_g_native, "native"}, {&s_g_parts_bytes, "parts_bytes"}, {&s_c_steps, "steps"},
    {&s_c_repeat_steps, "repeat_steps"}, {&s_c_unknown_rows, "unknown_request_rows"}, {&s_last, "last"},
    {&s_all_decode, "all_decode"}, {&s_made, "_made"}, {&s_a_closed, "_closed"},
    {&s_a_sampled_live, "_sampled_live"}, {&s_a_staging, "_staging"}, {&s_g_written_slabs, "written_slabs"},
    {&s_c_idle_steps, "idle_steps"},
};

PyMODINIT_FUNC PyInit__capture(void) {
    crc_init();
    for (size_t i = 0; i < sizeof(INTERNED) / sizeof(INTERNED[0]); i++)
        if (!(*INTERNED[i].var = PyUnicode_InternFromString(INTERNED[i].name))) return NULL;
    if (PyType_Ready(&PlanType) < 0 || PyType_Ready(&GroupType) < 0 || PyType_Ready(&CoreType) < 0 || PyType_Ready(&TimerType) < 0 ||
        PyType_Ready(&TapType) < 0 || PyType_Ready(&ForwardWrapType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Plan", (PyObject *)&PlanType) < 0 ||
        PyModule_AddObjectRef(m, "Group", (PyObject *)&GroupType) < 0 ||
        PyModule_AddObjectRef(m, "Core", (PyObject *)&CoreType) < 0 ||
        PyModule_AddObjectRef(m, "Timer", (PyObject *)&TimerType) < 0 ||
        PyModule_AddObjectRef(m, "Tap", (PyObject *)&TapType) < 0 ||
        PyModule_AddObjectRef(m, "ForwardWrap", (PyObject *)&ForwardWrapType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "K_INPUT", K_INPUT);
    PyModule_AddIntConstant(m, "K_PLAIN_INPUT", K_PLAIN_INPUT);
    PyModule_AddIntConstant(m, "K_OUTPUT", K_OUTPUT);
    PyModule_AddIntConstant(m, "K_FIRST_OUTPUT", K_FIRST_OUTPUT);
    PyModule_AddIntConstant(m, "K_CALL", K_CALL);
    PyModule_AddIntConstant(m, "K_ROWS", K_ROWS);
    PyModule_AddIntConstant(m, "K_ROWS_OUT0", K_ROWS_OUT0);
    PyModule_AddIntConstant(m, "K_ROWS_OUT1_OR_IN0", K_ROWS_OUT1_OR_IN0);
    PyModule_AddIntConstant(m, "K_ROWS_OUT1", K_ROWS_OUT1);
    PyModule_AddIntConstant(m, "K_ROWS_IN0", K_ROWS_IN0);
    PyModule_AddIntConstant(m, "K_ROWS_OUT0_COLS", K_ROWS_OUT0_COLS);
    PyModule_AddIntConstant(m, "W_NO", W_NO);
    PyModule_AddIntConstant(m, "W_NATIVE", W_NATIVE);
    PyModule_AddIntConstant(m, "W_SLOW", W_SLOW);
    PyModule_AddIntConstant(m, "ABI", 5);
    return m;
}
