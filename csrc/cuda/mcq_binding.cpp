// Torch binding of the CUDA search kernel: shape checks, then the C-ABI launcher on the
// current stream. Built only where the installed torch has CUDA (setup.py).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

extern "C" {
int fastcompress_mcq_search_f32(const float*, const float*, const float*, int64_t*, int64_t, int,
                                int, int, int, int, cudaStream_t);
int fastcompress_mcq_search_bf16(const void*, const float*, const float*, int64_t*, int64_t, int,
                                 int, int, int, int, cudaStream_t);
int fastcompress_mcq_search_f16(const void*, const float*, const float*, int64_t*, int64_t, int,
                                int, int, int, int, cudaStream_t);
}

namespace {

at::Tensor mcq_search(const at::Tensor& z, const at::Tensor& book, const at::Tensor& bias,
                      bool normalize) {
  TORCH_CHECK(z.is_cuda() && z.dim() == 2 && z.is_contiguous(), "z must be contiguous (N, C) CUDA");
  TORCH_CHECK(
      book.is_cuda() && book.dim() == 3 && book.scalar_type() == at::kFloat && book.is_contiguous(),
      "book must be contiguous float32 (G, K, d) on CUDA");
  TORCH_CHECK(
      bias.is_cuda() && bias.dim() == 2 && bias.is_contiguous() && bias.scalar_type() == at::kFloat,
      "bias must be contiguous float32 (G, K) on CUDA");
  // Every tensor on z's device, and the launch on that device's current stream: with a
  // tensor on cuda:1 and the current device 0, the kernel would otherwise run on device
  // 0's stream against device 1's memory.
  TORCH_CHECK(book.device() == z.device(), "book is on ", book.device(), " but z is on ",
              z.device());
  TORCH_CHECK(bias.device() == z.device(), "bias is on ", bias.device(), " but z is on ",
              z.device());
  const c10::cuda::CUDAGuard device_guard(z.device());
  const int64_t n = z.size(0);
  const int groups = static_cast<int>(book.size(0));
  const int vocab = static_cast<int>(book.size(1));
  const int dim = static_cast<int>(book.size(2));
  TORCH_CHECK(z.size(1) == int64_t{groups} * dim, "z has ", z.size(1), " channels, expected ",
              groups * dim);
  TORCH_CHECK(bias.size(0) == groups && bias.size(1) >= vocab, "bias must be (G=", groups,
              ", row length >= K=", vocab, "), got (", bias.size(0), ", ", bias.size(1), ")");
  auto indices = at::empty({n, groups}, z.options().dtype(at::kLong));
  auto stream = at::cuda::getCurrentCUDAStream(z.device().index()).stream();
  const int bias_stride = static_cast<int>(bias.size(1));  // row stride of bias (>= K)
  int rc;
  if (z.scalar_type() == at::kFloat) {
    rc = fastcompress_mcq_search_f32(z.data_ptr<float>(), book.data_ptr<float>(),
                                     bias.data_ptr<float>(), indices.data_ptr<int64_t>(), n, groups,
                                     vocab, bias_stride, dim, normalize, stream);
  } else if (z.scalar_type() == at::kBFloat16) {
    rc = fastcompress_mcq_search_bf16(z.data_ptr(), book.data_ptr<float>(), bias.data_ptr<float>(),
                                      indices.data_ptr<int64_t>(), n, groups, vocab, bias_stride,
                                      dim, normalize, stream);
  } else {
    TORCH_CHECK(z.scalar_type() == at::kHalf, "z must be float32, bfloat16 or float16");
    rc = fastcompress_mcq_search_f16(z.data_ptr(), book.data_ptr<float>(), bias.data_ptr<float>(),
                                     indices.data_ptr<int64_t>(), n, groups, vocab, bias_stride,
                                     dim, normalize, stream);
  }
  TORCH_CHECK(rc != -1, "the CUDA MCQ search supports d in {2, 4, 8, 16}, got d=", dim);
  TORCH_CHECK(rc == 0,
              "CUDA MCQ search launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(rc)));
  return indices;
}

}  // namespace

TORCH_LIBRARY(fastcompress_cuda, m) {
  m.def("mcq_search(Tensor z, Tensor book, Tensor bias, bool normalize) -> Tensor");
  m.impl("mcq_search", c10::DispatchKey::CUDA, TORCH_FN(mcq_search));
}
