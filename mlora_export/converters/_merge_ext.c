/* Fused merge kernel of the streaming merge: out = round(float32(W) + L·R), one pass, GIL released.
 *
 * W is a [m, n] weight in bfloat16, float16 or float32 (raw elements), L [m, k] and R [k, n]
 * float32 (the scaled adapter factors, already oriented), out [m, n] in any of the three dtypes
 * and possibly W itself. Each output element is the float32 sum of its k products (in order, as
 * a BLAS micro-kernel sums them: fused multiply-adds in the AVX2 build, and in the portable one
 * where the hardware fuses them), plus W widened to float32, rounded
 * once to the output dtype with torch's rounding (round to nearest even; NaN -> 0x7FC0 in
 * bfloat16 and sign|0x7E00 in float16, as c10 does). A 4 x 16 block of outputs stays in
 * registers over all k, so W is read once and out written once, straight from registers: no
 * float32 tile goes through memory (numpy needs seven passes over one for the same result).
 *
 * Two builds of the same loops: AVX2 + FMA + F16C (chosen at run time where the CPU has them)
 * and portable C. Docs: docs/design.md section 1 (the definition), docs/benchmarks.md (speed).
 *
 * Every stored element is also tested, in the same pass, for being finite in the output dtype
 * (its exponent bits all ones means an infinity or a NaN): merge() and cast() return whether
 * every element written is finite, so the caller refuses an output that overflowed (a huge
 * scale, float16's range) without reading it again (docs/untrusted-input.md).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2, DT_COUNT = 3 };
static const size_t DT_SIZE[DT_COUNT] = {4, 2, 2};

#if defined(__GNUC__) || defined(__clang__)
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static inline
#endif

/* -- scalar conversions, bit-exact with torch (c10/util/BFloat16.h, c10/util/Half.h) -------- */

INLINE uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
INLINE float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

INLINE float bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

INLINE uint16_t f32_to_bf16(float f) {
    if (f != f) return 0x7FC0;
    uint32_t u = f32_bits(f);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

INLINE float f16_to_f32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = bits_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_f32((two_w >> 17) | (126u << 23)) - 0.5f;
    return bits_f32(sign | (two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized)));
}

