// CPU kernel of the fused multi-codebook search: distance + argmax per codebook,
// gather of the chosen rows, straight-through output, squared error and the usage
// histogram in one pass over z. Never materialises the N x K score matrix.
//
// Layout (prepared by fastcompress/mcq.py, float32 unless noted, contiguous):
//   z      (N, C)       float32 / bfloat16 / float16, C = G * D
//   book   (G, K, D)    code rows (unit rows for cosine)
//   bias   (G, K)       0 (cosine) or -|c|^2 / 2 (L2)
// Vectorised over chunks, not codes: a block holds 16 * RV chunks transposed in
// registers, and each code value is one scalar broadcast shared by RV row vectors. The
// first version vectorised over codes and spilled its 64 chunk broadcasts to the stack,
// which made it load-bound (72 zmm loads per 64 FMAs; see benchmarks/NOTES.md).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <limits>
#include <vector>

#include "fastcompress/mcq_tile.cuh"
#include "fastcompress/simd.h"

namespace fastcompress {
namespace {

// Rescans whose block did not hold the lane's best (the full scalar scan then ran). Zero
// on any data while the vector chain and the scalar chain agree bit for bit; the tests
// assert it, so a broken fast pass cannot hide behind the exact but slow safety net.
std::atomic<int64_t> safety_net_hits{0};

using simd::kLanes;
using vfloat = simd::vec16;
using vint = simd::ivec16;
using simd::load16;

// Row vectors per block: the D x RV chunk vectors stay in registers (32 zmm in all).
template <int D>
constexpr int row_vectors() {
  return D <= 4 ? 4 : (D <= 8 ? 2 : 1);
}

// Codes per block of the search: a lane tracks only the best score of each block
// (one vmaxps per code, off the FMA pipes) and the index of the best block; the
// compare + two selects per code of exact index tracking cost ~20 % of the FMA rate.
constexpr int64_t kCodeBlock = 8;

// Score of code k for RV row vectors. For cosine (kBias false) the bias is 0 and the
// chain starts with a product: the same value as code_score's fmaf(z0, c0, 0.f).
template <int D, int RV, bool kBias>
inline void score_code(const vfloat (&z)[RV][D], const float* row, float bias, vfloat (&s)[RV]) {
  for (int v = 0; v < RV; ++v) {
    s[v] = kBias ? simd::fma16(z[v][0], simd::splat(row[0]), simd::splat(bias)) : z[v][0] * row[0];
  }
  for (int j = 1; j < D; ++j) {
    const vfloat c = simd::splat(row[j]);
    for (int v = 0; v < RV; ++v) s[v] = simd::fma16(z[v][j], c, s[v]);
  }
}

// Best code of one chunk over all codes: the shared scalar scan (generic-d path, and the
// safety net of the vector search).
inline int32_t best_code_scalar(const float* chunk, const float* book, const float* bias, int dim,
                                int64_t vocab) {
  float best = -std::numeric_limits<float>::infinity();
  int32_t code = 0;
  scan_codes(chunk, book, bias, dim, 0, static_cast<int32_t>(vocab), &best, &code);
  return code;
}

// Best code for kLanes * RV chunks at once: lane i of vector v is chunk v * 16 + i.
// `chunks_t` is (D, RV * 16): the chunks transposed so that each dimension is a vector;
// `chunks` is the same (RV * 16, D) row-major, for the rescans.
// Pass 1 keeps, per lane, the best block maximum and its block (strict '>': the first
// block reaching it). Pass 2 rescans that block with the shared scalar code_score (the
// same fmaf chain, so the same bits) for the first code equal to the best: the lowest
// index among equal scores, the torch.argmax rule.
template <int D, int RV, bool kBias>
void search_block(const float* chunks_t, const float* chunks, const float* book, const float* bias,
                  int64_t vocab, int32_t* best_code) {
  vfloat z[RV][D];
  vfloat best[RV];
  vint best_block[RV];
  for (int v = 0; v < RV; ++v) {
    for (int j = 0; j < D; ++j) z[v][j] = load16(chunks_t + j * RV * kLanes + v * kLanes);
    best[v] = simd::splat(-std::numeric_limits<float>::infinity());
    best_block[v] = vint{};
  }
  vint block = vint{};
  for (int64_t k0 = 0; k0 < vocab; k0 += kCodeBlock) {
    vfloat block_max[RV];
    score_code<D, RV, kBias>(z, book + k0 * D, bias[k0], block_max);
    const int64_t k_end = std::min(vocab, k0 + kCodeBlock);
    for (int64_t k = k0 + 1; k < k_end; ++k) {
      vfloat s[RV];
      score_code<D, RV, kBias>(z, book + k * D, bias[k], s);
      for (int v = 0; v < RV; ++v) block_max[v] = simd::vmax(s[v], block_max[v]);
    }
    for (int v = 0; v < RV; ++v) {
      const vint better = block_max[v] > best[v];
      best[v] = better ? block_max[v] : best[v];
      best_block[v] = better ? block : best_block[v];
    }
    block = block + 1;
  }
  for (int v = 0; v < RV; ++v) {
    for (int lane = 0; lane < kLanes; ++lane) {
      const int r = v * kLanes + lane;
      const float* chunk = chunks + r * D;
      const int64_t k0 = best_block[v][lane] * kCodeBlock;
      float found = -std::numeric_limits<float>::infinity();
      int32_t code = 0;
      // The first code of the block that reaches the lane's best: code_score's fmaf chain
      // is the vector chain lane for lane (explicit FMAs, same order), so it is found.
      // Were a toolchain to break that, the full scalar scan keeps the answer exact.
      scan_codes(chunk, book, bias, D, static_cast<int32_t>(k0),
                 static_cast<int32_t>(std::min(vocab, k0 + kCodeBlock)), &found, &code);
      if (found == best[v][lane]) {
        best_code[r] = code;
      } else {
        safety_net_hits.fetch_add(1, std::memory_order_relaxed);
        best_code[r] = best_code_scalar(chunk, book, bias, D, vocab);
      }
    }
  }
}

// Generic-d path: the shared scalar scan over row-major codes.
inline void search_block_scalar(const float* chunks, const float* book, const float* bias, int dim,
                                int64_t vocab, int rows, int32_t* best_code) {
  for (int r = 0; r < rows; ++r)
    best_code[r] = best_code_scalar(chunks + r * dim, book, bias, dim, vocab);
}

struct Problem {
  int64_t n, groups, vocab;
  int dim;
  bool normalize, full;
  const float* book;
  const float* bias;
  int64_t* indices;  // (N, G)
  int64_t* counts;   // (G, K)
};

constexpr int64_t kTaskRows = 64;

// D > 0: vectorised block search with D fixed at compile time; D == 0: runtime dim.
template <typename scalar_t, int D>
void run(const Problem& p, const scalar_t* z, scalar_t* z_q, double* task_err) {
  constexpr int R = D > 0 ? row_vectors<D>() * kLanes : 8;
  const int dim = D > 0 ? D : p.dim;
  const int64_t channels = p.groups * dim;
  const int64_t tasks_per_group = (p.n + kTaskRows - 1) / kTaskRows;
  at::parallel_for(0, p.groups * tasks_per_group, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> chunks(R * dim), chunks_t(R * dim), raw(dim), out(dim);
    int32_t code[R];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / tasks_per_group;
      const int64_t row_end = std::min(p.n, (task % tasks_per_group + 1) * kTaskRows);
      const float* book = p.book + g * p.vocab * dim;
      double err = 0.0;
      for (int64_t r0 = (task % tasks_per_group) * kTaskRows; r0 < row_end; r0 += R) {
        const int rows = static_cast<int>(std::min<int64_t>(R, row_end - r0));
        for (int r = 0; r < R; ++r) {
          float* chunk = chunks.data() + r * dim;
          if (r >= rows) {  // padding rows of the last block: searched, never written
            std::fill(chunk, chunk + dim, 0.f);
            continue;
          }
          const scalar_t* src = z + (r0 + r) * channels + g * dim;
          for (int j = 0; j < dim; ++j) raw[j] = static_cast<float>(src[j]);
          if (p.normalize) {
            normalize_chunk(raw.data(), chunk, dim);
          } else {
            std::copy(raw.begin(), raw.end(), chunk);
          }
        }
        if constexpr (D > 0) {
          for (int r = 0; r < R; ++r) {
            for (int j = 0; j < D; ++j) chunks_t[j * R + r] = chunks[r * D + j];
          }
          const float* bias = p.bias + g * p.vocab;
          if (p.normalize) {  // cosine: the bias is 0 (prepare_codebooks)
            search_block<D, R / kLanes, false>(chunks_t.data(), chunks.data(), book, bias, p.vocab,
                                               code);
          } else {
            search_block<D, R / kLanes, true>(chunks_t.data(), chunks.data(), book, bias, p.vocab,
                                              code);
          }
        } else {
          search_block_scalar(chunks.data(), book, p.bias + g * p.vocab, dim, p.vocab, rows, code);
        }
        for (int r = 0; r < rows; ++r) {
          const int64_t row = r0 + r;
          p.indices[row * p.groups + g] = code[r];
          if (!p.full) continue;
          err += straight_through(chunks.data() + r * dim, book + int64_t{code[r]} * dim,
                                  out.data(), dim);
          scalar_t* dst = z_q + row * channels + g * dim;
          for (int j = 0; j < dim; ++j) dst[j] = static_cast<scalar_t>(out[j]);
          __atomic_fetch_add(p.counts + g * p.vocab + code[r], int64_t{1}, __ATOMIC_RELAXED);
        }
      }
      task_err[task] = err;
    }
  });
}

