"""Resampling, the SMC building block (docs/smc.md): resample, and its halves draw_ancestors (the decision on the
device) and move_particles (the in-place move)."""

from __future__ import annotations

import torch

from .. import error_flags, reference
from .backends import _select_backend
from .operands import _check_cpu_status, _has_data
from .registry import run

RESAMPLE_METHODS = reference.METHODS
RESAMPLE_MOVES = ("inplace", "gather")


class ResampleResult(tuple):
    """``(particles, log_w, ancestors, ess)``; unpacks as that 4-tuple. Also on device, without a sync:
    ``resampled`` (G,) bool, whether each group was resampled, and ``log_norm`` (G,), the logsumexp of the incoming
    log-weights (NaN for a degenerate group): summed over steps it is the log marginal-likelihood estimate."""

    def __new__(cls, particles, log_w, ancestors, ess, resampled, log_norm):
        self = super().__new__(cls, (particles, log_w, ancestors, ess))
        self.resampled, self.log_norm = resampled, log_norm
        return self

    particles = property(lambda self: self[0])
    log_w = property(lambda self: self[1])
    ancestors = property(lambda self: self[2])
    ess = property(lambda self: self[3])


def resample_uniforms(method: str, G: int, K: int, generator: torch.Generator | None,
                      device: torch.device) -> torch.Tensor:
    """The uniforms the kernels take, float64: (G, 1) for systematic, (G, K) for stratified, and (G, K) sorted per
    group for multinomial and residual (their draws are positions of sorted uniforms)."""
    u = torch.rand(G, 1 if method == "systematic" else K, dtype=torch.float64, generator=generator, device=device)
    return u.sort(1).values if method in ("multinomial", "residual") else u


def ancestor_rows(ancestors: torch.Tensor) -> torch.Tensor:
    """Global row indices (G K,) of within-group ancestors (G, K): row n K + ancestors[n, k] of the particles
    (G K, ...), e.g. for particles.index_select(0, rows) or a kernel reading particles[ancestors] directly."""
    G, K = ancestors.shape
    return (ancestors + K * torch.arange(G, device=ancestors.device)[:, None]).reshape(-1)


def _check_resample_args(log_w, particles, method, ess_threshold, move, backend) -> None:
    if not isinstance(log_w, torch.Tensor) or log_w.dim() != 2 or 0 in log_w.shape:
        raise ValueError(f"log_w must be a (G, K) tensor with G, K >= 1, got "
                         f"{tuple(log_w.shape) if isinstance(log_w, torch.Tensor) else type(log_w).__name__}")
    if log_w.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"log_w must be float32 or float64, got {log_w.dtype}")
    G, K = log_w.shape
    if K > reference.MAX_PARTICLES:
        raise ValueError(f"log_w: at most {reference.MAX_PARTICLES} particles per group, got K = {K}")
    if method not in RESAMPLE_METHODS:
        raise ValueError(f"method must be one of {RESAMPLE_METHODS}, got {method!r}")
    if ess_threshold is not None and not (isinstance(ess_threshold, (int, float)) and 0 <= ess_threshold <= 1):
        raise ValueError(f"ess_threshold must be None (always resample) or a number in [0, 1], got {ess_threshold!r}")
    if move not in RESAMPLE_MOVES:
        raise ValueError(f"move must be one of {RESAMPLE_MOVES}, got {move!r}")
    if not isinstance(particles, torch.Tensor):
        raise ValueError(f"particles must be a torch.Tensor, got {type(particles).__name__}")
    flat = particles.dim() >= 1 and particles.shape[0] == G * K
    if not (flat or (particles.dim() >= 2 and tuple(particles.shape[:2]) == (G, K))):
        raise ValueError(f"particles must have shape (G*K, ...) = ({G * K}, ...) or (G, K, ...) = ({G}, {K}, ...) "
                         f"for log_w of shape {(G, K)}, got {tuple(particles.shape)}")
    if particles.device != log_w.device:
        raise ValueError(f"particles must be on log_w's device {log_w.device}, got {particles.device}")
    if backend not in ("auto", "reference") and log_w.dtype != torch.float32:
        raise ValueError(f"backend {backend!r} takes float32 log_w; got {log_w.dtype} (use backend='reference')")


def draw_ancestors(log_w: torch.Tensor, method: str, ess_threshold: float | None,
                   generator: torch.Generator | None, backend: str = "auto") -> tuple[str, tuple]:
    """The decision half of `resample` on checked arguments: draws the uniforms from `generator` and runs the
    backend's resample_ancestors; returns (backend name, (log_w_out, ancestors, ess, resampled, log_norm))."""
    G, K = log_w.shape
    uniforms = resample_uniforms(method, G, K, generator, log_w.device)
    status = error_flags.default(log_w.device)
    args = (log_w, uniforms, RESAMPLE_METHODS.index(method), float("inf") if ess_threshold is None
            else float(ess_threshold), status)
    name = _select_backend(backend, log_w)
    return name, run("resample_ancestors", name, *args)


