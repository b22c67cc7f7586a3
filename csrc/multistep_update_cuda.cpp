// CUDA registration of the fused multistep update and of LML's Gram: the shared host drivers with launches over
// the raw-pointer kernels of csrc/cuda, on the current torch stream of x's device. Built into diffsampler._C
// when the package is installed with CUDA, or JIT-compiled on first use (python/diffsampler/_cuda_jit.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/multistep_update.h"
#include "multistep_update.h"

namespace diffsampler {
namespace {

UpdateLaunch cuda_launch(const at::Tensor& x) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  return [stream](ds_dtype dtype, ds_phase phase, const ds_update_tensors& t, const ds_update_coeffs& k) {
    const int err = ds_multistep_update_cuda(dtype, phase, t, k, stream);
    TORCH_CHECK(err == 0, "multistep_update_cuda: kernel launch failed: ",
                cudaGetErrorString(static_cast<cudaError_t>(err)));
  };
}

// The Gram's per-block partials live in a scratch tensor from torch's caching allocator (stream-ordered, so it
// is safe to free once launched, and it comes from the graph's pool under CUDA-graph capture).
GramLaunch cuda_gram_launch(const at::Tensor& x) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  const auto options = x.options().dtype(at::kDouble);
  return [stream, options](ds_dtype dtype, const ds_update_tensors& t, const ds_update_coeffs& k, double* gram) {
    const auto scratch = at::empty({ds_lml_gram_cuda_scratch(t, k)}, options);
    const int err = ds_lml_gram_cuda(dtype, t, k, gram, scratch.data_ptr<double>(), stream);
    TORCH_CHECK(err == 0, "lml_gram_cuda: kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  };
}

at::Tensor multistep_update_cuda(const at::Tensor& x, const at::Tensor& model_out,
                                 const c10::optional<at::Tensor>& history, int64_t write_slot,
                                 at::IntArrayRef read_slots, at::ArrayRef<double> coeffs,
                                 const c10::optional<at::Tensor>& noise, double clip, bool thresholding,
                                 const c10::optional<at::Tensor>& state, const c10::optional<at::Tensor>& dirs,
                                 int64_t dir_slot, at::ArrayRef<double> dir_coeffs,
                                 const c10::optional<at::Tensor>& dir_weights, const c10::optional<at::Tensor>& guide) {
  TORCH_CHECK(x.is_cuda(), "multistep_update_cuda: x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return run_multistep_update(x, model_out, history, write_slot, read_slots, coeffs, noise, clip, thresholding,
                              state, dirs, dir_slot, dir_coeffs, dir_weights, guide, cuda_launch(x));
}

at::Tensor lml_gram_cuda(const at::Tensor& x, const at::Tensor& model_out, const c10::optional<at::Tensor>& history,
                         at::IntArrayRef read_slots, at::ArrayRef<double> coeffs, double clip, const at::Tensor& dirs,
                         at::ArrayRef<double> dir_coeffs, const c10::optional<at::Tensor>& guide) {
  TORCH_CHECK(x.is_cuda(), "lml_gram_cuda: x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return run_lml_gram(x, model_out, history, read_slots, coeffs, clip, dirs, dir_coeffs, guide, cuda_gram_launch(x));
}

at::Tensor multistep_update_functional_cuda(const at::Tensor& x, const at::Tensor& model_out,
                                            at::ArrayRef<double> coeffs, const c10::optional<at::Tensor>& noise,
                                            double clip, bool thresholding,
                                           const c10::optional<at::Tensor>& guide) {
  TORCH_CHECK(x.is_cuda(), "multistep_update_functional_cuda: x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return run_multistep_update_functional(x, model_out, coeffs, noise, clip, thresholding, guide, cuda_launch(x));
}

at::Tensor multistep_update_indexed_cuda(const at::Tensor& x, const at::Tensor& model_out,
                                         const c10::optional<at::Tensor>& history, const at::Tensor& table,
                                         const at::Tensor& slots, const at::Tensor& step, int64_t n_reads,
                                         const c10::optional<at::Tensor>& noise, double clip,
                                         const c10::optional<at::Tensor>& state,
                                         const c10::optional<at::Tensor>& status,
                                        const c10::optional<at::Tensor>& guide) {
  TORCH_CHECK(x.is_cuda(), "multistep_update_indexed_cuda: x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return run_multistep_update_indexed(x, model_out, history, table, slots, step, n_reads, noise, clip, state,
                                      status, guide, cuda_launch(x));
}

}  // namespace
}  // namespace diffsampler

TORCH_LIBRARY_IMPL(diffsampler, CUDA, m) {
  m.impl("multistep_update", &diffsampler::multistep_update_cuda);
  m.impl("multistep_update_functional", &diffsampler::multistep_update_functional_cuda);
  m.impl("lml_gram", &diffsampler::lml_gram_cuda);
  m.impl("multistep_update_indexed", &diffsampler::multistep_update_indexed_cuda);
}
