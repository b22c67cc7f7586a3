"""Continuous batching for diffusion serving: requests join a running batch at any step and leave it when done.

Every request has its own solver plan (solver, step count, schedule, options) and its own place in the batch:
row b of x, of the history ring and of the state. One tick is one model call over the whole batch and one
fused update with a step per sample (ops.multistep_update_indexed with step of shape (B,)): sample b takes row
step[b] of one table that holds every admitted plan's steps, its coefficients and its history slots. Rows
without a request step with the identity (x' = x); the model sees only the rows with a request (gathered when
some are idle), or with pad=True the whole batch every tick (a fixed shape, as a captured graph needs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import checks, error_flags, ops
from .sample import cached_plan, scale_table, scaled_input, time_table
from .solvers import Plan

IDENTITY = ops.UpdateCoeffs(p=0.0, q=0.0, a=1.0, b=(0.0,))  # the idle rows' step: x' = x


@dataclass
class _Request:
    row: int
    start: int  # the table row of its plan's first step
    steps: int
    generator: torch.Generator | None
    noisy: tuple[bool, ...]  # per step: whether it draws noise
    taken: int = 0


class BatchSampler:
    """``server = BatchSampler(model, capacity=8, sample_shape=(4, 64, 64))``; ``rid = server.submit(x_T,
    steps=20, solver="dpmpp_2m", schedule=...)`` at any time; ``done = server.step()`` runs one tick and
    returns ``{rid: x0}`` for the requests it finished; ``server.run()`` ticks until every request is done.

    model(x, t) gets the whole batch (capacity, *sample_shape) with t of shape (capacity,): each sample's own
    time (int64 training timesteps for discrete schedules), so it must treat samples independently, as
    diffusers' UNets do with a timestep per sample. A request's result equals ``diffsampler.sample`` run on it
    alone (bitwise on the C++ CPU backend in float32 when the model computes each sample as it would alone);
    stochastic steps draw the request's noise from its own generator, as sample() would. Plans must be
    indexable (no DPM-Solver-v3, LML or thresholding) and agree on discrete or continuous model times.
    pad: call the model on all `capacity` rows every tick (idle ones too) instead of the busy rows only.
    """

    def __init__(self, model: Callable[..., torch.Tensor], capacity: int, sample_shape, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", clip: float | None = None,
                 backend: str = "auto", pad: bool = False):
        checks.model(model)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= \
                ops.update.MAX_PER_SAMPLE_STEPS:
            raise ValueError(f"capacity must be an int in [1, {ops.update.MAX_PER_SAMPLE_STEPS}], got {capacity!r}")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be > 0 or None, got {clip}")
        self.model, self.capacity, self.clip, self.backend = model, capacity, clip, backend
        self.pad = checks.flag("pad", pad)
        self.busy: torch.Tensor | None = None  # the busy rows' indices while some rows are idle (pad=False)
        self.shape = (capacity, *tuple(int(d) for d in sample_shape))
        self.x = torch.zeros(self.shape, dtype=dtype, device=device)
        self.plans: list[Plan] = []
        self.starts: dict[int, int] = {}  # id(plan) -> its first table row
        self.requests: dict[int, _Request] = {}
        self.free = list(range(capacity))
        self.next_id = 0
        self.step_index = torch.zeros(capacity, dtype=torch.int64, device=device)  # row 0: the identity
        self.active = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.status = error_flags.new(device)
        self.history = self.state = self.table = self.times = self.scales = None
        self.discrete: bool | None = None

    @property
    def pending(self) -> int:
        """Requests admitted and not yet finished."""
        return len(self.requests)

    def submit(self, x_T: torch.Tensor, steps: int = 20, solver: str = "dpmpp_2m", schedule=None,
               prediction: str | None = None, *, generator: torch.Generator | None = None, **solver_options) -> int:
        """Admit a request (x_T: standard normal noise of sample_shape) into a free row; returns its id. Raises
        ValueError when every row is taken (step() until one is free) or its plan cannot join the batch."""
        if not isinstance(x_T, torch.Tensor) or tuple(x_T.shape) != self.shape[1:]:
            raise ValueError(f"x_T must be a tensor of sample_shape {self.shape[1:]}, got "
                             f"{tuple(x_T.shape) if isinstance(x_T, torch.Tensor) else type(x_T).__name__}")
        if not self.free:
            raise ValueError(f"all {self.capacity} rows are taken: call step() until a request finishes")
        plan = cached_plan(solver, schedule, steps, prediction, tuple(solver_options.items()))
        start = self._register(plan)
        row = self.free.pop(0)
        rid, self.next_id = self.next_id, self.next_id + 1
        self.requests[rid] = _Request(row, start, len(plan.steps), generator, tuple(s.needs_noise for s in plan.steps))
        x = x_T.to(device=self.x.device, dtype=self.x.dtype)
        self.x[row] = x * plan.init_scale if plan.init_scale != 1.0 else x  # as run_plan scales x_T
        if self.history is not None:
            self.history[:, row] = 0  # reads without weight read finite values
        if self.state is not None:
            self.state[row] = 0
        self.step_index[row] = start
        self.active[row] = 1
        self._rows_changed()
        return rid

    def _rows_changed(self) -> None:
        rows = sorted(r.row for r in self.requests.values())
        full = self.pad or len(rows) == self.capacity
        self.busy = None if full else torch.tensor(rows, dtype=torch.int64, device=self.x.device)

    def _register(self, plan: Plan) -> int:
        """The first table row of plan's steps, rebuilding the table (and growing the ring) for a new plan."""
        if id(plan) in self.starts:
            return self.starts[id(plan)]
        plan.check_defined()
        if any(s.coeffs is None or s.tensor_coeffs is not None for s in plan.steps):
            raise ValueError("BatchSampler: DPM-Solver-v3's steps (ems_update) are not indexed; pick another solver")
        if plan.mean_state:
            raise ValueError("BatchSampler: mean-reverting requests (solver 'mrs') are not supported; run them with "
                             "sample()")
        if self.discrete is not None and plan.discrete_time != self.discrete:
            raise ValueError("BatchSampler: every request's model times must be discrete (training timesteps) or "
                             "every one continuous: the model gets one time tensor")
        self.discrete = plan.discrete_time
        self.starts[id(plan)] = 1 + sum(len(p.steps) for p in self.plans)
        self.plans.append(plan)
        steps = [s for p in self.plans for s in p.steps]
        uses_state = any(p.uses_state for p in self.plans)
        n_reads = max(len(s.read_slots) for s in steps)
        slots = max([p.history_slots for p in self.plans] + [n_reads + 1 if n_reads else 0])
        self.table = ops.step_table([IDENTITY] + [s.coeffs for s in steps], [0] + [s.write_slot for s in steps],
                                    [()] + [s.read_slots for s in steps], slots, uses_state, self.x.device)
        self.times = time_table([steps[0].t] + [s.t for s in steps], self.discrete, self.x)
        self.scales = scale_table([1.0] + [s.input_scale for s in steps], self.x)
        if slots and (self.history is None or self.history.shape[0] < slots):
            grown = self.x.new_zeros((slots, *self.shape))
            if self.history is not None:
                grown[:self.history.shape[0]] = self.history
            self.history = grown
        if uses_state and self.state is None:
            self.state = torch.zeros_like(self.x)
        return self.starts[id(plan)]

    def step(self) -> dict[int, torch.Tensor]:
        """One tick: the model on the batch, the fused update of every row at its own step; returns the
        requests finished by it, {id: x0 of sample_shape}."""
        if not self.requests:
            return {}
        t = self.times.index_select(0, self.step_index)
        inp = self.x
        if self.scales is not None:
            inp = scaled_input(self.x, self.scales, self.step_index)
        if self.busy is None:
            out = self.model(inp, t)
        else:  # the model on the busy rows only; the idle rows' identity step ignores their output
            out = torch.zeros_like(self.x).index_copy_(
                0, self.busy, self.model(inp.index_select(0, self.busy), t.index_select(0, self.busy)))
        noise = self._noise()
        self.x = ops.multistep_update_indexed(self.x, out, self.table, self.step_index, history=self.history,
                                              noise=noise, clip=self.clip, state=self.state, status=self.status,
                                              backend=self.backend)
        self.step_index.add_(self.active)
        done = {}
        for rid, req in list(self.requests.items()):
            req.taken += 1
            if req.taken == req.steps:
                done[rid] = self.x[req.row].clone()
                self._retire(rid)
        return done

    def _noise(self) -> torch.Tensor | None:
        """Each request's noise for this tick from its own generator (float32, as sample() draws it); None when
        no request's step draws any."""
        noisy = [r for r in self.requests.values() if r.noisy[r.taken]]
        if not noisy:
            return None
        noise = torch.zeros_like(self.x)
        for r in noisy:
            z = torch.randn(self.shape[1:], generator=r.generator, device=self.x.device, dtype=torch.float32)
            noise[r.row] = z.to(self.x.dtype)
        return noise

    def _retire(self, rid: int) -> None:
        row = self.requests.pop(rid).row
        self.step_index[row] = 0
        self.active[row] = 0
        self.free.append(row)
        self.free.sort()
        self._rows_changed()

    def run(self) -> dict[int, torch.Tensor]:
        """Tick until every admitted request is finished; {id: x0} of those finished now. Then raises if a step
        read a clamped index (error_flags.check; one host sync)."""
        done = {}
        while self.requests:
            done.update(self.step())
        error_flags.check(self.status)
        return done
