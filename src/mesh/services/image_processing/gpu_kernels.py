"""CUDA source of the GPU backend's kernels (compiled by CuPy once per sample type at start-up).

Kept as a Python string so that it ships inside the package with the code that launches it.
"""

SOURCE = r"""
// CUDA kernels of the GPU backend, compiled once per sample type at start-up with
// -DSAMPLE=<unsigned char|unsigned short> -DSAMPLE_MAX=<255|65535>.
// Images are interleaved (height, width, channels) rows; "samples" count channels too.

#define ROW_TILE 128   // pixels per block in the row pass
#define COL_W 32       // samples per block in the column pass
#define COL_H 64       // rows per block in the column pass

typedef SAMPLE sample_t;

__device__ __forceinline__ long long lmax(long long a, long long b) { return a > b ? a : b; }
__device__ __forceinline__ long long lmin(long long a, long long b) { return a < b ? a : b; }

// Border modes: 0 reflect (101, no edge repeat), 1 clamp, 2 wrap, 3 constant (-1 = outside).
__device__ __forceinline__ int map_index(int i, int n, int border) {
    if (i >= 0 && i < n) return i;
    if (border == 1) return i < 0 ? 0 : n - 1;
    if (border == 2) { i %= n; return i < 0 ? i + n : i; }
    if (border == 3) return -1;
    if (n == 1) return 0;
    while (i < 0 || i >= n) {
        if (i < 0) i = -i;
        if (i >= n) i = 2 * n - 2 - i;
    }
    return i;
}

__device__ __forceinline__ sample_t saturate(double v) {
    v = rint(v);
    return (sample_t)(v < 0.0 ? 0.0 : (v > (double)SAMPLE_MAX ? (double)SAMPLE_MAX : v));
}

__device__ __forceinline__ sample_t saturatef(float v) {
    v = rintf(v);
    return (sample_t)(v < 0.f ? 0.f : (v > (float)SAMPLE_MAX ? (float)SAMPLE_MAX : v));
}

// Per-channel lookup table (channels x (SAMPLE_MAX + 1)); 8-bit tables live in shared memory.
// Fused point-wise steps (invert, adjust, binary threshold, equalisation) arrive here composed into one table.
extern "C" __global__ void lut_apply(const sample_t* __restrict__ src, sample_t* __restrict__ dst,
                                     const sample_t* __restrict__ lut, long long n, int channels) {
#if SAMPLE_MAX == 255
    __shared__ sample_t table[4 * 256];
    for (int i = threadIdx.x; i < channels * 256; i += blockDim.x) table[i] = lut[i];
    __syncthreads();
    // Four samples per thread through 32-bit loads when the buffer allows it.
    long long n4 = n / 4;
    const uchar4* src4 = reinterpret_cast<const uchar4*>(src);
    uchar4* dst4 = reinterpret_cast<uchar4*>(dst);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n4; i += (long long)gridDim.x * blockDim.x) {
        uchar4 v = src4[i];
        // One 64-bit modulo per four samples; the channel then steps with a compare.
        int ch = (int)((i * 4) % channels);
        v.x = table[ch * 256 + v.x];
        ch = ch + 1 == channels ? 0 : ch + 1;
        v.y = table[ch * 256 + v.y];
        ch = ch + 1 == channels ? 0 : ch + 1;
        v.z = table[ch * 256 + v.z];
        ch = ch + 1 == channels ? 0 : ch + 1;
        v.w = table[ch * 256 + v.w];
        dst4[i] = v;
    }
    for (long long i = n4 * 4 + blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        dst[i] = table[(int)(i % channels) * 256 + src[i]];
#else
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        dst[i] = lut[(long long)(i % channels) * (SAMPLE_MAX + 1) + src[i]];
#endif
}

// Grey from RGB(A). method 0: 14-bit fixed-point weights, rounded half to even; 1: average; 2: lightness;
// 3: 15-bit weights rounded half up (BT.601 exactly as OpenCV's cvtColor).
extern "C" __global__ void grayscale(const sample_t* __restrict__ src, sample_t* __restrict__ dst, long long pixels,
                                     int channels, int wr, int wg, int wb, int method) {
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < pixels; p += (long long)gridDim.x * blockDim.x) {
        const sample_t* px = src + p * channels;
        long long r = px[0], g = px[1], b = px[2];
        long long out;
        if (method == 0) {
            long long s = r * wr + g * wg + b * wb;
            long long q = s >> 14, rem = s & 16383;
            out = q + ((rem > 8192 || (rem == 8192 && (q & 1))) ? 1 : 0);
        } else if (method == 3) {
            out = (r * wr + g * wg + b * wb + 16384) >> 15;
        } else if (method == 1) {
            out = (r + g + b + 1) / 3;
        } else {
            long long hi = lmax(r, lmax(g, b)), lo = lmin(r, lmin(g, b));
            long long s = hi + lo, q = s >> 1;
            out = q + (((s & 1) && (q & 1)) ? 1 : 0);
        }
        dst[p] = (sample_t)out;
    }
}

// Row pass of a separable filter: shared-memory tile of ROW_TILE + 2r pixels per row, float output.
extern "C" __global__ void conv_rows(const sample_t* __restrict__ src, float* __restrict__ dst, int h, int w, int c,
                                     const float* __restrict__ k, int r, int border) {
    extern __shared__ float tile[];
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    int x0 = blockIdx.x * ROW_TILE;
    int span = (ROW_TILE + 2 * r) * c;
    float* row = tile + threadIdx.y * span;
    if (y < h) {
        const sample_t* line = src + (long long)y * w * c;
        for (int i = threadIdx.x; i < span; i += blockDim.x) {
            int sx = map_index(x0 - r + i / c, w, border);
            row[i] = sx < 0 ? 0.f : (float)line[(long long)sx * c + i % c];
        }
    }
    __syncthreads();
    if (y >= h) return;
    float* out = dst + (long long)y * w * c;
    int taps = 2 * r + 1;
    for (int i = threadIdx.x; i < ROW_TILE * c; i += blockDim.x) {
        int p = i / c;
        if (x0 + p >= w) break;
        const float* base = row + p * c + i % c;
        float acc = 0.f;
        for (int t = 0; t < taps; ++t) acc = fmaf(__ldg(k + t), base[t * c], acc);
        out[(long long)(x0 + p) * c + i % c] = acc;
    }
}

// Column pass: shared-memory tile of (COL_H + 2r) rows x COL_W samples. Output rounded (scale applied in
// double, so integer box sums divide exactly like OpenCV) or, with raw_out, kept as float.
extern "C" __global__ void conv_cols(const float* __restrict__ src, void* __restrict__ dst, int h, int w, int c,
                                     const float* __restrict__ k, int r, int border, double scale, int raw_out) {
    extern __shared__ float tile[];
    long long row_len = (long long)w * c;
    long long sx = (long long)blockIdx.x * COL_W + threadIdx.x;
    int y0 = blockIdx.y * COL_H;
    for (int j = threadIdx.y; j < COL_H + 2 * r; j += blockDim.y) {
        int sy = map_index(y0 - r + j, h, border);
        tile[j * COL_W + threadIdx.x] = (sx < row_len && sy >= 0) ? src[(long long)sy * row_len + sx] : 0.f;
    }
    __syncthreads();
    if (sx >= row_len) return;
    int taps = 2 * r + 1;
    for (int j = threadIdx.y; j < COL_H; j += blockDim.y) {
        int y = y0 + j;
        if (y >= h) break;
        float acc = 0.f;
        for (int t = 0; t < taps; ++t) acc = fmaf(__ldg(k + t), tile[(j + t) * COL_W + threadIdx.x], acc);
        long long at = (long long)y * row_len + sx;
        if (raw_out) ((float*)dst)[at] = acc;
        else ((sample_t*)dst)[at] = saturate((double)acc * scale);
    }
}

// Both passes of a separable filter in one kernel: the block loads its input tile with the apron into shared
// memory once, runs the row pass into a second shared tile (apron rows included) and the column pass from it,
// so the image is read and written once. Same arithmetic, in the same order, as conv_rows + conv_cols.
extern "C" __global__ void conv_fused(const sample_t* __restrict__ src, void* __restrict__ dst, int h, int w, int c,
                                      const float* __restrict__ kx, int rx, const float* __restrict__ ky, int ry,
                                      int border, double scale, int raw_out, int tile_w, int tile_h) {
    extern __shared__ float smem[];
    int in_w = (tile_w + 2 * rx) * c;
    int in_h = tile_h + 2 * ry;
    int mid_w = tile_w * c;
    float* in = smem;
    float* mid = smem + in_h * in_w;
    int x0 = blockIdx.x * tile_w, y0 = blockIdx.y * tile_h;
    int tid = threadIdx.y * blockDim.x + threadIdx.x, threads = blockDim.x * blockDim.y;
    for (int i = tid; i < in_h * in_w; i += threads) {
        int ty = i / in_w, tx = i - ty * in_w;
        int sy = map_index(y0 - ry + ty, h, border);
        int sx = map_index(x0 - rx + tx / c, w, border);
        in[i] = (sy < 0 || sx < 0) ? 0.f : (float)src[((long long)sy * w + sx) * c + tx % c];
    }
    __syncthreads();
    int xtaps = 2 * rx + 1, ytaps = 2 * ry + 1;
    for (int i = tid; i < in_h * mid_w; i += threads) {
        int ty = i / mid_w, tx = i - ty * mid_w;
        const float* base = in + ty * in_w + tx;
        float acc = 0.f;
        for (int t = 0; t < xtaps; ++t) acc = fmaf(__ldg(kx + t), base[t * c], acc);
        mid[i] = acc;
    }
    __syncthreads();
    for (int i = tid; i < tile_h * mid_w; i += threads) {
        int oy = i / mid_w, tx = i - oy * mid_w;
        int y = y0 + oy, x = x0 + tx / c;
        if (y >= h || x >= w) continue;
        float acc = 0.f;
        for (int t = 0; t < ytaps; ++t) acc = fmaf(__ldg(ky + t), mid[(oy + t) * mid_w + tx], acc);
        long long at = ((long long)y * w + x) * c + tx % c;
        if (raw_out) ((float*)dst)[at] = acc;
        else ((sample_t*)dst)[at] = saturate((double)acc * scale);
    }
}

// Sobel output: |dx|, |dy| or sqrt(dx^2 + dy^2), rounded and saturated.
extern "C" __global__ void gradient_out(const float* __restrict__ dx, const float* __restrict__ dy,
                                        sample_t* __restrict__ dst, long long n, int magnitude) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float a = dx[i];
        dst[i] = saturatef(magnitude ? sqrtf(a * a + dy[i] * dy[i]) : fabsf(a));
    }
}

// Unsharp mask: x + amount * (x - blurred) where |x - blurred| >= threshold.
extern "C" __global__ void unsharp(const sample_t* __restrict__ x, const sample_t* __restrict__ blurred,
                                   sample_t* __restrict__ dst, long long n, float amount, int threshold) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float v = (float)x[i], b = (float)blurred[i];
        bool small = threshold > 0 && fabsf(v - b) < (float)threshold;
        dst[i] = small ? x[i] : saturatef(v * (1.f + amount) + b * (-amount));
    }
}

// Adaptive threshold: x > mean - c -> max (or the inverse).
extern "C" __global__ void adaptive_compare(const sample_t* __restrict__ x, const sample_t* __restrict__ mean,
                                            sample_t* __restrict__ dst, long long n, int c, int invert) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        bool above = (int)x[i] > (int)mean[i] - c;
        dst[i] = (above != (bool)invert) ? (sample_t)SAMPLE_MAX : (sample_t)0;
    }
}

// Two-tap separable resampling (nearest, bilinear, OpenCV's area upscaling) from per-axis tables.
extern "C" __global__ void resample2(const sample_t* __restrict__ src, sample_t* __restrict__ dst, int in_w, int out_h,
                                     int out_w, int c, const int* __restrict__ yi, const float* __restrict__ yw,
                                     const int* __restrict__ xi, const float* __restrict__ xw) {
    long long total = (long long)out_h * out_w * c;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        int ch = (int)(i % c);
        long long p = i / c;
        int x = (int)(p % out_w), y = (int)(p / out_w);
        const sample_t* r0 = src + (long long)yi[2 * y] * in_w * c;
        const sample_t* r1 = src + (long long)yi[2 * y + 1] * in_w * c;
        int x0 = xi[2 * x] * c + ch, x1 = xi[2 * x + 1] * c + ch;
        float wx1 = xw[x], wy1 = yw[y];
        float top = (float)r0[x0] * (1.f - wx1) + (float)r0[x1] * wx1;
        float bottom = (float)r1[x0] * (1.f - wx1) + (float)r1[x1] * wx1;
        dst[i] = saturatef(top * (1.f - wy1) + bottom * wy1);
    }
}

// Area downscaling: each output is the overlap-weighted mean of its source box (CSR weight tables per axis).
extern "C" __global__ void resample_area(const sample_t* __restrict__ src, sample_t* __restrict__ dst, int in_w,
                                         int out_h, int out_w, int c, const int* __restrict__ ystart,
                                         const int* __restrict__ yidx, const float* __restrict__ yw,
                                         const int* __restrict__ xstart, const int* __restrict__ xidx,
                                         const float* __restrict__ xw) {
    long long total = (long long)out_h * out_w * c;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        int ch = (int)(i % c);
        long long p = i / c;
        int x = (int)(p % out_w), y = (int)(p / out_w);
        float acc = 0.f;
        for (int a = ystart[y]; a < ystart[y + 1]; ++a) {
            const sample_t* line = src + (long long)yidx[a] * in_w * c + ch;
            float row = 0.f;
            for (int b = xstart[x]; b < xstart[x + 1]; ++b) row = fmaf(xw[b], (float)line[(long long)xidx[b] * c], row);
            acc = fmaf(yw[a], row, acc);
        }
        dst[i] = saturatef(acc);
    }
}

// Affine warp with zero fill (rotate); m maps destination to source. Like OpenCV 5's warpAffine, source
// coordinates are float32 and unquantised: nearest rounds to even, bilinear weights are the fractions.
extern "C" __global__ void warp_affine(const sample_t* __restrict__ src, sample_t* __restrict__ dst, int in_h, int in_w,
                                       int out_h, int out_w, int c, float m0, float m1, float m2, float m3,
                                       float m4, float m5, int bilinear) {
    long long total = (long long)out_h * out_w;
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < total; p += (long long)gridDim.x * blockDim.x) {
        int x = (int)(p % out_w), y = (int)(p / out_w);
        float sx = __fadd_rn(__fadd_rn(__fmul_rn(m0, (float)x), __fmul_rn(m1, (float)y)), m2);
        float sy = __fadd_rn(__fadd_rn(__fmul_rn(m3, (float)x), __fmul_rn(m4, (float)y)), m5);
        sample_t* out = dst + p * c;
        if (!bilinear) {
            int ix = (int)rintf(sx), iy = (int)rintf(sy);
            bool inside = ix >= 0 && iy >= 0 && ix < in_w && iy < in_h;
            for (int ch = 0; ch < c; ++ch) out[ch] = inside ? src[((long long)iy * in_w + ix) * c + ch] : (sample_t)0;
            continue;
        }
        int ix = (int)floorf(sx), iy = (int)floorf(sy);
        float fx = sx - (float)ix, fy = sy - (float)iy;
        for (int ch = 0; ch < c; ++ch) {
            float v[4];
            for (int t = 0; t < 4; ++t) {
                int xx = ix + (t & 1), yy = iy + (t >> 1);
                v[t] = (xx >= 0 && yy >= 0 && xx < in_w && yy < in_h) ? (float)src[((long long)yy * in_w + xx) * c + ch] : 0.f;
            }
            float top = v[0] * (1.f - fx) + v[1] * fx, bottom = v[2] * (1.f - fx) + v[3] * fx;
            out[ch] = saturatef(top * (1.f - fy) + bottom * fy);
        }
    }
}

// RGB -> HSV. 8-bit: OpenCV's integer algorithm (full 0..255 hue) with its division tables;
// 16-bit: OpenCV's float algorithm, hue 0..360 scaled to 0..65535.
extern "C" __global__ void rgb_to_hsv(const sample_t* __restrict__ src, sample_t* __restrict__ dst, long long pixels,
                                      int channels, const int* __restrict__ sdiv, const int* __restrict__ hdiv) {
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < pixels; p += (long long)gridDim.x * blockDim.x) {
        const sample_t* in = src + p * channels;
        sample_t* out = dst + p * channels;
#if SAMPLE_MAX == 255
        int r = in[0], g = in[1], b = in[2];
        int v = (int)lmax(r, lmax(g, b)), vmin = (int)lmin(r, lmin(g, b)), diff = v - vmin;
        int vr = v == r ? -1 : 0, vg = v == g ? -1 : 0;
        int s = (diff * sdiv[v] + (1 << 11)) >> 12;
        int h = (vr & (g - b)) + (~vr & ((vg & (b - r + 2 * diff)) + ((~vg) & (r - g + 4 * diff))));
        h = (h * hdiv[diff] + (1 << 11)) >> 12;
        h += h < 0 ? 256 : 0;
        out[0] = (sample_t)(h < 0 ? 0 : (h > 255 ? 255 : h));
        out[1] = (sample_t)s;
        out[2] = (sample_t)v;
#else
        float r = in[0] * (1.f / 65535.f), g = in[1] * (1.f / 65535.f), b = in[2] * (1.f / 65535.f);
        float v = fmaxf(r, fmaxf(g, b)), vmin = fminf(r, fminf(g, b)), diff = v - vmin;
        float s = diff / (fabsf(v) + 1.19209290e-7f);
        diff = 60.f / (diff + 1.19209290e-7f);
        float h;
        if (v == r) h = (g - b) * diff;
        else if (v == g) h = (b - r) * diff + 120.f;
        else h = (r - g) * diff + 240.f;
        if (h < 0.f) h += 360.f;
        out[0] = saturatef(h * (65535.f / 360.f));
        out[1] = saturatef(s * 65535.f);
        out[2] = saturatef(v * 65535.f);
#endif
        if (channels == 4) out[3] = in[3];
    }
}

// HSV -> RGB with OpenCV's float algorithm (8-bit hue scale 6/255 like HSV2RGB_FULL).
extern "C" __global__ void hsv_to_rgb(const sample_t* __restrict__ src, sample_t* __restrict__ dst, long long pixels,
                                      int channels) {
    const int sector_data[6][3] = {{1, 3, 0}, {1, 0, 2}, {3, 0, 1}, {0, 2, 1}, {0, 1, 3}, {2, 1, 0}};
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < pixels; p += (long long)gridDim.x * blockDim.x) {
        const sample_t* in = src + p * channels;
        sample_t* out = dst + p * channels;
#if SAMPLE_MAX == 255
        float h = in[0] * (6.f / 255.f), s = in[1] * (1.f / 255.f), v = in[2] * (1.f / 255.f);
#else
        float h = in[0] * (360.f / 65535.f) * (6.f / 360.f), s = in[1] * (1.f / 65535.f), v = in[2] * (1.f / 65535.f);
#endif
        float rgb[3];
        if (s == 0.f) {
            rgb[0] = rgb[1] = rgb[2] = v;
        } else {
            while (h >= 6.f) h -= 6.f;
            int sector = (int)floorf(h);
            h -= sector;
            if ((unsigned)sector >= 6u) { sector = 0; h = 0.f; }
            float tab[4] = {v, v * (1.f - s), v * (1.f - s * h), v * (1.f - s * (1.f - h))};
            float bb = tab[sector_data[sector][0]], gg = tab[sector_data[sector][1]], rr = tab[sector_data[sector][2]];
            rgb[0] = rr; rgb[1] = gg; rgb[2] = bb;
        }
        for (int ch = 0; ch < 3; ++ch) out[ch] = saturatef(rgb[ch] * (float)SAMPLE_MAX);
        if (channels == 4) out[3] = in[3];
    }
}
"""
