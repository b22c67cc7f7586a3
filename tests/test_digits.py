"""The learned-score benchmark's infrastructure (diffsampler.digits): the data split, the weight cache, the
Fréchet distance, and the denoiser as a model of diffsampler.sample. Small models trained into a temporary
cache; the full default models in the heavy test."""

import numpy as np
import pytest
import torch

import diffsampler as ds
from diffsampler import digits
from diffsampler.schedules import VP
from diffsampler.solvers import SOLVERS

pytest.importorskip("sklearn")

SMALL_CLASSIFIER = digits.ClassifierConfig(width=64, features=16, iters=300)
SMALL_DENOISER = digits.DenoiserConfig(width=64, depth=2, iters=300)
VP_SOLVERS = [s for s in SOLVERS if VP in SOLVERS[s].schedules]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "diffsampler"


@pytest.fixture(scope="module")
def data():
    return digits.load_digits()


@pytest.fixture(scope="module")
def small_classifier(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        return digits.classifier(SMALL_CLASSIFIER)


def test_split_is_seeded_disjoint_and_in_range(data):
    assert data.train_x.shape == (1348, 64) and data.held_x.shape == (449, 64)
    assert data.train_x.min() == -1 and data.train_x.max() == 1
    assert torch.equal(digits.load_digits().held_x, data.held_x)
    assert not torch.equal(digits.load_digits(seed=1).held_x, data.held_x)
    train_rows, held_rows = ({tuple(r) for r in x.tolist()} for x in (data.train_x, data.held_x))
    assert not train_rows & held_rows and len(train_rows | held_rows) == 1797  # the 1797 images are distinct
    with pytest.raises(ValueError, match="held_out"):
        digits.load_digits(held_out=1.0)


def test_cache_is_reused_and_keyed_by_hyper_parameters(cache, monkeypatch):
    fits = []
    fit = digits.fit_classifier
    monkeypatch.setattr(digits, "fit_classifier", lambda m, c: fits.append(c) or fit(m, c))
    config = digits.ClassifierConfig(width=16, features=8, iters=5)
    first = digits.classifier(config)
    assert len(fits) == 1 and digits.cache_path("classifier", config).exists()
    second = digits.classifier(config, train=False)
    assert len(fits) == 1
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    changed = digits.ClassifierConfig(width=16, features=8, iters=6)
    with pytest.raises(FileNotFoundError, match="train=True"):
        digits.classifier(changed, train=False)
    digits.classifier(changed)
    assert len(fits) == 2
    monkeypatch.setattr(digits, "VERSION", digits.VERSION + 1)
    digits.classifier(config)
    assert len(fits) == 3


def test_training_is_seeded(tmp_path, monkeypatch):
    """The same configuration trains to the same weights, whatever the global RNG's state."""
    config = digits.DenoiserConfig(width=16, depth=1, iters=5)
    weights = []
    threads = torch.get_num_threads()
    for run in range(2):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / str(run)))
        torch.manual_seed(run)
        weights.append(digits.denoiser(config).state_dict())
    assert torch.get_num_threads() == threads  # trained on one thread, then restored
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name


