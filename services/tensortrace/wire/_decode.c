/* Native envelope scanner for the consumers' hot loop (tensortrace.wire.native is its Python face).
 *
 * scan(data) parses one v1 Envelope (proto/tensortrace/v1/records.proto) without a Python object per
 * record and returns (n, columns): `columns` is an (n x NCOL) int64 matrix as bytes, one row per
 * record: every scalar a consumer reads, and (offset, length) into `data` for every string, bytes and
 * packed field, plus the verdict of consume/validate.py's check_tensor_record (a status code).
 *
 * The Python path (wire/codec.py decode_envelope + consume/validate.py) is the oracle. This scanner
 * handles the canonical encodings our producers write and answers None ("use the Python path") for
 * anything it does not decode exactly as upb would: a parse error of any kind, an envelope-level
 * WireError (bad version, no records, unknown dtype/encoding, id lengths, chunk index), a group, a
 * non-ASCII string (upb's UTF-8 check is not reproduced), a packed field given twice or unpacked,
 * a sub-message given twice (upb would merge them), a record with two kinds. So every message it
 * accepts decodes the same both ways, and every message it refuses gets the Python path's own error.
 * Every read is bounds-checked against the buffer (it parses untrusted bytes).
 *
 * gather(...) / unpack(...) build Arrow-ready buffers (values + offsets) from the slices of many
 * scanned messages: the loader's column batch without a Python object per row.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum {
    C_KIND, C_STATUS, C_BODY_OFF, C_BODY_LEN, C_MODEL_OFF, C_MODEL_LEN, C_RID_OFF, C_RID_LEN,
    C_TRACE_OFF, C_TRACE_LEN, C_SPAN_OFF, C_SPAN_LEN, C_HOOK_OFF, C_HOOK_LEN, C_LAYER, C_TP_RANK,
    C_TP_SIZE, C_POS_KIND, C_TOKEN_START, C_TOKEN_END, C_POS_OFF, C_POS_LEN, C_POS_COUNT, C_PHASE,
    C_STEP, C_DTYPE, C_SHAPE_OFF, C_SHAPE_LEN, C_NDIM, C_ENCODING, C_RAW_SIZE, C_PAYLOAD_OFF,
    C_PAYLOAD_LEN, C_CAPTURE_NS, C_EXPORT_NS, C_NODE_OFF, C_NODE_LEN, C_POD_OFF, C_POD_LEN, C_PID,
    C_PRANK, C_GENERATION, C_SEQ, C_CHUNK_INDEX, C_CHUNK_COUNT, C_CHUNK_OFFSET, C_PAYLOAD_SIZE,
    C_RUN, C_MH, C_SHAPE0, C_LASTDIM, C_ELEM,
    NCOL
};

/* status codes: the first failing check of check_tensor_record, in its order */
enum { S_OK = 0, S_CHUNKED = 1, S_SHAPE = 2, S_RAW_SIZE = 3, S_RAW_PAYLOAD = 4, S_TOKEN_RANGE = 5,
       S_POSITIONS = 6, S_NO_REQUEST_ID = 7, S_NO_HOOK = 8 };

static const int ELEM[16] = {0, 4, 2, 2, 8, 1, 1, 2, 4, 8, 1, 1, 1, 1, 1, 1};

typedef struct { const uint8_t *base; } Ctx;

/* 0 on success; -1: not decodable as upb would (caller answers "Python path"). */
static int rd_varint(const uint8_t **pp, const uint8_t *end, uint64_t *out) {
    const uint8_t *p = *pp;
    uint64_t v = 0;
    for (int i = 0; i < 10; i++) {
        if (p >= end) return -1;
        uint8_t b = *p++;
        if (i == 9 && b > 1) return -1;
        v |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) { *pp = p; *out = v; return 0; }
    }
    return -1;
}

