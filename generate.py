"""Generate images from a trained or pretrained EDM network.

Examples:

    # 64 CIFAR-10 images with the paper's deterministic sampler (18 steps, NFE 35)
    python generate.py --network https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl \\
        --outdir out --seeds 0-63 --batch 64

    # ImageNet-64 with the stochastic sampler, on 8 GPUs
    torchrun --standalone --nproc_per_node=8 generate.py --outdir out --seeds 0-49999 --subdirs \\
        --network https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-imagenet-64x64-cond-adm.pkl \\
        --steps 256 --S_churn 40 --S_min 0.05 --S_max 50 --S_noise 1.003

    # A fast sampler of training.sampling's SAMPLERS: at most 20 network calls per image
    python generate.py --network ... --outdir out --seeds 0-63 --sampler unipc_bh2 --nfe 20 --steps-schedule optimized

Any of --solver/--disc/--schedule/--scaling switches to the ablation sampler (Table 1 combinations); any of
--sampler/--nfe/--steps-schedule to a named sampler (docs/samplers.md). The two do not mix.
"""

from __future__ import annotations

import pickle

import click

from dnnlib.util import parse_int_list
from torch_utils import distributed
from training.sampling.generation import GenerateOptions, generate_to_files
from training.sampling import BALANCED, SAMPLERS, STEPS_SCHEDULES, sigma_steps, split_steps_schedule
from training.sampling.time_steps import DEFAULT_NUM_STEPS


