// The torch binding of the CPU kernels: one schema per op, and a dispatch to the ISA level
// chosen once per process (csrc/cpu/isa_*.cpp hold one build of the kernels per level).
// This file is compiled for the baseline, so the extension loads on any x86-64 (or
// aarch64) CPU; a level's code runs only after the CPU is found to have it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <tuple>

#if defined(FASTCOMPRESS_BUILD_KEY)
// An ahead-of-time build carries the hash of its sources and flags (fastcompress/_build.py)
// as a marker string, which the loader reads from the file before deciding to load it.
#define FC_STRINGIFY_(x) #x
#define FC_STRINGIFY(x) FC_STRINGIFY_(x)
extern "C" __attribute__((used, visibility("default"))) const char fastcompress_build_key[] =
    "FASTCOMPRESS_BUILD_KEY=" FC_STRINGIFY(FASTCOMPRESS_BUILD_KEY);
#endif

namespace fastcompress {

#define FC_DECLARE_KERNELS(NS)                                                                   \
  namespace NS {                                                                                 \
  namespace mcq_kernels {                                                                        \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mcq_forward(const at::Tensor& z,    \
                                                                         const at::Tensor& book, \
                                                                         const at::Tensor& bias, \
                                                                         bool normalize,         \
                                                                         bool full);             \
  int64_t mcq_safety_net_hits();                                                                 \
  }                                                                                              \
  namespace context_pool_kernels {                                                               \
  std::tuple<at::Tensor, at::Tensor> meta_context_pool(const at::Tensor& x,                      \
                                                       const at::Tensor& folded, int64_t grid_h, \
                                                       int64_t grid_w, int64_t stride);          \
  std::tuple<at::Tensor, at::Tensor> compress_forward(                                           \
      const at::Tensor& x, const at::Tensor& queries, const at::Tensor& in_proj_weight,          \
      const c10::optional<at::Tensor>& in_proj_bias, const at::Tensor& out_proj_weight,          \
      const c10::optional<at::Tensor>& out_proj_bias, int64_t num_heads, int64_t grid_h,         \
      int64_t grid_w, int64_t stride);                                                           \
  }                                                                                              \
  namespace entropy_kernels {                                                                    \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> entropy_forward(const at::Tensor& chunks,       \
                                                                 const at::Tensor& book,         \
                                                                 double inv_temp);               \
  std::tuple<at::Tensor, at::Tensor> entropy_backward(const at::Tensor& chunks,                  \
                                                      const at::Tensor& book,                    \
                                                      const at::Tensor& mean_p,                  \
                                                      const at::Tensor& stats, double inv_temp,  \
                                                      double grad);                              \
  at::Tensor simd_exp2(const at::Tensor& x);                                                     \
  }                                                                                              \
  namespace decode_step_kernels {                                                                \
  at::Tensor decoder_step(const at::Tensor& x, at::TensorList params, at::TensorList cache_k,    \
                          at::TensorList cache_v, at::TensorList ctx_k, at::TensorList ctx_v,    \
                          int64_t position, int64_t heads, double eps, bool gelu_tanh);          \
  }                                                                                              \
  }

FC_DECLARE_KERNELS(isa_baseline)
#if defined(__x86_64__) || defined(_M_X64)
FC_DECLARE_KERNELS(isa_avx2)
FC_DECLARE_KERNELS(isa_avx512)
#endif

namespace {

// Whether this is a test build whose avx512 level runs on AVX2 (FC_EMULATE_AVX512,
// isa_avx512.cpp): there, a CPU with AVX2 + FMA gets level 3.
#if defined(FC_EMULATE_AVX512)
constexpr bool kAvx512Emulated = true;
#else
constexpr bool kAvx512Emulated = false;
#endif

// Levels: 1 baseline, 2 AVX2 + FMA, 3 AVX-512 (F, BW, VL, DQ). __builtin_cpu_supports
// also checks that the OS saves the wider registers (XCR0), not only the CPUID bits.
int64_t best_supported_level() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return 3;
  }
  constexpr int64_t kLevelWithAvx2 = kAvx512Emulated ? 3 : 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kLevelWithAvx2;
#endif
  return 1;
}

