// CUDA registration of the resampling ops: the shared checks (resample.h) and the raw-pointer launchers of
// csrc/cuda/resample.cu on the current torch stream. Built into diffsampler._C with CUDA, or JIT-compiled.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/resample.h"
#include "resample.h"

namespace diffsampler {
namespace {

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, what, ": kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

ResampleOutputs resample_ancestors_cuda(const at::Tensor& log_w_in, const at::Tensor& uniforms_in, int64_t method,
                                        double ess_threshold, const c10::optional<at::Tensor>& status) {
  TORCH_CHECK(log_w_in.is_cuda(), "resample_ancestors_cuda: log_w must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(log_w_in.device());
  auto outs = resample_outputs(log_w_in, uniforms_in, method);
  const auto log_w = log_w_in.contiguous();
  const auto uniforms = uniforms_in.contiguous();
  const auto cum = at::empty(log_w.sizes(), log_w.options().dtype(at::kLong));
  const auto counts = at::empty_like(cum);
  ds_resample_args a{};
  a.log_w = log_w.data_ptr<float>();
  a.uniforms = uniforms.data_ptr<double>();
  a.log_w_out = std::get<0>(outs).data_ptr<float>();
  a.ancestors = std::get<1>(outs).data_ptr<int64_t>();
  a.ess = std::get<2>(outs).data_ptr<float>();
  a.resampled = std::get<3>(outs).data_ptr<bool>();
  a.log_norm = std::get<4>(outs).data_ptr<float>();
  a.cum = cum.data_ptr<int64_t>();
  a.counts = counts.data_ptr<int64_t>();
  a.G = log_w.size(0);
  a.K = log_w.size(1);
  a.width = uniforms.size(1);
  a.method = static_cast<int>(method);
  a.ess_threshold = ess_threshold;
  a.status = status_pointer(status, log_w_in.device(), "resample_ancestors");
  check_launch(ds_resample_ancestors_cuda(a, c10::cuda::getCurrentCUDAStream(log_w.device().index())),
               "resample_ancestors_cuda");
  return outs;
}

void resample_move_cuda(const at::Tensor& particles, const at::Tensor& ancestors, const at::Tensor& resampled,
                        const c10::optional<at::Tensor>& status) {
  TORCH_CHECK(particles.is_cuda(), "resample_move_cuda: particles must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(particles.device());
  const int64_t row = resample_row_bytes(particles, ancestors, resampled);
  const at::Tensor work = particles.is_contiguous() ? particles : particles.contiguous();
  check_launch(ds_resample_move_cuda(work.data_ptr(), ancestors.data_ptr<int64_t>(), resampled.data_ptr<bool>(),
                                     ancestors.size(0), ancestors.size(1), row,
                                     status_pointer(status, particles.device(), "resample_move"),
                                     c10::cuda::getCurrentCUDAStream(particles.device().index())),
               "resample_move_cuda");
  if (!work.is_same(particles)) particles.copy_(work);
}

}  // namespace
}  // namespace diffsampler

TORCH_LIBRARY_IMPL(diffsampler, CUDA, m) {
  m.impl("resample_ancestors", &diffsampler::resample_ancestors_cuda);
  m.impl("resample_move", &diffsampler::resample_move_cuda);
}