template <typename scalar_t>
void dispatch_dim(const Problem& p, const scalar_t* z, scalar_t* z_q, double* task_err) {
  switch (p.dim) {
    case 2:
      return run<scalar_t, 2>(p, z, z_q, task_err);
    case 4:
      return run<scalar_t, 4>(p, z, z_q, task_err);
    case 8:
      return run<scalar_t, 8>(p, z, z_q, task_err);
    case 16:
      return run<scalar_t, 16>(p, z, z_q, task_err);
    default:
      return run<scalar_t, 0>(p, z, z_q, task_err);
  }
}

// Returns (indices (N, G) int64, z_q (N, C) z.dtype, counts (G, K) int64,
// squared_error (G,) float64). With full == false only `indices` is filled.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mcq_forward(const at::Tensor& z,
                                                                       const at::Tensor& book,
                                                                       const at::Tensor& bias,
                                                                       bool normalize, bool full) {
  TORCH_CHECK(z.device().is_cpu() && z.dim() == 2 && z.is_contiguous(),
              "mcq_forward: z must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(book.dim() == 3 && book.scalar_type() == at::kFloat && book.is_contiguous(),
              "mcq_forward: book must be contiguous float32 (G, K, d)");
  Problem p{};
  p.n = z.size(0);
  p.groups = book.size(0);
  p.vocab = book.size(1);
  p.dim = static_cast<int>(book.size(2));
  p.normalize = normalize;
  p.full = full;
  TORCH_CHECK(z.size(1) == p.groups * p.dim, "mcq_forward: z has ", z.size(1),
              " channels, expected G * d = ", p.groups * p.dim);
  TORCH_CHECK(bias.is_contiguous() && bias.scalar_type() == at::kFloat && bias.dim() == 2 &&
                  bias.size(0) == p.groups && bias.size(1) == p.vocab,
              "mcq_forward: bias must be contiguous float32 (G, K)");
  // The cosine search skips the bias add (one FMA per code), so it must be 0 there.
  TORCH_CHECK(!normalize || !bias.any().item<bool>(),
              "mcq_forward: bias must be 0 for the cosine search (normalize=True)");
  auto indices = at::empty({p.n, p.groups}, z.options().dtype(at::kLong));
  auto z_q = full ? at::empty_like(z) : at::empty({0}, z.options());
  auto counts = at::zeros({full ? p.groups : 0, p.vocab}, z.options().dtype(at::kLong));
  const int64_t tasks = p.groups * ((p.n + kTaskRows - 1) / kTaskRows);
  auto task_err =
      at::zeros({p.groups, tasks / std::max<int64_t>(p.groups, 1)}, z.options().dtype(at::kDouble));
  p.book = book.data_ptr<float>();
  p.bias = bias.data_ptr<float>();
  p.indices = indices.data_ptr<int64_t>();
  p.counts = full ? counts.data_ptr<int64_t>() : nullptr;
  if (p.n > 0 && p.groups > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "mcq_forward", [&] {
      dispatch_dim<scalar_t>(p, z.data_ptr<scalar_t>(), full ? z_q.data_ptr<scalar_t>() : nullptr,
                             task_err.data_ptr<double>());
    });
  }
  // Per-task partial sums added in task order: deterministic for any thread count.
  return {indices, z_q, counts, task_err.sum(1)};
}

int64_t mcq_safety_net_hits() { return safety_net_hits.load(); }

}  // namespace
}  // namespace fastcompress

TORCH_LIBRARY(fastcompress_cpu, m) {
  m.def("mcq_safety_net_hits() -> int", &fastcompress::mcq_safety_net_hits);
  m.def(
      "mcq_forward(Tensor z, Tensor book, Tensor bias, bool normalize, bool full)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  m.impl("mcq_forward", c10::DispatchKey::CPU, TORCH_FN(fastcompress::mcq_forward));
}
