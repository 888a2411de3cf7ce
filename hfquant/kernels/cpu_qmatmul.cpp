// Fused unpack + grouped dot product for DecoupledLinear on CPU (few input rows: decode).
//
// y[m, n] = sum_g scales[n, g] * (x[m, group g] . Q[n, group g]) + zeros[n, g] * sum(x[m, group g])
//
// The packed format (hfquant/nn/packing.py) stores 32 values of a row in exactly BITS int32 words,
// one little-endian bit stream. A "block" is those 32 values; LANES consecutive blocks are unpacked
// side by side (one block per SIMD lane) from a small transposed copy of their words, so the shifts,
// masks and int->float conversions vectorize for 2, 3 (values crossing word boundaries) and 4 bits.
// x is permuted once per call into the same [block-lane, value] order, zero-padded to whole lane
// groups, so padding values never contribute. Group sizes must be multiples of 32 (or one group per
// row): every block then lies inside one group and takes that group's scale after its dot product.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

typedef float vf __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));

constexpr int kLanes = 8;    // units unpacked side by side, one per SIMD lane
constexpr int kMaxRows = 16;

// A unit is the smallest run of whole words holding whole values: 1 word (16 two-bit or 8 four-bit
// values) or 3 words (32 three-bit values, some straddling two words).
template <int BITS>
constexpr int unit_words() { return 32 % BITS == 0 ? 1 : BITS; }
template <int BITS>
constexpr int unit_values() { return unit_words<BITS>() * 32 / BITS; }

// y[m, n] for rows n0..n1 and MR input rows starting at xp (permuted) and xsum.
template <int BITS, int MR>
void qmatmul_rows(const float* xp, const float* xsum, const int32_t* unit_group, const uint32_t* qw,
                  const float* scales, const float* zeros, float* y, int64_t n0, int64_t n1, int64_t n_out,
                  int64_t words, int64_t n_steps, int64_t ng, int64_t x_stride) {
  constexpr int UW = unit_words<BITS>(), UV = unit_values<BITS>();
  constexpr uint32_t kMask = (1u << BITS) - 1;
  const int64_t n_units = words / UW;
  for (int64_t n = n0; n < n1; ++n) {
    const uint32_t* row = qw + n * words;
    const float* srow = scales + n * ng;
    vf tot[MR] = {};
    for (int64_t step = 0; step < n_steps; ++step) {
      const int64_t u0 = step * kLanes;
      vu wt[UW];
      vf sc;
      if (UW == 1 && u0 + kLanes <= n_units) {
        std::memcpy(&wt[0], row + u0, sizeof(vu));
        for (int i = 0; i < kLanes; ++i) sc[i] = srow[unit_group[u0 + i]];
      } else {
        for (int i = 0; i < kLanes; ++i) {
          const bool valid = u0 + i < n_units;
          for (int k = 0; k < UW; ++k) wt[k][i] = valid ? row[(u0 + i) * UW + k] : 0u;
          sc[i] = valid ? srow[unit_group[u0 + i]] : 0.0f;
        }
      }
      vf acc[MR] = {};
      const float* xs = xp + step * UV * kLanes;
#pragma GCC unroll 32
      for (int j = 0; j < UV; ++j) {
        const int p = j * BITS, w = p >> 5, off = p & 31;
        vu v = wt[w] >> off;
        if (off + BITS > 32) v |= wt[w + 1] << (32 - off);
        const vf q = __builtin_convertvector((vi)(v & kMask), vf);
        for (int m = 0; m < MR; ++m) {
          vf xv;
          std::memcpy(&xv, xs + m * x_stride + j * kLanes, sizeof(vf));
          acc[m] += q * xv;
        }
      }
      for (int m = 0; m < MR; ++m) tot[m] += sc * acc[m];
    }
    const float* zrow = zeros + n * ng;
    for (int m = 0; m < MR; ++m) {
      float out = 0.0f;
      for (int i = 0; i < kLanes; ++i) out += tot[m][i];
      for (int64_t g = 0; g < ng; ++g) out += zrow[g] * xsum[m * ng + g];
      y[m * n_out + n] = out;
    }
  }
}