INLINE uint16_t f32_to_f16(float f) {
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = f32_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = bits_f32((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

INLINE float load1(const char *p, int dt) {
    uint16_t h;
    float f;
    switch (dt) {
    case DT_F32: memcpy(&f, p, 4); return f;
    case DT_BF16: memcpy(&h, p, 2); return bf16_to_f32(h);
    default: memcpy(&h, p, 2); return f16_to_f32(h);
    }
}

/* Stores v rounded to dt; returns 1 when the stored value is an infinity or a NaN. */
INLINE int store1(char *p, float v, int dt) {
    uint16_t h;
    switch (dt) {
    case DT_F32: memcpy(p, &v, 4); return (f32_bits(v) & 0x7F800000u) == 0x7F800000u;
    case DT_BF16: h = f32_to_bf16(v); memcpy(p, &h, 2); return (h & 0x7F80u) == 0x7F80u;
    default: h = f32_to_f16(v); memcpy(p, &h, 2); return (h & 0x7C00u) == 0x7C00u;
    }
}

/* The sums start at +0 as a BLAS's do (so a -0 weight plus a zero delta is +0, as torch's addmm
 * gives), except for k = 0, where the output is W itself, its signed zeros kept. */
#define ZERO(k) ((k) ? 0.0f : -0.0f)

/* Rows per block: the block's rows of L (rows x k floats) stay in the L2 cache while every
 * 16-column strip of R (k x 16 floats, in L1) passes over them, and a strip's rows of W and out
 * (one page apart for a 2048-wide bfloat16 weight) stay within the TLB's reach. */
static Py_ssize_t block_rows(Py_ssize_t k) {
    Py_ssize_t rows = 32768 / (k > 0 ? k : 1);
    if (rows > 128) rows = 128;
    rows -= rows % 4;
    return rows < 4 ? 4 : rows;
}

/* -- portable C ------------------------------------------------------------------------------ */

#define STRIP 16
/* One rounding per product-add where the hardware fuses them; else two (fmaf in software is slow). */
#ifdef FP_FAST_FMAF
#define MULADD(a, b, c) fmaf(a, b, c)
#else
#define MULADD(a, b, c) ((c) + (a) * (b))
#endif

INLINE int merge_generic(const char *w, int wt, const float *L, const float *R, char *out, int ot,
                         Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, float *pack) {
    (void)pack; /* reads R in place */
    const size_t ws = DT_SIZE[wt], os = DT_SIZE[ot];
    int bad = 0;
    const Py_ssize_t rb = block_rows(k);
    const float zero = ZERO(k);
    for (Py_ssize_t i0 = 0; i0 < m; i0 += rb) {
        const Py_ssize_t i1 = i0 + rb < m ? i0 + rb : m;
        for (Py_ssize_t j0 = 0; j0 < n; j0 += STRIP) {
            const Py_ssize_t width = n - j0 < STRIP ? n - j0 : STRIP;
            for (Py_ssize_t i = i0; i < i1; i++) {
                float acc[STRIP];
                for (Py_ssize_t t = 0; t < STRIP; t++) acc[t] = zero;
                const float *l = L + i * k;
                for (Py_ssize_t kk = 0; kk < k; kk++) {
                    const float x = l[kk];
                    const float *r = R + kk * n + j0;
                    for (Py_ssize_t t = 0; t < width; t++) acc[t] = MULADD(x, r[t], acc[t]);
                }
                const size_t at = (size_t)(i * n + j0);
                for (Py_ssize_t t = 0; t < width; t++)
                    bad |= store1(out + (at + t) * os, acc[t] + load1(w + (at + t) * ws, wt), ot);
            }
        }
    }
    return bad;
}

INLINE int cast_generic(const char *src, int st, char *out, int ot, Py_ssize_t count) {
    const size_t ss = DT_SIZE[st], os = DT_SIZE[ot];
    int bad = 0;
    for (Py_ssize_t i = 0; i < count; i++) bad |= store1(out + i * os, load1(src + i * ss, st), ot);
    return bad;
}

/* -- AVX2 + FMA + F16C ----------------------------------------------------------------------- */

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_X86 1
#include <immintrin.h>
#define X86 __attribute__((target("avx2,fma,f16c")))
#define X86_INLINE static inline __attribute__((always_inline, target("avx2,fma,f16c")))

X86_INLINE __m256 load8(const char *p, int dt) {
    switch (dt) {
    case DT_F32: return _mm256_loadu_ps((const float *)p);
    case DT_BF16:
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
    default: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    }
}

/* Stores 8 values rounded to dt; sets the lanes of *bad whose stored value is an infinity or a NaN. */
X86_INLINE void store8(char *p, __m256 v, int dt, __m256i *bad) {
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    if (dt == DT_F32) {
        _mm256_storeu_ps((float *)p, v);
        const __m256i e = _mm256_set1_epi32(0x7F800000);
        *bad = _mm256_or_si256(*bad, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v), e), e));
    } else if (dt == DT_BF16) {
        const __m256i u = _mm256_castps_si256(v);
        const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)), _mm256_set1_epi32(0x7FFF));
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
        r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
        _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
        const __m256i e = _mm256_set1_epi32(0x7F80);
        *bad = _mm256_or_si256(*bad, _mm256_cmpeq_epi32(_mm256_and_si256(r, e), e));
    } else {
        __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        /* NaN: c10's sign | 0x7E00 (F16C keeps the payload) */
        const __m256i sign = _mm256_srli_epi32(_mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32((int)0x80000000u)), 16);
        const __m256i canon = _mm256_or_si256(sign, _mm256_set1_epi32(0x7E00));
        const __m128i canon16 = _mm_packus_epi32(_mm256_castsi256_si128(canon), _mm256_extracti128_si256(canon, 1));
        const __m128i nan16 = _mm_packs_epi32(_mm256_castsi256_si128(nan), _mm256_extracti128_si256(nan, 1));
        h = _mm_blendv_epi8(h, canon16, nan16);
        _mm_storeu_si128((__m128i *)p, h);
        const __m128i e = _mm_set1_epi16(0x7C00);
        *bad = _mm256_or_si256(*bad, _mm256_cvtepi16_epi32(_mm_cmpeq_epi16(_mm_and_si128(h, e), e)));
    }
}

