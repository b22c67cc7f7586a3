"""Resampling particles sharded across the ranks of a torch.distributed group (docs/smc.md, "Distributed
resampling").

Rank r holds K_local particles of each of G groups; the global group n has K = world K_local particles in
rank-major order: global particle j = r K_local + k is local particle k of rank r. Every rank gathers the (G, K)
log-weights, draws the same uniforms from an identically seeded generator and so computes the same global
ancestors as `ops.resample` on the concatenated problem; then only the particles whose ancestor lives on another
rank travel (one all_to_all_single of just those rows), the others are copied locally by the fused move.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist

from . import ops, reference
from .ops.resample import _check_resample_args

# all_gather(out, inp, group=None): the ranks' inputs concatenated along dim 0 (all_gather_into_tensor before
# torch 2.13, deprecated there).
all_gather_dim0 = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_CHECKED_FIELDS = ("G (groups)", "K_local (particles per rank)", "bytes per particle", "log_w dtype", "method",
                   "ess_threshold", "generator state")


def _generator_fingerprint(generator: torch.Generator | None, device: torch.device) -> int:
    """crc32 of the generator's state (the device's default generator when None); read on the host, no sync."""
    if generator is None:
        generator = (torch.cuda.default_generators[device.index if device.index is not None
                                                    else torch.cuda.current_device()]
                     if device.type == "cuda" else torch.default_generator)
    return zlib.crc32(generator.get_state().numpy().tobytes())


def _check_ranks(log_w, particles, method, ess_threshold, generator, group, failed: bool) -> None:
    """All-gathers each rank's problem description (or that its local checks `failed`) and raises the same
    ValueError on every rank if they differ; a rank whose local checks failed returns (it raises its own)."""
    mine = [float(failed)] + [0.0] * len(_CHECKED_FIELDS)
    if not failed:
        G, K_local = log_w.shape
        row = particles[0] if particles.shape[0] == G * K_local else particles[0, 0]
        mine[1:] = [G, K_local, row.numel() * row.element_size(), 0 if log_w.dtype == torch.float32 else 1,
                    ops.RESAMPLE_METHODS.index(method), -1.0 if ess_threshold is None else float(ess_threshold),
                    _generator_fingerprint(generator, log_w.device)]
    world = dist.get_world_size(group)
    device = log_w.device if isinstance(log_w, torch.Tensor) else torch.device("cpu")
    table = torch.empty(world * len(mine), dtype=torch.float64, device=device)
    all_gather_dim0(table, torch.tensor(mine, dtype=torch.float64, device=device), group=group)
    table = table.view(world, len(mine)).tolist()
    bad = [r for r, row in enumerate(table) if row[0]]
    if bad:
        if failed:
            return
        raise ValueError(f"resample_distributed: invalid arguments on rank(s) {bad} (see the error raised there)")
    for i, name in enumerate(_CHECKED_FIELDS, 1):
        values = [row[i] for row in table]
        if len(set(values)) > 1:
            raise ValueError(f"resample_distributed: {name} must be the same on every rank, got "
                             f"{dict(enumerate(values))} by rank" +
                             (" (seed the generator identically on every rank and draw from it identically)"
                              if name == "generator state" else ""))


def _exchange_counts(src: torch.Tensor, world: int) -> torch.Tensor:
    """(world, world) int64: M[s, d] = the rows rank s sends to rank d, the particles of d whose ancestor lives
    on s != d; src (G, world, K_local) is the rank of each global slot's ancestor (slot d K_local + k on rank d)."""
    dst = torch.arange(world, device=src.device)[None, :, None]
    pair = torch.where(src != dst, src * world + dst, world * world)
    return torch.bincount(pair.flatten(), minlength=world * world + 1)[:-1].view(world, world)


