/* mailguard._scan: one pass over a chunk of SMTP message data.
 *
 * The pure-Python DataScanner (mailguard/wire.py) takes three passes of
 * bytes.count() to prove a chunk clean (CRLF pairs only, no NUL) and more to
 * count stuffing dots and find the terminator.  scan() does all of it in one
 * pass, 16 octets at a time with SSE2 where the CPU has it.  It only ever
 * says "clean, forward as is" or "not sure": anything unusual is left to the
 * careful Python path, so the output never depends on this module.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
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

static PyMethodDef methods[] = {
    {"scan", py_scan, METH_O,
     "scan(data) -> (doubtful_offset or -1, dots, terminator_offset or -1)"},
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
