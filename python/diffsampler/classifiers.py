"""The training loop of the small classifiers diffsampler fits itself (dmcmc's noise-level classifier, minority
guidance's class classifier on noised samples): Adam on the cross-entropy of net(*inputs) against labels."""

from __future__ import annotations

from typing import Callable

import torch


def train(make_net: Callable[[], torch.nn.Module], batch: Callable[[torch.Generator], tuple], steps: int, lr: float,
          seed: int, decay: bool = False) -> torch.nn.Module:
    """The net of make_net(), its initial weights seeded by `seed` (the global RNG untouched), trained for `steps`
    steps on (inputs, labels) = batch(generator), the generator seeded by `seed`; `decay`: the learning rate falls
    linearly to 0. Returns it in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = make_net()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for i in range(steps):
        if decay:
            for group in opt.param_groups:
                group["lr"] = lr * (1 - i / steps)
        inputs, labels = batch(gen)
        loss = torch.nn.functional.cross_entropy(net(*inputs), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()
