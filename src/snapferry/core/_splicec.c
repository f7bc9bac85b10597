/* vmsplice(2) for snapferry.core.splice: hands a pipe the pages of a buffer instead of a copy of them.
 *
 * The pipe then refers to the caller's memory until its reader has taken the bytes, so the caller must
 * not write there before that (SpliceRing keeps that promise). Without this module splice.py writes with
 * os.writev, which copies; tests/test_splice.py compares what a pipe's reader gets both ways.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/uio.h>

PyDoc_STRVAR(vmsplice_all_doc,
             "vmsplice_all(fd, buffer, /) -> None\n\n"
             "Every byte of buffer into the pipe fd, by reference (blocking while the pipe is full).");

static PyObject *
py_vmsplice_all(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "vmsplice_all(fd, buffer) takes 2 arguments");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "not a file descriptor");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    struct iovec iov = {view.buf, (size_t)view.len};
    int failed = 0;
    while (iov.iov_len > 0) {
        ssize_t n;
        Py_BEGIN_ALLOW_THREADS
        n = vmsplice((int)fd, &iov, 1, 0);
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0) {
                    failed = 1;
                    break;
                }
                continue;
            }
            PyErr_SetFromErrno(PyExc_OSError);
            failed = 1;
            break;
        }
        iov.iov_base = (char *)iov.iov_base + n;
        iov.iov_len -= (size_t)n;
    }
    PyBuffer_Release(&view);
    if (failed)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"vmsplice_all", (PyCFunction)(void (*)(void))py_vmsplice_all, METH_FASTCALL, vmsplice_all_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    "_splicec",
    "vmsplice(2): a buffer's pages into a pipe (the fallback is os.writev in splice.py).",
    0,
    methods,
};

PyMODINIT_FUNC
PyInit__splicec(void)
{
    return PyModule_Create(&moduledef);
}
