// Element-wise steps on one warp's 16 x 8N accumulator tile (float[N][4] per lane, the C layout
// of flash_mma.cuh): lane (g, c) holds, in n-tile n, rows row[0] = g and row[1] = g + 8 of the
// warp's 16 (elements 2r, 2r + 1 of row half r) at columns n * 8 + 2c and + 1. Rows are queries
// and columns keys in the score tiles (S, P) of the forward and of dQ.
#pragma once
#include "flash_common.cuh"

namespace flash {

// S <- mod(scale S) where key j0 + column is visible to the row (below j0 + cols, and set in
// the block mask's bits `bb`), -inf elsewhere. `plain` (no modifiers, every element visible)
// only scales.
template <int N>
FLASH_DEV void mask_scores(float (&s)[N][4], const Mods& md, const BlockBits& bb, float scale,
                           const int (&row)[2], int j0, int cols, int c, bool plain) {
#pragma unroll
    for (int n = 0; n < N; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float x = s[n][e] * scale;
            if (!plain) {
                const int i = row[e >> 1], j = j0 + n * 8 + 2 * c + (e & 1);
                x = (j < j0 + cols && md.visible(i, j) && bb.test(i, j)) ? md.modify(x, i, j)
                                                                          : -FLASH_INF;
            }
            s[n][e] = x;
        }
}

// Maximum of row half r over the quad's lanes, and `init`.
template <int N> FLASH_DEV float row_max(const float (&s)[N][4], int r, float init) {
    float mx = init;
#pragma unroll
    for (int n = 0; n < N; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
    return quad_max(mx);
}

// The exponent base of a row whose maximum is m: a row with nothing visible (m = -inf) takes 0,
// so its weights are exp(-inf) = 0, not exp(nan).
FLASH_DEV float exp_base(float m) { return m == -FLASH_INF ? 0.f : m; }

// P <- exp(S - base) on row half r; returns this lane's part of the row sum.
template <int N> FLASH_DEV float exp_row(float (&s)[N][4], int r, float base) {
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < N; ++n) {
        s[n][2 * r] = fexp(s[n][2 * r] - base);
        s[n][2 * r + 1] = fexp(s[n][2 * r + 1] - base);
        sum += s[n][2 * r] + s[n][2 * r + 1];
    }
    return sum;
}

// P <- P Z, Z the dropout factors (0 or 1 / (1 - p)) of the rows and keys j0 + column.
template <int N>
FLASH_DEV void apply_dropout(float (&s)[N][4], const Dropout& dr, const int (&row)[2], int j0,
                             int c) {
#pragma unroll
    for (int n = 0; n < N; ++n)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float f0, f1;
            dr.pair(row[r], j0 + n * 8 + 2 * c, f0, f1);
            s[n][2 * r] *= f0;
            s[n][2 * r + 1] *= f1;
        }
}

// Row half r of the tile times `mul`, as T, to dst[0 .. ncols) (dst: the row's column 0).
template <typename T, int N>
FLASH_DEV void store_row(T* dst, const float (&acc)[N][4], int r, int c, float mul, int ncols) {
#pragma unroll
    for (int n = 0; n < N; ++n) {
        const int col = n * 8 + 2 * c;
        if (col < ncols) dst[col] = from_f32<T>(acc[n][2 * r] * mul);
        if (col + 1 < ncols) dst[col + 1] = from_f32<T>(acc[n][2 * r + 1] * mul);
    }
}

}  // namespace flash
