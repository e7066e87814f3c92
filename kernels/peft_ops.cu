// Kernels behind peft-core's custom ops on CUDA (crates/peft-core/src/cuda/). Each has a CPU
// reference computing the same function in crates/peft-core/src/ops/, and `peft-rs bench --suite
// kernels` checks one against the other on the device.
//
// Conventions: row-major, contiguous inputs; `T` is float or __nv_bfloat16; every reduction and
// every transcendental runs in f32. Entry points are `extern "C"` with a dtype suffix (_f32, _bf16)
// so the Rust side loads them by name from one PTX module.
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

// Sum over a block of at most 1024 threads; every thread gets the result. `shared` holds 32 floats.
__device__ float block_sum(float v, float *shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // `shared` may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = lane < warps ? shared[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

__device__ float block_max(float v, float *shared) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = lane < warps ? shared[lane] : -INFINITY;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  return v;
}

// ---------------------------------------------------------------------------------- elementwise
// y[r, c] += b[c]
template <typename T>
__device__ void add_bias_rows(T *y, const T *b, int64_t n, int cols) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    y[i] = from_f<T>(to_f(y[i]) + to_f(b[i % cols]));
}

// Dropout's keep-mask, scaled by 1/keep: 1/keep with probability `keep`, else 0. Counter-based
// (splitmix64 of seed and index), so a mask is a pure function of (seed, index): the CPU draws
// the same mask (crates/peft-core/src/ops/dropout.rs).
__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
// y = x ⊙ mask(seed), the mask computed on the fly: dropout's forward, and (applied to
// the output gradient with the same seed) its backward. No mask tensor is ever stored.
template <typename T>
__device__ void dropout_apply(const T *x, T *y, int64_t n, uint64_t seed, float keep) {
  const float scale = 1.f / keep;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const float u = (float)(splitmix64(seed ^ (uint64_t)i * 0xd1342543de82ef95ULL) >> 40) *
                    (1.f / 16777216.f);
    y[i] = from_f<T>(u < keep ? to_f(x[i]) * scale : 0.f);
  }
}

// out[i] = a[i] * m[i] (out may alias a)
template <typename T>
__device__ void mul(T *out, const T *a, const T *m, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    out[i] = from_f<T>(to_f(a[i]) * to_f(m[i]));
}

// y[i] += a[i] * m[i]
template <typename T>
__device__ void add_mul(T *y, const T *a, const T *m, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    y[i] = from_f<T>(to_f(y[i]) + to_f(a[i]) * to_f(m[i]));
}

// Exact (erf) GELU and its derivative.
template <typename T>
__device__ void gelu_fwd(const T *x, T *y, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const float v = to_f(x[i]);
    y[i] = from_f<T>(0.5f * v * (1.f + erff(v * 0.70710678118654752f)));
  }
}
template <typename T>
__device__ void gelu_bwd(const T *x, const T *g, T *dx, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const float v = to_f(x[i]);
    const float cdf = 0.5f * (1.f + erff(v * 0.70710678118654752f));
    const float pdf = 0.39894228040143268f * __expf(-0.5f * v * v);
    dx[i] = from_f<T>(to_f(g[i]) * (cdf + v * pdf));
  }
}

// ------------------------------------------------------------------------------------ row-wise
// LayerNorm with frozen affine, one block per row.
template <typename T>
__device__ void layer_norm_fwd(const T *x, const T *gamma, const T *beta, T *y, int h, float eps) {
  __shared__ float shared[32];
  const T *xr = x + (int64_t)blockIdx.x * h;
  T *yr = y + (int64_t)blockIdx.x * h;
  float s = 0.f;
  for (int i = threadIdx.x; i < h; i += blockDim.x) s += to_f(xr[i]);
  const float mean = block_sum(s, shared) / h;
  float v = 0.f;
  for (int i = threadIdx.x; i < h; i += blockDim.x) {
    const float d = to_f(xr[i]) - mean;
    v += d * d;
  }
  const float rstd = rsqrtf(block_sum(v, shared) / h + eps);
  for (int i = threadIdx.x; i < h; i += blockDim.x)
    yr[i] = from_f<T>((to_f(xr[i]) - mean) * rstd * to_f(gamma[i]) + to_f(beta[i]));
}