def test_frechet_distance(small_classifier, data):
    clf = small_classifier
    assert digits.accuracy(clf, data.held_x, data.held_y) > 0.8
    scale = digits.frechet_distance(torch.randn(1000, 64), data.held_x, clf)
    assert abs(digits.frechet_distance(data.held_x, data.held_x, clf)) < 1e-9 * scale
    ab = digits.frechet_distance(data.train_x, data.held_x, clf)
    ba = digits.frechet_distance(data.held_x, data.train_x, clf)
    assert 0 < ab and abs(ab - ba) < 1e-6 * ab
    assert scale > 20 * ab
    # against the textbook formula with scipy's matrix square root
    from scipy import linalg

    fa, fb = (clf.features(x).double().numpy() for x in (data.train_x, data.held_x))
    ca, cb = np.cov(fa.T), np.cov(fb.T)
    want = ((fa.mean(0) - fb.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert abs(ab - want) < 1e-6 * want
    with pytest.raises(ValueError, match="samples"):
        digits.frechet_distance(torch.zeros(10, 63), data.held_x, clf)
    diverged = data.train_x.clone()
    diverged[3, 5] = float("nan")
    assert digits.frechet_distance(diverged, data.held_x, clf) == float("inf")


def test_denoiser_returns_the_noise_of_its_velocity():
    """eps = sigma x + alpha v, so the data prediction of the eps output is alpha x - sigma v; alpha_t, sigma_t
    are the schedule's at integer t and interpolated between them."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = digits.Denoiser(width=32, depth=1)
    t = torch.tensor([0, 1, 500, 998, 999])
    alpha, sigma = model.alpha_sigma(t)
    want_alpha, want_sigma = model.schedule.alpha_sigma_at(t)
    assert torch.allclose(alpha.squeeze(1).double(), want_alpha, rtol=1e-6)
    assert torch.allclose(sigma.squeeze(1).double(), want_sigma, rtol=1e-6)
    half, _ = model.alpha_sigma(torch.tensor(998.5))
    assert float(alpha[4]) < float(half) < float(alpha[3])
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        for i, ti in enumerate(t):
            p, q = ds.models.data_coeffs("eps", float(alpha[i]), float(sigma[i]))
            x0 = p * x + q * model(x, ti)
            want = alpha[i] * x.reshape(5, 64) - sigma[i] * model.velocity(x, ti)
            assert torch.allclose(x0.reshape(5, 64), want, atol=1e-5 / float(alpha[i]))  # fp32 eps times 1 / alpha


@pytest.mark.parametrize("solver", VP_SOLVERS)
def test_denoiser_is_a_model_of_every_vp_solver(cache, solver):
    model = digits.denoiser(digits.DenoiserConfig(width=16, depth=1, iters=5))
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    options = {}
    if solver == "dpmv3":  # DPM-Solver-v3 takes its statistics; constant ones make it DPM-Solver++
        from diffsampler.solvers.dpmv3 import EMS

        lam = model.schedule.alphas_cumprod.double()
        lam = (0.5 * torch.log(lam / (1 - lam))).flip(0)
        options["ems"] = EMS.constant(torch.linspace(float(lam[0]) - 1, float(lam[-1]) + 1, 50))
    out = ds.sample(model, x, steps=6, solver=solver, schedule=model.schedule, prediction=model.prediction,
                    **options)
    assert out.shape == x.shape and out.dtype == torch.float64 and torch.isfinite(out).all()


def test_short_training_samples_far_better_than_noise(cache, small_classifier, data):
    model = digits.denoiser(SMALL_DENOISER)
    x_T = torch.randn(500, 64, generator=torch.Generator().manual_seed(0))
    samples = ds.sample(model, x_T, steps=20, solver="dpmpp_2m", schedule=model.schedule)
    noise = digits.frechet_distance(x_T, data.held_x, small_classifier)
    assert digits.frechet_distance(samples, data.held_x, small_classifier) < noise / 20


def test_benchmark_rows_and_table(cache, small_classifier, data, tmp_path):
    from diffsampler.bench import digits_solvers, report
    from diffsampler.bench.common import write_json

    model = digits.denoiser(SMALL_DENOISER)
    rows = digits_solvers.fd_rows(model, small_classifier, data, solvers=("ddim", "unipc"), nfes=(2, 8), n=200,
                                  seeds=(0, 1))
    assert [(r["solver"], r["nfe"]) for r in rows] == [("ddim", 2), ("ddim", 8), ("unipc", 2), ("unipc", 8),
                                                       ("data", None), ("dpmpp_2m", 100)]
    by = {(r["solver"], r["nfe"]): r["fd_mean"] for r in rows}
    assert by["data", None] < by["dpmpp_2m", 100] < by["ddim", 8] < by["ddim", 2]
    payload = dict(machine=dict(device="cpu", threads=1, torch=torch.__version__, date="2026-01-01"), n=200, seeds=2,
                   nfes=[2, 8], held_out=len(data.held_x), classifier_accuracy=0.9, rows=rows)
    table = report.digits_table(write_json(tmp_path / "digits-cpu.json", payload))
    assert f"| unipc | {by['unipc', 2]:.2f} ± " in table and f"dpmpp_2m at NFE 100 {by['dpmpp_2m', 100]:.2f}" in table


@pytest.mark.heavy
def test_default_models(data):
    """The benchmark's models (trained into the user cache if absent, about 2 minutes)."""
    clf = digits.classifier()
    assert digits.accuracy(clf, data.held_x, data.held_y) > 0.9
    model = digits.denoiser()
    x_T = torch.randn(1000, 64, generator=torch.Generator().manual_seed(0))
    samples = ds.sample(model, x_T, steps=20, solver="dpmpp_2m", schedule=model.schedule)
    noise = digits.frechet_distance(x_T, data.held_x, clf)
    assert digits.frechet_distance(samples, data.held_x, clf) < noise / 20
