/* Fletcher-4 of ZFS send streams in C: the per-record hot path of snapferry.zfs.codec.fletcher and .stream.
 *
 * The pure-Python/numpy code in fletcher.py is the reference; tests/test_fletcher_native.py compares
 * the two byte for byte. Every sum wraps modulo 2**64, like the C in ZFS.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    uint64_t a, b, c, d;
} f4_t;

/* Below this many bytes the GIL stays held: releasing it costs more than the sum. */
#define GIL_RELEASE_BYTES (64 * 1024)

/* Four lanes, lane j summing words 4i+j on its own: no dependency between lanes, so the loop
 * pipelines and gcc vectorises it. The lanes are combined exactly as in OpenZFS's
 * fletcher_4_superscalar4 (see the derivation in fletcher4_lanes_fini). target_clones picks an AVX2
 * build at load time where the CPU has it. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define F4_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define F4_CLONES
#endif

F4_CLONES
static void
fletcher4_lanes(const unsigned char *p, size_t quads, uint64_t la[4], uint64_t lb[4], uint64_t lc[4], uint64_t ld[4])
{
    uint64_t a[4] = {0, 0, 0, 0}, b[4] = {0, 0, 0, 0}, c[4] = {0, 0, 0, 0}, d[4] = {0, 0, 0, 0};
    for (size_t i = 0; i < quads; i++) {
        uint32_t w[4];
        /* memcpy: the buffer need not be aligned; the words are little-endian on x86 and arm64. */
        memcpy(w, p + 16 * i, 16);
        for (int j = 0; j < 4; j++) {
            a[j] += w[j];
            b[j] += a[j];
            c[j] += b[j];
            d[j] += c[j];
        }
    }
    for (int j = 0; j < 4; j++) {
        la[j] = a[j];
        lb[j] = b[j];
        lc[j] = c[j];
        ld[j] = d[j];
    }
}