/* ROWS x 16 outputs in registers over all k, then + W, rounded, stored. */
#define ROW_FMA(r)                                                   \
    do {                                                             \
        const __m256 x = _mm256_broadcast_ss(l##r + kk);             \
        a##r##0 = _mm256_fmadd_ps(x, b0, a##r##0);                   \
        a##r##1 = _mm256_fmadd_ps(x, b1, a##r##1);                   \
    } while (0)
#define ROW_STORE(r)                                                                                   \
    do {                                                                                               \
        const size_t at = (size_t)((i + r) * n + j0);                                                  \
        store8(out + at * os, _mm256_add_ps(a##r##0, load8(w + at * ws, wt)), ot, &bad);               \
        store8(out + (at + 8) * os, _mm256_add_ps(a##r##1, load8(w + (at + 8) * ws, wt)), ot, &bad);   \
    } while (0)

/* R's 16-column strips, each k x 16 contiguous: the k loads of a strip are one stream (rows of
 * R a power-of-two apart would fall into the same cache sets). */
X86_INLINE void pack_strips(const float *R, float *pack, Py_ssize_t n, Py_ssize_t k) {
    for (Py_ssize_t j0 = 0; j0 + 16 <= n; j0 += 16) {
        float *dst = pack + (j0 / 16) * k * 16;
        for (Py_ssize_t kk = 0; kk < k; kk++, dst += 16) {
            _mm256_storeu_ps(dst, _mm256_loadu_ps(R + kk * n + j0));
            _mm256_storeu_ps(dst + 8, _mm256_loadu_ps(R + kk * n + j0 + 8));
        }
    }
}

X86_INLINE int merge_x86(const char *w, int wt, const float *L, const float *R, char *out, int ot,
                         Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, float *pack) {
    const size_t ws = DT_SIZE[wt], os = DT_SIZE[ot];
    __m256i bad = _mm256_setzero_si256();
    int bad1 = 0;
    const Py_ssize_t rb = block_rows(k);
    const __m256 zero = _mm256_set1_ps(ZERO(k));
    const float zero1 = ZERO(k);
    pack_strips(R, pack, n, k);
    for (Py_ssize_t i0 = 0; i0 < m; i0 += rb) {
        const Py_ssize_t i1 = i0 + rb < m ? i0 + rb : m;
        Py_ssize_t j0 = 0;
        for (; j0 + 16 <= n; j0 += 16) {
            Py_ssize_t i = i0;
            for (; i + 4 <= i1; i += 4) {
                __m256 a00 = zero, a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
                const float *l0 = L + i * k, *l1 = l0 + k, *l2 = l1 + k, *l3 = l2 + k;
                const float *r = pack + (j0 / 16) * k * 16;
                for (Py_ssize_t kk = 0; kk < k; kk++, r += 16) {
                    const __m256 b0 = _mm256_loadu_ps(r), b1 = _mm256_loadu_ps(r + 8);
                    ROW_FMA(0);
                    ROW_FMA(1);
                    ROW_FMA(2);
                    ROW_FMA(3);
                }
                ROW_STORE(0);
                ROW_STORE(1);
                ROW_STORE(2);
                ROW_STORE(3);
            }
            for (; i < i1; i++) {
                __m256 a00 = zero, a01 = a00;
                const float *l0 = L + i * k;
                const float *r = pack + (j0 / 16) * k * 16;
                for (Py_ssize_t kk = 0; kk < k; kk++, r += 16) {
                    const __m256 b0 = _mm256_loadu_ps(r), b1 = _mm256_loadu_ps(r + 8);
                    ROW_FMA(0);
                }
                ROW_STORE(0);
            }
        }
        for (Py_ssize_t i = i0; j0 < n && i < i1; i++) { /* the last n % 16 columns */
            for (Py_ssize_t j = j0; j < n; j++) {
                float s = zero1;
                for (Py_ssize_t kk = 0; kk < k; kk++) s = fmaf(L[i * k + kk], R[kk * n + j], s);
                const size_t at = (size_t)(i * n + j);
                bad1 |= store1(out + at * os, s + load1(w + at * ws, wt), ot);
            }
        }
    }
    return bad1 | !_mm256_testz_si256(bad, bad);
}

X86_INLINE int cast_x86(const char *src, int st, char *out, int ot, Py_ssize_t count) {
    const size_t ss = DT_SIZE[st], os = DT_SIZE[ot];
    __m256i bad = _mm256_setzero_si256();
    int bad1 = 0;
    Py_ssize_t i = 0;
    for (; i + 8 <= count; i += 8) store8(out + i * os, load8(src + i * ss, st), ot, &bad);
    for (; i < count; i++) bad1 |= store1(out + i * os, load1(src + i * ss, st), ot);
    return bad1 | !_mm256_testz_si256(bad, bad);
}
#endif

/* -- one specialised function per (input dtype, output dtype) and build ---------------------- */

typedef int (*merge_fn)(const char *, const float *, const float *, char *, Py_ssize_t, Py_ssize_t, Py_ssize_t, float *);
typedef int (*cast_fn)(const char *, char *, Py_ssize_t);

/* Per build (generic, x86): one function per (input dtype, output dtype), and the tables that pick them. */
#define PAIR(ISA, ATTR, A, B)                                                                                      \
    ATTR static int merge_##ISA##_##A##_##B(const char *w, const float *L, const float *R, char *out, Py_ssize_t m,  \
                                            Py_ssize_t n, Py_ssize_t k, float *pack) {                             \
        return merge_##ISA(w, A, L, R, out, B, m, n, k, pack);                                                     \
    }                                                                                                              \
    ATTR static int cast_##ISA##_##A##_##B(const char *s, char *o, Py_ssize_t c) { return cast_##ISA(s, A, o, B, c); }
#define ROW(ISA, ATTR, A) PAIR(ISA, ATTR, A, DT_F32) PAIR(ISA, ATTR, A, DT_BF16) PAIR(ISA, ATTR, A, DT_F16)
#define ENTRY(F, ISA, A) {F##_##ISA##_##A##_DT_F32, F##_##ISA##_##A##_DT_BF16, F##_##ISA##_##A##_DT_F16}
#define TABLES(ISA, ATTR)                                                                                        \
    ROW(ISA, ATTR, DT_F32) ROW(ISA, ATTR, DT_BF16) ROW(ISA, ATTR, DT_F16)                                       \
    static const merge_fn MERGE_##ISA[DT_COUNT][DT_COUNT] = {ENTRY(merge, ISA, DT_F32), ENTRY(merge, ISA, DT_BF16), \
                                                             ENTRY(merge, ISA, DT_F16)};                       \
    static const cast_fn CAST_##ISA[DT_COUNT][DT_COUNT] = {ENTRY(cast, ISA, DT_F32), ENTRY(cast, ISA, DT_BF16),    \
                                                           ENTRY(cast, ISA, DT_F16)};
#define NO_ATTR
TABLES(generic, NO_ATTR)
#ifdef HAVE_X86
TABLES(x86, X86)
#endif

#ifdef HAVE_X86
static int cpu_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif

/* Builds this CPU runs, best last (the caller picks: no state is kept here). */
static PyObject *py_builds(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
#ifdef HAVE_X86
    if (cpu_has_avx2()) return Py_BuildValue("(ss)", "generic", "avx2");
#endif
    return Py_BuildValue("(s)", "generic");
}

/* 1 for the AVX2 build, 0 for the portable one, -1 (ValueError set) for one this CPU cannot run. */
static int check_build(int build) {
    if (build == 0) return 0;
#ifdef HAVE_X86
    if (build == 1 && cpu_has_avx2()) return 1;
#endif
    PyErr_Format(PyExc_ValueError, "build %d is not available on this CPU (see builds())", build);
    return -1;
}

/* -- Python interface ------------------------------------------------------------------------ */

static int check_dtype(int dt, const char *what) {
    if (dt < 0 || dt >= DT_COUNT) {
        PyErr_Format(PyExc_ValueError, "%s: unknown dtype code %d", what, dt);
        return -1;
    }
    return 0;
}

/* a * b * c bytes, or -1 (with ValueError set) when the product does not fit a Py_ssize_t. */
static Py_ssize_t product(Py_ssize_t a, Py_ssize_t b, Py_ssize_t c) {
    Py_ssize_t ab, abc;
    if (a < 0 || b < 0 || c < 0 || __builtin_mul_overflow(a, b, &ab) || __builtin_mul_overflow(ab, c, &abc)) {
        PyErr_SetString(PyExc_ValueError, "shape is negative or too large");
        return -1;
    }
    return abc;
}

static int check_len(const Py_buffer *b, Py_ssize_t need, const char *what) {
    if (need < 0) return -1; /* from product(): the error is set */
    if (b->len < need) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, need %zd", what, b->len, need);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(merge_doc,
             "merge(w, w_dtype, left, right, out, out_dtype, m, n, k, build)\n--\n\n"
             "out = round(float32(w) + left @ right): w and out [m, n] raw elements of dtype codes 0 (float32), 1 "
             "(bfloat16), 2 (float16); left [m, k] and right [k, n] C-contiguous float32. out may be w. build: 0 "
             "portable C, 1 AVX2 (an index into builds()). Returns True when every element written is finite "
             "(no infinity, no NaN in the output dtype).");

static PyObject *py_merge(PyObject *self, PyObject *args) {
    Py_buffer w, l, r, o;
    int wt, ot;
    Py_ssize_t m, n, k;
    int build;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*iy*y*w*innni", &w, &wt, &l, &r, &o, &ot, &m, &n, &k, &build)) return NULL;
    PyObject *result = NULL;
    const int x86 = check_build(build);
    if (x86 < 0 || check_dtype(wt, "w") || check_dtype(ot, "out")) goto done;
    if (check_len(&w, product(m, n, (Py_ssize_t)DT_SIZE[wt]), "w") || check_len(&l, product(m, k, 4), "left") ||
        check_len(&r, product(k, n, 4), "right") || check_len(&o, product(m, n, (Py_ssize_t)DT_SIZE[ot]), "out"))
        goto done;
    if (((uintptr_t)l.buf | (uintptr_t)r.buf) % sizeof(float)) {
        PyErr_SetString(PyExc_ValueError, "left and right must be 4-byte aligned float32");
        goto done;
    }
    {
        /* k x (n rounded down to 16) floats: no larger than right, whose size was checked */
        float *pack = x86 ? PyMem_RawMalloc((size_t)k * (size_t)(n / 16 * 16) * sizeof(float) + sizeof(float)) : NULL;
        if (x86 && !pack) {
            PyErr_NoMemory();
            goto done;
        }
        int bad;
        Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_X86
        if (x86)
            bad = MERGE_x86[wt][ot]((const char *)w.buf, (const float *)l.buf, (const float *)r.buf, (char *)o.buf, m, n, k, pack);
        else
#endif
            bad = MERGE_generic[wt][ot]((const char *)w.buf, (const float *)l.buf, (const float *)r.buf, (char *)o.buf, m, n, k, pack);
        Py_END_ALLOW_THREADS
        PyMem_RawFree(pack);
        result = PyBool_FromLong(!bad);
    }
done:
    PyBuffer_Release(&w);
    PyBuffer_Release(&l);
    PyBuffer_Release(&r);
    PyBuffer_Release(&o);
    return result;
}

PyDoc_STRVAR(cast_doc, "cast(src, src_dtype, out, out_dtype, count, build)\n--\n\nConvert count elements between dtype codes, rounded as "
                       "torch rounds. Returns True when every element written is finite.");

static PyObject *py_cast(PyObject *self, PyObject *args) {
    Py_buffer s, o;
    int st, ot;
    Py_ssize_t count;
    int build;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*iw*ini", &s, &st, &o, &ot, &count, &build)) return NULL;
    PyObject *result = NULL;
    const int x86 = check_build(build);
    if (x86 < 0 || check_dtype(st, "src") || check_dtype(ot, "out")) goto done;
    if (check_len(&s, product(count, 1, (Py_ssize_t)DT_SIZE[st]), "src") || check_len(&o, product(count, 1, (Py_ssize_t)DT_SIZE[ot]), "out"))
        goto done;
    {
        int bad;
        Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_X86
        if (x86)
            bad = CAST_x86[st][ot]((const char *)s.buf, (char *)o.buf, count);
        else
#endif
            bad = CAST_generic[st][ot]((const char *)s.buf, (char *)o.buf, count);
        Py_END_ALLOW_THREADS
        (void)x86;
        result = PyBool_FromLong(!bad);
    }
done:
    PyBuffer_Release(&s);
    PyBuffer_Release(&o);
    return result;
}

static PyMethodDef methods[] = {
    {"merge", py_merge, METH_VARARGS, merge_doc},
    {"cast", py_cast, METH_VARARGS, cast_doc},
    {"builds", py_builds, METH_NOARGS, "builds() -> the builds of the loops this CPU runs, best last."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_merge_ext", "Fused merge kernel (see merge_kernels.py).", -1, methods, NULL, NULL, NULL, NULL};

/* API 2: merge() and cast() return whether every element written is finite (API 1 returned None). */
PyMODINIT_FUNC PyInit__merge_ext(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "API", 2) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
