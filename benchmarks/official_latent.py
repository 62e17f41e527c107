"""Our generate.py against the official EDM2 generate_images.py on an img512-style latent pickle, both with the same
VAE: how many pixels differ.

    # A checkout of https://github.com/NVlabs/edm2 (outside this repo) and the extras (diffusers)
    python benchmarks/official_latent.py --official=/path/to/edm2 --work=/tmp/latent-compare \\
        --out=benchmarks/results/official-latent.json

The official code, run from its own checkout in a child process, makes everything: a tiny AutoencoderKL of random
weights (saved with save_pretrained), two small class-conditional EDM2 networks on its latents (float16, as its
snapshots are), their pickles (``training.encoders.StabilityVAEEncoder`` naming the VAE's folder), and the images of
its ``generate_images`` for seeds 0-15 at its defaults (32 Heun steps), unguided and autoguided (w = 2). Then our
generate.py loads the same pickles through the safe loader and writes the same seeds. The official sampler runs in
float32 and ours in float64 (as EDM's), so a few pixels may differ by one level after rounding. Last, our
dataset_tool.py encode and the official encoder (one image at a time, as its dataset_tool.py calls it) turn the same
PNGs into raw latents; in batches of more than one image the CPU's convolutions round differently (1e-6).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import click
import numpy as np
import PIL.Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = 16
IMAGES = 12
RUNS = {"unguided": [], "autoguided w=2": ["--gnet={work}/gnet.pkl", "--guidance=2"]}

OFFICIAL_SIDE = r'''
import os, pickle, sys
import torch
work = sys.argv[1]
sys.path.insert(0, os.getcwd())  # The official checkout.
import dnnlib, diffusers
import generate_images
from training.encoders import StabilityVAEEncoder
from training.networks_edm2 import Precond

torch.manual_seed(0)
diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=4, sample_size=32).save_pretrained(f"{work}/vae")

def network(seed, channels):
    torch.manual_seed(seed)
    net = Precond(img_resolution=8, img_channels=4, label_dim=10, model_channels=channels, channel_mult=[1, 2],
                  num_blocks=1, attn_resolutions=[4])
    with torch.no_grad():  # Away from the initialization, where every network denoises alike (out_gain = 0).
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        net.unet.out_gain.fill_(1)
    return net.eval().requires_grad_(False).to(torch.float16)

for name, seed, channels in (("net", 1, 16), ("gnet", 2, 8)):
    data = dnnlib.EasyDict(encoder=StabilityVAEEncoder(vae_name=f"{work}/vae"), loss_fn=None, ema=network(seed, channels),
                           dataset_kwargs=dnnlib.EasyDict(class_name="training.dataset.ImageFolderDataset", path="x.zip"))
    with open(f"{work}/{name}.pkl", "wb") as f:
        pickle.dump(data, f)

import numpy as np, PIL.Image  # Its encoder, one image at a time as its dataset_tool.py encode calls it.
os.makedirs(f"{work}/images", exist_ok=True)
os.makedirs(f"{work}/official/latents", exist_ok=True)
rng = np.random.default_rng(0)
encoder = StabilityVAEEncoder(vae_name=f"{work}/vae")
for i in range(IMAGES):
    image = (rng.random([32, 32, 3]) * 255).astype(np.uint8)
    PIL.Image.fromarray(image).save(f"{work}/images/{i:03d}.png")
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None]
    np.save(f"{work}/official/latents/{i:03d}.npy", encoder.encode_pixels(pixels)[0].numpy())

os.environ.update(MASTER_ADDR="localhost", MASTER_PORT="29577", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
torch.distributed.init_process_group(backend="gloo")
for tag, kwargs in (("unguided", {}), ("autoguided w=2", dict(gnet=f"{work}/gnet.pkl", guidance=2.0))):
    for _ in generate_images.generate_images(net=f"{work}/net.pkl", outdir=f"{work}/official/{tag}",
                                             seeds=range(SEEDS), max_batch_size=SEEDS, device=torch.device("cpu"),
                                             **kwargs):
        pass
'''.replace("SEEDS", str(SEEDS)).replace("IMAGES", str(IMAGES))


def read_images(folder: str) -> np.ndarray:
    return np.stack([np.array(PIL.Image.open(os.path.join(folder, f"{seed:06d}.png"))) for seed in range(SEEDS)])


def run(command: list[str], cwd: str) -> None:
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise click.ClickException(f"{' '.join(command[:2])} failed: {proc.stderr.strip().splitlines()[-1]}")


@click.command()
@click.option("--official", help="A checkout of NVlabs/edm2", metavar="DIR", required=True)
@click.option("--work", help="Scratch folder for the VAE, the pickles and the images", metavar="DIR", required=True)
@click.option("--out", help="Where to write the JSON", metavar="JSON")
def main(official: str, work: str, out: str | None):
    """Compare our generate.py with the official generate_images.py on latent pickles."""
    work = os.path.abspath(work)
    os.makedirs(work, exist_ok=True)
    script = os.path.join(work, "official_side.py")
    with open(script, "w") as f:
        f.write(OFFICIAL_SIDE)
    run([sys.executable, script, work], cwd=os.path.abspath(official))
    results = {}
    for tag, extra in RUNS.items():
        ours = os.path.join(work, "ours", tag)
        run([sys.executable, "generate.py", f"--network={work}/net.pkl", f"--outdir={ours}", f"--seeds=0-{SEEDS - 1}",
             "--steps=32", f"--batch={SEEDS}", "--device=cpu", *[e.format(work=work) for e in extra]], cwd=REPO)
        theirs, mine = (read_images(folder).astype(np.int64) for folder in (os.path.join(work, "official", tag), ours))
        diff = np.abs(theirs - mine)
        results[tag] = dict(images=SEEDS, shape=list(theirs.shape[1:]), max_abs_diff=int(diff.max()),
                            differing_values=int((diff > 0).sum()), values=int(diff.size),
                            identical_images=int(sum(bool((d == 0).all()) for d in diff)))
        print(f"{tag}: {results[tag]['identical_images']}/{SEEDS} images identical, "
              f"{results[tag]['differing_values']} of {diff.size} values differ, by at most {diff.max()}")
    results["encode"] = {f"batch {batch}": compare_encodings(work, batch) for batch in (1, 5)}
    if out:
        with open(out, "w") as f:
            json.dump(dict(comparison="generate.py vs official EDM2 generate_images.py, latent pickles, same VAE; "
                                      "dataset_tool.py encode (batches of 1 and 5) vs the official encoder (one at a time)",
                           sampler="Heun, 32 steps, float64 (ours) vs float32 (official)", results=results), f,
                      indent=1)


def compare_encodings(work: str, batch: int) -> dict:
    """Our dataset_tool.py encode, in batches of ``batch``, against the official encoder's raw latents of the same
    PNGs."""
    import zipfile
    dest = os.path.join(work, "ours", f"latents-batch{batch}.zip")
    if os.path.exists(dest):
        os.remove(dest)
    run([sys.executable, "dataset_tool.py", "encode", f"--source={work}/images", f"--dest={dest}",
         f"--model-url={work}/vae", f"--batch={batch}", "--device=cpu"], cwd=REPO)
    with zipfile.ZipFile(dest) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".npy"))
        ours = np.stack([np.load(z.open(n)) for n in names])
    theirs = np.stack([np.load(os.path.join(work, "official", "latents", f"{i:03d}.npy")) for i in range(IMAGES)])
    diff = np.abs(ours - theirs)
    result = dict(images=IMAGES, shape=list(ours.shape[1:]), dtype=str(ours.dtype), names=names[:2],
                  max_abs_diff=float(diff.max()), max_relative_diff=float((diff / np.abs(theirs).clip(1e-3)).max()))
    print(f"encode, batch {batch}: {IMAGES} images, raw latents {list(ours.shape[1:])} {ours.dtype}, at most {diff.max():.3g} apart")
    return result


if __name__ == "__main__":
    main()