def move_particles(name: str, particles: torch.Tensor, ancestors: torch.Tensor, resampled: torch.Tensor,
                   status: torch.Tensor | None = None) -> None:
    """In place: particles[n K + k] = particles[n K + ancestors[n, k]] where ancestors[n, k] != k in resampled
    groups (the move half of `resample`, on backend `name`); sources must be rows that are not written.

    ancestors (G, K) int64 and resampled (G,) bool on particles' device. An ancestor of a resampled group outside
    [0, K) is clamped into the group and sets a bit of `status` (None: error_flags.default of the device);
    CPU tensors raise at once."""
    if not (isinstance(ancestors, torch.Tensor) and ancestors.dtype == torch.int64 and ancestors.dim() == 2
            and 0 not in ancestors.shape):
        raise ValueError(f"ancestors must be a (G, K) int64 tensor with G, K >= 1, got "
                         f"{getattr(ancestors, 'dtype', type(ancestors).__name__)} "
                         f"{tuple(getattr(ancestors, 'shape', ()))}")
    G, K = ancestors.shape
    if not (isinstance(resampled, torch.Tensor) and resampled.dtype == torch.bool and tuple(resampled.shape) == (G,)):
        raise ValueError(f"resampled must be a ({G},) bool tensor, got {getattr(resampled, 'dtype', resampled)}")
    if not isinstance(particles, torch.Tensor) or not (
            (particles.dim() >= 1 and particles.shape[0] == G * K)
            or (particles.dim() >= 2 and tuple(particles.shape[:2]) == (G, K))):
        raise ValueError(f"particles must have shape (G*K, ...) = ({G * K}, ...) or (G, K, ...) = ({G}, {K}, ...), "
                         f"got {tuple(getattr(particles, 'shape', ()))}")
    if ancestors.device != particles.device or resampled.device != particles.device:
        raise ValueError(f"ancestors and resampled must be on particles' device {particles.device}")
    status = error_flags.validate(status, particles.device)
    ancestors, resampled = ancestors.contiguous(), resampled.contiguous()
    run("resample_move", name, particles, ancestors, resampled, status)
    _check_cpu_status(name, status)


def resample(
    log_w: torch.Tensor,
    particles: torch.Tensor,
    method: str = "systematic",
    ess_threshold: float | None = None,
    generator: torch.Generator | None = None,
    *,
    move: str = "inplace",
    check: bool = False,
    backend: str = "auto",
) -> ResampleResult:
    """Resample G groups of K particles by their log-weights; returns (particles, log_w, ancestors, ess).

        w = softmax(log_w) per group,  ESS = 1 / sum_k w_k^2,  resampled = ESS < ess_threshold K  (None: always)
        ancestors[n, k] = a: particle k of group n is now the old particle a of the same group (within-group
        index; ancestor_rows gives the global rows); = k where nothing was resampled
        log_w out: -log K in resampled groups, log_w - logsumexp(log_w) (normalised) in the others
        result.log_norm = logsumexp(log_w) per group; result.resampled the (G,) bool decision

    method: "systematic" (u_k = (k + U) / K), "stratified" (u_k = (k + U_k) / K), "multinomial" (K sorted
    uniforms), "residual" (floor(K w_k) copies, the remainder multinomial); the uniforms come from `generator`
    and every backend gives the same ancestors from them. The decision is taken on the device: no host sync.

    particles: (G*K, ...) (group-major) or (G, K, ...), any dtype. move="inplace" (default) overwrites only the
    slots of particles without offspring, in `particles` itself (survivors keep their slots: ancestors[n, k] = k
    whenever particle k has offspring), and returns it; move="gather" returns a new tensor particles[rows] and
    leaves `particles` unchanged.

    A group with a NaN or +inf log-weight, or all -inf, is degenerate: its weights are reset to uniform on the
    device (its log_norm is NaN). check=True raises a ValueError naming such groups (one host sync).

    A 1-D log_w of shape (K,) is one group (as torch.multinomial takes weights): particles (K, ...), and the
    results are shaped like the input (log_w and ancestors (K,), ess, resampled and log_norm 0-dim).
    """
    if isinstance(log_w, torch.Tensor) and log_w.dim() == 1:
        r = resample(log_w[None], particles, method, ess_threshold, generator, move=move, check=check,
                     backend=backend)
        return ResampleResult(r.particles, r.log_w[0], r.ancestors[0], r.ess[0], r.resampled[0], r.log_norm[0])
    _check_resample_args(log_w, particles, method, ess_threshold, move, backend)
    G, K = log_w.shape
    name, (log_w_out, ancestors, ess, resampled, log_norm) = draw_ancestors(log_w, method, ess_threshold,
                                                                            generator, backend)
    if check and not _has_data(log_norm):
        raise ValueError(f"check=True reads the log-weights on the host; not possible on {log_norm.device} tensors")
    if check:
        bad = torch.isnan(log_norm).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"log_w: group(s) {bad} have a NaN or +inf log-weight or all -inf "
                             f"(reset to uniform weights when check=False)")
    if move == "gather":
        particles = particles.reshape(G * K, -1).index_select(0, ancestor_rows(ancestors)).view(particles.shape)
    else:
        move_particles(name, particles, ancestors, resampled)
    return ResampleResult(particles, log_w_out, ancestors, ess, resampled, log_norm)

