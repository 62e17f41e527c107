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

from torch_utils import distributed
from training.cli_options import parse_class_option, parse_interval, parse_seeds, precision_option, sampler_options
from training.sampling.generation import GenerateOptions, generate_to_files


@click.command()
@click.option("--network", "network", help="Network pickle or safetensors export (path or URL)", metavar="PATH|URL",
              required=True)
@click.option("--outdir", help="Where to save the images, one {seed:06d}.png each", metavar="DIR")
@click.option("--seeds", help="Seeds, one image each: a list and/or ranges, e.g. 0-63 or 1,2,5-10", metavar="LIST", default="0-63", show_default=True,
              callback=parse_seeds)
@click.option("--subdirs", help="Save in subfolders of 1000 seeds", is_flag=True)
@click.option("--class", "class_idx", help="Class of every image, or 'balanced': seed s gets class s mod the class "
              "count  [default: drawn per seed]", metavar="INT|balanced",
              callback=parse_class_option)
@click.option("--batch", "max_batch_size", help="Images per batch on each process, at most", metavar="INT",
              type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--grid", help="Also save all images as one grid PNG", metavar="PNG")
@click.option("--device", help="cpu, cuda, cuda:1, ...  [default: cuda if available]", metavar="DEVICE")
@sampler_options
@click.option("--gnet", help="Guiding network: a smaller or shorter-trained one (autoguidance), or 'uncond' for "
              "classifier-free guidance (the network without its label)", metavar="PATH|URL|uncond")
@click.option("--guidance", help="Guidance weight w: D_g + w (D - D_g); 1 = none", metavar="FLOAT", type=float,
              default=1, show_default=True)
@click.option("--guidance-interval", "guidance_interval", help="Guide only for sigma in this range, e.g. 0.28,2.9",
              metavar="LO,HI", callback=lambda ctx, param, value: parse_interval(value))
@precision_option
@click.option("--channels-last", "channels_last", help="NHWC memory format  [default: per device; on a CPU for EDM2 "
              "networks only]", metavar="BOOL", type=bool)
@click.option("--compile", "compile", help="torch.compile the network  [default: off]", metavar="BOOL", type=bool)
@click.option("--tf32", help="TF32 on Ampere+ GPUs  [default: off]", metavar="BOOL", type=bool)
def main(network, outdir, seeds, subdirs, class_idx, max_batch_size, grid, device, gnet, guidance, guidance_interval,
         precision, channels_last, compile, tf32, sampler):
    """Generate images with the EDM samplers (Algorithms 1 and 2, or any Table 1 combination)."""
    fast_paths = {k: v for k, v in dict(channels_last=channels_last, compile=compile, tf32=tf32).items()
                  if v is not None}
    options = GenerateOptions(network=network, seeds=seeds, outdir=outdir, subdirs=subdirs, grid=grid,
                              class_idx=class_idx, max_batch_size=max_batch_size, device=device,
                              sampler=sampler, fast_paths=fast_paths, precision=precision, gnet=gnet,
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
