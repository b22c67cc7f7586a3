// CUDA registration of lml_weights: the shared argument checks and a launch over csrc/cuda/lml_weights.cu on
// the current torch stream. Built into diffsampler._C with CUDA, or JIT-compiled on first use (_cuda_jit.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#define DS_LML_WEIGHTS_CUDA_LAUNCHER
#include "lml_weights.h"

namespace diffsampler {
namespace {

at::Tensor lml_weights_cuda(const at::Tensor& gram_in, const at::Tensor& mix_in, double damping, double scale) {
  TORCH_CHECK(gram_in.is_cuda(), "lml_weights_cuda: gram must be a CUDA tensor, got ", gram_in.device());
  const c10::cuda::CUDAGuard guard(gram_in.device());
  const auto [gram, mix] = lml_weights_operands(gram_in, mix_in);
  auto w = at::empty({gram.size(0), gram.size(1)}, gram.options());
  const int err = ds_lml_weights_cuda(gram.data_ptr<double>(), mix.data_ptr<double>(), gram.size(0),
                                      static_cast<int>(gram.size(1)), static_cast<int>(mix.size(1)), damping, scale,
                                      w.data_ptr<double>(), c10::cuda::getCurrentCUDAStream(gram.device().index()));
  TORCH_CHECK(err == 0, "lml_weights_cuda: kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return w;
}

}  // namespace
}  // namespace diffsampler

TORCH_LIBRARY_IMPL(diffsampler, CUDA, m) { m.impl("lml_weights", &diffsampler::lml_weights_cuda); }