def _exchange_rows(rows: torch.Tensor, src: torch.Tensor, rank: int,
                   n_send: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(send_rows, recv_rows) of this rank: rows (G, world, K_local) = n K_local + (a mod K_local) of each global
    slot's ancestor a (group n), src its rank. send_rows: the n_send rows this rank sends, ordered by (destination,
    group, slot); recv_rows: the local rows n K_local + k to overwrite, ordered by (source, group, slot), the first
    sum(M[:, rank]) valid. Both sides of a pair list its rows in (group, slot) order, so all_to_all_single matches
    them up."""
    G, world, K_local = src.shape
    dst = torch.arange(world, device=src.device)[None, :, None]
    sends = ((src == rank) & (dst != rank)).transpose(0, 1).flatten()   # (destination, group, slot) order
    position = torch.where(sends, sends.cumsum(0) - 1, n_send)
    send_rows = rows.new_empty(n_send + 1).scatter_(0, position, rows.transpose(0, 1).flatten())[:n_send]
    key = torch.where(src[:, rank] != rank, src[:, rank], world).flatten()
    local = torch.arange(G * K_local, device=src.device)
    return send_rows, local[key.argsort(stable=True)]


def _move_sharded(name: str, particles: torch.Tensor, ancestors: torch.Tensor, resampled: torch.Tensor, rank: int,
                  world: int, group) -> None:
    """In place: particle k of group n on this rank <- particle a mod K_local of rank a // K_local, a = the global
    ancestors[n, rank K_local + k]: local sources by the fused move (backend `name`), the others by one
    all_to_all_single (after one host read of the (world, world) counts; skipped when no row crosses ranks)."""
    G, K = ancestors.shape
    K_local = K // world
    src = (ancestors // K_local).view(G, world, K_local)
    mine, local = ancestors[:, rank * K_local:(rank + 1) * K_local], torch.arange(K_local, device=ancestors.device)
    local_ancestors = torch.where(src[:, rank] == rank, mine - rank * K_local, local)  # else k: not copied here
    counts = _exchange_counts(src, world).tolist()
    exchange = None
    if any(map(any, counts)):
        group_index = torch.arange(G, device=ancestors.device)[:, None, None]
        rows = group_index * K_local + ancestors.view(G, world, K_local) - src * K_local  # n K_local + a mod K_local
        send_rows, recv_rows = _exchange_rows(rows, src, rank, sum(counts[rank]))
        flat = particles.shape[0] == G * K_local
        row_shape = particles.shape[1:] if flat else particles.shape[2:]

        def index(r):
            return (r,) if flat else (r // K_local, r % K_local)

        send_sizes, recv_sizes = counts[rank], [row[rank] for row in counts]
        send = particles[index(send_rows)].reshape(sum(send_sizes), math.prod(row_shape))
        recv = torch.empty(sum(recv_sizes), send.shape[1] * send.element_size(), dtype=torch.uint8,
                           device=send.device)
        exchange = dist.all_to_all_single(recv, send.view(torch.uint8), recv_sizes, send_sizes, group=group,
                                          async_op=True)
    ops.move_particles(name, particles, local_ancestors, resampled)
    if exchange is not None:
        exchange.wait()
        particles[index(recv_rows[:recv.shape[0]])] = recv.view(particles.dtype).view(-1, *row_shape)


def resample_distributed(
    log_w_local: torch.Tensor,
    particles_local: torch.Tensor,
    method: str = "systematic",
    ess_threshold: float | None = None,
    generator: torch.Generator | None = None,
    group: dist.ProcessGroup | None = None,
    *,
    check_ranks: bool = True,
    backend: str = "auto",
) -> ops.ResampleResult:
    """`ops.resample` of G groups whose K = world K_local particles are sharded across the ranks of `group`
    (rank-major: global particle r K_local + k is local particle k of rank r); returns this rank's shard of the
    single-process result, bitwise: (particles_local, log_w_local_out, ancestors_local, ess), with .resampled and
    .log_norm (G,) for the whole groups.

        log_w = all_gather(log_w_local) (G, K);  ancestors, ess, resampled, log_norm as in ops.resample(log_w)
        ancestors_local = ancestors[:, r K_local:(r+1) K_local]  (global within-group indices in [0, K))
        particle k of rank r <- particle a mod K_local of rank a // K_local,  a = ancestors_local[n, k]

    `generator` must be in the same state on every rank (the uniforms of the global problem are drawn from it
    on every rank, as ops.resample draws them); the move is in place: survivors stay, a dead slot whose
    ancestor is local is copied by the fused move, the others arrive through one all_to_all_single of just those
    rows (overlapped with the local copy). particles_local: (G*K_local, ...) or (G, K_local, ...), any dtype, on
    log_w_local's device (CPU with gloo, CUDA with NCCL).

    Collectives and host syncs per call: with check_ranks (default) one all_gather of 8 float64 describing each
    rank's problem (local argument errors, shapes, dtype, method, threshold, generator fingerprint) read on the
    host, raising a ValueError on every rank if they differ or a rank's arguments are invalid (without it, a
    rank with bad arguments raises alone and the others wait in the next collective); one all_gather of the
    log-weights (G K_local per rank); one read of the (world, world) exchange counts on the host
    (all_to_all_single takes its split sizes from the host); one all_to_all_single of the moving rows, skipped
    on every rank when no row crosses ranks.
    """
    try:
        _check_resample_args(log_w_local, particles_local, method, ess_threshold, "inplace", backend)
        local_error = None
    except ValueError as error:
        local_error = error
    if check_ranks:
        _check_ranks(log_w_local, particles_local, method, ess_threshold, generator, group, local_error is not None)
    if local_error is not None:
        raise local_error
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    G, K_local = log_w_local.shape
    if world * K_local > reference.MAX_PARTICLES:
        raise ValueError(f"log_w_local: at most {reference.MAX_PARTICLES} particles per group in all, got "
                         f"K = {world} ranks x {K_local}")
    gathered = torch.empty(world * G, K_local, dtype=log_w_local.dtype, device=log_w_local.device)
    all_gather_dim0(gathered, log_w_local.contiguous(), group=group)
    log_w = gathered.view(world, G, K_local).permute(1, 0, 2).reshape(G, world * K_local)
    name, (log_w_out, ancestors, ess, resampled, log_norm) = ops.draw_ancestors(log_w, method, ess_threshold,
                                                                                generator, backend)
    _move_sharded(name, particles_local, ancestors, resampled, rank, world, group)
    shard = slice(rank * K_local, (rank + 1) * K_local)
    return ops.ResampleResult(particles_local, log_w_out[:, shard].contiguous(), ancestors[:, shard].contiguous(),
                              ess, resampled, log_norm)
