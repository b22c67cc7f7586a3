"""Model outputs: the prediction types a denoiser may return and their conversion to the data prediction x0.

With x_t = alpha_t x0 + sigma_t eps (flow matching: alpha_t = 1 - t, sigma_t = t), the data prediction is
linear in (x_t, out):  x0 = p x_t + q out.
"""

from __future__ import annotations

from typing import Callable

import torch

PREDICTIONS = ("eps", "x0", "v", "flow", "score")


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    return prediction


def data_coeffs(prediction: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(p, q) with x0 = p x + q out.

        eps:   x0 = (x - sigma eps) / alpha
        x0:    x0 = out
        v:     x0 = alpha x - sigma v                 (VP: alpha^2 + sigma^2 = 1)
        flow:  x0 = x - t v,  t = sigma               (x_t = (1 - t) x0 + t eps, v = eps - x0)
        score: x0 = (x + sigma^2 score) / alpha

    alpha, sigma: numbers, or tensors (then p, q are tensors, and alpha = 0 is not checked: no host sync).
    """
    check_prediction(prediction)
    if not isinstance(alpha, torch.Tensor) and alpha == 0 and prediction in ("eps", "score"):
        raise ValueError(f"prediction {prediction!r} gives no data prediction at alpha_t = 0 (zero terminal SNR); "
                         "use a 'v' or 'x0' model there")
    if prediction == "eps":
        return 1.0 / alpha, -sigma / alpha
    if prediction == "x0":
        return 0.0, 1.0
    if prediction == "v":
        return alpha, -sigma
    if prediction == "flow":
        return 1.0, -sigma
    return 1.0 / alpha, sigma * sigma / alpha


def noise_coeffs(prediction: str, alpha: float, sigma: float) -> tuple[float, float]:
    """(p, q) with eps = p x + q out, the noise the raw output implies (used by DDIM's direction term).

        eps: eps = out;  x0: eps = (x - alpha out) / sigma;  v: eps = sigma x + alpha v;
        flow: eps = x + (1 - t) v;  score: eps = -sigma score
    """
    check_prediction(prediction)
    if prediction == "eps":
        return 0.0, 1.0
    if prediction == "x0":
        return 1.0 / sigma, -alpha / sigma
    if prediction == "v":
        return sigma, alpha
    if prediction == "flow":
        return 1.0, 1.0 - sigma
    return 0.0, -sigma


def classifier_free_guidance(model: Callable[..., torch.Tensor], guidance_scale: float, cond: dict,
                             uncond: dict) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """model(x, t) of classifier-free guidance: out = u + w (c - u), u and c from ONE batched call.

    The wrapped `model(x, t, **kwargs)` gets x twice along the batch (uncond first) and each keyword tensor of
    `uncond` / `cond` concatenated along dim 0 (a keyword given in only one of them is passed as is). The
    guidance is linear in the outputs, so it composes with every prediction type's conversion.
    """
    keys = set(cond) | set(uncond)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kwargs = {}
        for k in keys:
            if k in cond and k in uncond and isinstance(cond[k], torch.Tensor):
                kwargs[k] = torch.cat([uncond[k], cond[k]])
            else:
                kwargs[k] = cond.get(k, uncond.get(k))
        t2 = t if t.dim() == 0 else torch.cat([t, t])
        out_u, out_c = model(torch.cat([x, x]), t2, **kwargs).chunk(2)
        return out_u + guidance_scale * (out_c - out_u)

    return guided
