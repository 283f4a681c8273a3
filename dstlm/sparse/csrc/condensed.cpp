// Constant fan-in ("condensed") linear layer on the CPU: forward, input gradient and the gradient of the
// active weights only. Built at first use by dstlm/sparse/kernels.py (torch.utils.cpp_extension.load).
//
// Layout (fp32): weight W [R, k], indices I [R, k] (uint16 or int32 input positions), rows [R] (the output
// unit of each condensed row; ablated units have no row). y[b, rows[r]] = sum_j W[r, j] * x[b, I[r, j]] + bias.
//
// Two schedules:
//  - gather (small batch): per row, a SIMD gather of x at the row's indices, dotted with the row's weights;
//    the x rows stay in L1, the condensed weights and indices are read once per call.
//  - blocked (larger batch): x is transposed block by block into xT [in, BW] (BW batch columns, held in L2);
//    each (row, j) then adds W[r, j] * xT[I[r, j], :] to BW accumulators: contiguous loads, one FMA each.
// The input gradient uses the transposed structure (CSC: for each input, the condensed entries that read it),
// so it is a gather too and needs no atomics. Every output element is summed in a fixed order whatever the
// thread count, so results are reproducible bit for bit across runs and thread counts.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// --- small-batch forward: gather dot products -----------------------------------------------------------
template <typename I>
inline float gather_dot(const float* w, const I* idx, int64_t k, const float* x) {
#if defined(__AVX512F__)
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= k; j += 32) {
    __m512i i0, i1;
    if constexpr (sizeof(I) == 2) {
      i0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + j)));
      i1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + j + 16)));
    } else {
      i0 = _mm512_loadu_si512(idx + j);
      i1 = _mm512_loadu_si512(idx + j + 16);
    }
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j), _mm512_i32gather_ps(i0, x, 4), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j + 16), _mm512_i32gather_ps(i1, x, 4), acc1);
  }
  for (; j < k; j += 16) {
    const int64_t n = std::min<int64_t>(16, k - j);
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
    __m512i ij;
    if constexpr (sizeof(I) == 2) {
      ij = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, idx + j));
    } else {
      ij = _mm512_maskz_loadu_epi32(m, idx + j);
    }
    const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, ij, x, 4);
    acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + j), xv, acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#else
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  int64_t j = 0;
  for (; j + 4 <= k; j += 4) {
    s0 += w[j] * x[idx[j]];
    s1 += w[j + 1] * x[idx[j + 1]];
    s2 += w[j + 2] * x[idx[j + 2]];
    s3 += w[j + 3] * x[idx[j + 3]];
  }
  for (; j < k; ++j) s0 += w[j] * x[idx[j]];
  return (s0 + s1) + (s2 + s3);
#endif
}

template <typename I>
void forward_gather(const float* x, int64_t B, int64_t in, const float* w, const I* idx, const int64_t* rows,
                    int64_t R, int64_t k, const float* bias, float* y, int64_t out) {
  at::parallel_for(0, R, 32, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float b_r = bias ? bias[rows[r]] : 0.f;
      for (int64_t b = 0; b < B; ++b) y[b * out + rows[r]] = gather_dot(w + r * k, idx + r * k, k, x + b * in) + b_r;
    }
  });
}

// --- blocked schedule: transposed batch blocks -----------------------------------------------------------
// dst [n, BW] (zero-padded columns nb..BW) from columns [c0, c0 + n) of rows [b0, b0 + nb) of src [*, ld];
// `cols`, when given, picks the source column of each of the n destination rows (gathered outputs).
template <int BW>
void transpose_in(const float* src, int64_t ld, int64_t b0, int64_t nb, int64_t n, const int64_t* cols, float* dst) {
  constexpr int64_t T = 64;  // a tile of T destination rows: T * BW floats stay in L1 while batch rows stream in
  at::parallel_for(0, (n + T - 1) / T, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = t * T, i1 = std::min(n, i0 + T);
      for (int64_t b = 0; b < nb; ++b) {
        const float* s = src + (b0 + b) * ld;
        if (cols) {
          for (int64_t i = i0; i < i1; ++i) dst[i * BW + b] = s[cols[i]];
        } else {
          for (int64_t i = i0; i < i1; ++i) dst[i * BW + b] = s[i];
        }
      }
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t b = nb; b < BW; ++b) dst[i * BW + b] = 0.f;
    }
  });
}