static uint32_t
load_le32(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static int
is_little_endian(void)
{
    const uint16_t one = 1;
    return *(const unsigned char *)&one == 1;
}

/* Fletcher-4 from zero of `words` 32-bit little-endian words. */
static f4_t
fletcher4_block(const unsigned char *p, size_t words)
{
    f4_t s = {0, 0, 0, 0};
    size_t quads = is_little_endian() ? words / 4 : 0;
    if (quads) {
        uint64_t a[4], b[4], c[4], d[4];
        fletcher4_lanes(p, quads, a, b, c, d);
        /* Word 4i+j is followed by 4(m-i) - j words counting itself, with m = quads; lane j
         * weighs it with p = m - i in its own sums, so with T2(x) = x(x+1)/2, T3 = x(x+1)(x+2)/6:
         *   4p - j      = 4p - j
         *   T2(4p - j)  = 16 T2(p) - (6 + 4j) p + j(j-1)/2
         *   T3(4p - j)  = 64 T3(p) - (48 + 16j) T2(p) + g_j p - [j == 3],  g = 4, 10, 20, 34. */
        static const uint64_t g[4] = {4, 10, 20, 34};
        for (int j = 0; j < 4; j++) {
            uint64_t uj = (uint64_t)j;
            s.a += a[j];
            s.b += 4 * b[j] - uj * a[j];
            s.c += 16 * c[j] - (6 + 4 * uj) * b[j] + (uj * (uj - 1) / 2) * a[j];
            s.d += 64 * d[j] - (48 + 16 * uj) * c[j] + g[j] * b[j] - (j == 3 ? a[j] : 0);
        }
    }
    for (size_t i = 4 * quads; i < words; i++) {
        s.a += load_le32(p + 4 * i);
        s.b += s.a;
        s.c += s.b;
        s.d += s.c;
    }
    return s;
}

/* n(n+1)/2 and n(n+1)(n+2)/6 modulo 2**64: the divisions are exact, so they come first, in 128 bits
 * so that n + 2 cannot wrap. */
static uint64_t
t2(uint64_t n)
{
    unsigned __int128 x = n, y = x + 1;
    if (x % 2 == 0)
        x /= 2;
    else
        y /= 2;
    return (uint64_t)x * (uint64_t)y;
}

static uint64_t
t3(uint64_t n)
{
    unsigned __int128 x = n, y = x + 1, z = x + 2;
    if (x % 3 == 0)
        x /= 3;
    else if (y % 3 == 0)
        y /= 3;
    else
        z /= 3;
    if (x % 2 == 0)
        x /= 2;
    else
        y /= 2;
    return (uint64_t)x * (uint64_t)y * (uint64_t)z;
}

/* The state after feeding, from `s`, the n words whose sums from zero are `blk`. */
static f4_t
fletcher4_extend(f4_t s, uint64_t n, f4_t blk)
{
    f4_t r;
    uint64_t n2 = t2(n), n3 = t3(n);
    r.a = s.a + blk.a;
    r.b = s.b + n * s.a + blk.b;
    r.c = s.c + n * s.b + n2 * s.a + blk.c;
    r.d = s.d + n * s.c + n2 * s.b + n3 * s.a + blk.d;
    return r;
}

static PyObject *
f4_tuple(f4_t s)
{
    return Py_BuildValue("(KKKK)", (unsigned long long)s.a, (unsigned long long)s.b, (unsigned long long)s.c,
                         (unsigned long long)s.d);
}

/* Reads an int modulo 2**64 (states are kept reduced; this only refuses non-ints). */
static int
u64_arg(PyObject *obj, uint64_t *out)
{
    if (!PyLong_Check(obj)) {
        PyErr_SetString(PyExc_TypeError, "fletcher-4 sums are ints");
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLongMask(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = (uint64_t)v;
    return 0;
}

/* A word count must be exact: T2 and T3 of it modulo 2**64 depend on more than its low 64 bits. */
static int
count_arg(PyObject *obj, uint64_t *out)
{
    if (!PyLong_Check(obj)) {
        PyErr_SetString(PyExc_TypeError, "a word count is an int");
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = (uint64_t)v;
    return 0;
}

static int
block_of(PyObject *data, f4_t *out, uint64_t *words)
{
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return -1;
    if (view.len % 4) {
        PyErr_Format(PyExc_ValueError, "fletcher-4 needs whole 32-bit words, got %zd bytes", view.len);
        PyBuffer_Release(&view);
        return -1;
    }
    if (view.len >= GIL_RELEASE_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        *out = fletcher4_block(view.buf, (size_t)view.len / 4);
        Py_END_ALLOW_THREADS
    } else {
        *out = fletcher4_block(view.buf, (size_t)view.len / 4);
    }
    *words = (uint64_t)view.len / 4;
    PyBuffer_Release(&view);
    return 0;
}

PyDoc_STRVAR(block_sum_doc, "block_sum(data, /) -> (a, b, c, d)\n\nFletcher-4 from zero of a buffer of whole 32-bit words.");

static PyObject *
py_block_sum(PyObject *module, PyObject *data)
{
    f4_t s;
    uint64_t n;
    if (block_of(data, &s, &n) < 0)
        return NULL;
    return f4_tuple(s);
}

PyDoc_STRVAR(update_doc, "update(a, b, c, d, data, /) -> (a, b, c, d)\n\nThe running state after feeding a buffer of whole words.");

static PyObject *
py_update(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    f4_t s, blk;
    uint64_t n;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "update takes a, b, c, d and a buffer");
        return NULL;
    }
    if (u64_arg(args[0], &s.a) < 0 || u64_arg(args[1], &s.b) < 0 || u64_arg(args[2], &s.c) < 0 || u64_arg(args[3], &s.d) < 0)
        return NULL;
    if (block_of(args[4], &blk, &n) < 0)
        return NULL;
    return f4_tuple(fletcher4_extend(s, n, blk));
}

PyDoc_STRVAR(extend_doc,
             "extend(a, b, c, d, count, ba, bb, bc, bd, /) -> (a, b, c, d)\n\n"
             "The state after feeding, from (a, b, c, d), the count words whose sums from zero are (ba, bb, bc, bd).");

static PyObject *
py_extend(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    f4_t s, blk;
    uint64_t n;
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "extend takes a, b, c, d, count, ba, bb, bc, bd");
        return NULL;
    }
    if (u64_arg(args[0], &s.a) < 0 || u64_arg(args[1], &s.b) < 0 || u64_arg(args[2], &s.c) < 0 || u64_arg(args[3], &s.d) < 0 ||
        count_arg(args[4], &n) < 0 || u64_arg(args[5], &blk.a) < 0 || u64_arg(args[6], &blk.b) < 0 || u64_arg(args[7], &blk.c) < 0 ||
        u64_arg(args[8], &blk.d) < 0)
        return NULL;
    return f4_tuple(fletcher4_extend(s, n, blk));
}

