// CUDA kernels of the resampling ops (math: resample_math.h, shared with the CPU kernels). Raw pointers, no torch.
//
// resample_ancestors: one block per group; every pass walks the group in tiles of kThreads with cub block scans
// and reductions, carrying exact int64 sums between tiles (a blocked scan: deterministic for any K up to 2^17).
// Passes: max -> quantised weights, their cumulative sum (workspace) and ESS -> decision -> (residual: the
// integer copies and the remainders' cumulative sum) -> offspring counts by a binary search of each cumulative
// weight among the sorted draw positions -> in-place arrangement: one scan of (extras, deaths) packed in an int64,
// then each dead slot's source by a binary search over the extras' cumulative sum. __syncthreads() orders the
// workspace writes of a pass before the next pass's reads.
// resample_move: a grid-stride loop over the widest unit (16, 8, 4, 2 or 1 bytes) dividing the rows and their
// alignment; only the units of dead slots of resampled groups are read and written.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "resample.h"

namespace {

constexpr int kThreads = 512;
using Scan = cub::BlockScan<long long, kThreads>;
using SumI = cub::BlockReduce<long long, kThreads>;
using SumF = cub::BlockReduce<float, kThreads>;  // sums and the max

struct Max {
  __device__ float operator()(float x, float y) const { return x > y ? x : y; }
};

struct Shared {
  union {
    Scan::TempStorage scan;
    SumI::TempStorage sum_i;
    SumF::TempStorage sum_f;
  } tmp;
  long long broadcast[4];
  float broadcast_f[2];
};

// Block-wide int64 sum, returned to every thread.
__device__ long long block_sum(Shared& sh, long long v) {
  const long long total = SumI(sh.tmp.sum_i).Sum(v);
  if (threadIdx.x == 0) sh.broadcast[0] = total;
  __syncthreads();
  const long long out = sh.broadcast[0];
  __syncthreads();
  return out;
}

// Inclusive scan of one value per thread plus carry; carry advances by the tile's sum.
__device__ long long tile_scan(Shared& sh, long long v, long long& carry) {
  long long inclusive, aggregate;
  Scan(sh.tmp.scan).InclusiveSum(v, inclusive, aggregate);
  __syncthreads();
  const long long out = inclusive + carry;
  carry += aggregate;
  return out;
}

// #{j < count : position(j) < c}; positions are nondecreasing in j.
__device__ long long draws_below(int method, const double* u, long long K, long long count, long long total,
                                 long long c) {
  long long lo = 0, hi = count;
  while (lo < hi) {
    const long long mid = (lo + hi) / 2;
    if (ds_position(method, mid, u, K, count, total) < c) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

__global__ void __launch_bounds__(kThreads) ancestors_kernel(ds_resample_args a) {
  __shared__ Shared sh;
  const long long group = blockIdx.x, K = a.K;
  const float* lw = a.log_w + group * K;
  const double* u = a.uniforms + group * a.width;
  int64_t* cum = a.cum + group * K;
  int64_t* cnt = a.counts + group * K;
  int64_t* anc = a.ancestors + group * K;
  const int tid = threadIdx.x;

  int bad_uniform = 0;  // invalid uniforms are clamped by ds_position; flagged here
  for (long long j = tid; j < a.width; j += kThreads) bad_uniform |= !ds_uniform_ok(a.method, u, j);
  if (bad_uniform && a.status != nullptr) atomicOr(a.status, DS_ERR_UNIFORM);

  float m = -INFINITY;
  int bad = 0;
  for (long long k = tid; k < K; k += kThreads) {
    const float v = lw[k];
    bad |= isnan(v) || v == INFINITY;
    if (v > m) m = v;
  }
  m = SumF(sh.tmp.sum_f).Reduce(m, Max());
  __syncthreads();
  bad = static_cast<int>(block_sum(sh, bad));
  if (tid == 0) sh.broadcast_f[0] = m;
  __syncthreads();
  m = sh.broadcast_f[0];
  const bool degenerate = bad > 0 || m == -INFINITY;

  long long total = 0, sa = 0, sb = 0, sc = 0;
  float s = 0.0f;
  for (long long start = 0; start < K; start += kThreads) {
    const long long k = start + tid;
    const float x = k < K ? (degenerate ? 0.0f : lw[k] - m) : -INFINITY;
    const long long q = k < K ? ds_weight_q(x) : 0;
    const long long c = tile_scan(sh, q, total);
    if (k < K) cum[k] = c;
    int64_t da, db, dc;
    ds_square_parts(q, da, db, dc);
    sa += da;
    sb += db;
    sc += dc;
    s += k < K ? expf(x) : 0.0f;
  }
  sa = block_sum(sh, sa);
  sb = block_sum(sh, sb);
  sc = block_sum(sh, sc);
  s = SumF(sh.tmp.sum_f).Sum(s);
  if (tid == 0) sh.broadcast_f[1] = s;
  __syncthreads();
  s = sh.broadcast_f[1];
  const double ess = ds_ess(total, sa, sb, sc);
  const bool resampled = ess < a.ess_threshold * static_cast<double>(K);
  const float log_s = logf(s);
  const float log_norm = m + log_s;
  if (tid == 0) {
    a.ess[group] = static_cast<float>(ess);
    a.resampled[group] = resampled;
    a.log_norm[group] = degenerate ? NAN : log_norm;
  }
  const float uniform = static_cast<float>(-log(static_cast<double>(K)));
  for (long long k = tid; k < K; k += kThreads) {
    a.log_w_out[group * K + k] = (resampled || degenerate) ? uniform : (lw[k] - m) - log_s;  // exact at any scale
    anc[k] = k;
  }
  if (!resampled) return;  // uniform over the block: every thread takes the same branch

  long long count = K, weight_total = total;
  if (a.method == DS_RESIDUAL) {  // floor(K q / T) copies; the remainders K q mod T weigh the remainder draws
    __syncthreads();
    long long copies = 0;
    weight_total = 0;
    for (long long start = 0; start < K; start += kThreads) {
      const long long k = start + tid;
      const long long kq = k < K ? K * ds_weight_q(degenerate ? 0.0f : lw[k] - m) : 0;
      const long long base = kq / total;
      const long long c = tile_scan(sh, kq - total * base, weight_total);
      if (k < K) {
        cnt[k] = base;
        cum[k] = c;
      }
      copies += base;
    }
    count = K - block_sum(sh, copies);
  }
  __syncthreads();
  for (long long k = tid; k < K; k += kThreads) {
    const long long c = cum[k], prev = k > 0 ? cum[k - 1] : 0;
    long long n = draws_below(a.method, u, K, count, weight_total, c) -
                  draws_below(a.method, u, K, count, weight_total, prev);
    if (a.method == DS_RESIDUAL) n += cnt[k];
    cnt[k] = n;
  }
  __syncthreads();
  // One scan of extras 2^32 + deaths (each sum stays below 2^17): the extras' cumulative sum and the dead ranks.
  long long carry = 0;
  for (long long start = 0; start < K; start += kThreads) {
    const long long k = start + tid;
    const long long n = k < K ? cnt[k] : 1;
    const long long packed = tile_scan(sh, (n > 1 ? n - 1 : 0) * (1LL << 32) + (n == 0), carry);
    if (k < K) {
      cum[k] = packed >> 32;
      anc[k] = n == 0 ? -(packed & 0xFFFFFFFFLL) : k;  // a dead slot of rank r holds -1 - r
    }
  }
  __syncthreads();
  for (long long k = tid; k < K; k += kThreads) {
    const long long v = anc[k];
    if (v >= 0) continue;
    const long long rank = -1 - v;
    long long lo = 0, hi = K;
    while (lo < hi) {  // the smallest k' whose extras' sum exceeds the rank
      const long long mid = (lo + hi) / 2;
      if (cum[mid] > rank) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    anc[k] = lo < K ? lo : K - 1;  // only reached with invalid (flagged) uniforms
  }
}

template <typename Unit>
__global__ void move_kernel(Unit* p, const int64_t* anc, const bool* res, long long K, long long units_per_row,
                            long long n, int* status) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long r = i / units_per_row, group = r / K;
    if (!res[group]) continue;
    int err = 0;
    const long long src = ds_clamp_index(anc[r], K, DS_ERR_ANCESTOR, &err);
    if (err != 0 && status != nullptr && i % units_per_row == 0) atomicOr(status, err);
    if (src == r - group * K) continue;
    p[i] = p[(group * K + src) * units_per_row + (i - r * units_per_row)];
  }
}

template <typename Unit>
int launch_move(void* particles, const int64_t* anc, const bool* res, long long G, long long K, long long row_bytes,
                int* status, cudaStream_t stream) {
  const long long per_row = row_bytes / static_cast<long long>(sizeof(Unit));
  const long long n = G * K * per_row;
  const long long blocks = (n + 255) / 256 < 65535 * 8 ? (n + 255) / 256 : 65535 * 8;
  move_kernel<Unit><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(static_cast<Unit*>(particles), anc, res, K,
                                                                      per_row, n, status);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int ds_resample_ancestors_cuda(ds_resample_args args, cudaStream_t stream) {
  if (args.G == 0) return 0;
  ancestors_kernel<<<static_cast<unsigned>(args.G), kThreads, 0, stream>>>(args);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int ds_resample_move_cuda(void* particles, const int64_t* ancestors, const bool* resampled, int64_t G,
                                     int64_t K, int64_t row_bytes, int* status, cudaStream_t stream) {
  if (G * K * row_bytes == 0) return 0;
  const uintptr_t align = reinterpret_cast<uintptr_t>(particles) | static_cast<uintptr_t>(row_bytes);
  const auto run = [&](auto unit) {
    return launch_move<decltype(unit)>(particles, ancestors, resampled, G, K, row_bytes, status, stream);
  };
  if (align % 16 == 0) return run(uint4{});
  if (align % 8 == 0) return run(uint2{});
  if (align % 4 == 0) return run(0u);
  if (align % 2 == 0) return run(static_cast<unsigned short>(0));
  return run(static_cast<unsigned char>(0));
}