// acc[0, BW) = sum_{j < n} weight(j) * row(j)[0, BW): the inner loop of the forward and the input gradient.
// U entries at a time, so U * BW / 16 independent FMA chains keep both FMA ports busy whatever BW is.
template <int BW, typename WF, typename XF>
inline void accumulate_rows(int64_t n, WF weight, XF row, float* acc) {
#if defined(__AVX512F__)
  constexpr int NV = BW / 16;
  constexpr int U = NV >= 4 ? 2 : 8 / NV;
  __m512 a[U][NV];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) a[u][v] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + U <= n; j += U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const __m512 w = _mm512_set1_ps(weight(j + u));
      const float* x = row(j + u);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) a[u][v] = _mm512_fmadd_ps(w, _mm512_load_ps(x + 16 * v), a[u][v]);
    }
  }
  for (; j < n; ++j) {
    const __m512 w = _mm512_set1_ps(weight(j));
    const float* x = row(j);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) a[0][v] = _mm512_fmadd_ps(w, _mm512_load_ps(x + 16 * v), a[0][v]);
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    __m512 sum = a[0][v];
#pragma GCC unroll 8
    for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, a[u][v]);
    _mm512_store_ps(acc + 16 * v, sum);
  }
#else
  for (int b = 0; b < BW; ++b) acc[b] = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const float w = weight(j);
    const float* x = row(j);
    for (int b = 0; b < BW; ++b) acc[b] += w * x[b];
  }
#endif
}

// sum_b g[b] * x[b] over one block (both 64-byte aligned, BW floats)
template <int BW>
inline float dot_block(const float* g, const float* x) {
#if defined(__AVX512F__)
  constexpr int NV = BW / 16;
  __m512 a = _mm512_mul_ps(_mm512_load_ps(g), _mm512_load_ps(x));
#pragma GCC unroll 8
  for (int v = 1; v < NV; ++v) a = _mm512_fmadd_ps(_mm512_load_ps(g + 16 * v), _mm512_load_ps(x + 16 * v), a);
  return _mm512_reduce_add_ps(a);
#else
  float s = 0.f;
  for (int b = 0; b < BW; ++b) s += g[b] * x[b];
  return s;
#endif
}

constexpr int64_t kTile = 16;  // outputs written 16 at a time: one cache line of y per batch row

template <int BW, typename I>
void forward_block(const float* xT, const float* w, const I* idx, const int64_t* rows, int64_t R, int64_t k,
                   const float* bias, float* y, int64_t out, int64_t b0, int64_t nb) {
  at::parallel_for(0, (R + kTile - 1) / kTile, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) float tile[kTile][BW];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * kTile, n = std::min(kTile, R - r0);
      for (int64_t q = 0; q < n; ++q) {
        const float* wr = w + (r0 + q) * k;
        const I* ir = idx + (r0 + q) * k;
        accumulate_rows<BW>(k, [&](int64_t j) { return wr[j]; },
                            [&](int64_t j) { return xT + static_cast<int64_t>(ir[j]) * BW; }, tile[q]);
      }
      for (int64_t b = 0; b < nb; ++b) {
        float* yb = y + (b0 + b) * out;
        for (int64_t q = 0; q < n; ++q) {
          const int64_t o = rows[r0 + q];
          yb[o] = tile[q][b] + (bias ? bias[o] : 0.f);
        }
      }
    }
  });
}

// gx block: gxT[i, :] = sum over the entries e reading input i of W[e] * gyT[row(e), :]
template <int BW>
void input_grad_block(const float* gyT, const float* w, const int32_t* ptr, const int32_t* ent_row,
                      const int32_t* ent_pos, int64_t in, float* gx, int64_t b0, int64_t nb) {
  at::parallel_for(0, (in + kTile - 1) / kTile, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) float tile[kTile][BW];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = t * kTile, n = std::min(kTile, in - i0);
      for (int64_t q = 0; q < n; ++q) {
        const int64_t i = i0 + q;
        const int32_t* er = ent_row + ptr[i];
        const int32_t* ep = ent_pos + ptr[i];
        accumulate_rows<BW>(ptr[i + 1] - ptr[i], [&](int64_t e) { return w[ep[e]]; },
                            [&](int64_t e) { return gyT + static_cast<int64_t>(er[e]) * BW; }, tile[q]);
      }
      for (int64_t b = 0; b < nb; ++b) {
        float* gb = gx + (b0 + b) * in + i0;
        for (int64_t q = 0; q < n; ++q) gb[q] = tile[q][b];
      }
    }
  });
}