/* ---- One record's sums in one call: the per-record half of StreamReader.records() and StampedWriter.record().
 * A record header is 312 bytes: 280 of fields, then the 32-byte running checksum (the stamp) that modern
 * OpenZFS writes there; an END header carries the checksum of everything before it at bytes 8-40. */
#define HEADER_BYTES 312
#define STAMP_AT 280
#define HEAD_WORDS (STAMP_AT / 4)
#define STAMP_WORDS ((HEADER_BYTES - STAMP_AT) / 4)
#define END_RECORD 5

static uint64_t
load_le64(const unsigned char *p)
{
    return (uint64_t)load_le32(p) | ((uint64_t)load_le32(p + 4) << 32);
}

static void
store_le64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static f4_t
load_f4(const unsigned char *p)
{
    f4_t s = {load_le64(p), load_le64(p + 8), load_le64(p + 16), load_le64(p + 24)};
    return s;
}

static int
f4_equal(f4_t x, f4_t y)
{
    return x.a == y.a && x.b == y.b && x.c == y.c && x.d == y.d;
}

static int
state_arg(PyObject *obj, f4_t *out)
{
    if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != 4) {
        PyErr_SetString(PyExc_TypeError, "a fletcher-4 state is a tuple of four ints");
        return -1;
    }
    return u64_arg(PyTuple_GET_ITEM(obj, 0), &out->a) < 0 || u64_arg(PyTuple_GET_ITEM(obj, 1), &out->b) < 0 ||
                   u64_arg(PyTuple_GET_ITEM(obj, 2), &out->c) < 0 || u64_arg(PyTuple_GET_ITEM(obj, 3), &out->d) < 0
               ? -1
               : 0;
}

static int
header_arg(PyObject *obj, Py_buffer *view, int writable)
{
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return -1;
    if (view->len != HEADER_BYTES) {
        PyErr_Format(PyExc_ValueError, "a record header is %d bytes, got %zd", HEADER_BYTES, view->len);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int
is_zero(const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

PyDoc_STRVAR(verify_header_doc,
             "verify_header(wire, header, /) -> int\n\n"
             "Checks a record header against the running checksum `wire` (a, b, c, d) of the stream before it:\n"
             "0 no stamp, 1 stamp matches, 2 stamp mismatch, 3 an END whose checksum is not `wire`.");

static PyObject *
py_verify_header(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    f4_t wire;
    Py_buffer view;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "verify_header takes a state and a header");
        return NULL;
    }
    if (state_arg(args[0], &wire) < 0 || header_arg(args[1], &view, 0) < 0)
        return NULL;
    const unsigned char *h = view.buf;
    long status = 0;
    if (!is_zero(h + STAMP_AT, HEADER_BYTES - STAMP_AT)) {
        f4_t expected = fletcher4_extend(wire, HEAD_WORDS, fletcher4_block(h, HEAD_WORDS));
        status = f4_equal(expected, load_f4(h + STAMP_AT)) ? 1 : 2;
    }
    if (status != 2 && load_le32(h) == END_RECORD && !f4_equal(load_f4(h + 8), wire))
        status = 3;
    PyBuffer_Release(&view);
    return PyLong_FromLong(status);
}

PyDoc_STRVAR(advance_record_doc,
             "advance_record(wire, fingerprint, header, payload, /) -> (wire, fingerprint, sums)\n\n"
             "The running checksum after a record (header with its stamp as it is, then payload), the fingerprint\n"
             "after it (its stamp taken as zeros; None: not kept) and the record's sums: the header's (a, b, c, d)\n"
             "before its stamp, then the payload's (count, a, b, c, d).");

static PyObject *
py_advance_record(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    f4_t wire, print = {0, 0, 0, 0}, head, stamp, body;
    uint64_t words;
    Py_buffer view;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "advance_record takes a state, a fingerprint or None, a header and a payload");
        return NULL;
    }
    int keep_print = args[1] != Py_None;
    if (state_arg(args[0], &wire) < 0 || (keep_print && state_arg(args[1], &print) < 0))
        return NULL;
    if (header_arg(args[2], &view, 0) < 0)
        return NULL;
    head = fletcher4_block(view.buf, HEAD_WORDS);
    stamp = fletcher4_block((const unsigned char *)view.buf + STAMP_AT, STAMP_WORDS);
    PyBuffer_Release(&view);
    if (block_of(args[3], &body, &words) < 0)
        return NULL;
    wire = fletcher4_extend(fletcher4_extend(fletcher4_extend(wire, HEAD_WORDS, head), STAMP_WORDS, stamp), words, body);
    PyObject *print_after;
    if (keep_print) {
        f4_t zero = {0, 0, 0, 0};
        print_after = f4_tuple(fletcher4_extend(fletcher4_extend(fletcher4_extend(print, HEAD_WORDS, head), STAMP_WORDS, zero), words, body));
        if (print_after == NULL)
            return NULL;
    } else {
        print_after = Py_NewRef(Py_None);
    }
    return Py_BuildValue("(N, N, (KKKKKKKKK))", f4_tuple(wire), print_after, (unsigned long long)head.a, (unsigned long long)head.b,
                         (unsigned long long)head.c, (unsigned long long)head.d, (unsigned long long)words, (unsigned long long)body.a,
                         (unsigned long long)body.b, (unsigned long long)body.c, (unsigned long long)body.d);
}

