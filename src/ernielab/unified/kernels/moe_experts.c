/* Fused routed-experts pass of the MoE feed-forward for small CPU calls (decoding).
 *
 * out[t] += sum_j gate[t, j] * down_e( gelu(x[t] W_gate_e) * (x[t] W_up_e) ),  e = index[t, j]
 *
 * One call replaces what the torch path spends about ten ops and two grouped matmuls on (sort,
 * group ends, gather, one small matmul per expert and weight, gelu, products, scatter-add). At decoding
 * sizes those ops cost more in fixed overhead than in arithmetic. Only the experts a token was routed to
 * are evaluated on it: assignments are counting-sorted by expert, and each expert's weights are read once
 * per block of up to ROWS of its tokens.
 *
 * Built by ernielab/layers/moe_kernel.py with the host compiler (-O3 -march=native) and called through
 * ctypes. float32, contiguous, row-major; weights w_gate_up [E, D, 2H] (gate columns first) and
 * w_down [E, H, D], as MoEFeedForward stores them. Plain C with GCC/Clang vector extensions: the compiler
 * picks the widest vectors the host has.
 */
#include <stdint.h>
#include <stdlib.h>

#define ROWS 4  /* tokens of one expert multiplied together: 4 rows x 2 vectors = 8 accumulators */
#define VL 8    /* floats per vector */

typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));
typedef float vf_unaligned __attribute__((vector_size(VL * sizeof(float)), aligned(4), may_alias));

static inline vf load(const float *p) { return *(const vf_unaligned *)p; }
static inline void store(float *p, vf v) { *(vf_unaligned *)p = v; }
static inline vf splat(float v) { return (vf){0} + v; }

/* y[r, c] = sum_d x[r][d] * w[d, c] for r < rows (a compile-time constant after inlining), c < n. */
static inline __attribute__((always_inline)) void gemm_rows(const float *const *x, const int rows, int64_t dim,
                                                           const float *w, int64_t n, float *y) {
    int64_t c = 0;
    for (; c + 2 * VL <= n; c += 2 * VL) {
        vf acc[ROWS][2] = {{{0}}};
        for (int64_t d = 0; d < dim; d++) {
            const vf w0 = load(w + d * n + c), w1 = load(w + d * n + c + VL);
            for (int r = 0; r < rows; r++) {
                const vf xv = splat(x[r][d]);
                acc[r][0] += xv * w0;
                acc[r][1] += xv * w1;
            }
        }
        for (int r = 0; r < rows; r++) {
            store(y + r * n + c, acc[r][0]);
            store(y + r * n + c + VL, acc[r][1]);
        }
    }
    for (; c < n; c++) /* columns past the last whole pair of vectors */
        for (int r = 0; r < rows; r++) {
            float s = 0.0f;
            for (int64_t d = 0; d < dim; d++) s += x[r][d] * w[d * n + c];
            y[r * n + c] = s;
        }
}

static void gemm(const float *const *x, int rows, int64_t dim, const float *w, int64_t n, float *y) {
    switch (rows) { /* one specialisation per row count keeps the accumulators in registers */
    case 1: gemm_rows(x, 1, dim, w, n, y); break;
    case 2: gemm_rows(x, 2, dim, w, n, y); break;
    case 3: gemm_rows(x, 3, dim, w, n, y); break;
    default: gemm_rows(x, 4, dim, w, n, y); break;
    }
}

/* exp(v) for v <= 0 (the argument -z^2 of erf's tail): 2^n * p(r), r = v - n ln2, |r| <= ln2 / 2,
 * degree-6 Taylor polynomial (relative error < 3e-9 before float rounding); exp(v < -87) -> ~0. */
static inline vf exp_nonpositive(vf v) {
    const vi low = v < splat(-87.0f);  /* lanes of all ones where v < -87 (C has no vector ?:) */
    v = (vf)(((vi)v & ~low) | ((vi)splat(-87.0f) & low));
    /* round(v log2 e) for v <= 0: truncation toward zero of a negative number rounds up */
    const vf n = __builtin_convertvector(__builtin_convertvector(v * 1.44269504f - 0.5f, vi), vf);
    const vf r = v - n * 0.693145752f - n * 1.42860677e-6f;  /* ln 2 in two parts: exact n * hi */
    vf p = splat(1.0f / 720);
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const vi scale = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)scale;
}

