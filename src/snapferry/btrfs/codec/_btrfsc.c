/* The attribute (TLV) decoding of one btrfs send-stream command in C: the hot loop of
 * snapferry.btrfs.codec.stream.decode_command.
 *
 * It handles only commands that are well formed. Anything else (an unknown command or attribute, an
 * attribute that overruns, comes twice, is not one the command carries or has the wrong size, a missing
 * required attribute) makes decode() return None, and the pure-Python decode_command, the reference,
 * decodes the command again and raises the error it describes. tests/test_btrfs_native.py compares
 * the two command for command. The command's crc32c is checked by the caller before this runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define NATTR 32 /* attribute types 0-31; btrfs defines 1-31 */
#define NCMD 64
#define ATTR_DATA 19
#define ATTR_XATTR_DATA 14
#define SIZE_ANY (-1)
#define NOT_CARRIED (-2)

typedef struct {
    int known;
    int needs_v2;
    int size[NATTR]; /* a fixed size, SIZE_ANY or NOT_CARRIED */
    uint32_t required; /* bit t: attribute t must be there */
} rule_t;

static rule_t rules[NCMD];
static PyObject *attr_keys[NATTR]; /* the Attr members, by raw type; NULL for unknown types */

/* configure(keys, table): keys is a tuple of NATTR Attr members or None; table a tuple of
 * (kind, needs_v2, sizes, required_mask) with sizes a tuple of NATTR ints (-1 any, -2 not carried). */
static PyObject *
configure(PyObject *self, PyObject *args)
{
    PyObject *keys, *table;
    if (!PyArg_ParseTuple(args, "O!O!", &PyTuple_Type, &keys, &PyTuple_Type, &table))
        return NULL;
    if (PyTuple_GET_SIZE(keys) != NATTR) {
        PyErr_SetString(PyExc_ValueError, "keys must have 32 entries");
        return NULL;
    }
    rule_t fresh[NCMD];
    memset(fresh, 0, sizeof fresh);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(table); i++) {
        PyObject *sizes;
        int kind, needs_v2;
        unsigned long required;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(table, i), "iiO!k", &kind, &needs_v2, &PyTuple_Type, &sizes, &required))
            return NULL;
        if (kind < 0 || kind >= NCMD || PyTuple_GET_SIZE(sizes) != NATTR) {
            PyErr_SetString(PyExc_ValueError, "bad rule");
            return NULL;
        }
        rule_t *r = &fresh[kind];
        r->known = 1;
        r->needs_v2 = needs_v2;
        r->required = (uint32_t)required;
        for (int t = 0; t < NATTR; t++) {
            long size = PyLong_AsLong(PyTuple_GET_ITEM(sizes, t));
            if (size == -1 && PyErr_Occurred())
                return NULL;
            r->size[t] = (int)size;
        }
    }
    for (int t = 0; t < NATTR; t++) {
        PyObject *key = PyTuple_GET_ITEM(keys, t);
        Py_XSETREF(attr_keys[t], key == Py_None ? NULL : Py_NewRef(key));
    }
    memcpy(rules, fresh, sizeof rules);
    Py_RETURN_NONE;
}

/* decode(kind, body, version): the attributes as a dict {Attr: value} in stream order, or None.
 * DATA and XATTR_DATA are memoryview slices of body (no copy); the others, short, are bytes. */
static PyObject *
decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "decode(kind, body, version)");
        return NULL;
    }
    long kind = PyLong_AsLong(args[0]);
    long version = PyLong_AsLong(args[2]);
    if ((kind == -1 || version == -1) && PyErr_Occurred())
        return NULL;
    if (kind < 0 || kind >= NCMD || !rules[kind].known || (version < 2 && rules[kind].needs_v2))
        Py_RETURN_NONE;
    const rule_t *rule = &rules[kind];
    Py_buffer buf;
    if (PyObject_GetBuffer(args[1], &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *attrs = PyDict_New();
    if (attrs == NULL) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    const unsigned char *p = buf.buf;
    Py_ssize_t end = buf.len, pos = 0;
    uint32_t seen = 0;
    while (pos < end) {
        if (end - pos < 2)
            goto reference;
        unsigned int t = p[pos] | (unsigned int)p[pos + 1] << 8;
        if (t >= NATTR || attr_keys[t] == NULL || (seen >> t) & 1)
            goto reference;
        Py_ssize_t start, length;
        if (version >= 2 && t == ATTR_DATA) {
            start = pos + 2; /* protocol 2: DATA has no length and runs to the end of the command */
            length = end - start;
        } else {
            if (end - pos < 4)
                goto reference;
            length = p[pos + 2] | (Py_ssize_t)p[pos + 3] << 8;
            start = pos + 4;
            if (length > end - start)
                goto reference;
        }
        int size = rule->size[t];
        if (size == NOT_CARRIED || (size != SIZE_ANY && size != length))
            goto reference;
        seen |= (uint32_t)1 << t;
        PyObject *value = (t == ATTR_DATA || t == ATTR_XATTR_DATA) ? PySequence_GetSlice(args[1], start, start + length)
                                                                   : PyBytes_FromStringAndSize((const char *)p + start, length);
        if (value == NULL || PyDict_SetItem(attrs, attr_keys[t], value) < 0) {
            Py_XDECREF(value);
            Py_DECREF(attrs);
            PyBuffer_Release(&buf);
            return NULL;
        }
        Py_DECREF(value);
        pos = start + length;
    }
    if ((seen & rule->required) != rule->required)
        goto reference;
    PyBuffer_Release(&buf);
    return attrs;
reference:
    Py_DECREF(attrs);
    PyBuffer_Release(&buf);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS, "Set the attribute keys and the per-command rules."},
    {"decode", (PyCFunction)(void (*)(void))decode, METH_FASTCALL, "A well-formed command's attributes, or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_btrfsc", "btrfs send-stream command decoding in C.", -1, methods};

PyMODINIT_FUNC
PyInit__btrfsc(void)
{
    return PyModule_Create(&module);
}
