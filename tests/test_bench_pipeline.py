"""accelerate(pipe, cuda_graph=True) and `bench pipeline`: on a CPU the captured denoiser falls back to eager with
its reason logged once and gives the images of accelerate(pipe); a tiny bench run writes its JSON and its report
table; bad option values are argparse errors. On a GPU (tests marked gpu) the replayed pipeline gives the eager
images bitwise."""

import json
import logging

import pytest
import torch

pytest.importorskip("transformers")  # diffusers' Stable Diffusion pipelines need it importable

from diffsampler.bench import pipeline as bench_pipeline  # noqa: E402
from diffsampler.bench import report  # noqa: E402
from diffsampler.graphs import CapturedForward  # noqa: E402
from diffsampler.integrations.diffusers import accelerate, captured_forward  # noqa: E402

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CPU_REASON = "an argument is on cpu; CUDA graphs need CUDA tensors"


def tiny_images(pipe, conditioning, device="cpu", seed=0):
    return bench_pipeline.images(pipe, conditioning, torch.device(device), latent=8, steps=3, guidance=5.0,
                                 batch=1, seed=seed)


@pytest.mark.parametrize("name", ["sd", "sd3"])
def test_cuda_graph_falls_back_on_cpu_with_the_reason_logged_once(name, caplog):
    pipe, conditioning = bench_pipeline.build(name, torch.device("cpu"), torch.float32)
    theirs = tiny_images(pipe, conditioning)
    accelerate(pipe, verbose=False)
    fused = tiny_images(pipe, conditioning)
    assert not torch.equal(fused, theirs)  # the fused scheduler ran, to diffusers' numbers
    assert (fused - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    accelerate(pipe, verbose=False, cuda_graph=True)
    with caplog.at_level(logging.WARNING, logger="diffsampler"):
        first, second = tiny_images(pipe, conditioning), tiny_images(pipe, conditioning)
    assert torch.equal(first, fused) and torch.equal(second, fused)
    ours = [r.getMessage().split(": ", 2)[-1] for r in caplog.records if r.name == "diffsampler"]
    assert ours == [CPU_REASON]  # once for both calls (other libraries may warn too)
    forward = captured_forward(pipe)
    assert forward.fallbacks == [CPU_REASON] and forward.graphs == {}


def test_accelerate_cuda_graph_wraps_the_denoiser_once(capsys):
    pipe, _ = bench_pipeline.build("sd", torch.device("cpu"), torch.float32)
    assert captured_forward(pipe) is None
    accelerate(pipe, cuda_graph=True)
    out = capsys.readouterr().out
    assert "replaced diffusers.DPMSolverMultistepScheduler" in out and "pipe.unet.forward is captured" in out
    forward = pipe.unet.forward
    assert isinstance(forward, CapturedForward) and captured_forward(pipe) is forward
    accelerate(pipe, cuda_graph=True)
    assert "already captured" in capsys.readouterr().out and pipe.unet.forward is forward


@pytest.mark.parametrize("kwargs, match", [(dict(cuda_graph="yes"), "cuda_graph must be True or False"),
                                           (dict(verbose=None), "verbose must be True or False")])
def test_accelerate_bad_option_values(kwargs, match):
    pipe, _ = bench_pipeline.build("sd3", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match=match):
        accelerate(pipe, **kwargs)


def test_accelerate_cuda_graph_needs_a_denoiser():
    import diffusers

    class NoDenoiser:
        scheduler = diffusers.DDIMScheduler()

    with pytest.raises(ValueError, match="NoDenoiser has no denoiser module; expected one of pipe.unet, "
                                         "pipe.transformer"):
        accelerate(NoDenoiser(), verbose=False, cuda_graph=True)


def test_captured_forward_reasons_and_bad_arguments():
    lin = torch.nn.Linear(3, 2)
    forward = CapturedForward(lin.forward)
    x = torch.randn(4, 3)
    assert torch.equal(forward(x), lin(x))  # autograd on: eager
    with torch.no_grad():
        assert torch.equal(forward(x), lin(x))  # CPU tensors: eager
    assert forward.fallbacks == ["autograd is on; a captured forward is for inference (run under torch.no_grad())",
                                 CPU_REASON]
    assert forward.__wrapped__ == lin.forward  # inspect.signature sees the forward's own parameters
    with pytest.raises(ValueError, match="fn must be callable"):
        CapturedForward(3)
    with pytest.raises(ValueError, match="warmup must be an integer >= 1, got 0"):
        CapturedForward(lin.forward, warmup=0)


def test_captured_forward_flattens_flat_and_nested_arguments():
    from diffsampler.graphs import _flatten, _unflatten

    x, t = torch.zeros(2, 3), torch.tensor(5)
    leaves, spec = _flatten((x, t), dict(scale=2.0, cond=None))
    assert spec == (2, ("scale", "cond")) and leaves[2:] == [2.0, None]
    args, kwargs = _unflatten(leaves, spec)
    assert args[0] is x and args[1] is t and kwargs == dict(scale=2.0, cond=None)
    leaves, spec = _flatten((x,), dict(added=dict(text_embeds=t), sizes=[1, 2]))
    assert len(leaves) == 4 and leaves[0] is x and leaves[1] is t and leaves[2:] == [1, 2]
    args, kwargs = _unflatten(leaves, spec)
    assert args[0] is x and kwargs["added"]["text_embeds"] is t and kwargs["sizes"] == [1, 2]


def test_bench_pipeline_writes_json_and_report_table(tmp_path, capsys):
    threads = torch.get_num_threads()
    bench_pipeline.main(["--device", "cpu", "--latent", "8", "--steps", "2", "--rounds", "2", "--out",
                         str(tmp_path)])
    assert torch.get_num_threads() == threads
    path = next(tmp_path.glob("pipeline-*.json"))
    data = json.loads(path.read_text())
    assert data["benchmark"] == "pipeline" and data["machine"]["device_type"] == "cpu"
    assert data["config"] | dict(latent=None) == dict(
        steps=2, guidance_scale=7.0, batch=1, dtype="fp32", latent=None, rounds=2,
        output="final latents (no VAE decode)", conditioning="random prompt embeddings")
    assert data["config"]["latent"] == {"sd": 8, "sd3": 8}
    rows = {r["pipeline"]: r for r in data["rows"]}
    assert set(rows) == {"sd", "sd3"}
    assert rows["sd"]["latent"] == [4, 8, 8] and rows["sd3"]["latent"] == [16, 8, 8]
    assert rows["sd"]["pipeline_class"] == "StableDiffusionPipeline"
    assert rows["sd3"]["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    for r in rows.values():
        assert set(r["seconds_per_image"]) == set(bench_pipeline.VARIANTS)
        assert all(0 < r["best_seconds_per_image"][v] <= s < 60 for v, s in r["seconds_per_image"].items())
        assert r["speedup_vs_diffusers"]["accelerate"] == pytest.approx(
            r["seconds_per_image"]["diffusers"] / r["seconds_per_image"]["accelerate"])
        assert r["graph_equals_accelerate"] and r["accelerate_repeatable"]
        assert 0 < r["accelerate_vs_diffusers_max_abs_diff"] <= 1e-5 * r["output_max_abs"]
        assert r["cuda_graphs_captured"] == 0 and r["cuda_graph_fallbacks"] == [CPU_REASON]
    table = report.pipeline_table(path)
    assert table.count("\n| ") == 3  # the header row and one row per pipeline
    assert "| StableDiffusionPipeline + DPMSolverMultistepScheduler (UNet2DConditionModel, " in table
    assert f"eager: {CPU_REASON} |" in table and "| yes |" in table
    assert "## Whole diffusers pipelines (`bench pipeline`)" in report.page(tmp_path, [8, 4, 128, 128], "smooth-16d")
    assert "wrote " in capsys.readouterr().out


@pytest.mark.parametrize("args, option", [(["--latent", "0"], "--latent"), (["--pipelines", "sdxl"], "--pipelines"),
                                          (["--guidance", "-1"], "--guidance"), (["--dtype", "int8"], "--dtype"),
                                          (["--steps", "x"], "--steps"), (["--threads", "-2"], "--threads")])
def test_bad_option_is_an_argparse_error(args, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_pipeline.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "Traceback" not in err


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["sd", "sd3"])
def test_cuda_graph_replays_the_eager_images_bitwise(name):
    """One graph per shape, captured at the first call; every replayed call gives accelerate(pipe)'s images."""
    device = torch.device("cuda")
    pipe, conditioning = bench_pipeline.build(name, device, torch.float32)
    accelerate(pipe, verbose=False)
    eager = [tiny_images(pipe, conditioning, "cuda", seed) for seed in (0, 1)]
    accelerate(pipe, verbose=False, cuda_graph=True)
    replayed = [tiny_images(pipe, conditioning, "cuda", seed) for seed in (0, 1, 0)]
    forward = captured_forward(pipe)
    assert forward.fallbacks == [] and len(forward.graphs) == 1
    assert torch.equal(replayed[0], eager[0]) and torch.equal(replayed[1], eager[1])
    assert torch.equal(replayed[2], eager[0])
    assert not torch.equal(eager[0], eager[1])


@pytest.mark.gpu
@gpu
def test_captured_forward_replays_and_returns_fresh_outputs():
    lin = torch.nn.Linear(16, 8).cuda()
    forward = CapturedForward(lin.forward)
    xs = [torch.randn(4, 16, device="cuda") for _ in range(3)]
    with torch.no_grad():
        outs = [forward(x) for x in xs]
        expected = [lin(x) for x in xs]
    assert len(forward.graphs) == 1 and forward.fallbacks == []
    assert all(torch.equal(o, e) for o, e in zip(outs, expected))  # earlier outputs were not overwritten
    with torch.no_grad():
        forward(torch.randn(5, 16, device="cuda"))
    assert len(forward.graphs) == 2