/* gelu(g) * u with the exact (erf) gelu, as torch.nn.functional.gelu computes it by default.
 * erf from Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7), odd symmetry for negative inputs. */
static inline vf gelu_times(vf g, vf u) {
    const vf z = g * 0.70710678f;
    const vi sign = (vi)z & (int32_t)0x80000000;
    const vf az = (vf)((vi)z & (int32_t)0x7fffffff);
    const vf t = 1.0f / (1.0f + 0.3275911f * az);
    vf poly = splat(1.061405429f);
    poly = poly * t - 1.453152027f;
    poly = poly * t + 1.421413741f;
    poly = poly * t - 0.284496736f;
    poly = poly * t + 0.254829592f;
    const vf erf_abs = 1.0f - poly * t * exp_nonpositive(-az * az);
    const vf erf = (vf)((vi)erf_abs ^ sign);
    return 0.5f * g * (1.0f + erf) * u;
}

static void gelu_times_up(const float *gate_up, int rows, int64_t hidden, float *out) {
    for (int r = 0; r < rows; r++) {
        const float *g = gate_up + r * 2 * hidden, *u = g + hidden;
        float *o = out + r * hidden;
        int64_t j = 0;
        for (; j + VL <= hidden; j += VL) store(o + j, gelu_times(load(g + j), load(u + j)));
        for (; j < hidden; j++) { /* scalar tail through the same vector formula */
            float gv[VL] = {0}, uv[VL] = {0}, ov[VL];
            gv[0] = g[j], uv[0] = u[j];
            store(ov, gelu_times(load(gv), load(uv)));
            o[j] = ov[0];
        }
    }
}

/* Returns 0, or -1 for an expert id outside [0, num_experts), -2 when out of memory (out untouched). */
int ernielab_moe_experts(const float *x, int64_t num_tokens, int64_t dim, const int64_t *index,
                         const float *gate, int64_t k, const float *w_gate_up, const float *w_down,
                         int64_t num_experts, int64_t hidden, float *out) {
    const int64_t assignments = num_tokens * k;
    for (int64_t a = 0; a < assignments; a++)
        if (index[a] < 0 || index[a] >= num_experts) return -1;
    int64_t *start = calloc((size_t)num_experts + 1, sizeof(int64_t));
    int64_t *order = malloc((size_t)(assignments ? assignments : 1) * sizeof(int64_t));
    float *buffer = malloc((size_t)ROWS * (2 * hidden + hidden + dim) * sizeof(float));
    if (!start || !order || !buffer) {
        free(start), free(order), free(buffer);
        return -2;
    }
    float *gate_up = buffer, *act = gate_up + ROWS * 2 * hidden, *y = act + ROWS * hidden;
    /* counting sort of the assignments by expert (stable: tokens keep their order within an expert) */
    for (int64_t a = 0; a < assignments; a++) start[index[a] + 1]++;
    for (int64_t e = 0; e < num_experts; e++) start[e + 1] += start[e];
    for (int64_t a = 0; a < assignments; a++) order[start[index[a]]++] = a;
    for (int64_t e = num_experts; e > 0; e--) start[e] = start[e - 1];
    start[0] = 0;

    const float *rows_in[ROWS], *rows_act[ROWS];
    for (int64_t e = 0; e < num_experts; e++) {
        const float *wgu = w_gate_up + e * dim * 2 * hidden, *wd = w_down + e * hidden * dim;
        for (int64_t a0 = start[e]; a0 < start[e + 1]; a0 += ROWS) {
            const int rows = (int)(start[e + 1] - a0 < ROWS ? start[e + 1] - a0 : ROWS);
            for (int r = 0; r < rows; r++) {
                rows_in[r] = x + (order[a0 + r] / k) * dim;
                rows_act[r] = act + r * hidden;
            }
            gemm(rows_in, rows, dim, wgu, 2 * hidden, gate_up);
            gelu_times_up(gate_up, rows, hidden, act);
            gemm(rows_act, rows, hidden, wd, dim, y);
            for (int r = 0; r < rows; r++) {
                const float g = gate[order[a0 + r]];
                float *o = out + (order[a0 + r] / k) * dim;
                for (int64_t c = 0; c < dim; c++) o[c] += g * y[r * dim + c];
            }
        }
    }
    free(start), free(order), free(buffer);
    return 0;
}
