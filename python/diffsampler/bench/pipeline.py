"""`python -m diffsampler.bench pipeline`: whole diffusers pipelines, time per image with diffusers' scheduler,
with `accelerate(pipe)` (the fused drop-in) and with `accelerate(pipe, cuda_graph=True)` (the denoiser replayed
from a CUDA graph at every step).

The pipelines are diffusers' own `StableDiffusionPipeline` (DPM-Solver++ 2M) and `StableDiffusion3Pipeline`
(flow matching Euler, shift 3), built offline from small randomly initialised denoisers at a real latent size
(no text encoders, tokenizers or VAE: the prompt embeddings are random tensors passed in, and the output is the
final latents, so what is timed is the denoising loop), with classifier-free guidance. The images of the three
variants start from the same generator seed: the fused ones against diffusers' (max abs difference) and the
captured one against the fused eager one (torch.equal) are recorded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffsampler.bench import cli
from diffsampler.bench.cli import DTYPES
from diffsampler.bench.common import machine_record, measure, slug, write_json

VARIANTS = ("diffusers", "accelerate", "accelerate + cuda_graph")
# the latent side of each pipeline by device: SD 512 px and SD3 1024 px on a GPU, 256 px on a CPU
LATENT = {"cuda": {"sd": 64, "sd3": 128}, "cpu": {"sd": 32, "sd3": 32}}
PROMPT_TOKENS = 77


def sd_pipeline(device: torch.device, dtype: torch.dtype):
    """StableDiffusionPipeline over a small random UNet2DConditionModel (4 latent channels, cross-attention
    width 32) with DPM-Solver++ 2M on Stable Diffusion's schedule; its call's conditioning keywords."""
    import diffusers

    unet = diffusers.UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                      beta_end=0.012, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    embed = lambda seed: _randn((1, PROMPT_TOKENS, 32), seed, device, dtype)
    return pipe, dict(prompt_embeds=embed(1), negative_prompt_embeds=embed(2))


def sd3_pipeline(device: torch.device, dtype: torch.dtype):
    """StableDiffusion3Pipeline over a small random SD3Transformer2DModel (16 latent channels, patch 2, two
    joint blocks) with flow matching Euler at SD3's shift 3; its call's conditioning keywords."""
    import diffusers

    transformer = diffusers.SD3Transformer2DModel(
        sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=32,
        pos_embed_max_size=128)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = diffusers.StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=None,
                                              text_encoder=None, tokenizer=None, text_encoder_2=None,
                                              tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    return pipe, dict(prompt_embeds=_randn((1, PROMPT_TOKENS, 32), 1, device, dtype),
                      negative_prompt_embeds=_randn((1, PROMPT_TOKENS, 32), 2, device, dtype),
                      pooled_prompt_embeds=_randn((1, 32), 3, device, dtype),
                      negative_pooled_prompt_embeds=_randn((1, 32), 4, device, dtype))


PIPELINES = {"sd": sd_pipeline, "sd3": sd3_pipeline}


def _randn(shape, seed: int, device, dtype) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


def build(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A pipeline of PIPELINES with its weights drawn from `seed`, on `device` in `dtype`, in eval mode, without
    a progress bar; and its conditioning keywords."""
    torch.manual_seed(seed)
    pipe, conditioning = PIPELINES[name](device, dtype)
    # the denoiser is the pipeline's one module (nn.Module.to: diffusers' to() warns on every dtype cast)
    torch.nn.Module.to(denoiser(pipe), device=device, dtype=dtype).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe, conditioning


def denoiser(pipe) -> torch.nn.Module:
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def images(pipe, conditioning: dict, device: torch.device, latent: int, steps: int, guidance: float, batch: int,
           seed: int = 0) -> torch.Tensor:
    """One pipeline call: `batch` images of latent side `latent` from generator seed `seed` (the final latents)."""
    generator = torch.Generator(device).manual_seed(seed)
    side = latent * pipe.vae_scale_factor
    return pipe(**conditioning, height=side, width=side, num_inference_steps=steps, guidance_scale=guidance,
                num_images_per_prompt=batch, generator=generator, output_type="latent").images