#if defined(__AVX512F__)
// 16 vectors -> one vector of their 16 horizontal sums, in order (a butterfly: 15 shuffles and adds instead of
// 16 separate reductions)
inline __m512 sum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)  // 128-bit lanes 0,1: v[i]; lanes 2,3: v[i + 8]
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)  // lanes: v[i], v[i + 8], v[i + 4], v[i + 12]
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 4], 0x88), _mm512_shuffle_f32x4(a[i], a[i + 4], 0xDD));
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)  // in each lane, elements 0,2 hold b[i]'s vector, 1,3 b[i + 2]'s
    c[i] = _mm512_add_ps(_mm512_unpacklo_ps(b[i], b[i + 2]), _mm512_unpackhi_ps(b[i], b[i + 2]));
  // lanes: sums of v[0..3], v[8..11], v[4..7], v[12..15]; put the lanes in order
  const __m512 d = _mm512_add_ps(_mm512_unpacklo_ps(c[0], c[1]), _mm512_unpackhi_ps(c[0], c[1]));
  return _mm512_shuffle_f32x4(d, d, 0xD8);
}
#endif

// gw[r, j] += gyT[r, :] . xT[I[r, j], :]
template <int BW, typename I>
void weight_grad_block(const float* gyT, const float* xT, const I* idx, int64_t R, int64_t k, float* gw) {
  at::parallel_for(0, R, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = gyT + r * BW;
      const I* ir = idx + r * k;
      float* gr = gw + r * k;
      int64_t j = 0;
#if defined(__AVX512F__)
      constexpr int NV = BW / 16;
      __m512 gv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) gv[v] = _mm512_load_ps(g + 16 * v);
      for (; j + 16 <= k; j += 16) {  // 16 entries at a time, reduced together
        __m512 acc[16];
#pragma GCC unroll 16
        for (int u = 0; u < 16; ++u) {
          const float* x = xT + static_cast<int64_t>(ir[j + u]) * BW;
          acc[u] = _mm512_mul_ps(gv[0], _mm512_load_ps(x));
#pragma GCC unroll 8
          for (int v = 1; v < NV; ++v) acc[u] = _mm512_fmadd_ps(gv[v], _mm512_load_ps(x + 16 * v), acc[u]);
        }
        _mm512_storeu_ps(gr + j, _mm512_add_ps(_mm512_loadu_ps(gr + j), sum16(acc)));
      }
#endif
      for (; j < k; ++j) gr[j] += dot_block<BW>(g, xT + static_cast<int64_t>(ir[j]) * BW);
    }
  });
}

void check_layout(const at::Tensor& w, const at::Tensor& idx, const at::Tensor& rows) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous(), "condensed weight: fp32 [R, k]");
  TORCH_CHECK(idx.sizes() == w.sizes() && idx.is_contiguous(), "condensed indices: contiguous, the weight's shape");
  TORCH_CHECK(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kUInt16, "condensed indices: uint16 or int32");
  TORCH_CHECK(rows.dim() == 1 && rows.size(0) == w.size(0) && rows.scalar_type() == at::kLong, "rows: int64 [R]");
}

template <typename F>
void on_index_type(const at::Tensor& idx, F&& f) {
  if (idx.scalar_type() == at::kUInt16) f(static_cast<const uint16_t*>(idx.data_ptr()));
  else f(idx.data_ptr<int32_t>());
}

struct AlignedBuffer {  // scratch, not initialised (every use writes before it reads)
  explicit AlignedBuffer(size_t n) : raw(new float[n + 16]) {}
  float* get() { return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(raw.get()) + 63) & ~uintptr_t(63)); }
  std::unique_ptr<float[]> raw;
};

