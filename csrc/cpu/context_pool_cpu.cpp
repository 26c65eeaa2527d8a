// The X pass of the UniCompress compressor on CPU, float32: for each sample, the scores
// of the M folded queries, their softmax over T, the (M, d) context and the s x s pooled
// grid, with X read from DRAM once (csrc/include/fastcompress/context_pool.h).
//
// x (B, T, d) float32 contiguous, folded (M, d) float32 (rows W_k,h^T q / sqrt(d_h)).
// Returns context (B, M, d) float32 and pooled (B, T / s^2, d) (B, 0, d) when s = 0.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "fastcompress/context_pool.h"

namespace fastcompress {
namespace {

using simd::kLanes;

struct Shape {
  int64_t batch, tokens, d, m, mp, height, width, stride;
};

// Scores and (stride > 0) pooled rows for the grid bands [band0, band1) of sample b.
void scores_and_pool(const Shape& s, const float* x, const float* folded_t, float* scores,
                     float* pooled, int64_t band0, int64_t band1) {
  const int64_t band_tokens = s.stride > 0 ? s.stride * s.width : s.tokens;
  for (int64_t band = band0; band < band1; ++band) {
    context_pool::scores_rows(x, band * band_tokens, (band + 1) * band_tokens, s.d, folded_t, s.mp,
                              scores);
    if (s.stride > 0) {
      context_pool::pool_row(x, s.width, s.d, s.stride, band,
                             pooled + band * (s.width / s.stride) * s.d);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> meta_context_pool(const at::Tensor& x, const at::Tensor& folded,
                                                     int64_t grid_h, int64_t grid_w,
                                                     int64_t stride) {
  TORCH_CHECK(
      x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3 && x.is_contiguous(),
      "meta_context_pool: x must be a contiguous float32 CPU tensor (B, T, d), got ",
      x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(folded.device().is_cpu() && folded.scalar_type() == at::kFloat && folded.dim() == 2 &&
                  folded.size(1) == x.size(2) && folded.size(0) > 0,
              "meta_context_pool: folded must be float32 (M > 0, d=", x.size(2), "), got ",
              folded.scalar_type(), " ", folded.sizes());
  Shape s{x.size(0), x.size(1), x.size(2), folded.size(0), 0, grid_h, grid_w, stride};
  s.mp = (s.m + kLanes - 1) / kLanes * kLanes;
  TORCH_CHECK(stride == 0 || stride == 2 || stride == 4, "meta_context_pool: stride must be 0, ",
              "2 or 4, got ", stride);
  TORCH_CHECK(grid_h * grid_w == s.tokens || stride == 0, "meta_context_pool: grid ", grid_h, "x",
              grid_w, " does not have T=", s.tokens, " tokens");
  TORCH_CHECK(stride == 0 || (grid_h % stride == 0 && grid_w % stride == 0),
              "meta_context_pool: grid ", grid_h, "x", grid_w, " is not divisible by stride ",
              stride);
  TORCH_CHECK(s.tokens > 0 && s.batch > 0, "meta_context_pool: x must have B > 0 and T > 0");

  // folded^T (d, mp) with zero pad columns: the scores kernel reads whole lane vectors.
  auto folded_t = at::zeros({s.d, s.mp}, folded.options());
  folded_t.narrow(1, 0, s.m).copy_(folded.t());
  auto context = at::zeros({s.batch, s.m, s.d}, x.options());  // accumulated
  const int64_t pooled_tokens = stride > 0 ? s.tokens / (stride * stride) : 0;
  auto pooled = at::empty({s.batch, pooled_tokens, s.d}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* ft = folded_t.data_ptr<float>();
  float* cp = context.data_ptr<float>();
  float* pp = pooled.data_ptr<float>();
  const int64_t bands = stride > 0 ? grid_h / stride : 1;
  const int64_t sample = s.tokens * s.d;

  if (s.batch >= at::get_num_threads()) {
    // One sample per task, one band of s grid rows at a time: its scores, pooled row and
    // context update (online softmax) run while the band is in L2. Reading X twice (all
    // scores, then the context from L3) cost 1.5 ms per sample for the context pass at
    // d = 1024 against 0.8 ms from L2.
    at::parallel_for(0, s.batch, 1, [&](int64_t b0, int64_t b1) {
      // Without pooling (stride 0) the tiles are 64 tokens, the last one partial.
      const int64_t tile = stride > 0 ? stride * s.width : std::min<int64_t>(64, s.tokens);
      const int64_t tiles = (s.tokens + tile - 1) / tile;
      std::vector<float> scores(tile * s.mp), run_max(s.mp), run_sum(s.mp), alpha(s.mp);
      for (int64_t b = b0; b < b1; ++b) {
        const float* xb = xp + b * sample;
        float* cb = cp + b * s.m * s.d;
        std::fill(run_max.begin(), run_max.end(), -INFINITY);
        std::fill(run_sum.begin(), run_sum.end(), 0.f);
        for (int64_t band = 0; band < tiles; ++band) {
          const float* xt = xb + band * tile * s.d;
          const int64_t rows = std::min(tile, s.tokens - band * tile);
          context_pool::scores_rows(xt, 0, rows, s.d, ft, s.mp, scores.data());
          if (stride > 0) {
            context_pool::pool_row(xb, s.width, s.d, stride, band,
                                   pp + (b * pooled_tokens + band * (s.width / stride)) * s.d);
          }
          context_pool::online_softmax_tile(scores.data(), rows, s.mp, run_max.data(),
                                            run_sum.data(), alpha.data());
          if (band > 0) context_pool::scale_rows(cb, s.m, s.d, alpha.data());
          context_pool::context_columns(scores.data(), xt, rows, s.d, s.mp, s.m, 0, s.d, cb);
        }
        for (int64_t m = 0; m < s.m; ++m) alpha[m] = 1.f / run_sum[m];
        context_pool::scale_rows(cb, s.m, s.d, alpha.data());
      }
    });
  } else {
    // Fewer samples than threads: split each sample's passes over bands and d columns.
    std::vector<float> scores(s.tokens * s.mp);
    for (int64_t b = 0; b < s.batch; ++b) {
      const float* xb = xp + b * sample;
      at::parallel_for(0, bands, 1, [&](int64_t band0, int64_t band1) {
        scores_and_pool(s, xb, ft, scores.data(), pp + b * pooled_tokens * s.d, band0, band1);
      });
      context_pool::softmax_columns(scores.data(), s.tokens, s.mp);
      const int64_t column_blocks = (s.d + 2 * kLanes - 1) / (2 * kLanes);
      at::parallel_for(0, column_blocks, 1, [&](int64_t c0, int64_t c1) {
        context_pool::context_columns(scores.data(), xb, s.tokens, s.d, s.mp, s.m, c0 * 2 * kLanes,
                                      std::min(s.d, c1 * 2 * kLanes), cp + b * s.m * s.d);
      });
    }
  }
  return {context, pooled};
}

// folded (heads * n, d), head-major: row h * n + i is W_k,h^T (W_q,h q_i + b_q,h) / sqrt(d_h),
// the queries folded into the key projection (the key bias cancels in the softmax).
// Two MKL products (addmm, bmm) and no reordering copy.
at::Tensor fold_queries_head_major(const at::Tensor& queries, const at::Tensor& w_qkv,
                                   const at::Tensor& b_qkv, int64_t heads) {
  const int64_t n = queries.size(0), d = queries.size(1), head_dim = d / heads;
  const auto q = at::addmm(b_qkv.narrow(0, 0, d), queries, w_qkv.narrow(0, 0, d).t());
  auto folded = at::bmm(q.view({n, heads, head_dim}).transpose(0, 1),
                        w_qkv.narrow(0, d, d).view({heads, head_dim, d}));
  return folded.mul_(1.0 / std::sqrt(static_cast<double>(head_dim))).view({heads * n, d});
}

// context (B, heads * n, d) head-major -> meta tokens (B, n, d): head h of token (b, i) is
// W_v,h context[b, h * n + i] + b_v,h (the softmax weights sum to one), then out_proj.
at::Tensor finish_meta_head_major(const at::Tensor& context, const at::Tensor& w_qkv,
                                  const at::Tensor& b_qkv, const at::Tensor& w_out,
                                  const at::Tensor& b_out, int64_t heads) {
  const int64_t batch = context.size(0), d = context.size(2), head_dim = d / heads;
  const int64_t n = context.size(1) / heads;
  // (heads, B n, d): the reshape copies the B * M * d context (small next to the weights).
  const auto per_head =
      context.view({batch, heads, n, d}).transpose(0, 1).reshape({heads, batch * n, d});
  const auto values = at::bmm(
      per_head,
      w_qkv.narrow(0, 2 * d, d).view({heads, head_dim, d}).transpose(1, 2));  // (heads, B n, d_h)
  const auto joined =
      values.transpose(0, 1).reshape({batch * n, d}).add_(b_qkv.narrow(0, 2 * d, d));
  return at::addmm(b_out, joined, w_out.t()).view({batch, n, d});
}

// The whole compressor forward for inference in one call (no autograd graph): folding,
// the X pass and the finish. In Python the same steps cost ~0.15 ms of dispatch around a
// 0.4 ms pass at d = 64. Shapes and dtypes are validated by fastcompress.compress (and
// again here, briefly); NaN or inf in x is caught through the (B, M, d) context, which
// every token reaches.
std::tuple<at::Tensor, at::Tensor> compress_forward(const at::Tensor& x, const at::Tensor& queries,
                                                    const at::Tensor& in_proj_weight,
                                                    const c10::optional<at::Tensor>& in_proj_bias,
                                                    const at::Tensor& out_proj_weight,
                                                    const c10::optional<at::Tensor>& out_proj_bias,
                                                    int64_t num_heads, int64_t grid_h,
                                                    int64_t grid_w, int64_t stride) {
  TORCH_CHECK(x.dim() == 3 && num_heads > 0 && x.size(2) % num_heads == 0,
              "compress_forward: x must be (B, T, d) with num_heads dividing d");
  const int64_t d = x.size(2), n = queries.size(0);
  const auto check_matrix = [&](const at::Tensor& t, const char* name, int64_t rows) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.dim() == 2 &&
                    t.size(0) == rows && t.size(1) == d,
                "compress_forward: ", name, " must be float32 (", rows, ", ", d, ") on CPU");
  };
  const auto vector_or_zeros = [&](const c10::optional<at::Tensor>& t, const char* name,
                                   int64_t rows) {
    if (!t.has_value()) return at::zeros({rows}, x.options());
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == rows,
                "compress_forward: ", name, " must be float32 (", rows, ")");
    return *t;
  };
  check_matrix(queries, "queries", n);
  check_matrix(in_proj_weight, "in_proj_weight", 3 * d);
  check_matrix(out_proj_weight, "out_proj_weight", d);
  const auto b_qkv = vector_or_zeros(in_proj_bias, "in_proj_bias", 3 * d);
  const auto b_out = vector_or_zeros(out_proj_bias, "out_proj_bias", d);

  const auto folded = fold_queries_head_major(queries, in_proj_weight, b_qkv, num_heads);
  auto [context, pooled] = meta_context_pool(x, folded, grid_h, grid_w, stride);
  const float* c = context.data_ptr<float>();
  bool finite = true;
  for (int64_t i = 0; i < context.numel(); ++i) finite &= std::isfinite(c[i]);
  TORCH_CHECK_VALUE(finite, "x contains NaN or inf; the result would be garbage");
  auto meta =
      finish_meta_head_major(context, in_proj_weight, b_qkv, out_proj_weight, b_out, num_heads);
  return {meta, pooled};
}

}  // namespace
}  // namespace fastcompress

TORCH_LIBRARY_FRAGMENT(fastcompress_cpu, m) {
  m.def(
      "meta_context_pool(Tensor x, Tensor folded, int grid_h, int grid_w, int stride)"
      " -> (Tensor, Tensor)");
  m.impl("meta_context_pool", c10::DispatchKey::CPU, TORCH_FN(fastcompress::meta_context_pool));
  m.def(
      "compress_forward(Tensor x, Tensor queries, Tensor in_proj_weight, Tensor? in_proj_bias,"
      " Tensor out_proj_weight, Tensor? out_proj_bias, int num_heads, int grid_h, int grid_w,"
      " int stride) -> (Tensor, Tensor)");
  m.impl("compress_forward", c10::DispatchKey::CPU, TORCH_FN(fastcompress::compress_forward));
}