std::atomic<int64_t>& active_level() {
  static std::atomic<int64_t> level{best_supported_level()};
  return level;
}

int64_t isa_level() { return active_level().load(); }

// Kernel calls per level since load: the tests check that a test parametrised with a
// level ran its kernels at that level and at no other.
std::atomic<int64_t> g_kernel_calls[4];

int64_t count_call(int64_t level) {
  g_kernel_calls[level].fetch_add(1, std::memory_order_relaxed);
  return level;
}

int64_t kernel_calls(int64_t level) {
  TORCH_CHECK(level >= 1 && level <= 3, "kernel_calls: level must be 1, 2 or 3, got ", level);
  return g_kernel_calls[level].load(std::memory_order_relaxed);
}

int64_t max_isa_level() { return best_supported_level(); }

bool avx512_emulated() { return kAvx512Emulated; }

void set_isa_level(int64_t level) {
  TORCH_CHECK(level >= 1 && level <= 3, "set_isa_level: level must be 1 (baseline), 2 (avx2) or ",
              "3 (avx512), got ", level);
  TORCH_CHECK(level <= best_supported_level(), "set_isa_level: this CPU supports up to level ",
              best_supported_level(), ", not ", level);
  active_level().store(level);
}

#if defined(__x86_64__) || defined(_M_X64)
#define FC_DISPATCH(KERNELS, FN, ...)                \
  switch (count_call(isa_level())) {                 \
    case 3:                                          \
      return isa_avx512::KERNELS::FN(__VA_ARGS__);   \
    case 2:                                          \
      return isa_avx2::KERNELS::FN(__VA_ARGS__);     \
    default:                                         \
      return isa_baseline::KERNELS::FN(__VA_ARGS__); \
  }
#else
#define FC_DISPATCH(KERNELS, FN, ...) \
  count_call(1);                      \
  return isa_baseline::KERNELS::FN(__VA_ARGS__);
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mcq_forward(
    const at::Tensor& z, const at::Tensor& book, const at::Tensor& bias, bool normalize,
    bool full){FC_DISPATCH(mcq_kernels, mcq_forward, z, book, bias, normalize, full)}

int64_t mcq_safety_net_hits() {
  int64_t hits = isa_baseline::mcq_kernels::mcq_safety_net_hits();
#if defined(__x86_64__) || defined(_M_X64)
  hits += isa_avx2::mcq_kernels::mcq_safety_net_hits();
  hits += isa_avx512::mcq_kernels::mcq_safety_net_hits();
#endif
  return hits;
}

std::tuple<at::Tensor, at::Tensor> meta_context_pool(const at::Tensor& x, const at::Tensor& folded,
                                                     int64_t grid_h, int64_t grid_w,
                                                     int64_t stride){
    FC_DISPATCH(context_pool_kernels, meta_context_pool, x, folded, grid_h, grid_w, stride)}

std::tuple<at::Tensor, at::Tensor> compress_forward(const at::Tensor& x, const at::Tensor& queries,
                                                    const at::Tensor& in_proj_weight,
                                                    const c10::optional<at::Tensor>& in_proj_bias,
                                                    const at::Tensor& out_proj_weight,
                                                    const c10::optional<at::Tensor>& out_proj_bias,
                                                    int64_t num_heads, int64_t grid_h,
                                                    int64_t grid_w, int64_t stride){
    FC_DISPATCH(context_pool_kernels, compress_forward, x, queries, in_proj_weight, in_proj_bias,
                out_proj_weight, out_proj_bias, num_heads, grid_h, grid_w, stride)}