// dx = rstd · (g' − mean(g') − x̂ · mean(g'·x̂)), g' = dy·γ
template <typename T>
__device__ void layer_norm_bwd(const T *x, const T *g, const T *gamma, T *dx, int h, float eps) {
  __shared__ float shared[32];
  const int64_t off = (int64_t)blockIdx.x * h;
  const T *xr = x + off, *gr = g + off;
  T *dr = dx + off;
  float s = 0.f;
  for (int i = threadIdx.x; i < h; i += blockDim.x) s += to_f(xr[i]);
  const float mean = block_sum(s, shared) / h;
  float v = 0.f;
  for (int i = threadIdx.x; i < h; i += blockDim.x) {
    const float d = to_f(xr[i]) - mean;
    v += d * d;
  }
  const float rstd = rsqrtf(block_sum(v, shared) / h + eps);
  float sg = 0.f, sgx = 0.f;
  for (int i = threadIdx.x; i < h; i += blockDim.x) {
    const float gg = to_f(gr[i]) * to_f(gamma[i]);
    sg += gg;
    sgx += gg * (to_f(xr[i]) - mean) * rstd;
  }
  const float mg = block_sum(sg, shared) / h;
  const float mgx = block_sum(sgx, shared) / h;
  for (int i = threadIdx.x; i < h; i += blockDim.x) {
    const float xhat = (to_f(xr[i]) - mean) * rstd;
    dr[i] = from_f<T>(rstd * (to_f(gr[i]) * to_f(gamma[i]) - mg - xhat * mgx));
  }
}

// softmax(scale·x + mask) over rows of `keys`; mask (f32, batch × keys) broadcast over the
// `rows_per_batch` rows (heads × queries) of each batch element; null for none.
template <typename TX, typename T>
__device__ void masked_softmax(const TX *x, const float *mask, T *y, int keys, int rows_per_batch,
                               float scale) {
  __shared__ float shared[32];
  const int64_t row = blockIdx.x;
  const TX *xr = x + row * keys;
  T *yr = y + row * keys;
  const float *mr = mask ? mask + (row / rows_per_batch) * keys : nullptr;
  float m = -INFINITY;
  for (int i = threadIdx.x; i < keys; i += blockDim.x)
    m = fmaxf(m, scale * to_f(xr[i]) + (mr ? mr[i] : 0.f));
  m = block_max(m, shared);
  float s = 0.f;
  for (int i = threadIdx.x; i < keys; i += blockDim.x)
    s += __expf(scale * to_f(xr[i]) + (mr ? mr[i] : 0.f) - m);
  const float inv = 1.f / block_sum(s, shared);
  for (int i = threadIdx.x; i < keys; i += blockDim.x)
    yr[i] = from_f<T>(__expf(scale * to_f(xr[i]) + (mr ? mr[i] : 0.f) - m) * inv);
}

// dx = scale · p ⊙ (g − Σ g⊙p)
template <typename T, typename TG>
__device__ void softmax_bwd(const T *p, const TG *g, T *dx, int keys, float scale) {
  __shared__ float shared[32];
  const int64_t off = (int64_t)blockIdx.x * keys;
  float s = 0.f;
  for (int i = threadIdx.x; i < keys; i += blockDim.x) s += to_f(g[off + i]) * to_f(p[off + i]);
  const float dot = block_sum(s, shared);
  for (int i = threadIdx.x; i < keys; i += blockDim.x)
    dx[off + i] = from_f<T>(scale * to_f(p[off + i]) * (to_f(g[off + i]) - dot));
}

// ------------------------------------------------------------------- multi-adapter LoRA (BGMV)
// Each row m of the batch uses adapter idx[m]; negative or >= `adapters`: none. A: (adapters, r, K), B:
// (adapters, N, r), scale: (adapters). Shrink: u[m, :] = A[idx[m]] · x[m, :] (f32, M × r); one
// block per row, one warp per rank component. Expand: y[m, n] += scale · B[idx[m]][n, :] · u[m, :].
template <typename T>
__device__ void bgmv_shrink(const T *x, const T *a, const int32_t *idx, float *u, int k, int r,
                            int adapters) {
  const int m = blockIdx.x;
  const int ad = idx[m] < adapters ? idx[m] : -1;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const T *xr = x + (int64_t)m * k;
  for (int j = warp; j < r; j += warps) {
    float s = 0.f;
    if (ad >= 0) {
      const T *ar = a + ((int64_t)ad * r + j) * k;
      for (int i = lane; i < k; i += 32) s += to_f(xr[i]) * to_f(ar[i]);
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
    if (lane == 0) u[(int64_t)m * r + j] = s;
  }
}
template <typename T>
__device__ void bgmv_expand(const float *u, const T *b, const float *scale, const int32_t *idx,
                            T *y, int n, int r, int adapters) {
  const int m = blockIdx.y;
  const int ad = idx[m];
  if (ad < 0 || ad >= adapters) return;
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= n) return;
  const float *ur = u + (int64_t)m * r;
  const T *br = b + ((int64_t)ad * n + col) * r;
  float s = 0.f;
  for (int j = 0; j < r; ++j) s += to_f(br[j]) * ur[j];
  T *yp = y + (int64_t)m * n + col;
  *yp = from_f<T>(to_f(*yp) + scale[ad] * s);
}

