"""The fused multistep update: every backend (the `backend` fixture: reference, C++ CPU, Triton) against the
float64 truth on the same inputs, dispatch, torch.library registration, and bad input."""

import pytest
import torch

import diffsampler as ds
from diffsampler import reference, step_row
from diffsampler.ops import StateRow, UpdateCoeffs
from update_cases import (DTYPES, HISTORY, ODD_SHAPES, STATE, VARIANT_SHAPES, VARIANTS, backend_op, case_seed as _seed,
                          check_backend, make_case, rel_err, update_samples, variant_case)

cpu_op = torch.ops.diffsampler.multistep_update


def test_samples_match_reference(backend):
    for args in update_samples():
        check_backend(backend_op("multistep_update", backend), args, args[0].dtype)


def test_opcheck():
    """torch.library.opcheck of the compiled op on the samples of test_samples_match_reference."""
    for args in update_samples():
        torch.library.opcheck(cpu_op, args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
@pytest.mark.parametrize("n_reads", [0, 1, 2, 3])
def test_matches_reference(backend, shape, dtype, n_reads):
    for noise in (True, False):
        check_backend(backend_op("multistep_update", backend),
                      make_case(shape, dtype, n_reads, noise=noise, seed=_seed(shape, dtype, n_reads, noise)), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants(backend, dtype, variant):
    for shape in VARIANT_SHAPES:
        check_backend(backend_op("multistep_update", backend),
                      variant_case(shape, dtype, variant, _seed(shape, dtype, variant)), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noncontiguous_history_against_reference(backend, dtype):
    """A history whose slots are strided views (slot index last in memory): reads and the m0 write."""
    for shape in [(7,), (2, 4, 9, 9)]:
        for kw in [dict(n_reads=3), dict(n_reads=2, threshold=True, slots=4), dict(n_reads=1, state=2, clip=0.8)]:
            args = make_case(shape, dtype, seed=_seed("strided-history", shape, dtype, str(kw)), **kw)
            strided = torch.empty((*shape, args[2].shape[0]), dtype=dtype).movedim(-1, 0)
            strided.copy_(args[2])
            assert not strided[args[3]].is_contiguous()
            args[2] = strided
            check_backend(backend_op("multistep_update", backend), args, dtype)


def test_threshold_acts_and_matches_diffusers_formula():
    """The bound really changes m0 here, and equals diffusers' _threshold_sample (torch.quantile)."""
    from diffusers import DDPMScheduler

    args = make_case((4, 3, 8, 8), torch.float32, 0, threshold=True, noise=False, seed=1)
    x, out = args[0], args[1]
    history = torch.zeros(1, *x.shape)
    coeffs = UpdateCoeffs(p=args[5][step_row.P], q=args[5][step_row.Q], a=0.0, b=(1.0,))
    got = ds.ops.multistep_update(x, out, coeffs, history=history, threshold_ratio=0.9, threshold_max=1.6)
    sched = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.6)
    expected = sched._threshold_sample(coeffs.p * x + coeffs.q * out)
    assert rel_err(got, expected) < 1e-6
    assert rel_err(got, coeffs.p * x + coeffs.q * out) > 1e-2  # thresholding changed the result
    assert torch.equal(history[0], got)


@pytest.mark.parametrize("ratio, max_value", [(0.0, 1.6), (0.9, 0.5), (0.0, 0.5)])
def test_threshold_bounds_diffusers_accepts(backend, ratio, max_value):
    """Quantile 0 and sample_max_value < 1 threshold as diffusers' _threshold_sample does (s = clamp(q, 1, max):
    max itself below 1); a ratio of 0 is thresholding, not "off"."""
    from diffusers import DDPMScheduler

    x, out = torch.randn(3, 2, 8, 8), 2.0 * torch.randn(3, 2, 8, 8)
    coeffs = UpdateCoeffs(p=0.5, q=1.0, a=0.0, b=(1.0,))
    sched = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value)
    expected = sched._threshold_sample(0.5 * x + out)
    got = ds.ops.multistep_update(x, out, coeffs, threshold_ratio=ratio, threshold_max=max_value, backend=backend)
    assert rel_err(got, expected) < 1e-6
    assert rel_err(ds.ops.multistep_update(x, out, coeffs), expected) > 1e-2


def test_threshold_acts_on_the_data_prediction_of_a_noise_history(backend):
    """coeffs.eps_of = (alpha, sigma): m_0 is a noise prediction; thresholding acts on x0 = (x - sigma eps) / alpha
    and the history and update get eps = (x - alpha x0) / sigma, as diffusers' noise-prediction solvers do."""
    from diffusers import DDPMScheduler

    alpha, sigma = 0.6, 0.8
    x, out = torch.randn(2, 3, 8, 8), 3.0 * torch.randn(2, 3, 8, 8)
    coeffs = UpdateCoeffs(p=0.0, q=1.0, a=1.1, b=(-0.4,), eps_of=(alpha, sigma))  # eps prediction: m_0 = out
    sched = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.2)
    eps = (x - alpha * sched._threshold_sample((x - sigma * out) / alpha)) / sigma
    history = torch.zeros(1, *x.shape)
    got = ds.ops.multistep_update(x, out, coeffs, history=history, threshold_ratio=0.9, threshold_max=1.2,
                                  backend=backend)
    assert rel_err(history[0], eps) < 1e-5
    assert rel_err(got, 1.1 * x - 0.4 * eps) < 1e-5
    functional = ds.ops.multistep_update(x, out, coeffs, threshold_ratio=0.9, threshold_max=1.2, backend=backend)
    assert rel_err(functional, got) < 1e-6
    unthresholded = ds.ops.multistep_update(x, out, coeffs)
    assert rel_err(unthresholded, 1.1 * x - 0.4 * out) < 1e-6  # eps_of changes nothing without thresholding