static int rd_tag(const uint8_t **pp, const uint8_t *end, uint32_t *field, int *wt) {
    uint64_t t;
    if (rd_varint(pp, end, &t)) return -1;
    if (t > 0xFFFFFFFFu) return -1;
    *field = (uint32_t)(t >> 3);
    *wt = (int)(t & 7);
    if (*field == 0 || *field > 536870911u) return -1;
    if (*wt == 3 || *wt == 4 || *wt > 5) return -1;   /* groups and invalid wire types */
    return 0;
}

static int rd_len(const uint8_t **pp, const uint8_t *end, const uint8_t **s, Py_ssize_t *n) {
    uint64_t l;
    if (rd_varint(pp, end, &l)) return -1;
    if (l > (uint64_t)(end - *pp)) return -1;
    *s = *pp;
    *n = (Py_ssize_t)l;
    *pp += l;
    return 0;
}

/* skip the value of an unknown field */
static int skip(const uint8_t **pp, const uint8_t *end, int wt) {
    uint64_t v;
    const uint8_t *s;
    Py_ssize_t n;
    switch (wt) {
    case 0: return rd_varint(pp, end, &v);
    case 1: if (end - *pp < 8) return -1; *pp += 8; return 0;
    case 2: return rd_len(pp, end, &s, &n);
    case 5: if (end - *pp < 4) return -1; *pp += 4; return 0;
    default: return -1;
    }
}

static int ascii(const uint8_t *s, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        if (s[i] & 0x80) return 0;
    return 1;
}

static uint64_t le64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