// ------------------------------------------------------------------------------------ AdamW
// The three in-place passes of torch.optim.AdamW's single-tensor update (f32), as the CPU's
// crates/peft-train/src/optim/kernels.rs: m.lerp_(g, w); v = v·b2 + (1−b2)·g²;
// p = p·decay − step·m / (sqrt(v)/bc2 + eps). `gscale` multiplies g first (1: none).
extern "C" __global__ void adamw_m_f32(float *m, const float *g, int64_t n, float w, float gscale) {
  const bool small = w < 0.5f;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const float gc = g[i] * gscale, mc = m[i];
    m[i] = small ? mc + w * (gc - mc) : gc - (gc - mc) * (1.f - w);
  }
}
extern "C" __global__ void adamw_v_f32(float *v, const float *g, int64_t n, float b2, float omb2,
                                       float gscale) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const float gc = g[i] * gscale;
    v[i] = v[i] * b2 + omb2 * gc * gc;
  }
}
extern "C" __global__ void adamw_p_f32(float *p, const float *m, const float *v, int64_t n,
                                       float decay, float bc2s, float eps, float nss) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const float denom = sqrtf(v[i]) / bc2s + eps;
    p[i] = p[i] * decay + nss * m[i] / denom;
  }
}

// ------------------------------------------------------------------------------ entry points
#define ENTRY(T, SFX)                                                                           \
  extern "C" __global__ void add_bias_rows_##SFX(T *y, const T *b, int64_t n, int cols) {     \
    add_bias_rows<T>(y, b, n, cols);                                                            \
  }                                                                                             \
  extern "C" __global__ void mul_##SFX(T *o, const T *a, const T *m, int64_t n) {             \
    mul<T>(o, a, m, n);                                                                         \
  }                                                                                             \
  extern "C" __global__ void add_mul_##SFX(T *y, const T *a, const T *m, int64_t n) {         \
    add_mul<T>(y, a, m, n);                                                                     \
  }                                                                                             \
  extern "C" __global__ void gelu_fwd_##SFX(const T *x, T *y, int64_t n) {                    \
    gelu_fwd<T>(x, y, n);                                                                       \
  }                                                                                             \
  extern "C" __global__ void gelu_bwd_##SFX(const T *x, const T *g, T *dx, int64_t n) {       \
    gelu_bwd<T>(x, g, dx, n);                                                                   \
  }                                                                                             \
  extern "C" __global__ void layer_norm_fwd_##SFX(const T *x, const T *ga, const T *be, T *y, \
                                                  int h, float eps) {                           \
    layer_norm_fwd<T>(x, ga, be, y, h, eps);                                                    \
  }                                                                                             \
  extern "C" __global__ void layer_norm_bwd_##SFX(const T *x, const T *g, const T *ga, T *dx, \
                                                  int h, float eps) {                           \
    layer_norm_bwd<T>(x, g, ga, dx, h, eps);                                                    \
  }                                                                                             \
  extern "C" __global__ void masked_softmax_##SFX(const T *x, const float *mask, T *y,        \
                                                  int keys, int rows_per_batch, float scale) {  \
    masked_softmax<T, T>(x, mask, y, keys, rows_per_batch, scale);                              \
  }                                                                                             \
  extern "C" __global__ void softmax_bwd_##SFX(const T *p, const T *g, T *dx, int keys,       \
                                               float scale) {                                   \
    softmax_bwd<T, T>(p, g, dx, keys, scale);                                                   \
  }                                                                                             \
  /* f32 scores / score gradients in, T out (the fused attention keeps scores in f32) */      \
  extern "C" __global__ void masked_softmax_from_f32_##SFX(const float *x, const float *mask,  \
                                                           T *y, int keys, int rows_per_batch,  \
                                                           float scale) {                       \
    masked_softmax<float, T>(x, mask, y, keys, rows_per_batch, scale);                          \
  }                                                                                             \
  extern "C" __global__ void softmax_bwd_from_f32_##SFX(const T *p, const float *g, T *dx,    \
                                                        int keys, float scale) {                \
    softmax_bwd<T, float>(p, g, dx, keys, scale);                                               \
  }                                                                                             \
  extern "C" __global__ void dropout_apply_##SFX(const T *x, T *y, int64_t n, uint64_t seed,  \
                                                 float keep) {                                  \
    dropout_apply<T>(x, y, n, seed, keep);                                                      \
  }                                                                                             \
  extern "C" __global__ void bgmv_shrink_##SFX(const T *x, const T *a, const int32_t *idx,    \
                                               float *u, int k, int r, int adapters) {          \
    bgmv_shrink<T>(x, a, idx, u, k, r, adapters);                                               \
  }                                                                                             \
  extern "C" __global__ void bgmv_expand_##SFX(const float *u, const T *b, const float *sc,   \
                                               const int32_t *idx, T *y, int n, int r,          \
                                               int adapters) {                                  \
    bgmv_expand<T>(u, b, sc, idx, y, n, r, adapters);                                           \
  }

ENTRY(float, f32)
ENTRY(__nv_bfloat16, bf16)
