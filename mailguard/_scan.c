/* mailguard._scan: one pass over a chunk of SMTP message data.
 *
 * The pure-Python DataScanner (mailguard/wire.py) takes three passes of
 * bytes.count() to prove a chunk clean (CRLF pairs only, no NUL) and more to
 * count stuffing dots and find the terminator.  scan() does all of it in one
 * pass, 16 octets at a time with SSE2 where the CPU has it.  It only ever
 * says "clean, forward as is" or "not sure": anything unusual is left to the
 * careful Python path, so the output never depends on this module.
 *
 * longest_line(), crlf_to_lf(), find_dashes() and unstuff() are the C-speed forms
 * of four bytes expressions the message-filter path runs over every octet (the
 * MIME reader's longest body line, text lines and boundary candidates, and
 * undoing dot stuffing); each returns exactly
 * what its Python expression does, which tests/test_wire.py checks.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* Returns -1 when buf[0:n] is clean up to its end (or up to the first
 * CRLF.CRLF, whose offset of the first CR goes to *term, else -1), with the
 * lines starting with "." counted in *dots; otherwise an offset at or before
 * the first doubtful octet.  A "." at buf[0] is not looked at (the caller
 * handles a chunk starting a line with "."), and a CR as the last octet is
 * doubtful (its LF is not here). */
static Py_ssize_t
scan(const unsigned char *buf, Py_ssize_t n, Py_ssize_t *dots, Py_ssize_t *term)
{
    unsigned carry_cr = 0, carry_lf = 0;
    Py_ssize_t d = 0, i = 0;
    *term = -1;
#if defined(__SSE2__)
    const __m128i cr = _mm_set1_epi8('\r'), lf = _mm_set1_epi8('\n');
    const __m128i nul = _mm_setzero_si128(), dot = _mm_set1_epi8('.');
    for (; i + 16 <= n; i += 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)(buf + i));
        unsigned m_cr = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(v, cr));
        unsigned m_lf = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(v, lf));
        unsigned m_nul = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(v, nul));
        unsigned m_dot = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(v, dot));
        unsigned want_lf = ((m_cr << 1) | carry_cr) & 0xFFFF;
        unsigned lines = m_dot & (((m_lf << 1) | carry_lf) & 0xFFFF);
        if ((m_lf != want_lf) | m_nul)
            return i;
        while (lines) {
            Py_ssize_t at = i + __builtin_ctz(lines);
            lines &= lines - 1;
            if (at + 2 >= n)
                return i; /* cannot tell yet */
            if (buf[at + 1] == '\r' && buf[at + 2] == '\n') {
                *term = at - 2;
                *dots = d;
                return -1;
            }
            d++;
        }
        carry_cr = m_cr >> 15;
        carry_lf = (m_lf >> 15) & 1;
    }
#endif
    for (; i < n; i++) {
        unsigned char c = buf[i];
        if (c == 0 || (c == '\n') != (carry_cr != 0))
            return i;
        if (c == '.' && carry_lf) {
            if (i + 2 >= n)
                return i;
            if (buf[i + 1] == '\r' && buf[i + 2] == '\n') {
                *term = i - 2;
                *dots = d;
                return -1;
            }
            d++;
        }
        carry_cr = c == '\r';
        carry_lf = c == '\n';
    }
    *dots = d;
    return carry_cr ? n - 1 : -1;
}

static PyObject *
py_scan(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    Py_ssize_t dots = 0, term = -1, bad;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    bad = scan((const unsigned char *)view.buf, view.len, &dots, &term);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return Py_BuildValue("nnn", bad, dots, term);
}


/* The length of the longest line of buf[0:n], without its line end: a line
 * ends at LF, and a CR just before that LF is not counted (any other CR is);
 * the octets after the last LF are a line too.  The same figure as
 * max(map(len, data.replace(b"\r\n", b"\n").split(b"\n"))). */
static Py_ssize_t
longest_line(const unsigned char *buf, Py_ssize_t n)
{
    Py_ssize_t start = 0, longest = 0;
    for (;;) {
        const unsigned char *lf = memchr(buf + start, '\n', (size_t)(n - start));
        if (lf == NULL) {
            if (n - start > longest)
                longest = n - start;
            return longest;
        }
        Py_ssize_t end = lf - buf, len = end - start;
        if (len > 0 && buf[end - 1] == '\r')
            len--;
        if (len > longest)
            longest = len;
        start = end + 1;
    }
}