def test_reference_is_float64_capable():
    args = make_case((5, 6), torch.float64, 2, seed=3)
    out = reference.multistep_update(*args)
    assert out.dtype == torch.float64
    # auto dispatch sends float64 to the reference, bit for bit
    a = list(args)
    k = step_row.fields(a[5])
    c = UpdateCoeffs(p=k.p, q=k.q, a=k.a, e=k.e, c=k.c, b=k.b[:3], r=k.r[:2])
    h = a[2].clone()
    got = ds.ops.multistep_update(a[0], a[1], c, history=h, write_slot=a[3], read_slots=a[4], noise=a[6])
    assert torch.equal(got, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic(backend, dtype):
    op = backend_op("multistep_update", backend)
    for shape, kw in [((3, 1000), dict(n_reads=3, threshold=True, slots=4)), ((2, 3, 37), dict(n_reads=3)),
                      ((2, 3, 37), dict(n_reads=2, threshold=True, slots=4, state=2))]:
        args = make_case(shape, dtype, seed=_seed("determinism", shape, dtype, str(kw)), **kw)
        runs = []
        for _ in range(2):
            a = [t.clone() if isinstance(t, torch.Tensor) else t for t in args]
            runs.append((op(*a), a[HISTORY], a[STATE]))
        (x1, h1, s1), (x2, h2, s2) = runs
        assert torch.equal(x1, x2) and torch.equal(h1, h2)
        assert s1 is None or torch.equal(s1, s2)


def test_noncontiguous_history_slot_is_written_in_place(backend):
    x = torch.randn(2, 3, 5)
    out = torch.randn(2, 3, 5)
    base = torch.zeros(2, 3, 5, 2)  # slot axis last: every slot view is non-contiguous
    history = base.movedim(-1, 0)
    assert not history[0].is_contiguous()
    coeffs = UpdateCoeffs(p=0.5, q=2.0, a=1.0, b=(1.0,))
    ds.ops.multistep_update(x, out, coeffs, history=history, write_slot=1, backend=backend)
    assert torch.allclose(base[..., 1], 0.5 * x + 2.0 * out, rtol=1e-6, atol=1e-6)
    assert torch.equal(base[..., 0], torch.zeros(2, 3, 5))


def test_backends_reports_reasons():
    b = ds.backends()
    assert b["reference"] and b["cpu"]
    for name in ("cuda", "triton"):
        assert b[name] or name in b["reasons"]
    if not torch.cuda.is_available():
        assert not b["cuda"] and "CUDA" in b["reasons"]["cuda"]


def test_forced_backend_errors():
    x = torch.randn(4)
    c = UpdateCoeffs(p=1.0, q=0.0, a=1.0, b=(0.0,))
    with pytest.raises(ValueError, match="backend must be one of"):
        ds.ops.multistep_update(x, x, c, backend="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA tensors"):
            ds.ops.multistep_update(x, x, c, backend="cuda")
    with pytest.raises(ValueError, match="float64"):
        ds.ops.multistep_update(x.double(), x.double(), c, backend="cpu")


def test_compile_fullgraph_loop():
    """torch.compile(fullgraph=True) traces a loop of fused updates (no graph break) and gives the eager numbers."""
    coeffs = [UpdateCoeffs(p=1.0 + 0.1 * i, q=-0.5, a=0.9, b=(0.3, 0.1)) for i in range(4)]

    def loop(x, history):
        for i, c in enumerate(coeffs):
            out = torch.tanh(x)
            x = ds.ops.multistep_update(x, out, c, history=history, write_slot=i % 2, read_slots=[(i + 1) % 2],
                                        check_nan=False)
        return x

    x = torch.randn(2, 4, 8)
    h_eager, h_comp = torch.zeros(2, 2, 4, 8), torch.zeros(2, 2, 4, 8)
    expected = loop(x, h_eager)
    torch._dynamo.reset()
    got = torch.compile(loop, fullgraph=True, backend="aot_eager")(x, h_comp)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert torch.allclose(h_comp, h_eager, rtol=1e-6, atol=1e-6)


# --- bad input: a ValueError that names the argument ---------------------------------------------------------


def _good():
    x = torch.randn(2, 3)
    return dict(x=x, model_out=torch.randn(2, 3), coeffs=UpdateCoeffs(p=1.0, q=-0.5, a=0.9, b=(0.3, 0.1)),
                history=torch.zeros(2, 2, 3), write_slot=0, read_slots=[1])


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(model_out=torch.randn(2, 4)), "model_out must have shape"),
        (dict(model_out=torch.randn(2, 3, dtype=torch.float64)), "model_out must have x's dtype"),
        (dict(model_out=torch.randn(2, 3, device="meta")), "model_out must be on x's device"),
        (dict(history=torch.zeros(2, 2, 4)), "history must have shape"),
        (dict(history=torch.zeros(2, 2, 3, dtype=torch.float16)), "history must have x's dtype"),
        (dict(history=torch.zeros(2, 3)), "history must be a tensor of shape"),
        (dict(history=torch.zeros(5, 2, 3), read_slots=[1, 2, 3, 4],
              coeffs=UpdateCoeffs(p=1, q=0, a=1, b=(1, 1, 1, 1, 1))), "read_slots: at most 3"),
        (dict(read_slots=[0]), "read_slots must be in"),
        (dict(write_slot=2), "write_slot must be in"),
        (dict(coeffs=UpdateCoeffs(p=1, q=0, a=1, b=(1,))), r"coeffs.b must have 1 \+ len\(read_slots\) = 2 entries"),
        (dict(coeffs=(1.0, 0.0)), "coeffs must be an UpdateCoeffs"),
        (dict(history=None, read_slots=[], coeffs=UpdateCoeffs(p=1, q=0, a=1, b=(1,), r=(0.5,))),
         r"coeffs.r weighs history reads in m_0: at most len\(read_slots\) = 0"),
        (dict(coeffs=UpdateCoeffs(p=1, q=0, a=1, b=(1, 1), c=0.5)), "noise is required"),
        (dict(noise=torch.randn(3, 2)), "noise must have shape"),
        (dict(history=None), "read_slots given without a history"),
        (dict(x=torch.randn(2, 3).int()), "x must be float32"),
        (dict(model_out=torch.tensor([[0.0, float("nan"), 1.0], [0.0, 0.0, 0.0]])), "model_out contains non-finite"),
        (dict(threshold_ratio=1.5), r"threshold_ratio must be None \(no thresholding\) or a quantile in \[0, 1\]"),
        (dict(threshold_ratio=-0.1), "threshold_ratio must be None"),
        (dict(threshold_ratio=True), "threshold_ratio must be None"),
        (dict(threshold_ratio=0.9, threshold_max=0.0), "threshold_max must be a number > 0"),
        (dict(threshold_ratio=0.9, threshold_max=float("nan")), "threshold_max must be a number > 0"),
        (dict(clip=1.0, coeffs=UpdateCoeffs(p=1, q=0, a=1, b=(1, 1), eps_of=(0.6, 0.8))),
         "clip acts on the data prediction"),
        (dict(clip=-1.0), "clip must be > 0"),
        (dict(coeffs=UpdateCoeffs(p=1, q=0, a=1, b=(1, 1), g=0.5)), "state is required"),
        (dict(state=torch.randn(2, 4), coeffs=UpdateCoeffs(p=1, q=0, a=1, b=(1, 1), g=0.5)), "state must have shape"),
        (dict(state=torch.randn(2, 3), coeffs=UpdateCoeffs(p=1, q=0, a=1, b=(1, 1), state=StateRow(a=1, b=(1,)))),
         "coeffs.state.b must have 2 entries"),
        (dict(state=torch.randn(2, 3), coeffs=UpdateCoeffs(p=1, q=0, a=1, b=(1, 1), state=StateRow(a=1, b=(1, 0),
                                                                                                   c=1.0))),
         "noise is required"),
    ],
)
def test_bad_input(change, match):
    kw = _good()
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        ds.ops.multistep_update(kw.pop("x"), kw.pop("model_out"), kw.pop("coeffs"), **kw)