// Runs body(b0, nb, scratch) for every batch block of BW rows. With at least one block per thread, the blocks
// are shared out (each thread's transposed block stays in its own L2, and the ops inside run serially);
// otherwise blocks run one after another and the ops inside split their rows across threads.
template <int BW, typename F>
void over_blocks(int64_t B, size_t scratch, F&& body) {
  const int64_t nblk = (B + BW - 1) / BW;
  if (nblk >= at::get_num_threads() && nblk > 1) {
    at::parallel_for(0, nblk, 1, [&](int64_t k0, int64_t k1) {
      AlignedBuffer buf(scratch);
      for (int64_t blk = k0; blk < k1; ++blk) body(blk * BW, std::min<int64_t>(BW, B - blk * BW), buf.get());
    });
  } else {
    AlignedBuffer buf(scratch);
    for (int64_t blk = 0; blk < nblk; ++blk) body(blk * BW, std::min<int64_t>(BW, B - blk * BW), buf.get());
  }
}

// `kept` (nblk * in * BW floats, or null): the transposed blocks are written there and kept for the backward
template <int BW, typename I>
void forward_blocked(const float* x, int64_t B, int64_t in, const float* w, const I* idx, const int64_t* rows,
                     int64_t R, int64_t k, const float* bias, float* y, int64_t out, float* kept) {
  over_blocks<BW>(B, kept ? 0 : static_cast<size_t>(in * BW), [&](int64_t b0, int64_t nb, float* scratch) {
    float* xT = kept ? kept + (b0 / BW) * in * BW : scratch;
    transpose_in<BW>(x, in, b0, nb, in, nullptr, xT);
    forward_block<BW>(xT, w, idx, rows, R, k, bias, y, out, b0, nb);
  });
}

constexpr int64_t kGatherBelow = 2;  // batch sizes up to this use the gather schedule (benchmarks/condensed.py)
constexpr int kTrainBW = 32;        // batch columns per block when the forward keeps its transposed input

}  // namespace

// (y [B, out], xT) from x [B, in]; schedule: 0 = choose by batch, 1 = gather, 2 = blocked. With keep_xT the
// blocked schedule runs (32 batch columns per block) and xT [nblk, in, 32] holds its transposed input blocks,
// which `condensed_backward` takes instead of x; otherwise xT is undefined.
std::vector<at::Tensor> condensed_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& idx,
                                          const at::Tensor& rows, const c10::optional<at::Tensor>& bias,
                                          int64_t out, int64_t schedule, bool keep_xT) {
  check_layout(w, idx, rows);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "condensed input: fp32 [B, in]");
  const int64_t B = x.size(0), in = x.size(1), R = w.size(0), k = w.size(1);
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({B, out}, x.options());
  if (R < out) {  // ablated units output their bias (or zero): written here, the kernel writes the rest
    std::vector<char> active(out, 0);
    const int64_t* rp = rows.data_ptr<int64_t>();
    for (int64_t r = 0; r < R; ++r) active[rp[r]] = 1;
    float* yp = y.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t o = 0; o < out; ++o)
        if (!active[o]) yp[b * out + o] = bp ? bp[o] : 0.f;
  }
  at::Tensor xT = keep_xT ? at::empty({(B + kTrainBW - 1) / kTrainBW, in, kTrainBW}, x.options()) : at::Tensor();
  if (schedule == 0) schedule = B <= kGatherBelow ? 1 : 2;
  on_index_type(idx, [&](auto ip) {
    const float* xp = x.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    const int64_t* rp = rows.data_ptr<int64_t>();
    float* yp = y.data_ptr<float>();
    if (keep_xT) {
      forward_blocked<kTrainBW>(xp, B, in, wp, ip, rp, R, k, bp, yp, out, xT.data_ptr<float>());
    } else if (schedule == 1) {
      forward_gather(xp, B, in, wp, ip, rp, R, k, bp, yp, out);
    } else if (B <= 16) {
      forward_blocked<16>(xp, B, in, wp, ip, rp, R, k, bp, yp, out, nullptr);
    } else {
      forward_blocked<32>(xp, B, in, wp, ip, rp, R, k, bp, yp, out, nullptr);
    }
  });
  return {y, xT};
}