PyDoc_STRVAR(restamp_doc,
             "restamp(state, header, sums, /) -> state\n\n"
             "Writes into the header the stamp that follows `state` (a, b, c, d), the checksum of what a writer\n"
             "has put out before the record, and returns the state after the record; `sums` as advance_record gives them.");

static PyObject *
py_restamp(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    f4_t state, head, body;
    uint64_t words;
    Py_buffer view;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "restamp takes a state, a header and the record's sums");
        return NULL;
    }
    PyObject *sums = args[2];
    if (!PyTuple_Check(sums) || PyTuple_GET_SIZE(sums) != 9) {
        PyErr_SetString(PyExc_TypeError, "a record's sums are a tuple of nine ints");
        return NULL;
    }
    if (state_arg(args[0], &state) < 0 || u64_arg(PyTuple_GET_ITEM(sums, 0), &head.a) < 0 || u64_arg(PyTuple_GET_ITEM(sums, 1), &head.b) < 0 ||
        u64_arg(PyTuple_GET_ITEM(sums, 2), &head.c) < 0 || u64_arg(PyTuple_GET_ITEM(sums, 3), &head.d) < 0 ||
        count_arg(PyTuple_GET_ITEM(sums, 4), &words) < 0 || u64_arg(PyTuple_GET_ITEM(sums, 5), &body.a) < 0 ||
        u64_arg(PyTuple_GET_ITEM(sums, 6), &body.b) < 0 || u64_arg(PyTuple_GET_ITEM(sums, 7), &body.c) < 0 ||
        u64_arg(PyTuple_GET_ITEM(sums, 8), &body.d) < 0)
        return NULL;
    if (header_arg(args[1], &view, 1) < 0)
        return NULL;
    unsigned char *h = view.buf;
    state = fletcher4_extend(state, HEAD_WORDS, head);
    store_le64(h + STAMP_AT, state.a);
    store_le64(h + STAMP_AT + 8, state.b);
    store_le64(h + STAMP_AT + 16, state.c);
    store_le64(h + STAMP_AT + 24, state.d);
    state = fletcher4_extend(state, STAMP_WORDS, fletcher4_block(h + STAMP_AT, STAMP_WORDS));
    PyBuffer_Release(&view);
    return f4_tuple(fletcher4_extend(state, words, body));
}

static PyMethodDef methods[] = {
    {"block_sum", (PyCFunction)py_block_sum, METH_O, block_sum_doc},
    {"update", (PyCFunction)(void (*)(void))py_update, METH_FASTCALL, update_doc},
    {"extend", (PyCFunction)(void (*)(void))py_extend, METH_FASTCALL, extend_doc},
    {"verify_header", (PyCFunction)(void (*)(void))py_verify_header, METH_FASTCALL, verify_header_doc},
    {"advance_record", (PyCFunction)(void (*)(void))py_advance_record, METH_FASTCALL, advance_record_doc},
    {"restamp", (PyCFunction)(void (*)(void))py_restamp, METH_FASTCALL, restamp_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    "snapferry.zfs.codec._fletcher4c",
    "Fletcher-4 of ZFS send streams in C (the reference is fletcher.py).",
    0,
    methods,
};

PyMODINIT_FUNC
PyInit__fletcher4c(void)
{
    return PyModule_Create(&moduledef);
}
