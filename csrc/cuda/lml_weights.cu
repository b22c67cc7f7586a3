// CUDA kernel of LML's direction weights: one thread per sample runs the shared per-sample solve
// (lml_weights.h). Tiny work; one launch instead of about 15 torch ops.
#include "lml_weights.h"

namespace {

__global__ void lml_weights_kernel(const double* __restrict__ gram, const double* __restrict__ mix, int64_t batch,
                                   int m, int r, double damping, double scale, double* __restrict__ weights) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  ds_lml_sample_weights(gram + b * m * m, mix, m, r, damping, scale, weights + b * m);
}

}  // namespace

extern "C" int ds_lml_weights_cuda(const double* gram, const double* mix, int64_t batch, int m, int r,
                                   double damping, double scale, double* weights, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  constexpr int kThreads = 64;
  const unsigned blocks = static_cast<unsigned>((batch + kThreads - 1) / kThreads);
  lml_weights_kernel<<<blocks, kThreads, 0, stream>>>(gram, mix, batch, m, r, damping, scale, weights);
  return static_cast<int>(cudaGetLastError());
}
