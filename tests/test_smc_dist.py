"""resample_distributed on 2 gloo processes: particles, log-weights, ancestors, ESS, decisions and log-normalisers
equal the single-process ops.resample of the concatenated problem bitwise (every method, with and without a
threshold, G > 1, both particle layouts, several dtypes, a multi-step loop), and mismatched ranks raise."""

import math
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffsampler import ops
from diffsampler.smc_dist import resample_distributed
import update_cases
from update_cases import case_seed

# The spawned ranks import update_cases afresh: give them this session's seed, so they draw the same problems.
os.environ.setdefault("DIFFSAMPLER_TEST_SEED", str(update_cases.SESSION_SEED))

WORLD = 2
TIMEOUT_S = 120
# (G, K_local, particle shape, dtype, layout): layout "flat" (G*K_local, ...) contiguous shards, "grouped"
# (G, K_local, ...) non-contiguous slices of the (G, K, ...) batch.
CASES = [(3, 5, (4,), torch.float32, "flat"), (4, 17, (2, 3), torch.bfloat16, "grouped"),
         (1, 8, (), torch.float64, "flat"), (2, 1, (5,), torch.float16, "grouped")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, *args) -> None:
    """Runs worker(rank, *args) in WORLD gloo processes; fails on an exception in any of them or after TIMEOUT_S."""
    ctx = mp.spawn(_init_and_run, args=(free_port(), worker, args), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish in {TIMEOUT_S} s")


def _init_and_run(rank, port, worker, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


def problem(G, K, shape, dtype, seed):
    """Log-weights with spreads from flat to concentrated (some -inf; for G = 4 a degenerate group with a NaN)
    and distinct particles (G*K, *shape)."""
    gen = torch.Generator().manual_seed(seed)
    lw = torch.randn(G, K, generator=gen) * 4 * torch.rand(G, 1, generator=gen)
    lw[torch.rand(G, K, generator=gen) < 0.1] = -math.inf
    lw[:, 0] = lw[:, 0].clamp(min=0)
    if G == 4:
        lw[2, K - 1] = math.nan
    return lw, torch.randn(G * K, *shape, generator=gen).to(dtype)


def shard(x, G, rank, K_local, layout):
    """Rank's particles of a (G*K, ...) batch in the given layout (rank-major within each group)."""
    x = x.view(G, WORLD * K_local, *x.shape[1:])[:, rank * K_local:(rank + 1) * K_local]
    return x.reshape(G * K_local, *x.shape[2:]) if layout == "flat" else x


def bits(t):
    """The tensor's bit patterns (floats viewed as integers: NaN == NaN, -0.0 != 0.0)."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]) if t.is_floating_point() else t


def assert_same(out, ref, G, rank, K_local, layout):
    """out (this rank's distributed result) is the rank's shard of ref (single process), bitwise."""
    cols = slice(rank * K_local, (rank + 1) * K_local)
    assert torch.equal(bits(out.particles), bits(shard(ref.particles, G, rank, K_local, layout)))
    assert torch.equal(bits(out.log_w), bits(ref.log_w[:, cols]))
    assert torch.equal(out.ancestors, ref.ancestors[:, cols])
    for name in ("ess", "resampled", "log_norm"):
        assert torch.equal(bits(getattr(out, name)), bits(getattr(ref, name))), name


def _equal_worker(rank, seed, device="cpu"):
    crossed = decided = degenerate = 0
    for method in ops.RESAMPLE_METHODS:
        for threshold in (None, 0.5):
            for G, K_local, shape, dtype, layout in CASES:
                lw, x = problem(G, WORLD * K_local, shape, dtype, case_seed(seed, method, threshold, G, K_local))
                lw, x = lw.to(device), x.to(device)
                gen_ref, gen = (torch.Generator(device).manual_seed(seed) for _ in range(2))
                ref = ops.resample(lw, x.clone(), method, threshold, gen_ref)
                mine = shard(x.clone(), G, rank, K_local, layout)
                out = resample_distributed(lw[:, rank * K_local:(rank + 1) * K_local].clone(), mine, method,
                                           threshold, gen)
                assert out.particles is mine  # in place
                assert_same(out, ref, G, rank, K_local, layout)
                assert torch.equal(gen.get_state(), gen_ref.get_state())  # the same uniforms drawn
                home = torch.arange(WORLD * K_local, device=device) // K_local
                crossed += int((ref.ancestors // K_local != home).sum())
                decided += int((~ref.resampled).sum())
                degenerate += int(ref.log_norm.isnan().sum())
    assert crossed > 0 and decided > 0 and degenerate > 0  # rows crossed ranks; the threshold left groups alone
    # Equal weights under a threshold: nothing is resampled, no collective moves particles, nothing changes.
    x = torch.randn(2 * 3, 4, device=device)
    out = resample_distributed(torch.zeros(2, 3, device=device), x.clone(), "systematic", 0.5,
                               torch.Generator(device).manual_seed(seed))
    assert torch.equal(out.particles, x) and not out.resampled.any()
    assert torch.equal(out.ancestors, torch.arange(3 * rank, 3 * rank + 3, device=device).expand(2, 3))


def _loop_worker(rank, seed):
    """SMC-like loop: the particles drift, the log-weights get an increment f(x), then resampling; 6 steps, on an
    explicit process group, the rank check only at the first step."""
    G, K_local, D = 3, 6, 2
    K = WORLD * K_local
    group = dist.new_group(list(range(WORLD)))
    for method in ops.RESAMPLE_METHODS:
        _, x = problem(G, K, (D,), torch.float32, case_seed(seed, "loop", method))
        lw = torch.zeros(G, K)
        mine, lw_mine = shard(x.clone(), G, rank, K_local, "flat"), lw[:, rank * K_local:(rank + 1) * K_local]
        gen_ref, gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for step in range(6):
            x, mine = x + 0.3 * torch.cos(x + step), mine + 0.3 * torch.cos(mine + step)
            lw, lw_mine = lw - 0.5 * x[:, 0].view(G, K) ** 2, lw_mine - 0.5 * mine[:, 0].view(G, K_local) ** 2
            ref = ops.resample(lw, x, method, 0.6, gen_ref)
            out = resample_distributed(lw_mine, mine, method, 0.6, gen, group, check_ranks=step == 0)
            assert_same(out, ref, G, rank, K_local, "flat")
            x, lw, mine, lw_mine = ref.particles, ref.log_w, out.particles, out.log_w


def _mismatch_worker(rank, seed):
    lw = torch.zeros(2, 3 + rank)  # K_local differs across ranks
    with pytest.raises(ValueError, match=r"K_local \(particles per rank\) must be the same on every rank"):
        resample_distributed(lw, torch.zeros(2 * (3 + rank), 4), "systematic")
    gen = torch.Generator().manual_seed(seed + rank)  # generators not in the same state
    with pytest.raises(ValueError, match="generator state must be the same on every rank"):
        resample_distributed(torch.zeros(2, 3), torch.zeros(6, 4), "systematic", generator=gen)
    # Bad arguments on rank 1 only: it raises its own error, the other ranks learn of it (no hang).
    match = "particles must have shape" if rank == 1 else r"invalid arguments on rank\(s\) \[1\]"
    with pytest.raises(ValueError, match=match):
        resample_distributed(torch.zeros(2, 3), torch.zeros(6 - rank, 4), "systematic")


@pytest.mark.parametrize("worker", [_equal_worker, _loop_worker, _mismatch_worker])
def test_resample_distributed(worker):
    run_ranks(worker, case_seed("smc_dist"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resample_distributed_cuda():
    """CUDA tensors (both ranks on one GPU, gloo: NCCL needs a GPU per rank): the device paths of the op."""
    run_ranks(_equal_worker, case_seed("smc_dist_cuda"), "cuda")