#define NEED(wt_expected) do { if (wt != (wt_expected)) return -1; } while (0)
#define SLICE(col) do { const uint8_t *s_; Py_ssize_t n_; if (rd_len(&p, end, &s_, &n_)) return -1; \
    r[col##_OFF] = s_ - c->base; r[col##_LEN] = n_; } while (0)
#define STR(col) do { const uint8_t *s_; Py_ssize_t n_; \
    if (rd_len(&p, end, &s_, &n_) || !ascii(s_, n_)) return -1; \
    r[col##_OFF] = s_ - c->base; r[col##_LEN] = n_; } while (0)
#define VAR(dst) do { uint64_t v_; if (rd_varint(&p, end, &v_)) return -1; dst; } while (0)

static int parse_producer(Ctx *c, const uint8_t *p, const uint8_t *end, int64_t *r) {
    while (p < end) {
        uint32_t f; int wt;
        if (rd_tag(&p, end, &f, &wt)) return -1;
        switch (f) {
        case 1: NEED(2); STR(C_NODE); break;
        case 2: NEED(2); STR(C_POD); break;
        case 3: NEED(0); VAR(r[C_PID] = (uint32_t)v_); break;
        case 4: NEED(0); VAR(r[C_PRANK] = (uint32_t)v_); break;
        case 5: NEED(0); VAR(r[C_GENERATION] = (int64_t)v_); break;
        default: if (skip(&p, end, wt)) return -1;
        }
    }
    return 0;
}

/* a packed repeated varint field: validate, count, and (shape) min/product/first/last */
static int packed_count(const uint8_t *s, Py_ssize_t n, int64_t *count) {
    const uint8_t *p = s, *end = s + n;
    int64_t k = 0;
    uint64_t v;
    while (p < end) { if (rd_varint(&p, end, &v)) return -1; k++; }
    *count = k;
    return 0;
}

static int parse_tensor(Ctx *c, const uint8_t *p, const uint8_t *end, int64_t *r) {
    int seen_shape = 0, seen_pos = 0, seen_prod = 0;
    while (p < end) {
        uint32_t f; int wt;
        if (rd_tag(&p, end, &f, &wt)) return -1;
        switch (f) {
        case 1: NEED(2); STR(C_MODEL); break;
        case 2: NEED(2); STR(C_RID); break;
        case 3: NEED(2); SLICE(C_TRACE); break;
        case 4: NEED(2); SLICE(C_SPAN); break;
        case 5: NEED(2); STR(C_HOOK); break;
        case 6: NEED(0); VAR(r[C_LAYER] = (int32_t)(uint32_t)v_); break;
        case 7: NEED(0); VAR(r[C_TP_RANK] = (uint32_t)v_); break;
        case 8: NEED(0); VAR(r[C_TP_SIZE] = (uint32_t)v_); break;
        case 9: NEED(0); VAR(r[C_POS_KIND] = (int32_t)(uint32_t)v_); break;
        case 10: NEED(0); VAR(r[C_TOKEN_START] = (uint32_t)v_); break;
        case 11: NEED(0); VAR(r[C_TOKEN_END] = (uint32_t)v_); break;
        case 12: NEED(2); if (seen_pos++) return -1; SLICE(C_POS);
            if (packed_count(c->base + r[C_POS_OFF], r[C_POS_LEN], &r[C_POS_COUNT])) return -1;
            break;
        case 13: NEED(0); VAR(r[C_PHASE] = (int32_t)(uint32_t)v_); break;
        case 14: NEED(0); VAR(r[C_STEP] = (int64_t)v_); break;
        case 15: NEED(0); VAR(r[C_DTYPE] = (int32_t)(uint32_t)v_); break;
        case 16: NEED(2); if (seen_shape++) return -1; SLICE(C_SHAPE);
            if (packed_count(c->base + r[C_SHAPE_OFF], r[C_SHAPE_LEN], &r[C_NDIM])) return -1;
            break;
        case 17: NEED(0); VAR(r[C_ENCODING] = (int32_t)(uint32_t)v_); break;
        case 18: NEED(0); VAR(r[C_RAW_SIZE] = (int64_t)v_); break;
        case 19: NEED(2); SLICE(C_PAYLOAD); break;
        case 20: NEED(1); if (end - p < 8) return -1; r[C_CAPTURE_NS] = (int64_t)le64(p); p += 8; break;
        case 21: NEED(1); if (end - p < 8) return -1; r[C_EXPORT_NS] = (int64_t)le64(p); p += 8; break;
        case 22: { NEED(2); if (seen_prod++) return -1;
            const uint8_t *s; Py_ssize_t n;
            if (rd_len(&p, end, &s, &n)) return -1;
            if (parse_producer(c, s, s + n, r)) return -1;
            break; }
        case 23: NEED(0); VAR(r[C_SEQ] = (int64_t)v_); break;
        case 24: NEED(0); VAR(r[C_CHUNK_INDEX] = (uint32_t)v_); break;
        case 25: NEED(0); VAR(r[C_CHUNK_COUNT] = (uint32_t)v_); break;
        case 26: NEED(0); VAR(r[C_CHUNK_OFFSET] = (int64_t)v_); break;
        case 27: NEED(0); VAR(r[C_PAYLOAD_SIZE] = (int64_t)v_); break;
        default: if (skip(&p, end, wt)) return -1;
        }
    }
    return 0;
}

static int parse_map_entry(const uint8_t *p, const uint8_t *end) {
    while (p < end) {
        uint32_t f; int wt;
        if (rd_tag(&p, end, &f, &wt)) return -1;
        if (f == 1) {
            const uint8_t *s; Py_ssize_t n;
            NEED(2);
            if (rd_len(&p, end, &s, &n) || !ascii(s, n)) return -1;
        } else if (f == 2) {
            uint64_t v;
            NEED(0);
            if (rd_varint(&p, end, &v)) return -1;
        } else if (skip(&p, end, wt)) return -1;
    }
    return 0;
}

static int parse_summary(Ctx *c, const uint8_t *p, const uint8_t *end, int64_t *r) {
    int seen_prod = 0;
    while (p < end) {
        uint32_t f; int wt;
        if (rd_tag(&p, end, &f, &wt)) return -1;
        switch (f) {
        case 1: NEED(2); STR(C_MODEL); break;
        case 2: NEED(2); STR(C_RID); break;
        case 3: NEED(2); SLICE(C_TRACE); break;
        case 4: NEED(2); SLICE(C_SPAN); break;
        case 5: { NEED(2); if (seen_prod++) return -1;
            const uint8_t *s; Py_ssize_t n;
            if (rd_len(&p, end, &s, &n)) return -1;
            if (parse_producer(c, s, s + n, r)) return -1;
            break; }
        case 6: NEED(0); VAR(r[C_SEQ] = (int64_t)v_); break;
        case 7: case 8: case 10: case 11: case 13: case 14: case 20: case 21: {
            uint64_t v; NEED(0); if (rd_varint(&p, end, &v)) return -1; break; }
        case 9: { const uint8_t *s; Py_ssize_t n; NEED(2);
            if (rd_len(&p, end, &s, &n) || parse_map_entry(s, s + n)) return -1; break; }
        case 12: case 15: case 16: { const uint8_t *s; Py_ssize_t n; NEED(2);
            if (rd_len(&p, end, &s, &n) || !ascii(s, n)) return -1; break; }
        case 17: case 18: case 19: NEED(1); if (end - p < 8) return -1; p += 8; break;
        default: if (skip(&p, end, wt)) return -1;
        }
    }
    return 0;
}

/* one Record: kind 1 tensor / 2 summary; -1 on anything not decoded exactly */
static int parse_record(Ctx *c, const uint8_t *p, const uint8_t *end, int64_t *r) {
    int kinds = 0;
    while (p < end) {
        uint32_t f; int wt;
        if (rd_tag(&p, end, &f, &wt)) return -1;
        if (f == 1 || f == 2) {
            const uint8_t *s; Py_ssize_t n;
            NEED(2);
            if (kinds++) return -1;          /* two kinds, or one twice (upb merges): Python path */
            if (rd_len(&p, end, &s, &n)) return -1;
            r[C_KIND] = f;
            r[C_BODY_OFF] = s - c->base;
            r[C_BODY_LEN] = n;
            if ((f == 1 ? parse_tensor : parse_summary)(c, s, s + n, r)) return -1;
        } else if (skip(&p, end, wt)) return -1;
    }
    return kinds ? 0 : -1;
}

static int same(const uint8_t *b, const int64_t *x, const int64_t *y, int off, int len) {
    return x[len] == y[len] && memcmp(b + x[off], b + y[off], (size_t)x[len]) == 0;
}

/* the checks of consume/validate.py check_tensor_record, in its order (dtype/encoding/id lengths
 * were already refused for the whole envelope, as codec.decode_envelope does) */
static int check_tensor(const uint8_t *b, int64_t *r) {
    if (r[C_CHUNK_COUNT] > 1) return S_CHUNKED;
    const uint8_t *p = b + r[C_SHAPE_OFF], *end = p + r[C_SHAPE_LEN];
    int negative = 0, zero = 0, overflow = 0;
    unsigned __int128 prod = 1;
    int64_t first = -1, last = 0;
    for (int64_t i = 0; i < r[C_NDIM]; i++) {
        uint64_t v;
        rd_varint(&p, end, &v);          /* validated by packed_count */
        int64_t d = (int64_t)v;
        if (i == 0) first = d;
        last = d;
        if (d < 0) negative = 1;
        else if (d == 0) zero = 1;
        else if (!overflow) { prod *= (uint64_t)d; if (prod >> 64) overflow = 1; }
    }
    r[C_SHAPE0] = first;
    r[C_LASTDIM] = r[C_NDIM] ? last : 0;
    r[C_ELEM] = ELEM[r[C_DTYPE]];
    if (negative) return S_SHAPE;
    if (zero) { prod = 0; overflow = 0; }
    prod *= (uint64_t)ELEM[r[C_DTYPE]];
    if (overflow || (prod >> 64) || (uint64_t)prod != (uint64_t)r[C_RAW_SIZE]) return S_RAW_SIZE;
    if (r[C_ENCODING] == 1 && (uint64_t)r[C_PAYLOAD_LEN] != (uint64_t)r[C_RAW_SIZE]) return S_RAW_PAYLOAD;
    if (r[C_POS_KIND] == 1) {
        if (r[C_NDIM] && r[C_TOKEN_END] - r[C_TOKEN_START] != first) return S_TOKEN_RANGE;
    } else if (r[C_POS_KIND] == 2 && r[C_NDIM] && r[C_POS_COUNT] != first) return S_POSITIONS;
    if (!r[C_RID_LEN]) return S_NO_REQUEST_ID;
    if (!r[C_HOOK_LEN]) return S_NO_HOOK;
    return S_OK;
}

/* the envelope-level checks of codec.decode_envelope: 0 ok, -1 the envelope is refused */
static int check_envelope_record(int64_t *r) {
    if (r[C_TRACE_LEN] && r[C_TRACE_LEN] != 16) return -1;
    if (r[C_SPAN_LEN] && r[C_SPAN_LEN] != 8) return -1;
    if (r[C_KIND] == 1) {
        if (r[C_DTYPE] < 1 || r[C_DTYPE] > 15) return -1;
        if (r[C_ENCODING] < 1 || r[C_ENCODING] > 4) return -1;
        if (r[C_CHUNK_COUNT] > 1 && r[C_CHUNK_INDEX] >= r[C_CHUNK_COUNT]) return -1;
    }
    return 0;
}

/* One tuple per run, for the consumer's per-run bookkeeping without numpy calls:
 * (lo, hi, kind, status, trace_id, request_id, (pod, pid, generation), seqs, payload_bytes, raw_bytes, one_mh)
 * for a run of valid tensor records; (lo, hi, kind, status, None, ...) for a summary or a record
 * that failed a check (a run of one). seqs: the set of the run's seq numbers; one_mh: every record
 * of the run has the same (model_id, hook). */
static PyObject *make_runs(const uint8_t *b, int64_t *rows, Py_ssize_t n) {
    PyObject *list = PyList_New(0);
    if (!list) return NULL;
    Py_ssize_t lo = 0;
    while (lo < n) {
        int64_t *r = rows + lo * NCOL;
        Py_ssize_t hi = lo + 1;
        while (hi < n && rows[hi * NCOL + C_RUN] == lo) hi++;
        PyObject *t;
        if (r[C_KIND] == 1 && r[C_STATUS] == S_OK) {
            PyObject *seqs = PySet_New(NULL);
            if (!seqs) { Py_DECREF(list); return NULL; }
            uint64_t payload = 0, raw = 0;
            int one_mh = 1;
            for (Py_ssize_t i = lo; i < hi; i++) {
                int64_t *q = rows + i * NCOL;
                PyObject *v = PyLong_FromUnsignedLongLong((uint64_t)q[C_SEQ]);
                if (!v || PySet_Add(seqs, v) < 0) { Py_XDECREF(v); Py_DECREF(seqs); Py_DECREF(list); return NULL; }
                Py_DECREF(v);
                payload += (uint64_t)q[C_PAYLOAD_LEN];
                raw += (uint64_t)q[C_RAW_SIZE];
                if (q[C_MH] != lo) one_mh = 0;
            }
            t = Py_BuildValue("(nniiy#s#(s#IK)NKKO)", lo, hi, (int)r[C_KIND], (int)r[C_STATUS],
                              (const char *)b + r[C_TRACE_OFF], (Py_ssize_t)r[C_TRACE_LEN],
                              (const char *)b + r[C_RID_OFF], (Py_ssize_t)r[C_RID_LEN],
                              (const char *)b + r[C_POD_OFF], (Py_ssize_t)r[C_POD_LEN], (unsigned int)r[C_PID],
                              (unsigned long long)r[C_GENERATION], seqs, (unsigned long long)payload,
                              (unsigned long long)raw, one_mh ? Py_True : Py_False);
        } else {
            t = Py_BuildValue("(nniiOOOOOOO)", lo, hi, (int)r[C_KIND], (int)r[C_STATUS], Py_None, Py_None, Py_None,
                              Py_None, Py_None, Py_None, Py_None);
        }
        if (!t || PyList_Append(list, t) < 0) { Py_XDECREF(t); Py_DECREF(list); return NULL; }
        Py_DECREF(t);
        lo = hi;
    }
    return list;
}

static PyObject *scan(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    const uint8_t *b = view.buf, *p = b, *end = b + view.len;
    PyObject *result = NULL;
    Py_ssize_t cap = 64, n = 0;
    int64_t *rows = NULL;
    uint64_t version = 0;
    int ok = view.len > 0;
    if (ok) rows = PyMem_Malloc(sizeof(int64_t) * NCOL * cap);
    if (ok && !rows) { PyBuffer_Release(&view); return PyErr_NoMemory(); }
    Ctx c = {b};
    while (ok && p < end) {
        uint32_t f; int wt;
        if (rd_tag(&p, end, &f, &wt)) { ok = 0; break; }
        if (f == 1) {
            if (wt != 0 || rd_varint(&p, end, &version)) { ok = 0; break; }
        } else if (f == 2) {
            const uint8_t *s; Py_ssize_t len;
            if (wt != 2 || rd_len(&p, end, &s, &len)) { ok = 0; break; }
            if (n == cap) {
                int64_t *grown = PyMem_Realloc(rows, sizeof(int64_t) * NCOL * cap * 2);
                if (!grown) { PyMem_Free(rows); PyBuffer_Release(&view); return PyErr_NoMemory(); }
                rows = grown;
                cap *= 2;
            }
            int64_t *r = rows + n * NCOL;
            memset(r, 0, sizeof(int64_t) * NCOL);
            if (parse_record(&c, s, s + len, r) || check_envelope_record(r)) { ok = 0; break; }
            n++;
        } else if (skip(&p, end, wt)) { ok = 0; break; }
    }
    if ((uint32_t)version != 1 || n == 0) ok = 0;
    if (ok) {
        int64_t run = -1, mh_head = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            int64_t *r = rows + i * NCOL, *q = i ? r - NCOL : NULL;
            if (r[C_KIND] == 1) r[C_STATUS] = check_tensor(b, r);
            else r[C_STATUS] = r[C_RID_LEN] ? S_OK : S_NO_REQUEST_ID;
            /* a run: consecutive valid, unchunked tensor records of one request and one producer */
            int cont = q && r[C_KIND] == 1 && q[C_KIND] == 1 && r[C_STATUS] == S_OK && q[C_STATUS] == S_OK
                && same(b, r, q, C_TRACE_OFF, C_TRACE_LEN) && same(b, r, q, C_RID_OFF, C_RID_LEN)
                && same(b, r, q, C_POD_OFF, C_POD_LEN) && r[C_PID] == q[C_PID] && r[C_GENERATION] == q[C_GENERATION];
            if (!cont) { run = i; mh_head = i; }
            r[C_RUN] = run;
            /* mh: the first record of the run with the same (model_id, hook); searched among a few */
            r[C_MH] = i;
            for (int64_t j = mh_head, k = 0; j < i && k < 16; j++) {
                int64_t *h = rows + j * NCOL;
                if (h[C_MH] != j) continue;
                k++;
                if (same(b, r, h, C_MODEL_OFF, C_MODEL_LEN) && same(b, r, h, C_HOOK_OFF, C_HOOK_LEN)) { r[C_MH] = j; break; }
            }
        }
        PyObject *cols = PyBytes_FromStringAndSize((const char *)rows, (Py_ssize_t)(sizeof(int64_t) * NCOL * n));
        PyObject *runs = cols ? make_runs(b, rows, n) : NULL;
        if (cols && runs) result = Py_BuildValue("(nNN)", n, cols, runs);
        else { Py_XDECREF(cols); Py_XDECREF(runs); }
    } else {
        result = Py_None;
        Py_INCREF(result);
    }
    PyMem_Free(rows);
    PyBuffer_Release(&view);
    return result;
}

/* -- column building for many scanned messages ------------------------------------------------ */

typedef struct { Py_buffer *bufs; Py_ssize_t nbufs; } Bufs;

static void release_bufs(Bufs *B) {
    for (Py_ssize_t i = 0; i < B->nbufs; i++) PyBuffer_Release(&B->bufs[i]);
    PyMem_Free(B->bufs);
}

static int get_bufs(PyObject *seq, Bufs *B) {
    PyObject *fast = PySequence_Fast(seq, "buffers: a sequence of bytes");
    if (!fast) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    B->bufs = PyMem_Calloc(n ? n : 1, sizeof(Py_buffer));
    B->nbufs = 0;
    if (!B->bufs) { Py_DECREF(fast); PyErr_NoMemory(); return -1; }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, i), &B->bufs[i], PyBUF_SIMPLE) < 0) {
            release_bufs(B); Py_DECREF(fast); return -1;
        }
        B->nbufs++;
    }
    Py_DECREF(fast);
    return 0;
}

