// One decode step of ARDecompressor (all layers, final norm and head) as a single op, so
// a generated token costs one dispatcher call instead of ~150 ATen calls, and the GEMVs
// stream their weights from every thread (csrc/include/fastcompress/decode_step.h).
//
// params, per layer (kParamsPerLayer, in this order):
//   norm1.{weight,bias} (dim), qkv.{weight (3 dim, dim), bias}, proj (dim, dim),
//   norm2, cross_q (dim, dim), cross_proj (dim, dim), norm3, fc1 (hidden, dim),
//   fc2 (dim, hidden); then norm.{weight,bias} and head (out, dim).
// cache_k / cache_v: per layer (B, S, H, D); this step's k/v are written at `position`.
// ctx_k / ctx_v: per layer (B, Lc, H, D), the cross-attention keys and values.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "fastcompress/decode_step.h"

namespace fastcompress {
namespace {

using decode::Epilogue;
constexpr int64_t kParamsPerLayer = 18;

void check_param(const at::Tensor& t, at::IntArrayRef shape, int64_t index) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.sizes() == shape,
              "decoder_step: params[", index, "] must be a contiguous float32 CPU tensor of shape ",
              shape, ", got ", t.scalar_type(), " ", t.sizes());
}

void check_kv(const at::Tensor& t, const char* name, int64_t layer, int64_t batch, int64_t heads,
              int64_t head_dim) {
  TORCH_CHECK(
      t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 4 &&
          t.size(0) == batch && t.size(2) == heads && t.size(3) == head_dim && t.size(1) > 0,
      "decoder_step: ", name, "[", layer, "] must be a contiguous float32 CPU tensor (B=", batch,
      ", L > 0, H=", heads, ", D=", head_dim, "), got ", t.scalar_type(), " ", t.sizes());
}

void linear(const at::Tensor& w, const at::Tensor& b, const float* x, int64_t batch, float* y,
            Epilogue epilogue) {
  const int64_t out = w.size(0), in = w.size(1);
  const float* wp = w.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  at::parallel_for(0, out, 64, [&](int64_t n0, int64_t n1) {
    decode::gemv_rows(wp, bp, x, batch, in, y, out, n0, n1, epilogue);
  });
}

void layer_norm(const float* x, const at::Tensor& w, const at::Tensor& b, int64_t batch,
                int64_t dim, float eps, float* y) {
  for (int64_t r = 0; r < batch; ++r) {
    decode::layer_norm_row(x + r * dim, w.data_ptr<float>(), b.data_ptr<float>(), dim, eps,
                           y + r * dim);
  }
}

// Positions per split-K chunk: 64 rows of (H, D) keys and values, 256 KiB at dim 512.
constexpr int64_t kChunk = 64;

// q (B, H * D) against keys/values (B, L, H, D) over their first `len` positions, split
// into chunks of positions (tasks of (sample, chunk)) and merged by log-sum-exp.
void attention(const float* q, const at::Tensor& keys, const at::Tensor& values, int64_t len,
               int64_t heads, int64_t head_dim, float* out) {
  const int64_t batch = keys.size(0), max_len = keys.size(1), dim = heads * head_dim;
  const int64_t chunks = (len + kChunk - 1) / kChunk;
  const float scale = 1.f / std::sqrt(static_cast<float>(head_dim));
  const float* kp = keys.data_ptr<float>();
  const float* vp = values.data_ptr<float>();
  std::vector<float> partial_out(batch * chunks * dim), partial_max(batch * chunks * heads),
      partial_sum(batch * chunks * heads);
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(heads * kChunk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, s0 = (task % chunks) * kChunk;
      decode::attend_chunk(q + b * dim, kp + b * max_len * dim, vp + b * max_len * dim, dim, s0,
                           std::min(len, s0 + kChunk), static_cast<int>(heads),
                           static_cast<int>(head_dim), scale, scores.data(),
                           partial_out.data() + task * dim, partial_max.data() + task * heads,
                           partial_sum.data() + task * heads);
    }
  });
  for (int64_t b = 0; b < batch; ++b) {
    decode::merge_chunks(partial_out.data() + b * chunks * dim,
                         partial_max.data() + b * chunks * heads,
                         partial_sum.data() + b * chunks * heads, chunks, static_cast<int>(heads),
                         static_cast<int>(head_dim), out + b * dim);
  }
}

