/* Selective scan (Mamba's S6 recurrence) for the CPU, compiled on first use by msm_lightning/encoders/cpu_scan.py.

       delta_t = softplus(delta_raw_t + bias)                    (bias and softplus optional)
       h_t     = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t,   h_0 = 0
       out_t   = (sum_n C_t[n] h_t[n] + D u_t) * silu(z_t)       (D and z optional)

   Everything for one (batch, channel) row happens in one pass over its time steps with the row's N states in
   registers, so no [L, N] tensor ever goes to main memory; this is what makes it several times faster than
   a scan built from PyTorch ops, which are memory-bound here. u, delta, z and out are [batch][d_inner][L]
   tensors of any strides (Mamba's are time-major views), A is [d_inner][N], B and C are contiguous
   [batch][L][N]. The backward recomputes a row's states into a per-thread buffer ([L + 1][N] floats), then
   runs the adjoint backwards; a thread owns whole batch items, so the B and C gradients (sums over channels)
   need no atomics, and per-batch-item partial sums of the A, D and bias gradients are reduced by the caller.
   Float32 throughout. */

#include <stdlib.h>
#include <string.h>

#define MAX_STATE 256

typedef struct {
    float *data;
    long sb, sd, st; /* strides of the batch, channel and time dimensions, in elements */
} view3;

typedef struct {
    view3 u, delta, z, out;  /* z.data == NULL: no gate */
    const float *A, *B, *C;  /* [d][N], [b][L][N], [b][L][N] */
    const float *D, *bias;   /* [d] or NULL */
    long nb, nd, L, N;
    int softplus, threads;
} scan_args;

typedef struct {
    view3 gout, gu, gdelta, gz;  /* gz.data == NULL: not wanted */
    float *gA;                   /* [b][d][N] partial sums per batch item */
    float *gB, *gC;              /* [b][L][N] */
    float *gD, *gbias;           /* [b][d] partial sums, or NULL */
} scan_grads;

/* exp(x) as 2^(x log2 e): integer part into the exponent bits, a degree-5 polynomial for the fraction
   (least-squares fit, relative error < 1e-7). Plain arithmetic vectorises with any SIMD ISA, unlike libm's
   expf. Inputs are clamped to the float range, so a huge step size gives a decay of 0, never NaN. */
static inline float fast_exp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float z = x * 1.44269504088896341f;
    float k = __builtin_floorf(z);
    float f = z - k;
    float p = 1.867182864e-3f;
    p = p * f + 9.016687624e-3f;
    p = p * f + 5.580044706e-2f;
    p = p * f + 2.401641535e-1f;
    p = p * f + 6.931513629e-1f;
    p = p * f + 1.0f;
    union { float f; int i; } bits = { p };
    bits.i += (int)k << 23;
    return bits.f;
}

/* log(1 + y) for y in [0, 1]: ln 2 * y * q(y), q a degree-8 fit of log2(1 + y) / y (relative error < 2e-7). */
static inline float log1p_unit(float y) {
    float q = 7.366087721e-03f;
    q = q * y - 4.182628608e-02f;
    q = q * y + 1.116363369e-01f;
    q = q * y - 1.960704723e-01f;
    q = q * y + 2.751405992e-01f;
    q = q * y - 3.582780266e-01f;
    q = q * y + 4.806761743e-01f;
    q = q * y - 7.213393783e-01f;
    q = q * y + 1.442694991e+00f;
    return 0.69314718056f * y * q;
}

/* softplus(x) = max(x, 0) + log(1 + exp(-|x|)), and its derivative sigmoid(x). */
static inline float softplus(float x) {
    float ax = x < 0.0f ? -x : x;
    return (x > 0.0f ? x : 0.0f) + log1p_unit(fast_exp(-ax));
}

static inline float sigmoid(float x) {
    float e = fast_exp(x < 0.0f ? x : -x); /* exp(-|x|), in (0, 1] */
    float s = 1.0f / (1.0f + e);
    return x < 0.0f ? e * s : s;
}

#define AT(v, b, d, t) ((v).data[(b) * (v).sb + (d) * (v).sd + (t) * (v).st])
#define BLOCK 16 /* channels moved between the caller's layout and contiguous rows at a time */

int msm_scan_max_state(void) { return MAX_STATE; }

/* Copy channels d0 .. d0 + w - 1 of batch item b into rows dst[c * L + t] (or back, with `to_view`). Mamba's
   tensors are time-major, so a row is strided; moving a block of channels per time step reads every cache
   line once, and the scans then run over contiguous rows. */
