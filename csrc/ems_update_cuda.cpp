// CUDA registration of ems_update: the shared host driver with a launch over csrc/cuda/ems_update.cu on the
// current torch stream. Built into diffsampler._C with CUDA, or JIT-compiled on first use (_cuda_jit.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#define DS_EMS_CUDA_LAUNCHER
#include "ems_update.h"

namespace diffsampler {
namespace {

at::Tensor ems_update_cuda(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& coeffs,
                           const c10::optional<at::Tensor>& history, int64_t write_slot, at::IntArrayRef read_slots,
                           const c10::optional<at::Tensor>& state) {
  TORCH_CHECK(x.is_cuda(), "ems_update_cuda: x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  return run_ems_update(x, model_out, coeffs, history, write_slot, read_slots, state,
                        [stream](ds_ems_dtype dtype, const ds_ems_tensors& t) {
                          const int err = ds_ems_update_cuda(dtype, t, stream);
                          TORCH_CHECK(err == 0, "ems_update_cuda: kernel launch failed: ",
                                      cudaGetErrorString(static_cast<cudaError_t>(err)));
                        });
}

}  // namespace
}  // namespace diffsampler

TORCH_LIBRARY_IMPL(diffsampler, CUDA, m) { m.impl("ems_update", &diffsampler::ems_update_cuda); }