// the transposed structure for the input gradient: ptr [in + 1], and per entry its row and flat position
std::vector<at::Tensor> condensed_csc(const at::Tensor& idx, int64_t in) {
  TORCH_CHECK(idx.dim() == 2 && idx.is_contiguous(), "condensed indices: contiguous [R, k]");
  const int64_t R = idx.size(0), k = idx.size(1), nnz = R * k;
  TORCH_CHECK(nnz < (int64_t(1) << 31), "condensed layer too large for int32 positions");
  auto opts = at::TensorOptions().dtype(at::kInt);
  at::Tensor ptr = at::zeros({in + 1}, opts), ent_row = at::empty({nnz}, opts), ent_pos = at::empty({nnz}, opts);
  int32_t* p = ptr.data_ptr<int32_t>();
  on_index_type(idx, [&](auto ip) {
    for (int64_t e = 0; e < nnz; ++e) {
      TORCH_CHECK(static_cast<int64_t>(ip[e]) >= 0 && static_cast<int64_t>(ip[e]) < in, "condensed index out of range");
      ++p[ip[e] + 1];
    }
    for (int64_t i = 0; i < in; ++i) p[i + 1] += p[i];
    std::vector<int32_t> fill(p, p + in);
    int32_t* er = ent_row.data_ptr<int32_t>();
    int32_t* ep = ent_pos.data_ptr<int32_t>();
    for (int64_t e = 0; e < nnz; ++e) {  // row-major order: each input's entries sorted by row
      const int32_t slot = fill[ip[e]]++;
      er[slot] = static_cast<int32_t>(e / k);
      ep[slot] = static_cast<int32_t>(e);
    }
  });
  return {ptr, ent_row, ent_pos};
}

// (grad_x [B, in] or undefined, grad_w [R, k] or undefined) from grad_y [B, out] and the transposed input
// blocks the forward kept (keep_xT). grad_y is transposed once, block by block; the input gradient then runs
// over batch blocks (each writes its own rows of gx), the weight gradient over rows (each sums its entries
// over the blocks in order), both reading the same transposed blocks.
std::vector<at::Tensor> condensed_backward(const at::Tensor& gy, const at::Tensor& xT, const at::Tensor& w,
                                           const at::Tensor& idx, const at::Tensor& rows,
                                           const std::vector<at::Tensor>& csc, bool need_x, bool need_w) {
  check_layout(w, idx, rows);
  constexpr int BW = kTrainBW;
  TORCH_CHECK(gy.dim() == 2 && gy.scalar_type() == at::kFloat && gy.is_contiguous(), "grad_y: fp32 [B, out]");
  const int64_t B = gy.size(0), out = gy.size(1), R = w.size(0), k = w.size(1), nblk = (B + BW - 1) / BW;
  TORCH_CHECK(xT.dim() == 3 && xT.size(0) == nblk && xT.size(2) == BW && xT.is_contiguous(),
              "condensed backward: xT must be the forward's kept transposed input");
  const int64_t in = xT.size(1);
  at::Tensor gx = need_x ? at::empty({B, in}, gy.options()) : at::Tensor();
  at::Tensor gw = need_w ? at::zeros({R, k}, w.options()) : at::Tensor();
  at::Tensor gyT = at::empty({nblk, R, BW}, gy.options());
  const float* gyp = gy.data_ptr<float>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  float* gyTp = gyT.data_ptr<float>();
  over_blocks<BW>(B, 0, [&](int64_t b0, int64_t nb, float*) {
    transpose_in<BW>(gyp, out, b0, nb, R, rp, gyTp + (b0 / BW) * R * BW);
  });
  if (need_x) {
    TORCH_CHECK(csc.size() == 3, "input gradient needs the transposed structure");
    over_blocks<BW>(B, 0, [&](int64_t b0, int64_t nb, float*) {
      input_grad_block<BW>(gyTp + (b0 / BW) * R * BW, w.data_ptr<float>(), csc[0].data_ptr<int32_t>(),
                           csc[1].data_ptr<int32_t>(), csc[2].data_ptr<int32_t>(), in, gx.data_ptr<float>(), b0, nb);
    });
  }
  if (need_w) {
    const float* xTp = xT.data_ptr<float>();
    float* gwp = gw.data_ptr<float>();
    on_index_type(idx, [&](auto ip) {
      at::parallel_for(0, R, 32, [&](int64_t r0, int64_t r1) {
        for (int64_t blk = 0; blk < nblk; ++blk)
          weight_grad_block<BW>(gyTp + (blk * R + r0) * BW, xTp + blk * in * BW, ip + r0 * k, r1 - r0, k,
                                gwp + r0 * k);
      });
    });
  }
  return {gx, gw};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &condensed_forward, "condensed linear forward");
  m.def("backward", &condensed_backward, "condensed linear input and weight gradients");
  m.def("csc", &condensed_csc, "transposed structure of the condensed indices");
}
