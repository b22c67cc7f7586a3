// CPU kernels of the resampling ops and the registration of their schemas. One group per task (at::parallel_for
// over groups); within a group sequential passes: max, quantised weights with their exact sum and ESS, then a
// merge of the sorted draw positions with the cumulative weights (offspring counts) and the in-place ancestor
// arrangement. The move lists the dead slots of resampled groups, then copies those rows only.
// Math: cuda/resample_math.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "resample.h"

namespace diffsampler {
namespace {

struct GroupOut {
  float* log_w;
  int64_t* ancestors;
  float* ess;
  bool* resampled;
  float* log_norm;
};

// One group: lw (K), u (its uniforms), scratch q, counts, positions and drawn (K + 1 each).
void resample_group(const float* lw, const double* u, int64_t K, int method, double threshold, GroupOut out,
                    int64_t* q, int64_t* counts, int64_t* positions, int64_t* drawn) {
  float m = -INFINITY;
  bool degenerate = false;
  for (int64_t k = 0; k < K; ++k) {
    degenerate = degenerate || std::isnan(lw[k]) || lw[k] == INFINITY;
    if (lw[k] > m) m = lw[k];
  }
  degenerate = degenerate || m == -INFINITY;
  const float shift = degenerate ? 0.0f : m;
  double s = 0.0;  // sum of exp(x) for log_norm (float exp, double sum: K up to 2^17 terms)
  for (int64_t k = 0; k < K; ++k) {
    const float x = degenerate ? 0.0f : lw[k] - shift;
    q[k] = ds_weight_q(x);
    s += std::exp(x);
  }
  int64_t total = 0, a = 0, b = 0, c = 0;
  for (int64_t k = 0; k < K; ++k) {
    total += q[k];
    int64_t da, db, dc;
    ds_square_parts(q[k], da, db, dc);
    a += da;
    b += db;
    c += dc;
  }
  const double ess = ds_ess(total, a, b, c);
  const bool resampled = ess < threshold * static_cast<double>(K);
  *out.ess = static_cast<float>(ess);
  *out.resampled = resampled;
  const float log_s = static_cast<float>(std::log(s));
  const float log_norm = static_cast<float>(static_cast<double>(m) + std::log(s));
  *out.log_norm = degenerate ? std::numeric_limits<float>::quiet_NaN() : log_norm;
  const float uniform = static_cast<float>(-std::log(static_cast<double>(K)));
  // (lw - m) - log s, not lw - log_norm: exact at any magnitude of the log-weights
  for (int64_t k = 0; k < K; ++k) out.log_w[k] = (resampled || degenerate) ? uniform : (lw[k] - shift) - log_s;
  if (!resampled) {
    for (int64_t k = 0; k < K; ++k) out.ancestors[k] = k;
    return;
  }
  // Offspring counts: residual first takes floor(K q / T) copies and keeps the remainders K q mod T as weights.
  int64_t count = K, weight_total = total;
  if (method == DS_RESIDUAL) {
    count = K;
    weight_total = 0;
    for (int64_t k = 0; k < K; ++k) {
      counts[k] = K * q[k] / total;
      q[k] = K * q[k] - total * counts[k];
      count -= counts[k];
      weight_total += q[k];
    }
  } else {
    for (int64_t k = 0; k < K; ++k) counts[k] = 0;
  }
  for (int64_t j = 0; j < count; ++j) positions[j] = ds_position(method, j, u, K, count, weight_total);
  positions[count] = std::numeric_limits<int64_t>::max();  // sentinel: past every cumulative weight
  q[K] = 0;
  // Merge the sorted positions with the cumulative weights, branch-free: each step either gives the next draw to
  // particle k (its position is below C_k) or closes particle k, storing its count, and moves to k + 1.
  int64_t j = 0, k = 0, run = 0, cum = q[0];
  for (int64_t step = 0; step < count + K; ++step) {
    const int64_t take = positions[j] < cum;
    drawn[k] = run;  // final at the closing step
    run = (run + 1) * take;
    j += take;
    k += 1 - take;
    cum += (1 - take) * q[k];
  }
  for (int64_t i = 0; i < K; ++i) counts[i] += drawn[i];
  // Survivors keep their slot; the i-th dead slot takes the i-th extra copy.
  int64_t source = -1, left = 0;
  for (int64_t k = 0; k < K; ++k) {
    if (counts[k] > 0) {
      out.ancestors[k] = k;
      continue;
    }
    while (left == 0) {
      ++source;
      left = counts[source] > 0 ? counts[source] - 1 : 0;
    }
    out.ancestors[k] = source;
    --left;
  }
}

ResampleOutputs resample_ancestors_cpu(const at::Tensor& log_w_in, const at::Tensor& uniforms_in, int64_t method,
                                       double ess_threshold, const c10::optional<at::Tensor>& status) {
  TORCH_CHECK(log_w_in.device().is_cpu(), "resample_ancestors_cpu: log_w must be a CPU tensor");
  auto outs = resample_outputs(log_w_in, uniforms_in, method);
  status_pointer(status, log_w_in.device(), "resample_ancestors");
  const auto log_w = log_w_in.contiguous();
  const auto uniforms = uniforms_in.contiguous();
  const int64_t G = log_w.size(0), K = log_w.size(1), width = uniforms.size(1);
  const float* lw = log_w.data_ptr<float>();
  const double* u = uniforms.data_ptr<double>();
  for (int64_t i = 0; i < G * width; ++i) {  // host memory: refused here rather than clamped
    TORCH_CHECK(ds_uniform_ok(static_cast<int>(method), u + i / width * width, i % width),
                "resample_ancestors: uniforms[", i / width, ", ", i % width, "] = ", u[i],
                method >= DS_MULTINOMIAL ? " must be in [0, 1) and sorted per group" : " must be in [0, 1)");
  }
  float* lw_out = std::get<0>(outs).data_ptr<float>();
  int64_t* anc = std::get<1>(outs).data_ptr<int64_t>();
  float* ess = std::get<2>(outs).data_ptr<float>();
  bool* res = std::get<3>(outs).data_ptr<bool>();
  float* log_norm = std::get<4>(outs).data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 4096 / K);
  at::parallel_for(0, G, grain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> scratch(4 * (K + 1));
    for (int64_t group = begin; group < end; ++group) {
      GroupOut o{lw_out + group * K, anc + group * K, ess + group, res + group, log_norm + group};
      int64_t* w = scratch.data();
      resample_group(lw + group * K, u + group * width, K, static_cast<int>(method), ess_threshold, o, w, w + (K + 1),
                     w + 2 * (K + 1), w + 3 * (K + 1));
    }
  });
  return outs;
}