template <int BITS>
void qmatmul_bits(const float* x, const uint32_t* qw, const float* scales, const float* zeros, float* y,
                  int64_t m_rows, int64_t n_out, int64_t in_features, int64_t words, int64_t gs, int64_t ng) {
  constexpr int UW = unit_words<BITS>(), UV = unit_values<BITS>();
  const int64_t n_units = words / UW, n_steps = (n_units + kLanes - 1) / kLanes;
  const int64_t x_stride = n_steps * kLanes * UV;
  // x permuted to [m, step, value j, lane i] (zero padded), its sums per group, each unit's group.
  std::vector<float> xp(m_rows * x_stride, 0.0f), xsum(m_rows * ng, 0.0f);
  std::vector<int32_t> unit_group(n_units);
  for (int64_t u = 0; u < n_units; ++u) unit_group[u] = static_cast<int32_t>(std::min(u * UV / gs, ng - 1));
  for (int64_t m = 0; m < m_rows; ++m) {
    for (int64_t k = 0; k < in_features; ++k) {
      const float v = x[m * in_features + k];
      const int64_t u = k / UV, j = k % UV;
      xp[m * x_stride + ((u / kLanes) * UV + j) * kLanes + u % kLanes] = v;
      xsum[m * ng + k / gs] += v;
    }
  }
  at::parallel_for(0, n_out, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < m_rows;) {
      const float *xm = xp.data() + m * x_stride, *sm = xsum.data() + m * ng;
      float* ym = y + m * n_out;
      const int64_t left = m_rows - m;
      if (left >= 4) {
        qmatmul_rows<BITS, 4>(xm, sm, unit_group.data(), qw, scales, zeros, ym, n0, n1, n_out, words, n_steps, ng, x_stride);
        m += 4;
      } else if (left >= 2) {
        qmatmul_rows<BITS, 2>(xm, sm, unit_group.data(), qw, scales, zeros, ym, n0, n1, n_out, words, n_steps, ng, x_stride);
        m += 2;
      } else {
        qmatmul_rows<BITS, 1>(xm, sm, unit_group.data(), qw, scales, zeros, ym, n0, n1, n_out, words, n_steps, ng, x_stride);
        m += 1;
      }
    }
  });
}

// x: float32 [M, K] (M <= 16); qweight: int32 [N, words]; scales, zeros: float32 [N, G].
at::Tensor qmatmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& zeros, int64_t bits, int64_t group_size, int64_t in_features) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(x.size(0) <= kMaxRows, "qmatmul_cpu handles at most ", kMaxRows, " rows");
  TORCH_CHECK(x.size(1) == in_features, "x has ", x.size(1), " columns, expected ", in_features);
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.is_contiguous(), "qweight: contiguous int32");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && zeros.scalar_type() == at::kFloat &&
                  scales.is_contiguous() && zeros.is_contiguous(),
              "scales, zeros: contiguous float32");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, "bits must be 2, 3 or 4");
  const int64_t m_rows = x.size(0), n_out = qweight.size(0), words = qweight.size(1);
  const int64_t n_blocks = (in_features + 31) / 32;
  TORCH_CHECK(words == n_blocks * bits, "qweight has ", words, " words per row, expected ", n_blocks * bits);
  const int64_t gs = group_size == -1 ? in_features : group_size;
  const int64_t ng = (in_features + gs - 1) / gs;
  TORCH_CHECK(ng == 1 || gs % 32 == 0, "group size must be a multiple of 32 or span the row");
  TORCH_CHECK(scales.size(0) == n_out && scales.size(1) == ng && zeros.sizes() == scales.sizes(),
              "scales/zeros must be [N, n_groups]");
  at::Tensor y = at::empty({m_rows, n_out}, x.options());
  const auto* qw = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  const float *xd = x.data_ptr<float>(), *sp = scales.data_ptr<float>(), *zp = zeros.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (bits == 2)
    qmatmul_bits<2>(xd, qw, sp, zp, yp, m_rows, n_out, in_features, words, gs, ng);
  else if (bits == 3)
    qmatmul_bits<3>(xd, qw, sp, zp, yp, m_rows, n_out, in_features, words, gs, ng);
  else
    qmatmul_bits<4>(xd, qw, sp, zp, yp, m_rows, n_out, in_features, words, gs, ng);
  return y;
}

}  // namespace

TORCH_LIBRARY(hfquant, m) {
  m.def(
      "qmatmul_cpu(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size, "
      "int in_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(hfquant, CPU, m) { m.impl("qmatmul_cpu", &qmatmul_cpu); }
