// CPU kernel of the fused multi-codebook search: distance + argmax per codebook,
// gather of the chosen rows, straight-through output, squared error and the usage
// histogram in one pass over z. Never materialises the N x K score matrix.
//
// Layout (prepared by fastcompress/mcq.py, all float32, contiguous):
//   z      (N, C)       float32 / bfloat16 / float16, C = G * D
//   book   (G, K, D)    code rows (unit rows for cosine), used for the gather
//   book_t (G, D, Kp)   the same, transposed and padded to Kp = ceil(K / 16) * 16
//   bias   (G, Kp)      0 (cosine) or -|c|^2 / 2 (L2); -inf on padded lanes
// A register block is kRows chunks x 16 codes: each code vector is loaded once and
// reused by kRows rows; per lane the running best keeps the first (lowest) index with
// a strict '>', and the final horizontal pass applies the same lowest-index rule.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <vector>

#include "fastcompress/mcq_tile.cuh"

namespace fastcompress {
namespace {

constexpr int kLanes = 16;
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Rows per register block: D code vectors + 2 accumulators per row must fit in 32 zmm.
template <int D>
constexpr int rows_per_block() {
  return D <= 8 ? 8 : 4;
}

// Best code of `rows` chunks (each D floats, row-major in `chunks`) in one codebook.
template <int D, int R>
void search_block(const float* chunks, const float* book_t, const float* bias, int64_t padded,
                  int32_t* best_code) {
  vfloat best[R];
  vint best_idx[R];
  vint lane;
  for (int i = 0; i < kLanes; ++i) lane[i] = i;
  for (int r = 0; r < R; ++r) {
    best[r] = vfloat{} - std::numeric_limits<float>::infinity();
    best_idx[r] = vint{};
  }
  for (int64_t k0 = 0; k0 < padded; k0 += kLanes) {
    vfloat code[D];
    for (int j = 0; j < D; ++j) code[j] = load(book_t + j * padded + k0);
    const vfloat b = load(bias + k0);
    const vint idx = lane + static_cast<int32_t>(k0);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      vfloat s = b;
      for (int j = 0; j < D; ++j) s = s + chunks[r * D + j] * code[j];  // contracted to FMA
      const vint better = s > best[r];
      best[r] = better ? s : best[r];
      best_idx[r] = better ? idx : best_idx[r];
    }
  }
  for (int r = 0; r < R; ++r) {
    float b = -std::numeric_limits<float>::infinity();
    int32_t code = 0;
    for (int i = 0; i < kLanes; ++i) {
      if (improves(best[r][i], best_idx[r][i], b, code)) {
        b = best[r][i];
        code = best_idx[r][i];
      }
    }
    best_code[r] = code;
  }
}

// Generic-d path: the shared scalar scan over row-major codes.
inline void search_block_scalar(const float* chunks, const float* book, const float* bias,
                                int dim, int64_t vocab, int rows, int32_t* best_code) {
  for (int r = 0; r < rows; ++r) {
    float best = -std::numeric_limits<float>::infinity();
    int32_t code = 0;
    scan_codes(chunks + r * dim, book, bias, dim, 0, static_cast<int32_t>(vocab), &best, &code);
    best_code[r] = code;
  }
}

struct Problem {
  int64_t n, groups, vocab, padded;
  int dim;
  bool normalize, full;
  const float* book;
  const float* book_t;
  const float* bias;
  int64_t* indices;  // (N, G)
  int64_t* counts;   // (G, K)
};

constexpr int64_t kTaskRows = 64;

// D > 0: vectorised block search with D fixed at compile time; D == 0: runtime dim.
template <typename scalar_t, int D>
void run(const Problem& p, const scalar_t* z, scalar_t* z_q, double* task_err) {
  constexpr int R = D > 0 ? rows_per_block<D>() : 8;
  const int dim = D > 0 ? D : p.dim;
  const int64_t channels = p.groups * dim;
  const int64_t tasks_per_group = (p.n + kTaskRows - 1) / kTaskRows;
  at::parallel_for(0, p.groups * tasks_per_group, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> chunks(R * dim), raw(dim), out(dim);
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
          search_block<D, R>(chunks.data(), p.book_t + g * D * p.padded, p.bias + g * p.padded,
                             p.padded, code);
        } else {
          search_block_scalar(chunks.data(), book, p.bias + g * p.padded, dim, p.vocab, rows,
                              code);
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
    case 2: return run<scalar_t, 2>(p, z, z_q, task_err);
    case 4: return run<scalar_t, 4>(p, z, z_q, task_err);
    case 8: return run<scalar_t, 8>(p, z, z_q, task_err);
    case 16: return run<scalar_t, 16>(p, z, z_q, task_err);
    default: return run<scalar_t, 0>(p, z, z_q, task_err);
  }
}

// Returns (indices (N, G) int64, z_q (N, C) z.dtype, counts (G, K) int64,
// squared_error (G,) float64). With full == false only `indices` is filled.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mcq_forward(
    const at::Tensor& z, const at::Tensor& book, const at::Tensor& book_t,
    const at::Tensor& bias, bool normalize, bool full) {
  TORCH_CHECK(z.device().is_cpu() && z.dim() == 2 && z.is_contiguous(),
              "mcq_forward: z must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(book.dim() == 3 && book.scalar_type() == at::kFloat && book.is_contiguous(),
              "mcq_forward: book must be contiguous float32 (G, K, d)");
  Problem p{};
  p.n = z.size(0);
  p.groups = book.size(0);
  p.vocab = book.size(1);
  p.dim = static_cast<int>(book.size(2));
  p.padded = bias.size(1);
  p.normalize = normalize;
  p.full = full;
  TORCH_CHECK(z.size(1) == p.groups * p.dim, "mcq_forward: z has ", z.size(1),
              " channels, expected G * d = ", p.groups * p.dim);
  TORCH_CHECK(book_t.is_contiguous() && book_t.size(2) == p.padded && bias.is_contiguous(),
              "mcq_forward: book_t (G, d, Kp) and bias (G, Kp) must agree and be contiguous");
  auto indices = at::empty({p.n, p.groups}, z.options().dtype(at::kLong));
  auto z_q = full ? at::empty_like(z) : at::empty({0}, z.options());
  auto counts = at::zeros({full ? p.groups : 0, p.vocab}, z.options().dtype(at::kLong));
  const int64_t tasks = p.groups * ((p.n + kTaskRows - 1) / kTaskRows);
  auto task_err = at::zeros({p.groups, tasks / std::max<int64_t>(p.groups, 1)},
                            z.options().dtype(at::kDouble));
  p.book = book.data_ptr<float>();
  p.book_t = book_t.data_ptr<float>();
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

}  // namespace
}  // namespace fastcompress

TORCH_LIBRARY(fastcompress_cpu, m) {
  m.def(
      "mcq_forward(Tensor z, Tensor book, Tensor book_t, Tensor bias, bool normalize, bool full)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  m.impl("mcq_forward", c10::DispatchKey::CPU, TORCH_FN(fastcompress::mcq_forward));
}