void resample_move_cpu(const at::Tensor& particles, const at::Tensor& ancestors, const at::Tensor& resampled,
                       const c10::optional<at::Tensor>& status) {
  TORCH_CHECK(particles.device().is_cpu(), "resample_move_cpu: particles must be a CPU tensor");
  const int64_t row = resample_row_bytes(particles, ancestors, resampled);
  status_pointer(status, particles.device(), "resample_move");
  const int64_t G = ancestors.size(0), K = ancestors.size(1);
  const int64_t* anc = ancestors.data_ptr<int64_t>();
  const bool* res = resampled.data_ptr<bool>();
  std::vector<std::pair<int64_t, int64_t>> copies;  // (destination, source) rows: the dead slots
  for (int64_t group = 0; group < G; ++group) {
    if (!res[group]) continue;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t a = anc[group * K + k];
      TORCH_CHECK(a >= 0 && a < K, "resample_move: ancestors[", group, ", ", k, "] = ", a, " is outside [0, K = ", K,
                  ")");
      if (a != k) copies.emplace_back(group * K + k, group * K + a);
    }
  }
  if (copies.empty()) return;
  const at::Tensor work = particles.is_contiguous() ? particles : particles.contiguous();
  char* base = static_cast<char*>(work.data_ptr());
  // Threads only for more than ~4 MiB of copies: below that, waking them costs more than the copy.
  const int64_t grain = std::max<int64_t>(1, (int64_t{4} << 20) / std::max<int64_t>(row, 1));
  at::parallel_for(0, static_cast<int64_t>(copies.size()), grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) std::memcpy(base + copies[i].first * row, base + copies[i].second * row, row);
  });
  if (!work.is_same(particles)) particles.copy_(work);
}

}  // namespace
}  // namespace diffsampler

TORCH_LIBRARY_FRAGMENT(diffsampler, m) {
  m.def(diffsampler::kResampleAncestorsSchema);
  m.def(diffsampler::kResampleMoveSchema);
}

TORCH_LIBRARY_IMPL(diffsampler, CPU, m) {
  m.impl("resample_ancestors", &diffsampler::resample_ancestors_cpu);
  m.impl("resample_move", &diffsampler::resample_move_cpu);
}
