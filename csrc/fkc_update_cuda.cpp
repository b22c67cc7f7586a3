// CUDA registration of fkc_update: the shared host driver with a launch over csrc/cuda/fkc_update.cu on the
// current torch stream. Built into diffsampler._C with CUDA, or JIT-compiled on first use (_cuda_jit.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#define DS_FKC_CUDA_LAUNCHER
#include "fkc_update.h"

namespace diffsampler {
namespace {

std::tuple<at::Tensor, at::Tensor> fkc_update_cuda(const at::Tensor& x, at::TensorList outs,
                                                   at::ArrayRef<double> coeffs, const c10::optional<at::Tensor>& noise) {
  TORCH_CHECK(x.is_cuda(), "fkc_update_cuda: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(0) <= 65535, "fkc_update_cuda: at most 65535 samples, got ", x.size(0));
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  return run_fkc_update(x, outs, coeffs, noise, [stream](ds_fkc_dtype dtype, const ds_fkc_tensors& t) {
    const int err = ds_fkc_update_cuda(dtype, t, stream);
    TORCH_CHECK(err == 0, "fkc_update_cuda: kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  });
}

}  // namespace
}  // namespace diffsampler

TORCH_LIBRARY_IMPL(diffsampler, CUDA, m) { m.impl("fkc_update", &diffsampler::fkc_update_cuda); }