std::tuple<at::Tensor, at::Tensor, at::Tensor> entropy_forward(const at::Tensor& chunks,
                                                               const at::Tensor& book,
                                                               double inv_temp){
    FC_DISPATCH(entropy_kernels, entropy_forward, chunks, book, inv_temp)}

std::tuple<at::Tensor, at::Tensor> entropy_backward(const at::Tensor& chunks,
                                                    const at::Tensor& book,
                                                    const at::Tensor& mean_p,
                                                    const at::Tensor& stats, double inv_temp,
                                                    double grad){
    FC_DISPATCH(entropy_kernels, entropy_backward, chunks, book, mean_p, stats, inv_temp, grad)}

at::Tensor simd_exp2(const at::Tensor& x){FC_DISPATCH(entropy_kernels, simd_exp2, x)}

at::Tensor decoder_step(const at::Tensor& x, at::TensorList params, at::TensorList cache_k,
                        at::TensorList cache_v, at::TensorList ctx_k, at::TensorList ctx_v,
                        int64_t position, int64_t heads, double eps, bool gelu_tanh) {
  FC_DISPATCH(decode_step_kernels, decoder_step, x, params, cache_k, cache_v, ctx_k, ctx_v,
              position, heads, eps, gelu_tanh)
}

}  // namespace
}  // namespace fastcompress

TORCH_LIBRARY(fastcompress_cpu, m) {
  m.def("isa_level() -> int", &fastcompress::isa_level);
  m.def("max_isa_level() -> int", &fastcompress::max_isa_level);
  m.def("avx512_emulated() -> bool", &fastcompress::avx512_emulated);
  m.def("set_isa_level(int level) -> ()", &fastcompress::set_isa_level);
  m.def("kernel_calls(int level) -> int", &fastcompress::kernel_calls);
  m.def("mcq_safety_net_hits() -> int", &fastcompress::mcq_safety_net_hits);
  m.def(
      "mcq_forward(Tensor z, Tensor book, Tensor bias, bool normalize, bool full)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  m.impl("mcq_forward", c10::DispatchKey::CPU, TORCH_FN(fastcompress::mcq_forward));
  m.def(
      "meta_context_pool(Tensor x, Tensor folded, int grid_h, int grid_w, int stride)"
      " -> (Tensor, Tensor)");
  m.impl("meta_context_pool", c10::DispatchKey::CPU, TORCH_FN(fastcompress::meta_context_pool));
  m.def(
      "compress_forward(Tensor x, Tensor queries, Tensor in_proj_weight, Tensor? in_proj_bias,"
      " Tensor out_proj_weight, Tensor? out_proj_bias, int num_heads, int grid_h, int grid_w,"
      " int stride) -> (Tensor, Tensor)");
  m.impl("compress_forward", c10::DispatchKey::CPU, TORCH_FN(fastcompress::compress_forward));
  m.def("entropy_forward(Tensor chunks, Tensor book, float inv_temp) -> (Tensor, Tensor, Tensor)");
  m.impl("entropy_forward", c10::DispatchKey::CPU, TORCH_FN(fastcompress::entropy_forward));
  m.def(
      "entropy_backward(Tensor chunks, Tensor book, Tensor mean_p, Tensor stats, float inv_temp,"
      " float grad) -> (Tensor, Tensor)");
  m.impl("entropy_backward", c10::DispatchKey::CPU, TORCH_FN(fastcompress::entropy_backward));
  m.def("simd_exp2(Tensor x) -> Tensor");
  m.impl("simd_exp2", c10::DispatchKey::CPU, TORCH_FN(fastcompress::simd_exp2));
  m.def(
      "decoder_step(Tensor x, Tensor[] params, Tensor(a!)[] cache_k, Tensor(b!)[] cache_v, "
      "Tensor[] ctx_k, Tensor[] ctx_v, int position, int heads, float eps, bool gelu_tanh) "
      "-> Tensor");
  m.impl("decoder_step", c10::DispatchKey::CPU, TORCH_FN(fastcompress::decoder_step));
}
