/* Hot loops of the update codec, as a tiny optional CPython extension.
 *
 * schemas/codec/kernels.py wraps these and falls back to numpy when the extension is not
 * built (no C compiler) or FEDFLEET_CODEC_KERNELS=0. Both paths accept and reject exactly the
 * same inputs (tests/test_codec_kernels.py compares them). Only the buffer protocol is used,
 * so no numpy headers are needed at build time. The GIL is released inside the loops.
 *
 *   ef_decode(bits, low, nlow, k, length, out) -> None
 *       Elias-Fano index decode: `bits` is the unary-coded high part (bit p of the
 *       little-endian bitmap is set for p = (idx[i] >> 8*nlow) + i), `low` holds nlow byte
 *       planes of k bytes each (plane j = byte j of every index). Writes k strictly increasing
 *       int64 indices, all < length, to `out`. ValueError on anything else.
 *
 *   scatter_add(target, idx, vals, scale[, qscale]) -> None
 *       target[idx[i]] += scale * vals[i] for a float32 target and int64 idx; vals are
 *       float32, or int8 dequantised on the fly as vals[i] * qscale. Every index is
 *       bounds-checked before anything is written (IndexError).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "little-endian hosts only (the pure-numpy path serves the others)"
#endif

static int
check_fmt(Py_buffer *b, char code, Py_ssize_t itemsize, const char *what)
{
    const char *f = b->format ? b->format : "B";
    if (*f == '<' || *f == '=' || *f == '@')
        f++;
    int ok = b->itemsize == itemsize && f[0] != '\0' && f[1] == '\0';
    if (ok) {
        if (code == 'q')
            ok = *f == 'q' || (*f == 'l' && sizeof(long) == 8);
        else
            ok = *f == code;
    }
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s: expected a contiguous buffer of '%c' items", what,
                     code);
        return -1;
    }
    return 0;
}

/* bit_pos[v][j] = position of the j-th set bit of byte v (8 for unused slots). */
static uint8_t bit_pos[256][8];

static void
init_bit_pos(void)
{
    for (int v = 0; v < 256; v++) {
        int n = 0;
        for (int j = 0; j < 8; j++)
            bit_pos[v][j] = 8;
        for (int bit = 0; bit < 8; bit++)
            if (v >> bit & 1)
                bit_pos[v][n++] = (uint8_t)bit;
    }
}

static PyObject *
ef_decode(PyObject *self, PyObject *args)
{
    Py_buffer bits, low, out;
    Py_ssize_t nlow, k, length;
    if (!PyArg_ParseTuple(args, "y*y*nnnw*", &bits, &low, &nlow, &k, &length, &out))
        return NULL;
    PyObject *result = NULL;
    const char *err = NULL;
    if (nlow < 0 || nlow > 3 || k < 1 || length < 1 || length > 0xFFFFFFFFLL) {
        PyErr_SetString(PyExc_ValueError, "bad Elias-Fano parameters");
        goto done;
    }
    if (low.len != nlow * k || out.len != k * 8) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match k");
        goto done;
    }
    {
        const int shift = 8 * (int)nlow;
        const uint64_t maxhigh = ((uint64_t)length - 1) >> shift;
        const uint64_t nbits = (uint64_t)k + maxhigh + 1;
        if ((uint64_t)bits.len != (nbits + 7) / 8) {
            PyErr_SetString(PyExc_ValueError, "bitmap size does not match k and length");
            goto done;
        }
        const uint8_t *bp = (const uint8_t *)bits.buf;
        const uint8_t *lp = (const uint8_t *)low.buf;
        int64_t *op = (int64_t *)out.buf;
        const Py_ssize_t nbytes = bits.len;
        Py_ssize_t i = 0;
        Py_BEGIN_ALLOW_THREADS
        /* Pass 1, one bitmap byte at a time: the positions of its set bits come from a
           table and are written unconditionally (8 slots), i advances by the popcount.
           The last 8 indices go through a scratch tail so `out` is never overrun. */
        uint64_t tail[16];
        for (Py_ssize_t b = 0; b < nbytes; b++) {
            const unsigned byte = bp[b];
            if (!byte)
                continue;
            const int cnt = __builtin_popcount(byte);
            if (i + cnt > k) {
                err = "more set bits than indices";
                goto out_of_loop;
            }
            const uint8_t *pos = bit_pos[byte];
            const uint64_t base = (uint64_t)b * 8 - (uint64_t)i;
            uint64_t *dst = i + 8 <= k ? (uint64_t *)op + i : tail;
            for (int j = 0; j < 8; j++)
                dst[j] = base + pos[j] - (uint64_t)j; /* high part of index i + j */
            if (dst == tail)
                memcpy(op + i, tail, (size_t)cnt * 8);
            i += cnt;
        }
        if (i != k) {
            err = "fewer set bits than indices";
            goto out_of_loop;
        }
        {
            /* Pass 2 (vectorisable): attach the low bytes and check everything at once.
               Strictly increasing + every high part <= maxhigh + last < length is
               exactly "k valid indices". */
            uint64_t *u = (uint64_t *)op;
            uint64_t bad = u[k - 1] > maxhigh;
            if (nlow == 1)
                for (Py_ssize_t j = 0; j < k; j++)
                    u[j] = (u[j] << 8) | lp[j];
            else if (nlow == 2)
                for (Py_ssize_t j = 0; j < k; j++)
                    u[j] = (u[j] << 16) | lp[j] | (uint64_t)lp[k + j] << 8;
            else if (nlow == 3)
                for (Py_ssize_t j = 0; j < k; j++)
                    u[j] = (u[j] << 24) | lp[j] | (uint64_t)lp[k + j] << 8 |
                           (uint64_t)lp[2 * k + j] << 16;
            for (Py_ssize_t j = 1; j < k; j++)
                bad |= u[j] <= u[j - 1];
            if (bad || u[k - 1] >= (uint64_t)length)
                err = "indices out of range or not strictly increasing";
        }
    out_of_loop:
        Py_END_ALLOW_THREADS
        if (err) {
            PyErr_SetString(PyExc_ValueError, err);
            goto done;
        }
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&bits);
    PyBuffer_Release(&low);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *
scatter_add(PyObject *self, PyObject *args)
{
    Py_buffer tgt, idx, vals;
    double scale, qscale = 1.0;
    memset(&tgt, 0, sizeof tgt);
    memset(&idx, 0, sizeof idx);
    memset(&vals, 0, sizeof vals);
    PyObject *target_obj, *idx_obj, *vals_obj;
    if (!PyArg_ParseTuple(args, "OOOd|d", &target_obj, &idx_obj, &vals_obj, &scale, &qscale))
        return NULL;
    PyObject *result = NULL;
    if (PyObject_GetBuffer(target_obj, &tgt, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) <
            0 ||
        PyObject_GetBuffer(idx_obj, &idx, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0 ||
        PyObject_GetBuffer(vals_obj, &vals, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        goto done;
    if (check_fmt(&tgt, 'f', 4, "target") < 0 || check_fmt(&idx, 'q', 8, "idx") < 0)
        goto done;
    const int is_i8 = vals.itemsize == 1;
    if (check_fmt(&vals, is_i8 ? 'b' : 'f', is_i8 ? 1 : 4, "vals") < 0)
        goto done;
    {
        const Py_ssize_t n = tgt.len / 4, k = idx.len / 8;
        if (vals.len / vals.itemsize != k) {
            PyErr_SetString(PyExc_ValueError, "idx and vals differ in length");
            goto done;
        }
        float *t = (float *)tgt.buf;
        const int64_t *ip = (const int64_t *)idx.buf;
        const float s = (float)scale, qs = (float)qscale;
        int bad = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < k; i++)
            bad |= ip[i] < 0 || ip[i] >= n;
        /* Same float32 rounding as numpy's `t[idx] += s * (q * qs)` (no FMA contraction:
           built with -ffp-contract=off). */
        if (!bad && is_i8) {
            const int8_t *q = (const int8_t *)vals.buf;
            if (s == 1.0f)
                for (Py_ssize_t i = 0; i < k; i++)
                    t[ip[i]] += (float)q[i] * qs;
            else
                for (Py_ssize_t i = 0; i < k; i++)
                    t[ip[i]] += s * ((float)q[i] * qs);
        }
        else if (!bad) {
            const float *vp = (const float *)vals.buf;
            if (s == 1.0f)
                for (Py_ssize_t i = 0; i < k; i++)
                    t[ip[i]] += vp[i];
            else
                for (Py_ssize_t i = 0; i < k; i++)
                    t[ip[i]] += s * vp[i];
        }
        Py_END_ALLOW_THREADS
        if (bad) {
            PyErr_SetString(PyExc_IndexError, "index out of range for target");
            goto done;
        }
    }
    result = Py_NewRef(Py_None);
done:
    if (tgt.obj)
        PyBuffer_Release(&tgt);
    if (idx.obj)
        PyBuffer_Release(&idx);
    if (vals.obj)
        PyBuffer_Release(&vals);
    return result;
}

static PyMethodDef methods[] = {
    {"ef_decode", ef_decode, METH_VARARGS, "Elias-Fano index decode (see module source)."},
    {"scatter_add", scatter_add, METH_VARARGS, "target[idx] += scale * vals."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "schemas.codec._kernels", "Codec hot loops.", -1, methods,
};

PyMODINIT_FUNC
PyInit__kernels(void)
{
    init_bit_pos();
    return PyModule_Create(&module);
}