static PyObject *
py_longest_line(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    Py_ssize_t longest;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    longest = longest_line((const unsigned char *)view.buf, view.len);
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(longest);
}

/* out cut to its first w octets (NULL when that fails). */
static PyObject *
shrunk(PyObject *out, Py_ssize_t w)
{
    if (_PyBytes_Resize(&out, w) < 0)
        return NULL;
    return out;
}

/* The offset of the LF of the first "CRLF ." in buf[i:n], or -1. */
static Py_ssize_t
next_stuffed(const unsigned char *buf, Py_ssize_t i, Py_ssize_t n)
{
    while (i < n) {
        const unsigned char *lf = memchr(buf + i, '\n', (size_t)(n - i));
        if (lf == NULL)
            return -1;
        Py_ssize_t at = lf - buf;
        if (at > 0 && buf[at - 1] == '\r' && at + 1 < n && buf[at + 1] == '.')
            return at;
        i = at + 1;
    }
    return -1;
}

/* data with the dot removed from every "CRLF ." (what
 * data.replace(b"\r\n.", b"\r\n") returns); data itself when it has none. */
static PyObject *
py_unstuff(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *buf = view.buf;
    Py_ssize_t n = view.len, i = 0, w = 0;
    Py_ssize_t found = next_stuffed(buf, 0, n);
    if (found < 0) {
        PyBuffer_Release(&view);
        Py_INCREF(arg);
        return arg;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, n);
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    while (found >= 0) {
        /* copy through the LF at found, skip the dot after it */
        memcpy(o + w, buf + i, (size_t)(found + 1 - i));
        w += found + 1 - i;
        i = found + 2;
        found = next_stuffed(buf, i, n);
    }
    memcpy(o + w, buf + i, (size_t)(n - i));
    w += n - i;
    PyBuffer_Release(&view);
    return shrunk(out, w);
}

/* data.replace(b"\r\n", b"\n"), in one pass. */
static PyObject *
py_crlf_to_lf(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *buf = view.buf;
    Py_ssize_t n = view.len, i = 0, w = 0;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n);
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
    while (i < n) {
        const unsigned char *lf = memchr(buf + i, '\n', (size_t)(n - i));
        Py_ssize_t end = lf == NULL ? n : lf - buf;
        Py_ssize_t keep = end - i;
        if (lf != NULL && keep > 0 && buf[end - 1] == '\r')
            keep--;
        memcpy(o + w, buf + i, (size_t)keep);
        w += keep;
        if (lf == NULL)
            break;
        o[w++] = '\n';
        i = end + 1;
    }
    PyBuffer_Release(&view);
    return shrunk(out, w);
}

/* data.find(b"\n--", start, end), a line break at a time. */
static PyObject *
py_find_dashes(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t start, end, found = -1;
    if (!PyArg_ParseTuple(args, "y*nn", &view, &start, &end))
        return NULL;
    const unsigned char *buf = view.buf;
    Py_ssize_t n = view.len;
    if (end > n)
        end = n;
    if (start < 0)
        start = 0;
    while (start + 3 <= end) {
        const unsigned char *lf = memchr(buf + start, '\n', (size_t)(end - 2 - start));
        if (lf == NULL)
            break;
        Py_ssize_t at = lf - buf;
        if (buf[at + 1] == '-' && buf[at + 2] == '-') {
            found = at;
            break;
        }
        start = at + 1;
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(found);
}

static PyMethodDef methods[] = {
    {"scan", py_scan, METH_O,
     "scan(data) -> (doubtful_offset or -1, dots, terminator_offset or -1)"},
    {"longest_line", py_longest_line, METH_O,
     "longest_line(data) -> length of the longest line, without its CRLF or LF"},
    {"find_dashes", py_find_dashes, METH_VARARGS,
     "find_dashes(data, start, end) -> data.find(b'\\n--', start, end)"},
    {"crlf_to_lf", py_crlf_to_lf, METH_O, "crlf_to_lf(data) -> data.replace(b'\\r\\n', b'\\n')"},
    {"unstuff", py_unstuff, METH_O,
     "unstuff(data) -> data.replace(b'\\r\\n.', b'\\r\\n') (data itself when unchanged)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "mailguard._scan",
    "One-pass scan of SMTP message data (optional accelerator).", -1, methods,
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    return PyModule_Create(&module);
}