def _seeds(ctx, param, value):
    try:
        return parse_int_list(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def parse_interval(value: str | None) -> tuple[float, float] | None:
    """'LO,HI' -> (lo, hi) with 0 <= lo < hi."""
    if value is None:
        return None
    try:
        lo, hi = (float(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"'{value}': expected two numbers LO,HI") from None
    if not 0 <= lo < hi:
        raise click.BadParameter(f"'{value}': expected 0 <= LO < HI")
    return lo, hi


def parse_class(value: str | None) -> int | str | None:
    """A class index >= 0, or 'balanced' (seed s gets class s mod the class count)."""
    if value is None or value == BALANCED:
        return value
    try:
        class_idx = int(value)
    except ValueError:
        raise click.BadParameter(f"'{value}': expected a class index or '{BALANCED}'") from None
    if class_idx < 0:
        raise click.BadParameter(f"'{value}': a class index is at least 0")
    return class_idx


def parse_steps_schedule(value: str | None) -> str | None:
    """A name of STEPS_SCHEDULES, 'polyexponential:P' with a number P > 0; either with '+gaussian' or not."""
    name = None if value is None else split_steps_schedule(value)[0]
    if name is None or name == "optimized":
        return value
    try:
        sigma_steps(name, 3, 0.002, 80)
    except ValueError:
        raise click.BadParameter(f"'{value}': expected one of {', '.join(STEPS_SCHEDULES)} "
                                 f"(polyexponential:P for an exponent P; NAME+gaussian for an analytic first "
                                 f"step)") from None
    return value


@click.command()
@click.option("--network", "network", help="Network pickle or safetensors export (path or URL)", metavar="PATH|URL",
              required=True)
@click.option("--outdir", help="Where to save the images, one {seed:06d}.png each", metavar="DIR")
@click.option("--seeds", help="Seeds, one image each: a list and/or ranges, e.g. 0-63 or 1,2,5-10", metavar="LIST", default="0-63", show_default=True,
              callback=_seeds)
@click.option("--subdirs", help="Save in subfolders of 1000 seeds", is_flag=True)
@click.option("--class", "class_idx", help="Class of every image, or 'balanced': seed s gets class s mod the class "
              "count  [default: drawn per seed]", metavar="INT|balanced",
              callback=lambda ctx, param, value: parse_class(value))
@click.option("--batch", "max_batch_size", help="Images per batch on each process, at most", metavar="INT",
              type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--grid", help="Also save all images as one grid PNG", metavar="PNG")
@click.option("--device", help="cpu, cuda, cuda:1, ...  [default: cuda if available]", metavar="DEVICE")
@click.option("--steps", "num_steps", help="Time steps N of the sampler (NFE 2N-1 with Heun)", metavar="INT", type=click.IntRange(min=2),
              default=DEFAULT_NUM_STEPS, show_default=True)
@click.option("--sigma_min", help="Smallest sigma of the time steps  [default: the discretization's]", metavar="FLOAT",
              type=click.FloatRange(min=0, min_open=True))
@click.option("--sigma_max", help="Largest sigma of the time steps  [default: the discretization's]", metavar="FLOAT",
              type=click.FloatRange(min=0, min_open=True))
@click.option("--rho", help="rho of the EDM time steps (Eq. 5)", metavar="FLOAT", type=click.FloatRange(min=0, min_open=True),
              default=7, show_default=True)
@click.option("--S_churn", "S_churn", help="Churn S_churn of Algorithm 2 (0: deterministic)", metavar="FLOAT", type=click.FloatRange(min=0),
              default=0, show_default=True)
@click.option("--S_min", "S_min", help="Churn only where sigma >= S_min", metavar="FLOAT", type=click.FloatRange(min=0),
              default=0, show_default=True)
@click.option("--S_max", "S_max", help="Churn only where sigma <= S_max", metavar="FLOAT", type=click.FloatRange(min=0),
              default="inf", show_default=True)
@click.option("--S_noise", "S_noise", help="S_noise: scale of the noise churn adds", metavar="FLOAT", type=float, default=1,
              show_default=True)
@click.option("--solver", help="Table 1 ablation: ODE solver", type=click.Choice(["euler", "heun"]))
@click.option("--disc", "discretization", help="Table 1 ablation: time steps {t_i}",
              type=click.Choice(["vp", "ve", "iddpm", "edm"]))
@click.option("--schedule", help="Table 1 ablation: sigma(t)", type=click.Choice(["vp", "ve", "linear"]))
@click.option("--scaling", help="Table 1 ablation: s(t)", type=click.Choice(["vp", "none"]))
@click.option("--sampler", help="A named sampler of training.sampling.SAMPLERS (docs/samplers.md), e.g. unipc_bh2, "
              "dpmpp_3m, ipndm; 'heun' and 'euler' are the paper's  [default: heun when --nfe or --steps-schedule "
              "is given]", type=click.Choice(list(SAMPLERS)))
@click.option("--nfe", help="With --sampler: network calls per image, at most  [default: 2*steps-1, the cost of "
              "the paper's Heun with --steps]", metavar="INT", type=click.IntRange(min=1))
@click.option("--steps-schedule", "steps_schedule", help="With --sampler: its noise levels, 'edm' (Eq. 5 with "
              "--rho), 'loguniform', 'polyexponential[:P]' or 'optimized' (searched once per network and sampler, "
              "on its own noise, not counted in --nfe); NAME+gaussian: the first step analytic, by the network's "
              "Gaussian fit (docs/samplers.md)  [default: the sampler's]. Separate from --disc, the Table 1 "
              "ablation's time steps, since --disc switches to the ablation sampler",
              metavar="NAME", callback=lambda ctx, param, value: parse_steps_schedule(value))
@click.option("--gnet", help="Guiding network: a smaller or shorter-trained one (autoguidance), or 'uncond' for "
              "classifier-free guidance (the network without its label)", metavar="PATH|URL|uncond")
@click.option("--guidance", help="Guidance weight w: D_g + w (D - D_g); 1 = none", metavar="FLOAT", type=float,
              default=1, show_default=True)
@click.option("--guidance-interval", "guidance_interval", help="Guide only for sigma in this range, e.g. 0.28,2.9",
              metavar="LO,HI", callback=lambda ctx, param, value: parse_interval(value))
@click.option("--precision", help="Run the U-Net in this precision  [default: the network's own]",
              type=click.Choice(["fp32", "bf16", "fp16"]))
@click.option("--channels-last", "channels_last", help="NHWC memory format  [default: per device; on a CPU for EDM2 "
              "networks only]", metavar="BOOL", type=bool)
@click.option("--compile", "compile", help="torch.compile the network  [default: off]", metavar="BOOL", type=bool)
@click.option("--tf32", help="TF32 on Ampere+ GPUs  [default: off]", metavar="BOOL", type=bool)
def main(network, outdir, seeds, subdirs, class_idx, max_batch_size, grid, device, gnet, guidance, guidance_interval,
         precision, channels_last, compile, tf32, **sampler_kwargs):
    """Generate images with the EDM samplers (Algorithms 1 and 2, or any Table 1 combination)."""
    fast_paths = {k: v for k, v in dict(channels_last=channels_last, compile=compile, tf32=tf32).items()
                  if v is not None}
    options = GenerateOptions(network=network, seeds=seeds, outdir=outdir, subdirs=subdirs, grid=grid,
                              class_idx=class_idx, max_batch_size=max_batch_size, device=device,
                              sampler_kwargs=sampler_kwargs, fast_paths=fast_paths, precision=precision, gnet=gnet,
                              guidance=guidance, guidance_interval=guidance_interval)
    try:
        summary = generate_to_files(options)
        where = " and ".join(p for p in (outdir and f"{outdir}/", grid) if p)
        distributed.print0(f"Generated {summary['num_images']} images with {summary['sampler']} in "
                           f"{summary['seconds']:.1f} s ({summary['num_images'] / max(summary['seconds'], 1e-9):.2f} "
                           f"img/s, {summary['world_size']} process(es) on {summary['device']}) -> {where}")
    except (ValueError, OSError, pickle.UnpicklingError) as e:
        raise click.ClickException(str(e)) from None
    finally:
        distributed.shutdown()

if __name__ == "__main__":
    main()