at::Tensor decoder_step(const at::Tensor& x, at::TensorList params, at::TensorList cache_k,
                        at::TensorList cache_v, at::TensorList ctx_k, at::TensorList ctx_v,
                        int64_t position, int64_t heads, double eps, bool gelu_tanh) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(0) > 0,
              "decoder_step: x must be a float32 CPU tensor (B > 0, dim), got ", x.scalar_type(),
              " ", x.sizes());
  const int64_t batch = x.size(0), dim = x.size(1);
  const int64_t layers = static_cast<int64_t>(cache_k.size());
  TORCH_CHECK(heads > 0 && dim % heads == 0, "decoder_step: heads=", heads,
              " must divide dim=", dim);
  const int64_t head_dim = dim / heads;
  TORCH_CHECK(static_cast<int64_t>(params.size()) == kParamsPerLayer * layers + 4,
              "decoder_step: params must hold ", kParamsPerLayer, " tensors per layer plus 4 (",
              kParamsPerLayer * layers + 4, " for ", layers, " layers), got ", params.size());
  TORCH_CHECK(cache_v.size() == cache_k.size() && ctx_k.size() == cache_k.size() &&
                  ctx_v.size() == cache_k.size(),
              "decoder_step: cache_k, cache_v, ctx_k and ctx_v must hold one tensor per layer");
  const int64_t hidden = layers > 0 ? params[14].size(0) : 0;
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t p = l * kParamsPerLayer;
    const std::vector<std::vector<int64_t>> shapes = {
        {dim}, {dim}, {3 * dim, dim}, {3 * dim}, {dim, dim},    {dim},
        {dim}, {dim}, {dim, dim},     {dim},     {dim, dim},    {dim},
        {dim}, {dim}, {hidden, dim},  {hidden},  {dim, hidden}, {dim}};
    for (int64_t i = 0; i < kParamsPerLayer; ++i) check_param(params[p + i], shapes[i], p + i);
    check_kv(cache_k[l], "cache_k", l, batch, heads, head_dim);
    check_kv(cache_v[l], "cache_v", l, batch, heads, head_dim);
    check_kv(ctx_k[l], "ctx_k", l, batch, heads, head_dim);
    check_kv(ctx_v[l], "ctx_v", l, batch, heads, head_dim);
    TORCH_CHECK(cache_v[l].sizes() == cache_k[l].sizes() && ctx_v[l].sizes() == ctx_k[l].sizes(),
                "decoder_step: keys and values of layer ", l, " differ in shape");
    TORCH_CHECK(position >= 0 && position < cache_k[l].size(1), "decoder_step: position=", position,
                " is outside the cache of layer ", l, " (", cache_k[l].size(1), " positions)");
  }
  const int64_t base = kParamsPerLayer * layers;
  check_param(params[base], {dim}, base);
  check_param(params[base + 1], {dim}, base + 1);
  const int64_t out_dim = params[base + 2].dim() == 2 ? params[base + 2].size(0) : -1;
  check_param(params[base + 2], {out_dim, dim}, base + 2);
  check_param(params[base + 3], {out_dim}, base + 3);

  const float epsf = static_cast<float>(eps);
  at::Tensor h = x.contiguous().clone();
  auto scratch = at::empty({batch, 4 * dim + hidden}, x.options());
  float* hp = h.data_ptr<float>();
  float* normed = scratch.data_ptr<float>();
  float* qkv = normed + batch * dim;        // (B, 3 dim): q | k | v
  float* attn = scratch.data_ptr<float>();  // reuses `normed` once it is consumed
  float* mlp = qkv + batch * 3 * dim;       // (B, hidden)
  const Epilogue act = gelu_tanh ? Epilogue::kGeluTanh : Epilogue::kGelu;
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* p = params.data() + l * kParamsPerLayer;
    layer_norm(hp, p[0], p[1], batch, dim, epsf, normed);
    linear(p[2], p[3], normed, batch, qkv, Epilogue::kStore);
    // qkv rows are (3, H, D) per sample; the q part is compacted to (B, dim) after the
    // k/v append so that the attention reads q with a row stride of dim.
    const int64_t max_len = cache_k[l].size(1);
    float* kc = cache_k[l].data_ptr<float>();
    float* vc = cache_v[l].data_ptr<float>();
    for (int64_t b = 0; b < batch; ++b) {
      const float* row = qkv + b * 3 * dim;
      std::memcpy(kc + (b * max_len + position) * dim, row + dim, dim * sizeof(float));
      std::memcpy(vc + (b * max_len + position) * dim, row + 2 * dim, dim * sizeof(float));
      std::memmove(qkv + b * dim, row, dim * sizeof(float));
    }
    attention(qkv, cache_k[l], cache_v[l], position + 1, heads, head_dim, attn);
    linear(p[4], p[5], attn, batch, hp, Epilogue::kAddInto);

    layer_norm(hp, p[6], p[7], batch, dim, epsf, normed);
    linear(p[8], p[9], normed, batch, qkv, Epilogue::kStore);
    attention(qkv, ctx_k[l], ctx_v[l], ctx_k[l].size(1), heads, head_dim, attn);
    linear(p[10], p[11], attn, batch, hp, Epilogue::kAddInto);

    layer_norm(hp, p[12], p[13], batch, dim, epsf, normed);
    linear(p[14], p[15], normed, batch, mlp, act);
    linear(p[16], p[17], mlp, batch, hp, Epilogue::kAddInto);
  }
  layer_norm(hp, params[base], params[base + 1], batch, dim, epsf, normed);
  auto y = at::empty({batch, out_dim}, x.options());
  linear(params[base + 2], params[base + 3], normed, batch, y.data_ptr<float>(), Epilogue::kStore);
  return y;
}

}  // namespace
}  // namespace fastcompress

TORCH_LIBRARY_FRAGMENT(fastcompress_cpu, m) {
  m.def(
      "decoder_step(Tensor x, Tensor[] params, Tensor(a!)[] cache_k, Tensor(b!)[] cache_v, "
      "Tensor[] ctx_k, Tensor[] ctx_v, int position, int heads, float eps, bool gelu_tanh) "
      "-> Tensor");
  m.impl("decoder_step", c10::DispatchKey::CPU, TORCH_FN(fastcompress::decoder_step));
}
