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
 *   has_int8_min(buf) -> bool
 *       True if the int8 buffer holds -128 (which the encoder never produces).
 *
 *   scatter_add(target, idx, vals, scale[, qscale[, checked]]) -> None
 *       target[idx[i]] += scale * vals[i] for a float32 target and int64 idx; vals are
 *       float32, or int8 dequantised on the fly as vals[i] * qscale. Every index is
 *       bounds-checked before anything is written (IndexError), unless `checked` is true:
 *       the caller vouches that every index is in range (a decoded chunk whose indices
 *       the decoder validated against the target's length).
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

/* Portable popcount (the extension is built for the baseline ISA, where
   __builtin_popcountll is a library call). */
static inline int
popcount64(uint64_t x)
{
    x = x - ((x >> 1) & 0x5555555555555555ULL);
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    return (int)((x * 0x0101010101010101ULL) >> 56);
}

/* Elias-Fano decode in three tight passes over `u` (80 KB for 10,000 indices, so it stays
   in cache): (1) walk the bitmap 64 bits at a time and store every set bit's position p;
   (2) turn p into the index: high part p - i, shifted, OR the low bytes; (3) check strict
   increase. Passes 2 and 3 have no loop-carried dependency and vectorise; pass 1 is the
   only branchy one and does as little as possible. NLOW is a compile-time constant in
   each caller, so every pass is specialised per layout. Returns NULL or the reason the
   streams are invalid. */
static inline const char *
ef_walk(const uint8_t *restrict bp, Py_ssize_t nbytes, const uint8_t *restrict lp,
        const int NLOW, Py_ssize_t k, uint64_t length, uint64_t maxhigh, uint64_t *restrict u)
{
    const int shift = 8 * NLOW;
    Py_ssize_t i = 0;
    for (Py_ssize_t off = 0; off < nbytes; off += 8) {
        uint64_t word = 0;
        if (nbytes - off >= 8)
            memcpy(&word, bp + off, 8); /* one unaligned load */
        else
            for (Py_ssize_t b = off; b < nbytes; b++)
                word |= (uint64_t)bp[b] << (8 * (b - off));
        if (!word)
            continue;
        if (i + popcount64(word) > k)
            return "more set bits than indices";
        const uint64_t base = (uint64_t)off * 8;
        do {
            u[i++] = base + (uint64_t)__builtin_ctzll(word);
            word &= word - 1;
        } while (word);
    }
    if (i != k)
        return "fewer set bits than indices";
    for (Py_ssize_t j = 0; j < k; j++) {
        uint64_t v = (u[j] - (uint64_t)j) << shift;
        if (NLOW >= 1)
            v |= lp[j];
        if (NLOW >= 2)
            v |= (uint64_t)lp[k + j] << 8;
        if (NLOW >= 3)
            v |= (uint64_t)lp[2 * k + j] << 16;
        u[j] = v;
    }
    /* Every value is < 2^58 (positions < 2^34, shifted by at most 24), so
       u[j] - u[j-1] - 1 wraps to a set top bit exactly when u[j] <= u[j-1]. */
    uint64_t bad = 0;
    for (Py_ssize_t j = 1; j < k; j++)
        bad |= u[j] - u[j - 1] - 1;
    /* High parts never decrease, so checking the last one covers all of them; strictly
       increasing + last < length is exactly "k valid indices". */
    if (bad >> 63 || u[k - 1] >> shift > maxhigh || u[k - 1] >= length)
        return "indices out of range or not strictly increasing";
    return NULL;
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
        const uint64_t maxhigh = ((uint64_t)length - 1) >> (8 * nlow);
        const uint64_t nbits = (uint64_t)k + maxhigh + 1;
        if ((uint64_t)bits.len != (nbits + 7) / 8) {
            PyErr_SetString(PyExc_ValueError, "bitmap size does not match k and length");
            goto done;
        }
        const uint8_t *bp = (const uint8_t *)bits.buf, *lp = (const uint8_t *)low.buf;
        uint64_t *u = (uint64_t *)out.buf;
        const Py_ssize_t nb = bits.len;
        Py_BEGIN_ALLOW_THREADS
        switch (nlow) {
        case 0: err = ef_walk(bp, nb, lp, 0, k, (uint64_t)length, maxhigh, u); break;
        case 1: err = ef_walk(bp, nb, lp, 1, k, (uint64_t)length, maxhigh, u); break;
        case 2: err = ef_walk(bp, nb, lp, 2, k, (uint64_t)length, maxhigh, u); break;
        default: err = ef_walk(bp, nb, lp, 3, k, (uint64_t)length, maxhigh, u); break;
        }
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

#define PREFETCH_AHEAD 16
#define PREFETCH(t, ip, i, k) \
    __builtin_prefetch(&(t)[(ip)[(i) + PREFETCH_AHEAD < (k) ? (i) + PREFETCH_AHEAD : (i)]], 1)

static PyObject *
scatter_add(PyObject *self, PyObject *args)
{
    Py_buffer tgt, idx, vals;
    double scale, qscale = 1.0;
    memset(&tgt, 0, sizeof tgt);
    memset(&idx, 0, sizeof idx);
    memset(&vals, 0, sizeof vals);
    PyObject *target_obj, *idx_obj, *vals_obj;
    int checked = 0;
    if (!PyArg_ParseTuple(args, "OOOd|dp", &target_obj, &idx_obj, &vals_obj, &scale, &qscale,
                          &checked))
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
        if (!checked) /* one unsigned compare catches negative indices too */
            for (Py_ssize_t i = 0; i < k; i++)
                bad |= (uint64_t)ip[i] >= (uint64_t)n;
        /* Same float32 rounding as numpy's `t[idx] += s * (q * qs)` (no FMA contraction:
           built with -ffp-contract=off). */
        /* Each index is usually its own cache line (top-k of a large slice), so the line
           PREFETCH_AHEAD entries on is requested while this one is updated. */
        if (!bad && is_i8) {
            const int8_t *q = (const int8_t *)vals.buf;
            if (s == 1.0f)
                for (Py_ssize_t i = 0; i < k; i++) {
                    PREFETCH(t, ip, i, k);
                    t[ip[i]] += (float)q[i] * qs;
                }
            else
                for (Py_ssize_t i = 0; i < k; i++) {
                    PREFETCH(t, ip, i, k);
                    t[ip[i]] += s * ((float)q[i] * qs);
                }
        }
        else if (!bad) {
            const float *vp = (const float *)vals.buf;
            if (s == 1.0f)
                for (Py_ssize_t i = 0; i < k; i++) {
                    PREFETCH(t, ip, i, k);
                    t[ip[i]] += vp[i];
                }
            else
                for (Py_ssize_t i = 0; i < k; i++) {
                    PREFETCH(t, ip, i, k);
                    t[ip[i]] += s * vp[i];
                }
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

static PyObject *
has_int8_min(PyObject *self, PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    const uint8_t *p = (const uint8_t *)b.buf;
    unsigned found = 0;
    for (Py_ssize_t i = 0; i < b.len; i++) /* vectorised: no early exit */
        found |= p[i] == 0x80;
    PyBuffer_Release(&b);
    return PyBool_FromLong(found);
}

static PyMethodDef methods[] = {
    {"ef_decode", ef_decode, METH_VARARGS, "Elias-Fano index decode (see module source)."},
    {"scatter_add", scatter_add, METH_VARARGS, "target[idx] += scale * vals."},
    {"has_int8_min", has_int8_min, METH_O, "True if an int8 buffer holds -128."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "schemas.codec._kernels", "Codec hot loops.", -1, methods,
};

PyMODINIT_FUNC
PyInit__kernels(void)
{
    return PyModule_Create(&module);
}
