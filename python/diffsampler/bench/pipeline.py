"""`python -m diffsampler.bench pipeline`: whole diffusers pipelines, time per image with diffusers' scheduler,
with `accelerate(pipe)` (the fused drop-in) and with `accelerate(pipe, cuda_graph=True)` (the denoiser replayed
from a CUDA graph at every step).

The pipelines are diffusers' own `StableDiffusionPipeline` (DPM-Solver++ 2M) and `StableDiffusion3Pipeline`
(flow matching Euler, shift 3), built offline from small randomly initialised denoisers at a real latent size
(no text encoders, tokenizers or VAE: the prompt embeddings are random tensors passed in, and the output is the
final latents, so what is timed is the denoising loop), with classifier-free guidance. The variants are switched on one pipeline object and timed in interleaved rounds
(one call of each per round), so a shared machine's drifting load hits all alike. Every call starts from the
same generator seed: the fused images against diffusers' (max abs difference) and every captured call's against
the fused eager one (torch.equal) are recorded.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from diffsampler.bench import cli
from diffsampler.bench.cli import DTYPES
from diffsampler.bench.common import machine_record, slug, write_json

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


def interleaved(fns: dict, device: torch.device, rounds: int) -> tuple[dict, dict]:
    """Seconds per call of each fn(), timed in rounds that call every fn once in turn (a shared machine's
    drifting load then hits all alike), after one untimed round; the median and the fastest over the rounds,
    and every call's output."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, outputs = {name: [] for name in fns}, {name: [] for name in fns}
    for r in range(rounds + 1):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            outputs[name].append(fn())
            sync()
            if r:
                times[name].append(time.perf_counter() - t0)
    return {n: (statistics.median(t), min(t)) for n, t in times.items()}, outputs


def run_variants(name: str, device: torch.device, dtype: torch.dtype, latent: int, steps: int, guidance: float,
                 batch: int, rounds: int) -> dict:
    """The three variants of one pipeline (diffusers, accelerate, accelerate + cuda_graph), switched on one
    pipeline object: seconds per image, speed-ups, and the equality of their images (every call starts from
    the same seed, so each variant's calls must agree too)."""
    from diffsampler.integrations.diffusers import accelerate, captured_forward

    pipe, conditioning = build(name, device, dtype)
    module = denoiser(pipe)
    theirs = pipe.scheduler
    fused = accelerate(pipe, verbose=False)
    accelerate(pipe, verbose=False, cuda_graph=True)
    captured = captured_forward(pipe)

    def variant(scheduler, forward):
        def call():
            pipe.scheduler = scheduler
            if forward is None:
                vars(module).pop("forward", None)  # the class's own forward
            else:
                module.forward = forward
            return images(pipe, conditioning, device, latent, steps, guidance, batch)
        return call

    fns = dict(zip(VARIANTS, (variant(theirs, None), variant(fused, None), variant(fused, captured))))
    timed, outputs = interleaved(fns, device, rounds)
    ref = outputs["accelerate"][0]
    same = lambda v: all(torch.equal(ref, out) for out in outputs[v])
    seconds = {v: timed[v][0] / batch for v in VARIANTS}
    return dict(
        pipeline=name, pipeline_class=type(pipe).__name__, scheduler=type(theirs).__name__,
        denoiser=type(module).__name__, denoiser_parameters=sum(p.numel() for p in module.parameters()),
        latent=list(ref.shape[1:]), seconds_per_image=seconds,
        best_seconds_per_image={v: timed[v][1] / batch for v in VARIANTS},
        speedup_vs_diffusers={v: seconds["diffusers"] / seconds[v] for v in VARIANTS[1:]},
        speedup_graph_vs_accelerate=seconds["accelerate"] / seconds["accelerate + cuda_graph"],
        graph_equals_accelerate=same("accelerate + cuda_graph"), accelerate_repeatable=same("accelerate"),
        accelerate_vs_diffusers_max_abs_diff=float((ref.double() - outputs["diffusers"][0].double()).abs().max()),
        output_max_abs=float(ref.double().abs().max()),
        cuda_graphs_captured=len(captured.graphs), cuda_graph_fallbacks=list(captured.fallbacks))


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
    ap.add_argument("--rounds", type=cli.positive_int, default=5,
                    help="timed rounds (each calls every variant once; one untimed round first)")
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
                           args.rounds)
        rows.append(row)
        cells = "".join(f"{row['seconds_per_image'][v]:>28.3f}" for v in VARIANTS)
        print(f"{name:<10}{'x'.join(map(str, row['latent'])):<14}{cells}{str(row['graph_equals_accelerate']):>16}"
              f"{row['accelerate_vs_diffusers_max_abs_diff']:>26.2e}")
        for reason in row["cuda_graph_fallbacks"]:
            print(f"  {name}: cuda_graph ran eagerly: {reason}")
    if args.out:
        payload = dict(benchmark="pipeline", machine=record,
                       config=dict(steps=args.steps, guidance_scale=args.guidance, batch=args.batch,
                                   dtype=args.dtype, latent=latents, rounds=args.rounds,
                                   output="final latents (no VAE decode)", conditioning="random prompt embeddings"),
                       note="seconds per image: the median over the rounds of whole pipeline calls, each round "
                            "calling the three variants in turn on one pipeline object after an untimed round",
                       rows=rows)
        path = write_json(Path(args.out) / f"pipeline-{slug(record['device'])}.json", payload)
        print(f"wrote {path}")
