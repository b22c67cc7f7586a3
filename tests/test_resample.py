"""The resampling op (ops.resample): every backend against the reference (identical ancestors and decisions from
the same uniforms), the statistics of the four schemes, the ESS threshold, the particle move, and bad input."""

import math

import pytest
import torch

import diffsampler as ds
import diffsampler.triton_kernels  # noqa: F401  (the subpackage, also when ops has not probed it yet)
from diffsampler import ops, reference
from diffsampler.bench.common import OpCounter
from update_cases import backend_op, case_seed, resample_samples

METHODS = ops.RESAMPLE_METHODS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INF = float("inf")


def random_log_w(G, K, gen, spread=3.0):
    """Log-weights with a range of spreads (ESS from ~1 to ~K) and some -inf entries."""
    lw = torch.randn(G, K, generator=gen) * spread * torch.rand(G, 1, generator=gen)
    lw[torch.rand(G, K, generator=gen) < 0.1] = -INF
    lw[:, 0] = lw[:, 0].clamp(min=0)  # at least one finite weight per group
    return lw


def assert_same_as_reference(out, ref):
    """Ancestors and decisions identical; ESS, log-weights and normalisers to float32 reduction accuracy."""
    log_w, ancestors, ess, resampled, log_norm = out
    assert ancestors.dtype == torch.int64 and resampled.dtype == torch.bool
    assert torch.equal(ancestors, ref[1])
    assert torch.equal(resampled, ref[3])
    assert torch.allclose(ess.double(), ref[2].double(), rtol=1e-5, atol=0)
    assert torch.equal(torch.isinf(log_w), torch.isinf(ref[0]))
    finite = torch.isfinite(ref[0])
    assert torch.allclose(log_w[finite].double(), ref[0][finite].double(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(log_norm.double(), ref[4].double(), rtol=1e-5, atol=1e-5, equal_nan=True)


def test_samples_match_reference(backend):
    for args in resample_samples():
        ref = reference.resample_ancestors(*args)
        assert_same_as_reference(backend_op("resample_ancestors", backend)(*args), ref)


@pytest.mark.parametrize("method", METHODS)
def test_backends_give_identical_ancestors(backend, method):
    for G, K in [(1, 1), (3, 2), (5, 7), (4, 64), (2, 1031)] + ([(1, 4099)] if backend == "cpu" else []):
        gen = torch.Generator().manual_seed(case_seed("resample", backend, method, G, K))
        lw = random_log_w(G, K, gen)
        uniforms = ops.resample_uniforms(method, G, K, gen, "cpu")
        for threshold in (INF, 0.5):
            ref = reference.resample_ancestors(lw, uniforms, METHODS.index(method), threshold)
            out = backend_op("resample_ancestors", backend)(lw, uniforms, METHODS.index(method), threshold)
            assert_same_as_reference(out, ref)
            if threshold == INF:
                assert out[3].all()


def test_cpu_large_group_and_many_groups():
    gen = torch.Generator().manual_seed(case_seed("resample-large"))
    for G, K in [(1, 100_000), (3000, 33)]:
        lw = random_log_w(G, K, gen, spread=2.0)
        for method in METHODS:
            uniforms = ops.resample_uniforms(method, G, K, gen, "cpu")
            ref = reference.resample_ancestors(lw, uniforms, METHODS.index(method), INF)
            out = backend_op("resample_ancestors", "cpu")(lw, uniforms, METHODS.index(method), INF)
            assert_same_as_reference(out, ref)


def test_reference_weights_and_ess_against_float64():
    """The quantised pipeline against plain float64 softmax and 1 / sum w^2 (the truth it approximates)."""
    gen = torch.Generator().manual_seed(case_seed("resample-ess"))
    lw = random_log_w(64, 257, gen, spread=5.0).double()
    w = torch.softmax(lw, 1)
    q, degenerate = reference.quantized_weights(lw)
    assert not degenerate.any()
    # w_k to ~2^-19 relative (float32 rounding of lw_k - max, |.| <= 32) plus the floor: 2^-28 of the largest w
    err = (q.double() / q.sum(1, keepdim=True) - w).abs()
    assert (err <= 4e-6 * w + 2.0**-27 * w.amax(1, keepdim=True)).all()
    assert torch.allclose(reference.quantized_ess(q), 1 / (w * w).sum(1), rtol=1e-5, atol=0)
    out_lw, _, ess, _, log_norm = reference.resample_ancestors(lw, torch.rand(64, 1, dtype=torch.float64), 0, 0.0)
    assert out_lw.dtype == torch.float64 and ess.dtype == torch.float64
    assert torch.allclose(log_norm, torch.logsumexp(lw, 1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_particle_move(backend, dtype):
    """Flat, grouped and non-contiguous particles: out = old[ancestor_rows], survivors' slots untouched, the same
    as the gather move; in place."""
    G, K = 3, 9
    gen = torch.Generator().manual_seed(case_seed("resample-move", backend, dtype))
    lw = random_log_w(G, K, gen)
    for shape, layout in [((G * K, 3, 5), "flat"), ((G, K, 4), "grouped"), ((G * K,), "flat"), ((G * K, 6), "strided")]:
        base = torch.randn(shape if layout != "strided" else (shape[0], 2 * shape[1]), generator=gen).to(dtype)
        particles = base[:, ::2] if layout == "strided" else base.clone()
        assert layout != "strided" or not particles.is_contiguous()
        before, odd = particles.clone(), base[..., 1::2].clone()
        seed = case_seed("resample-move-draw", backend, dtype, layout)
        gathered = ops.resample(lw, particles.clone(), "multinomial", generator=torch.Generator().manual_seed(seed),
                                move="gather", backend=backend)
        out = ops.resample(lw, particles, "multinomial", generator=torch.Generator().manual_seed(seed),
                           backend=backend)
        assert out.particles is particles
        rows = ops.ancestor_rows(out.ancestors)
        assert torch.equal(particles.reshape(G * K, -1), before.reshape(G * K, -1)[rows])
        assert torch.equal(gathered.particles, particles)
        assert torch.equal(gathered.ancestors, out.ancestors)
        alive = out.ancestors == torch.arange(K)
        assert torch.equal(particles.reshape(G, K, -1)[alive], before.reshape(G, K, -1)[alive])
        if layout == "strided":
            assert torch.equal(base[..., 1::2], odd)  # the columns between the view's stay as they were


def test_ess_threshold(backend):
    """A group above the threshold is not resampled: particles bitwise untouched, identity ancestors, normalised
    log-weights; one below it is, and its log-weights are all -log K. Threshold 0 never resamples."""
    K = 16
    lw = torch.stack([torch.linspace(0, 0.5, K), torch.linspace(0, 12, K)])  # ESS/K ~ 0.98 and ~ 0.07
    particles = torch.randn(2 * K, 3, 3)
    particles[0, 0, 0] = float("nan")  # a NaN row is copied bitwise too
    before = particles.clone()
    out = ops.resample(lw, particles, ess_threshold=0.5, generator=torch.Generator().manual_seed(0), backend=backend)
    assert out.resampled.tolist() == [False, True]
    assert torch.equal(before[:K].view(torch.int32), particles[:K].view(torch.int32))
    assert torch.equal(out.ancestors[0], torch.arange(K))
    assert torch.allclose(out.log_w[0], lw[0] - torch.logsumexp(lw[0], 0), atol=1e-6)
    assert torch.allclose(out.log_w[1], torch.full((K,), -math.log(K)))
    assert not torch.equal(out.ancestors[1], torch.arange(K))
    assert torch.allclose(out.ess, 1 / (torch.softmax(lw.double(), 1) ** 2).sum(1).float(), rtol=1e-5)
    never = ops.resample(lw, particles.clone(), ess_threshold=0.0, generator=torch.Generator().manual_seed(0),
                         backend=backend)
    assert not never.resampled.any() and torch.equal(never.particles.view(torch.int32), particles.view(torch.int32))


def check_threshold_boundary(fn, device, seed):
    """Thresholds one float64 step either side of ESS / K: fn decides as the float64 reference (a threshold
    rounded to float32 anywhere would flip one of them)."""
    K = 37
    lw = torch.randn(3, K, generator=torch.Generator().manual_seed(seed))
    uniforms = torch.rand(3, 1, dtype=torch.float64)
    ess = reference.quantized_ess(reference.quantized_weights(lw)[0])  # float64, what the decision compares
    for group in range(3):
        above = below = ess[group].item() / K
        while not ess[group].item() < above * K:
            above = math.nextafter(above, 2.0)
        while ess[group].item() < below * K:
            below = math.nextafter(below, 0.0)
        for threshold, expected in [(above, True), (below, False)]:
            resampled = fn(lw.to(device), uniforms.to(device), 0, threshold)[3].cpu()
            assert resampled[group].item() is expected
            assert torch.equal(resampled, reference.resample_ancestors(lw, uniforms, 0, threshold)[3])


def test_decision_at_the_threshold_boundary(backend):
    check_threshold_boundary(backend_op("resample_ancestors", backend), "cpu", case_seed("resample-boundary", backend))


# Statistics: N_g = 4000 groups with the same weights in one call (one row of uniforms each: independent draws).
STAT_GROUPS = 4000
STAT_W = torch.tensor([0.3, 0.02, 0.15, 0.005, 0.2, 0.125, 0.1, 0.1], dtype=torch.float64)
# Two-sided z bound at a family-wise false-alarm rate of 1e-6 over 4 methods x 8 counts (Bonferroni):
# P(|Z| > 5.9) = 3.6e-9 <= 1e-6 / 32. The variance used, K w (1 - w), is the multinomial one, an upper bound for
# the other three schemes (stratified: sum_j p_j (1 - p_j) <= K w (1 - w) by convexity; systematic: <= 1/4;
# residual: r (1 - r / R) <= K w (1 - w), docs/smc.md), so the bound stays valid for each.
Z_BOUND = 5.9


def offspring(method, uniforms=None, seed=0):
    """(STAT_GROUPS, K) offspring counts of one call with STAT_W, and the weights the pipeline actually uses."""
    K = STAT_W.numel()
    lw = STAT_W.log().float().expand(STAT_GROUPS, K).contiguous()
    if uniforms is None:
        uniforms = ops.resample_uniforms(method, STAT_GROUPS, K, torch.Generator().manual_seed(seed), "cpu")
    _, ancestors, *_ = torch.ops.diffsampler.resample_ancestors(lw, uniforms, METHODS.index(method), INF)
    counts = torch.zeros(STAT_GROUPS, K, dtype=torch.float64).scatter_add_(1, ancestors,
                                                                          torch.ones(STAT_GROUPS, K).double())
    q, _ = reference.quantized_weights(lw[:1])
    return counts, (q / q.sum()).double()[0]


def max_z(counts, w):
    """max_k |mean N_k - K w_k| / sqrt(K w_k (1 - w_k) / n)."""
    K, n = w.numel(), counts.shape[0]
    return ((counts.mean(0) - K * w).abs() / (K * w * (1 - w) / n).sqrt()).max().item()


@pytest.mark.parametrize("method", METHODS)
def test_unbiased_offspring_counts(method):
    counts, w = offspring(method, seed=11)
    assert (counts.sum(1) == STAT_W.numel()).all()
    assert max_z(counts, w) < Z_BOUND


def test_unbiasedness_check_catches_a_biased_scheme():
    """Stratified with U^2 in each stratum (draws pulled to the stratum starts): the same bound must fail."""
    uniforms = torch.rand(STAT_GROUPS, STAT_W.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    counts, w = offspring("stratified", uniforms=uniforms**2)
    assert max_z(counts, w) > Z_BOUND


def test_variance_ordering():
    """Var N_k summed over k: systematic, stratified and residual at most multinomial's (sample variances over
    4000 groups; multinomial's is K (1 - sum w^2) = 6.49 here, the others are below 2.5)."""
    var = {m: offspring(m, seed=5)[0].var(0).sum().item() for m in METHODS}
    K = STAT_W.numel()
    assert abs(var["multinomial"] - K * (1 - (STAT_W**2).sum().item())) < 0.3
    for m in ("systematic", "stratified", "residual"):
        assert var[m] <= var["multinomial"], var


def test_degenerate_groups_reset_to_uniform(backend):
    K = 5
    lw = torch.randn(4, K)
    lw[0] = -INF
    lw[1, 2] = float("nan")
    lw[2, 1] = INF
    out = ops.resample(lw, torch.randn(4 * K, 2), ess_threshold=0.5, backend=backend)
    assert torch.isnan(out.log_norm[:3]).all() and torch.isfinite(out.log_norm[3])
    assert torch.allclose(out.log_w[:3], torch.full((3, K), -math.log(K)))
    assert torch.allclose(out.ess[:3], torch.full((3,), float(K)))
    assert not out.resampled[:3].any()
    with pytest.raises(ValueError, match=r"log_w: group\(s\) \[0, 1, 2\]"):
        ops.resample(lw, torch.randn(4 * K, 2), check=True, backend=backend)


def test_one_particle_per_group_is_the_identity():
    lw = torch.randn(6, 1)
    particles = torch.randn(6, 3)
    before = particles.clone()
    for method in METHODS:
        out = ops.resample(lw, particles, method)
        assert torch.equal(out.ancestors, torch.zeros(6, 1, dtype=torch.int64))
        assert torch.equal(particles, before) and torch.equal(out.log_w, torch.zeros(6, 1))
        assert torch.allclose(out.ess, torch.ones(6))


def test_bad_input():
    lw, particles = torch.randn(2, 4), torch.randn(8, 3)
    with pytest.raises(ValueError, match=r"method must be one of \('systematic', 'stratified', 'multinomial', "
                                         r"'residual'\)"):
        ops.resample(lw, particles, "bernoulli")
    for bad in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="ess_threshold must be None"):
            ops.resample(lw, particles, ess_threshold=bad)
    with pytest.raises(ValueError, match=r"particles must have shape \(G\*K, \.\.\.\) = \(8, \.\.\.\)"):
        ops.resample(lw, torch.randn(7, 3))
    with pytest.raises(ValueError, match=r"particles must have shape"):
        ops.resample(lw, torch.randn(4, 2, 3))
    with pytest.raises(ValueError, match=r"log_w must be a \(G, K\) tensor"):
        ops.resample(torch.randn(2, 2, 2), particles)  # (1-D log_w is one group: test_validation.py)
    with pytest.raises(ValueError, match="log_w must be float32 or float64"):
        ops.resample(lw.half(), particles)
    with pytest.raises(ValueError, match="at most 131072 particles per group"):
        ops.resample(torch.zeros(1, 131073), torch.zeros(131073))
    with pytest.raises(ValueError, match=r"move must be one of \('inplace', 'gather'\)"):
        ops.resample(lw, particles, move="copy")
    with pytest.raises(ValueError, match="backend 'cpu' takes float32 log_w"):
        ops.resample(lw.double(), particles, backend="cpu")
    with pytest.raises(RuntimeError, match="uniforms must be float64"):
        torch.ops.diffsampler.resample_ancestors(lw, torch.rand(2, 1), 0, 0.5)


def test_float64_log_weights_run_on_the_reference():
    lw = torch.randn(3, 6, dtype=torch.float64)
    out = ops.resample(lw, torch.randn(18), "residual", generator=torch.Generator().manual_seed(1))
    assert out.log_w.dtype == torch.float64 and out.ess.dtype == torch.float64
    again = ops.resample(lw.float(), torch.randn(18), "residual", generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.ancestors, again.ancestors)


def test_reproducible_and_sync_free():
    """Same generator seed, same result; no op that synchronises unless check=True."""
    lw, particles = torch.randn(3, 10), torch.randn(30, 4)
    runs = [ops.resample(lw, particles.clone(), "stratified", 0.7, torch.Generator().manual_seed(9)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    syncing = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::nonzero"}
    with OpCounter() as counter:
        ops.resample(lw, particles, "systematic", 0.5, backend="cpu")
    assert counter.ops["diffsampler::resample_ancestors"] == 1 and counter.ops["diffsampler::resample_move"] == 1
    assert not syncing & set(counter.ops)
    with OpCounter() as counter:
        ops.resample(lw, particles, "systematic", 0.5, backend="cpu", check=True)
    assert syncing & set(counter.ops)


def test_opcheck():
    """torch.library.opcheck of the compiled ops on the samples of test_samples_match_reference."""
    for args in resample_samples():
        torch.library.opcheck(torch.ops.diffsampler.resample_ancestors.default, args)
        _, ancestors, _, resampled, _ = torch.ops.diffsampler.resample_ancestors(*args)
        particles = torch.randn(ancestors.numel(), 4)
        torch.library.opcheck(torch.ops.diffsampler.resample_move.default, (particles, ancestors, resampled))


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("method", METHODS)
def test_cuda_identical_ancestors(method):
    from diffsampler import _cuda_jit

    ok, why = _cuda_jit.load()
    assert ok, why
    for G, K in [(1, 1), (3, 2), (5, 7), (4, 64), (2, 1031), (1, 100_000), (3000, 33)]:
        gen = torch.Generator().manual_seed(case_seed("resample-cuda", method, G, K))
        lw = random_log_w(G, K, gen)
        uniforms = ops.resample_uniforms(method, G, K, gen, "cpu")
        for threshold in (INF, 0.5):
            ref = reference.resample_ancestors(lw, uniforms, METHODS.index(method), threshold)
            out = torch.ops.diffsampler.resample_ancestors(lw.cuda(), uniforms.cuda(), METHODS.index(method),
                                                           threshold)
            assert_same_as_reference([t.cpu() for t in out], ref)
            if K <= 1031 and ops.backends()["triton"]:  # (the Triton kernels compiled for the GPU)
                tri = ds.triton_kernels.resample_ancestors(lw.cuda(), uniforms.cuda(), METHODS.index(method),
                                                           threshold)
                assert_same_as_reference([t.cpu() for t in tri], ref)


@pytest.mark.gpu
@gpu
def test_cuda_decision_at_the_threshold_boundary():
    check_threshold_boundary(torch.ops.diffsampler.resample_ancestors, "cuda", case_seed("resample-boundary-cuda"))
    if ops.backends()["triton"]:
        check_threshold_boundary(ds.triton_kernels.resample_ancestors, "cuda", case_seed("resample-boundary-tr"))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_move_and_graph_capture(dtype):
    """The move on CUDA (flat rows of several alignments, non-contiguous), opcheck of the CUDA and Triton ops, the
    whole op captured in a CUDA graph."""
    G, K = 4, 33
    for shape in [(G * K, 4, 9, 9), (G * K, 3), (G * K,), (G, K, 5)]:
        lw = torch.randn(G, K, device="cuda") * 3
        particles = torch.randn(shape, device="cuda").to(dtype)
        before = particles.clone()
        out = ops.resample(lw, particles, "residual", 0.9, backend="cuda")
        assert torch.equal(particles.reshape(G * K, -1), before.reshape(G * K, -1)[ops.ancestor_rows(out.ancestors)])
    strided = torch.randn(G * K, 8, device="cuda").to(dtype)[:, ::2]
    before = strided.clone()
    out = ops.resample(torch.randn(G, K, device="cuda") * 3, strided, backend="cuda")
    assert torch.equal(strided, before[ops.ancestor_rows(out.ancestors)])
    lw = torch.randn(G, K, device="cuda") * 3
    particles = torch.randn(G * K, 16, device="cuda").to(dtype)
    uniforms = ops.resample_uniforms("residual", G, K, None, "cuda")
    torch.library.opcheck(torch.ops.diffsampler.resample_ancestors.default, (lw, uniforms, 3, 0.9))
    anc, res = torch.ops.diffsampler.resample_ancestors(lw, uniforms, 3, INF)[1:4:2]
    torch.library.opcheck(torch.ops.diffsampler.resample_move.default, (particles.clone(), anc, res))
    if ops.backends()["triton"]:
        import diffsampler.triton_kernels.resample  # noqa: F401  (registers the Triton ops; under the CPU
        # interpreter their fake tensors reach the interpreter, so they are checked here only)

        torch.library.opcheck(torch.ops.diffsampler.resample_ancestors_triton.default, (lw, uniforms, 3, 0.9))
        torch.library.opcheck(torch.ops.diffsampler.resample_move_triton.default, (particles.clone(), anc, res))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.resample(lw, particles.clone(), "systematic", 0.5, backend="cuda")  # the default generator: captured
    torch.cuda.current_stream().wait_stream(side)
    before = particles.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.resample(lw, particles, "systematic", 0.5, backend="cuda")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(particles, before[ops.ancestor_rows(out.ancestors)])
    ess = 1 / (torch.softmax(lw.double(), 1) ** 2).sum(1)
    assert torch.allclose(out.ess.double(), ess, rtol=1e-5)
    assert torch.equal(out.resampled, out.ess < 0.5 * K)