static void move_block(view3 v, long b, long d0, long w, long L, float *rows, int to_view) {
    for (long t = 0; t < L; t++)
        for (long c = 0; c < w; c++) {
            if (to_view)
                AT(v, b, d0 + c, t) = rows[c * L + t];
            else
                rows[c * L + t] = AT(v, b, d0 + c, t);
        }
}

/* Step sizes (in place over the raw values in `dts`) and, if `sig` is not NULL, d softplus / d raw. */
static void row_steps(const scan_args *a, long d, float *dts, float *sig) {
    const float bias = a->bias ? a->bias[d] : 0.0f;
    #pragma omp simd
    for (long t = 0; t < a->L; t++) {
        const float x = dts[t] + bias;
        dts[t] = a->softplus ? softplus(x) : x;
        if (sig) sig[t] = a->softplus ? sigmoid(x) : 1.0f;
    }
}

/* Per-thread work rows: `count` blocks of BLOCK rows of L floats. */
static float *block_rows(long L, int count) { return malloc(sizeof(float) * (size_t)BLOCK * L * count); }

void msm_scan_forward(const scan_args *a) {
    const long L = a->L, N = a->N, nd = a->nd, blocks = (nd + BLOCK - 1) / BLOCK;
    #pragma omp parallel num_threads(a->threads)
    {
        float *buf = block_rows(L, 3), *acc = malloc(sizeof(float) * (size_t)L);
        float *ub = buf, *db = buf + BLOCK * L, *zb = buf + 2 * BLOCK * L; /* zb becomes the output */
        #pragma omp for schedule(static)
        for (long r = 0; r < a->nb * blocks; r++) {
            const long b = r / blocks, d0 = (r % blocks) * BLOCK, w = nd - d0 < BLOCK ? nd - d0 : BLOCK;
            const float *Bb = a->B + b * L * N, *Cb = a->C + b * L * N;
            move_block(a->u, b, d0, w, L, ub, 0);
            move_block(a->delta, b, d0, w, L, db, 0);
            if (a->z.data) move_block(a->z, b, d0, w, L, zb, 0);
            for (long c = 0; c < w; c++) {
                const long d = d0 + c;
                const float *A = a->A + d * N, *u = ub + c * L;
                float *dts = db + c * L, *out = zb + c * L, h[MAX_STATE];
                row_steps(a, d, dts, NULL);
                for (long n = 0; n < N; n++) h[n] = 0.0f;
                const float D = a->D ? a->D[d] : 0.0f;
                for (long t = 0; t < L; t++) {
                    const float dt = dts[t], du = dt * u[t];
                    const float *Bt = Bb + t * N, *Ct = Cb + t * N;
                    float y = 0.0f;
                    #pragma omp simd reduction(+ : y)
                    for (long n = 0; n < N; n++) {
                        const float hn = fast_exp(dt * A[n]) * h[n] + du * Bt[n];
                        h[n] = hn;
                        y += Ct[n] * hn;
                    }
                    acc[t] = y;
                }
                if (a->z.data) {
                    #pragma omp simd
                    for (long t = 0; t < L; t++) out[t] = (acc[t] + D * u[t]) * out[t] * sigmoid(out[t]);
                } else {
                    #pragma omp simd
                    for (long t = 0; t < L; t++) out[t] = acc[t] + D * u[t];
                }
            }
            move_block(a->out, b, d0, w, L, zb, 1);
        }
        free(buf);
        free(acc);
    }
}