def test_state_row_updates_state_in_place(backend):
    """UniPC-like use: x' and the state both from the old state and the history, in one call."""
    x, out, st = torch.randn(3, 7), torch.randn(3, 7), torch.randn(3, 7)
    history = torch.randn(2, 3, 7)
    coeffs = UpdateCoeffs(p=0.5, q=-1.0, a=0.0, b=(0.2, 0.3), g=0.7, state=StateRow(a=0.1, b=(0.4, -0.2), g=0.9))
    m0 = 0.5 * x - out
    expected_x = 0.2 * m0 + 0.3 * history[1] + 0.7 * st
    expected_s = 0.1 * x + 0.4 * m0 - 0.2 * history[1] + 0.9 * st
    s, h = st.clone(), history.clone()
    got = ds.ops.multistep_update(x, out, coeffs, history=h, write_slot=0, read_slots=[1], state=s, backend=backend)
    assert torch.allclose(got, expected_x, atol=1e-6) and torch.allclose(s, expected_s, atol=1e-6)


def test_nan_check_can_be_skipped():
    kw = _good()
    kw["model_out"][0, 0] = float("nan")
    out = ds.ops.multistep_update(kw.pop("x"), kw.pop("model_out"), kw.pop("coeffs"), check_nan=False, **kw)
    assert torch.isnan(out[0, 0])  # documented: the caller opted out, NaN propagates


