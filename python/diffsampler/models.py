"""Model outputs: the prediction types a denoiser may return and their conversion to the data prediction x0.

With x_t = alpha_t x0 + sigma_t eps (flow matching: alpha_t = 1 - t, sigma_t = t), the data prediction is
linear in (x_t, out):  x0 = p x_t + q out.
"""

from __future__ import annotations

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
    """
    check_prediction(prediction)
    if alpha == 0 and prediction in ("eps", "score"):
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
