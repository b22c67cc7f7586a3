"""Random operands of the fused multistep update and the error bounds of design.md, shared by the backend tests."""

from __future__ import annotations

import os
import random
import zlib

import torch

from diffsampler import reference, step_row
from diffsampler.ops import StateRow, UpdateCoeffs, registry

# ||out - ref|| / ||ref|| against the float64 reference (design.md section 1)
BOUNDS = {torch.float32: 1e-6, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = list(BOUNDS)
# Fresh random inputs every run; rerun one with DIFFSAMPLER_TEST_SEED=<the seed in pytest's header>.
SESSION_SEED = int(os.environ.get("DIFFSAMPLER_TEST_SEED", random.SystemRandom().randrange(2**31)))
ODD_SHAPES = [(1,), (7,), (1023,), (65537,), (3, 5, 7, 11), (2, 4, 9, 9)]


def case_seed(*parts) -> int:
    """The seed of one test case: the session seed mixed with the case's parameters."""
    return (zlib.crc32(repr(parts).encode()) ^ SESSION_SEED) % 2**31


def rel_err(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """||out - ref|| / ||ref||; with `scale`, relative to max(||ref||, ||scale||) instead."""
    assert not torch.isnan(out).any(), "NaN in output"
    out, ref = out.double().cpu(), ref.double().cpu()
    denom = ref.norm() if scale is None else torch.maximum(ref.norm(), scale.double().cpu().norm())
    return ((out - ref).norm() / denom.clamp_min(1e-30)).item()


def _operand(shape, dtype, gen, noncontig):
    """A random tensor of `shape`; a strided view (every other column of a wider tensor) if noncontig."""
    if not noncontig:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    wide = torch.randn((*shape[:-1], 2 * shape[-1]), generator=gen, dtype=torch.float64).to(dtype)
    view = wide[..., ::2]
    assert not view.is_contiguous() or shape[-1] == 1
    return view


# Positions of multistep_update's schema arguments in a case (LML's dirs, dir_slot, dir_coeffs, dir_weights follow,
# then the guide).
HISTORY, COEFFS, CLIP, STATE, GUIDE = 2, 5, 7, 9, 14


def writes_state(args) -> bool:
    """Whether the case's step row rewrites the state."""
    return args[COEFFS][step_row.WRITES_STATE] != 0


def make_case(shape, dtype, n_reads=2, noise=True, noncontig=False, clip=0.0, threshold=False, slots=None, seed=0,
              state=0, threshold_coeffs=(0.9, 1.6, 0.0, 1.0), guide=False):
    """Operands and the step row of one multistep_update call, as the positional arguments of the schema
    (x, model_out, history, write_slot, read_slots, coeffs, noise, clip, thresholding, state), and with guide
    the 15 of a guided call (no LML: dirs None, then a random guide and the row's guide weight).
    state: 0 none, 1 a state read (x' += g s), 2 a state read and rewritten with its own row.
    threshold_coeffs: the row's [ratio, max_value, hx, hm] in a thresholded case (hx, hm: the history value
    hx x + hm x0)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    slots = slots if slots is not None else n_reads + 1
    x = _operand(shape, dtype, gen, noncontig)
    out = _operand(shape, dtype, gen, noncontig)
    history = torch.randn((slots, *shape), generator=gen, dtype=torch.float64).to(dtype)
    write_slot = rng.randrange(slots)
    read_slots = rng.sample([s for s in range(slots) if s != write_slot], n_reads)
    u = lambda m: tuple(rng.uniform(-1.5, 1.5) for _ in range(m))  # noqa: E731
    p, q, a, e, c = u(5)
    if threshold:
        p, q = 1.0, 1.5  # push |m0| past 1 so the bound acts
    s_row = StateRow(a=u(1)[0], b=u(n_reads + 1), e=u(1)[0], c=u(1)[0], g=u(1)[0]) if state == 2 else None
    coeffs = UpdateCoeffs(p=p, q=q, a=a, e=e, c=c, b=u(n_reads + 1), r=u(n_reads), g=u(1)[0] if state else 0.0,
                          state=s_row)
    row = step_row.row(coeffs)
    if threshold:
        row[step_row.THR_RATIO:step_row.THR_HM + 1] = [float(v) for v in threshold_coeffs]
    z = _operand(shape, dtype, gen, noncontig) if noise else None
    s = _operand(shape, dtype, gen, noncontig) if state else None
    if not guide:
        return [x, out, history, write_slot, read_slots, row, z, clip, threshold, s]
    row[step_row.GUIDE] = u(1)[0]
    return [x, out, history, write_slot, read_slots, row, z, clip, threshold, s, None, 0, [], None,
            _operand(shape, dtype, gen, noncontig)]


VARIANTS = ["noncontig", "clip", "threshold", "threshold_no_history", "no_history", "state_read", "state_row",
            "state_row_threshold", "state_noncontig", "threshold_eps", "threshold_eps_no_history",
            "threshold_quantile0", "threshold_max_below_1", "guide", "guide_noncontig", "guide_threshold_eps",
            "guide_state_row_no_history"]
# the thresholded data prediction mapped to a noise prediction (hx, hm) = (1 / sigma, -alpha / sigma), and the
# bounds diffusers allows: quantile 0 (the smallest |x0|, clamped to >= 1) and sample_max_value < 1 (s = max)
THRESHOLD_VARIANTS = {"threshold_eps": (0.9, 1.6, 1.25, -0.75), "threshold_quantile0": (0.0, 1.6, 0.0, 1.0),
                      "threshold_max_below_1": (0.9, 0.5, 0.0, 1.0)}
VARIANT_SHAPES = [(1,), (7,), (3, 5, 7, 11), (2, 4, 9, 9)]


def variant_case(shape, dtype, variant: str, seed: int):
    """The operands of one named variant (VARIANTS) of the update, shared by every backend's tests."""
    if variant.startswith("guide"):  # out + w guide in every term: with clip, thresholding, a state row
        args = make_case(shape, dtype, 0 if variant.endswith("no_history") else 2, noncontig="noncontig" in variant,
                         clip=0.8 if variant == "guide" else 0.0, threshold="threshold" in variant, slots=4,
                         seed=seed, state=2 if "state" in variant else 0, guide=True,
                         threshold_coeffs=THRESHOLD_VARIANTS["threshold_eps"])
        if variant.endswith("no_history"):
            args[2] = None
        return args
    if variant == "noncontig":
        return make_case(shape, dtype, 2, noncontig=True, seed=seed)
    if variant == "clip":
        return make_case(shape, dtype, 2, clip=0.7, seed=seed)
    if variant == "threshold":
        return make_case(shape, dtype, 2, threshold=True, slots=4, seed=seed)
    if variant in THRESHOLD_VARIANTS:
        return make_case(shape, dtype, 2, threshold=True, slots=4, seed=seed,
                         threshold_coeffs=THRESHOLD_VARIANTS[variant])
    if variant.startswith("state"):
        return make_case(shape, dtype, 3, state=1 if variant == "state_read" else 2, seed=seed,
                         threshold=variant.endswith("threshold"), noncontig=variant.endswith("noncontig"))
    args = make_case(shape, dtype, 0, threshold=variant.startswith("threshold"), seed=seed,
                     threshold_coeffs=THRESHOLD_VARIANTS["threshold_eps"] if "eps" in variant else (0.9, 1.6, 0.0, 1.0))
    args[2] = None
    return args


def reference_result(args):
    """(x_next, history, scale, history_scale, state, state_scale) of the float64 reference on a copy of
    `args` (the history and the state are mutated).

    scale = the same update on |operands| and |coeffs| without clip/threshold: elementwise, the sum of the
    magnitudes of the terms of x'. A kernel computing in fp32 is accurate relative to it, not to x' itself,
    where terms cancel (a one-element x' near 0), so the bound is checked relative to max(||x'||, ||scale||).
    """
    a = [t.double().clone() if isinstance(t, torch.Tensor) else t for t in args]
    x_next = reference.multistep_update(*a)
    b = [t.double().abs() if isinstance(t, torch.Tensor) else t for t in args]
    b[COEFFS] = [abs(c) for c in args[COEFFS]]
    b[CLIP:STATE] = [0.0, False]
    scale = reference.multistep_update(*b)
    return x_next, a[HISTORY], scale, b[HISTORY], a[STATE], b[STATE]


def check_backend(fn, args, dtype):
    """Run backend `fn` on a copy of `args` and assert x_next and the written slot meet the bound."""
    ref_x, ref_h, scale, h_scale, ref_s, s_scale = reference_result(args)
    a = list(args)
    for i in (HISTORY, STATE):
        a[i] = a[i].clone() if a[i] is not None else None
    got_x = fn(*a)
    assert got_x.dtype == args[0].dtype and got_x.shape == args[0].shape
    bound = BOUNDS[dtype]
    assert rel_err(got_x, ref_x, scale) < bound, rel_err(got_x, ref_x, scale)
    if a[2] is not None:
        w = args[3]
        assert rel_err(a[2][w], ref_h[w], h_scale[w]) < bound
        untouched = [s for s in range(a[2].shape[0]) if s != w]
        assert torch.equal(a[2][untouched], args[2][untouched]), "a slot other than write_slot was modified"
    if writes_state(args):
        assert rel_err(a[STATE], ref_s, s_scale) < bound
    elif a[STATE] is not None:
        assert torch.equal(a[STATE], args[STATE]), "a read-only state was modified"


def backend_op(op: str, backend: str):
    """The backend-level function of `op` on `backend`, with reference.<op>'s signature: the reference, the Triton
    function, or the compiled torch.ops.diffsampler.<op> (the table's entry, without the dispatch)."""
    entry = registry.OPS[op]
    if backend == "reference" or (backend == "triton" and entry.triton is None):
        return entry.reference
    if backend == "triton":
        return registry._triton(entry.triton)
    return getattr(torch.ops.diffsampler, op)


SAMPLE_KWARGS = [dict(), dict(threshold=True, slots=4), dict(noise=False), dict(n_reads=0, history=False),
                 dict(state=1), dict(state=2), dict(noncontig=True, state=2, clip=0.8), dict(guide=True),
                 dict(guide=True, n_reads=0, history=False), dict(guide=True, state=2, threshold=True, slots=4)]


def update_samples(shape=(2, 3, 5), dtypes=DTYPES, seed=7):
    """The sample inputs of multistep_update (the schema's positional arguments) that its correctness and opcheck
    tests share: random, with and without history (history=False), noise, thresholding and state, non-contiguous,
    per storage dtype."""
    samples = []
    for dtype in dtypes:
        for i, kw in enumerate(SAMPLE_KWARGS):
            kw = dict(kw)
            history = kw.pop("history", True)
            args = make_case(shape, dtype, seed=case_seed("sample", shape, dtype, i, seed), **kw)
            if not history:
                args[2] = None
            samples.append(args)
    return samples


def indexed_samples(steps, shape=(3, 2, 5), dtypes=DTYPES, seed=11):
    """The sample inputs of multistep_update_indexed (the schema's positional arguments, without status) for a
    StepTable `steps` with state, shared by its correctness and opcheck tests: each step of the table, random
    operands per storage dtype, with and without noise, one with strided model output; then per-sample steps
    (step of shape (B,): each sample at its own random step)."""
    samples = []
    n_steps = steps.coeffs.shape[0]
    for dtype in dtypes:
        gen = torch.Generator().manual_seed(case_seed("indexed-sample", shape, dtype, seed))
        rand = lambda *s: torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
        slots = steps.slots.max().item() + 1
        for i in range(n_steps):
            out = rand(*shape, 2)[..., 0] if i == 1 else rand(*shape)
            noise = rand(*shape) if i % 2 == 0 else None
            samples.append([rand(*shape), out, rand(slots, *shape), steps.coeffs, steps.slots, torch.tensor([i]),
                            steps.n_reads, noise, 0.7 if i == 2 else 0.0, rand(*shape)])
        for noisy in (True, False):
            step = torch.randint(0, n_steps, (shape[0],), generator=gen)
            samples.append([rand(*shape), rand(*shape), rand(slots, *shape), steps.coeffs, steps.slots, step,
                            steps.n_reads, rand(*shape) if noisy else None, 0.0 if noisy else 0.7, rand(*shape)])
    return samples


def resample_samples(seed=13):
    """The sample inputs of resample_ancestors (log_w, uniforms, method index, ess_threshold) shared by its
    correctness and opcheck tests: every method, groups of odd sizes, -inf log-weights, always / at a threshold."""
    from diffsampler import ops

    samples = []
    for G, K in [(1, 1), (3, 7), (2, 65)]:
        for m, method in enumerate(ops.RESAMPLE_METHODS):
            gen = torch.Generator().manual_seed(case_seed("resample-sample", G, K, method, seed))
            log_w = torch.randn(G, K, generator=gen) * 3
            log_w[:, 1:][torch.rand(G, K - 1, generator=gen) < 0.2] = -float("inf")
            uniforms = ops.resample_uniforms(method, G, K, gen, "cpu")
            samples += [[log_w, uniforms, m, float("inf")], [log_w, uniforms, m, 0.9]]
    return samples


# Positions of LML's arguments after the 10 of make_case (the schema's order).
DIRS, DIR_SLOT, DIR_COEFFS, DIR_WEIGHTS = 10, 11, 12, 13


def lml_case(shape, dtype, rank, n_reads, seed, *, history=True, clip=0.0, threshold=False, weights="float32",
             noncontig=False, noise=True, state=0, guide=False):
    """multistep_update's 14 positional arguments with a random ring of `rank` directions (a strided view when
    noncontig) and random per-sample weights (float32, float64 or None: d is only recorded); 15 with a guide."""
    assert history or n_reads == 0
    slots = max(n_reads + 1, 4 if threshold else 1)
    args = make_case(shape, dtype, n_reads, noise=noise, noncontig=noncontig, clip=clip, threshold=threshold,
                     slots=slots, seed=seed, state=state, guide=guide)
    if not history:
        args[2] = None
    gen = torch.Generator().manual_seed(seed + 1)
    rng = random.Random(seed + 1)
    width = 2 if noncontig else 1
    dirs = torch.randn((rank, *shape[:-1], width * shape[-1]), generator=gen, dtype=torch.float64).to(dtype)
    dirs = dirs[..., ::width]
    dir_coeffs = [rng.uniform(-1.5, 1.5) for _ in range(3 + n_reads)]
    w = None
    if weights is not None:
        w = torch.randn((shape[0], rank + 1), generator=gen, dtype=torch.float64).to(getattr(torch, weights))
    return args[:STATE + 1] + [dirs, rng.randrange(rank), dir_coeffs, w] + args[GUIDE:]


def gram_args(args):
    """lml_gram's arguments (x, model_out, history, read_slots, coeffs, clip, dirs, dir_coeffs, and the guide of a
    guided case) of an update case."""
    return [args[0], args[1], args[2], args[4], args[5], args[7], args[DIRS], args[DIR_COEFFS]] + args[GUIDE:]


LML_SAMPLE_KWARGS = [dict(), dict(state=2, threshold=True), dict(weights=None, history=False), dict(noncontig=True),
                     dict(guide=True, clip=0.7)]


def lml_samples(shape=(2, 3, 5), dtypes=DTYPES, seed=7):
    """The sample inputs of multistep_update with LML's ring (its 14 positional arguments; gram_args gives
    lml_gram's) shared by their correctness and opcheck tests: with and without history, weights, state and
    thresholding, non-contiguous, per storage dtype."""
    return [lml_case(shape, dtype, 2, 0 if kw.get("history") is False else 2,
                     case_seed("lml-sample", shape, dtype, i, seed), **kw)
            for dtype in dtypes for i, kw in enumerate(LML_SAMPLE_KWARGS)]