# --- on a GPU (marked gpu): the CPU cases above as CUDA tensors, strides kept, on the CUDA and Triton kernels --


@pytest.mark.gpu
def test_samples_match_reference_on_gpu(gpu_backend):
    from test_cuda import to_cuda

    for args in update_samples():
        check_backend(backend_op("multistep_update", gpu_backend), to_cuda(args), args[0].dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_variants_and_strided_history_on_gpu(gpu_backend, dtype):
    """test_variants and test_noncontiguous_history_against_reference as CUDA tensors."""
    from test_cuda import to_cuda

    op = backend_op("multistep_update", gpu_backend)
    for variant in VARIANTS:
        for shape in VARIANT_SHAPES:
            check_backend(op, to_cuda(variant_case(shape, dtype, variant, _seed("gpu", shape, dtype, variant))), dtype)
    for shape in [(7,), (2, 4, 9, 9)]:
        args = make_case(shape, dtype, n_reads=2, state=2, seed=_seed("gpu-strided-history", shape, dtype))
        strided = torch.empty((*shape, args[2].shape[0]), dtype=dtype).movedim(-1, 0)
        strided.copy_(args[2])
        args[2] = strided
        args = to_cuda(args)
        assert not args[2][args[3]].is_contiguous()
        check_backend(op, args, dtype)