typedef struct { Py_buffer which, off, len; Py_ssize_t n; } Idx;

static int get_idx(PyObject *w, PyObject *o, PyObject *l, Idx *I) {
    memset(I, 0, sizeof(*I));
    if (PyObject_GetBuffer(w, &I->which, PyBUF_SIMPLE) < 0) return -1;
    if (PyObject_GetBuffer(o, &I->off, PyBUF_SIMPLE) < 0) { PyBuffer_Release(&I->which); return -1; }
    if (PyObject_GetBuffer(l, &I->len, PyBUF_SIMPLE) < 0) { PyBuffer_Release(&I->which); PyBuffer_Release(&I->off); return -1; }
    I->n = I->which.len / 8;
    if (I->off.len / 8 != I->n || I->len.len / 8 != I->n) {
        PyBuffer_Release(&I->which); PyBuffer_Release(&I->off); PyBuffer_Release(&I->len);
        PyErr_SetString(PyExc_ValueError, "which/off/len: int64 arrays of one length");
        return -1;
    }
    return 0;
}

static void release_idx(Idx *I) {
    PyBuffer_Release(&I->which); PyBuffer_Release(&I->off); PyBuffer_Release(&I->len);
}

/* the slice (buffer which[i], off[i], len[i]), bounds-checked */
static const uint8_t *slice_at(Bufs *B, Idx *I, Py_ssize_t i, int64_t *len) {
    int64_t w = ((int64_t *)I->which.buf)[i], o = ((int64_t *)I->off.buf)[i], l = ((int64_t *)I->len.buf)[i];
    if (w < 0 || w >= B->nbufs || o < 0 || l < 0 || o > B->bufs[w].len || l > B->bufs[w].len - o) {
        PyErr_Format(PyExc_ValueError, "slice %zd out of bounds", i);
        return NULL;
    }
    *len = l;
    return (const uint8_t *)B->bufs[w].buf + o;
}