def run_variants(name: str, device: torch.device, dtype: torch.dtype, latent: int, steps: int, guidance: float,
                 batch: int, min_time: float) -> dict:
    """The three variants of one pipeline in order (diffusers, accelerate, accelerate + cuda_graph) on the same
    pipeline object: seconds per image, speed-ups, and the equality of their images."""
    from diffsampler.integrations.diffusers import accelerate, captured_forward

    pipe, conditioning = build(name, device, dtype)
    theirs = pipe.scheduler
    call = lambda: images(pipe, conditioning, device, latent, steps, guidance, batch)
    seconds, outputs = {}, {}
    for variant in VARIANTS:
        if variant == "accelerate":
            accelerate(pipe, verbose=False)
        elif variant == "accelerate + cuda_graph":
            accelerate(pipe, verbose=False, cuda_graph=True)
        first = call()  # also the warm-up (and the capture, with cuda_graph)
        seconds[variant] = measure(call, device, min_time=min_time, warmup=0) / batch
        outputs[variant] = (first, call())
    fused = outputs["accelerate"][0]
    graph_first, graph_last = outputs["accelerate + cuda_graph"]
    forward = captured_forward(pipe)
    return dict(
        pipeline=name, pipeline_class=type(pipe).__name__, scheduler=type(theirs).__name__,
        denoiser=type(denoiser(pipe)).__name__, denoiser_parameters=sum(p.numel() for p in denoiser(pipe).parameters()),
        latent=list(fused.shape[1:]), seconds_per_image=seconds,
        speedup_vs_diffusers={v: seconds["diffusers"] / seconds[v] for v in VARIANTS[1:]},
        speedup_graph_vs_accelerate=seconds["accelerate"] / seconds["accelerate + cuda_graph"],
        graph_equals_accelerate=bool(torch.equal(fused, graph_first) and torch.equal(fused, graph_last)),
        accelerate_repeatable=bool(torch.equal(fused, outputs["accelerate"][1])),
        accelerate_vs_diffusers_max_abs_diff=float((fused.double() - outputs["diffusers"][0].double()).abs().max()),
        output_max_abs=float(fused.double().abs().max()),
        cuda_graphs_captured=len(forward.graphs), cuda_graph_fallbacks=list(forward.fallbacks))


def main(argv=None) -> None:
    ap = cli.parser("pipeline", __doc__)
    ap.add_argument("--device", type=cli.device, default=cli.default_device())
    ap.add_argument("--pipelines", type=cli.listed(cli.choice(PIPELINES, "pipeline")), default="sd,sd3")
    ap.add_argument("--latent", type=cli.positive_int, default=None,
                    help="latent side for every pipeline (default: SD 64 and SD3 128 on CUDA, 32 on a CPU)")
    ap.add_argument("--steps", type=cli.positive_int, default=20)
    ap.add_argument("--guidance", type=cli.positive_float, default=7.0,
                    help="classifier-free guidance scale (> 1: the denoiser sees the doubled batch)")
    ap.add_argument("--batch", type=cli.positive_int, default=1, help="images per pipeline call")
    ap.add_argument("--dtype", type=cli.dtype, default="fp32", help="fp32, fp16, bf16, fp64 or torch's names")
    ap.add_argument("--threads", type=cli.nonnegative_int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--min-time", type=cli.positive_float, default=1.0)
    ap.add_argument("--out", default="bench/results", help="directory of the JSON ('' for none)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, DTYPES[args.dtype]
    record = machine_record(device)
    latents = {name: args.latent or LATENT[device.type][name] for name in args.pipelines}
    print(f"device: {record['device']} ({record['threads']} threads), torch {record['torch']}, diffusers "
          f"{record['diffusers']}, {args.steps} steps, guidance {args.guidance}, batch {args.batch}, {args.dtype}")
    header = (f"{'pipeline':<10}{'latent':<14}" + "".join(f"{v + ' [s]':>28}" for v in VARIANTS)
              + f"{'graph == eager':>16}{'max |fused - diffusers|':>26}")
    print(header)
    print("-" * len(header))
    rows = []
    for name in args.pipelines:
        row = run_variants(name, device, dtype, latents[name], args.steps, args.guidance, args.batch,
                           args.min_time)
        rows.append(row)
        cells = "".join(f"{row['seconds_per_image'][v]:>28.3f}" for v in VARIANTS)
        print(f"{name:<10}{'x'.join(map(str, row['latent'])):<14}{cells}{str(row['graph_equals_accelerate']):>16}"
              f"{row['accelerate_vs_diffusers_max_abs_diff']:>26.2e}")
        for reason in row["cuda_graph_fallbacks"]:
            print(f"  {name}: cuda_graph ran eagerly: {reason}")
    if args.out:
        payload = dict(benchmark="pipeline", machine=record,
                       config=dict(steps=args.steps, guidance_scale=args.guidance, batch=args.batch,
                                   dtype=args.dtype, latent=latents, min_time=args.min_time,
                                   output="final latents (no VAE decode)", conditioning="random prompt embeddings"),
                       note="seconds per image, median of 5 batches of whole pipeline calls; the three variants "
                            "run in order on one pipeline object",
                       rows=rows)
        path = write_json(Path(args.out) / f"pipeline-{slug(record['device'])}.json", payload)
        print(f"wrote {path}")