/* Returns 0, or -1 if a work buffer cannot be allocated. */
int msm_scan_backward(const scan_args *a, const scan_grads *g) {
    const long L = a->L, N = a->N, nd = a->nd;
    int failed = 0;
    #pragma omp parallel num_threads(a->threads) reduction(| : failed)
    {
        float *hs = malloc(sizeof(float) * (size_t)(L + 1) * N); /* states h_0 .. h_L of one row */
        float *es = malloc(sizeof(float) * (size_t)L * N);       /* decays of one row */
        float *buf = block_rows(L, 4);
        float *row = malloc(sizeof(float) * (size_t)L * 3);
        if (!hs || !es || !buf || !row) failed = 1;
        /* per block: u, delta -> step sizes -> dLoss/d raw delta, z -> dLoss/dz, dLoss/dout -> dLoss/du */
        float *ub = buf, *db = buf + BLOCK * L, *zb = buf + 2 * BLOCK * L, *gb = buf + 3 * BLOCK * L;
        float *sig = row, *acc = row + L, *gy = row + 2 * L;
        #pragma omp for schedule(static)
        for (long b = 0; b < a->nb; b++) {
            if (failed) continue;
            const float *Bb = a->B + b * L * N, *Cb = a->C + b * L * N;
            float *gBb = g->gB + b * L * N, *gCb = g->gC + b * L * N;
            memset(gBb, 0, sizeof(float) * (size_t)L * N);
            memset(gCb, 0, sizeof(float) * (size_t)L * N);
            for (long d0 = 0; d0 < nd; d0 += BLOCK) {
                const long w = nd - d0 < BLOCK ? nd - d0 : BLOCK;
                move_block(a->u, b, d0, w, L, ub, 0);
                move_block(a->delta, b, d0, w, L, db, 0);
                if (a->z.data) move_block(a->z, b, d0, w, L, zb, 0);
                move_block(g->gout, b, d0, w, L, gb, 0);
                for (long c = 0; c < w; c++) {
                    const long d = d0 + c;
                    const float *A = a->A + d * N, *u = ub + c * L;
                    const float D = a->D ? a->D[d] : 0.0f;
                    float *dts = db + c * L, *z = zb + c * L, *go = gb + c * L;
                    row_steps(a, d, dts, sig);
                    for (long n = 0; n < N; n++) hs[n] = 0.0f;
                    for (long t = 0; t < L; t++) {
                        const float dt = dts[t], du = dt * u[t];
                        const float *Bt = Bb + t * N, *Ct = Cb + t * N, *hp = hs + t * N;
                        float *hn = hs + (t + 1) * N, *e = es + t * N;
                        float y = 0.0f;
                        #pragma omp simd reduction(+ : y)
                        for (long n = 0; n < N; n++) {
                            const float en = fast_exp(dt * A[n]);
                            e[n] = en;
                            hn[n] = en * hp[n] + du * Bt[n];
                            y += Ct[n] * hn[n];
                        }
                        acc[t] = y;
                    }
                    /* Through the gate: gy = dLoss/d(C^T h); z's gradient overwrites z; D's gradient. */
                    float gD = 0.0f;
                    if (a->z.data) {
                        #pragma omp simd reduction(+ : gD)
                        for (long t = 0; t < L; t++) {
                            const float s = sigmoid(z[t]);
                            gy[t] = go[t] * z[t] * s;
                            z[t] = go[t] * (acc[t] + D * u[t]) * s * (1.0f + z[t] * (1.0f - s));
                            gD += gy[t] * u[t];
                        }
                    } else {
                        #pragma omp simd reduction(+ : gD)
                        for (long t = 0; t < L; t++) {
                            gy[t] = go[t];
                            gD += gy[t] * u[t];
                        }
                    }
                    /* Adjoint backwards in time: gh = dLoss/dh_t, carried through the decays. */
                    float gh[MAX_STATE], ga[MAX_STATE];
                    for (long n = 0; n < N; n++) gh[n] = ga[n] = 0.0f;
                    float gbias = 0.0f;
                    for (long t = L - 1; t >= 0; t--) {
                        const float dy = gy[t], dt = dts[t], du = dt * u[t];
                        const float *Bt = Bb + t * N, *Ct = Cb + t * N;
                        const float *hp = hs + t * N, *hn = hs + (t + 1) * N, *e = es + t * N;
                        float *gBt = gBb + t * N, *gCt = gCb + t * N;
                        float s_drive = 0.0f, s_decay = 0.0f;
                        #pragma omp simd reduction(+ : s_drive, s_decay)
                        for (long n = 0; n < N; n++) {
                            const float gn = gh[n] + Ct[n] * dy;
                            gCt[n] += hn[n] * dy;
                            gBt[n] += gn * du;
                            s_drive += gn * Bt[n];
                            const float g_exp = gn * hp[n] * e[n]; /* dLoss/d(delta_t A_n) */
                            s_decay += g_exp * A[n];
                            ga[n] += g_exp * dt;
                            gh[n] = gn * e[n];
                        }
                        go[t] = dt * s_drive + D * dy; /* dLoss/du */
                        const float graw = (u[t] * s_drive + s_decay) * sig[t];
                        dts[t] = graw;
                        gbias += graw;
                    }
                    memcpy(g->gA + (b * nd + d) * N, ga, sizeof(float) * (size_t)N);
                    if (g->gD) g->gD[b * nd + d] = gD;
                    if (g->gbias) g->gbias[b * nd + d] = gbias;
                }
                move_block(g->gu, b, d0, w, L, gb, 1);
                move_block(g->gdelta, b, d0, w, L, db, 1);
                if (g->gz.data) move_block(g->gz, b, d0, w, L, zb, 1);
            }
        }
        free(hs);
        free(es);
        free(buf);
        free(row);
    }
    return failed ? -1 : 0;
}