/* gather(buffers, which, off, len, width) -> (values, offsets)
 * width 0: variable-length values, offsets int64[n+1] (Arrow large_binary / string after a cast);
 * width > 0: fixed-size values, an empty slice becomes `width` zero bytes, offsets b"". */
static PyObject *gather(PyObject *self, PyObject *args) {
    PyObject *bseq, *w, *o, *l;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "OOOOn", &bseq, &w, &o, &l, &width)) return NULL;
    Bufs B; Idx I;
    if (get_bufs(bseq, &B)) return NULL;
    if (get_idx(w, o, l, &I)) { release_bufs(&B); return NULL; }
    PyObject *values = NULL, *offsets = NULL, *out = NULL;
    int64_t total = 0, ln;
    for (Py_ssize_t i = 0; i < I.n; i++) {
        if (!slice_at(&B, &I, i, &ln)) goto done;
        if (width > 0 && ln && ln != width) { PyErr_Format(PyExc_ValueError, "slice %zd is %lld bytes, not %zd", i, (long long)ln, width); goto done; }
        total += width > 0 ? width : ln;
    }
    values = PyBytes_FromStringAndSize(NULL, total);
    offsets = PyBytes_FromStringAndSize(NULL, width > 0 ? 0 : (I.n + 1) * 8);
    if (!values || !offsets) goto done;
    {
        uint8_t *v = (uint8_t *)PyBytes_AS_STRING(values);
        int64_t *of = (int64_t *)PyBytes_AS_STRING(offsets), at = 0;
        /* the copy (payloads: most of a batch's bytes) runs without the GIL: the buffers are held
         * by their Py_buffer views and were bounds-checked above */
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < I.n; i++) {
            /* validated by the first pass (slice_at) */
            int64_t w_ = ((int64_t *)I.which.buf)[i], o_ = ((int64_t *)I.off.buf)[i];
            const uint8_t *s = (const uint8_t *)B.bufs[w_].buf + o_;
            ln = ((int64_t *)I.len.buf)[i];
            if (width > 0) {
                if (ln) memcpy(v + at, s, (size_t)ln); else memset(v + at, 0, (size_t)width);
                at += width;
            } else {
                of[i] = at;
                memcpy(v + at, s, (size_t)ln);
                at += ln;
            }
        }
        if (width <= 0) of[I.n] = at;
        Py_END_ALLOW_THREADS
    }
    out = PyTuple_Pack(2, values, offsets);
done:
    Py_XDECREF(values); Py_XDECREF(offsets);
    release_idx(&I); release_bufs(&B);
    return out;
}

/* unpack(buffers, which, off, len, kind) -> (values, offsets int32[n+1]) of packed varint slices:
 * kind 0: uint32 values (positions), kind 1: int64 values (shape). */
static PyObject *unpack(PyObject *self, PyObject *args) {
    PyObject *bseq, *w, *o, *l;
    int kind;
    if (!PyArg_ParseTuple(args, "OOOOi", &bseq, &w, &o, &l, &kind)) return NULL;
    Bufs B; Idx I;
    if (get_bufs(bseq, &B)) return NULL;
    if (get_idx(w, o, l, &I)) { release_bufs(&B); return NULL; }
    PyObject *values = NULL, *offsets = NULL, *out = NULL;
    int64_t total = 0, ln;
    uint64_t v;
    for (Py_ssize_t i = 0; i < I.n; i++) {
        const uint8_t *s = slice_at(&B, &I, i, &ln), *e;
        if (!s) goto done;
        for (e = s + ln; s < e; total++)
            if (rd_varint(&s, e, &v)) { PyErr_Format(PyExc_ValueError, "slice %zd: bad packed varint", i); goto done; }
    }
    if (total > INT32_MAX) { PyErr_SetString(PyExc_ValueError, "too many values for int32 offsets"); goto done; }
    size_t esz = kind ? 8 : 4;
    values = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(total * esz));
    offsets = PyBytes_FromStringAndSize(NULL, (I.n + 1) * 4);
    if (!values || !offsets) goto done;
    {
        char *vv = PyBytes_AS_STRING(values);
        int32_t *of = (int32_t *)PyBytes_AS_STRING(offsets);
        int64_t at = 0;
        for (Py_ssize_t i = 0; i < I.n; i++) {
            const uint8_t *s = slice_at(&B, &I, i, &ln), *e = s + ln;
            of[i] = (int32_t)at;
            while (s < e) {
                rd_varint(&s, e, &v);
                if (kind) { int64_t x = (int64_t)v; memcpy(vv + at * 8, &x, 8); }
                else { uint32_t x = (uint32_t)v; memcpy(vv + at * 4, &x, 4); }
                at++;
            }
        }
        of[I.n] = (int32_t)at;
    }
    out = PyTuple_Pack(2, values, offsets);
done:
    Py_XDECREF(values); Py_XDECREF(offsets);
    release_idx(&I); release_bufs(&B);
    return out;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_O, "scan(envelope bytes) -> (n, int64 columns as bytes) or None (use the Python path)"},
    {"gather", gather, METH_VARARGS, "gather(buffers, which, off, len, width) -> (values, offsets)"},
    {"unpack", unpack, METH_VARARGS, "unpack(buffers, which, off, len, kind) -> (values, int32 offsets)"},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_decode", NULL, -1, methods};

PyMODINIT_FUNC PyInit__decode(void) {
    PyObject *m = PyModule_Create(&module);
    if (m) PyModule_AddIntConstant(m, "NCOL", NCOL);
    return m;
}
