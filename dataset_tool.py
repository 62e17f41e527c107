"""Make the datasets that train.py and fid.py read: convert images (the official EDM format), encode them into
latents of Stability's VAE (EDM2's format, for latent diffusion), or decode such latents back into images.

Examples:
  python dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip
  python dataset_tool.py --source=data/fashion-mnist/t10k-images-idx3-ubyte.gz --dest=datasets/fmnist-32x32.zip
  python dataset_tool.py --source=downloads/ffhq/images1024x1024 --dest=datasets/ffhq-64x64.zip --resolution=64x64
  python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip
See README.md, section "Datasets", docs/datasets.md (the rules in full) and training/data/ (sources.py, convert.py,
latents.py) for the sources and their labels.
"""

import contextlib

import click

from torch_utils.distributed import pick_device
from training.data.convert import TRANSFORMS, convert_dataset, default_workers, parse_resolution
from training.data.dataset import DatasetError
from training.data.encoders import VAEError
from training.data.latents import DEFAULT_VAE, decode_dataset, encode_dataset


class ConvertByDefault(click.Group):
    """Options without a command convert (``dataset_tool.py --source=... --dest=...``), as before the commands."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["convert", *args]
        return super().parse_args(ctx, args)


@click.group(cls=ConvertByDefault)
def main():
    """Make datasets: convert images (also without the command's name), encode them into latents, decode latents."""


@main.command()
@click.option("--source", required=True, metavar="PATH",
              help="Folder or ZIP of images, cifar-10-python.tar.gz, *-images-idx3-ubyte.gz, or an LSUN lmdb folder")
@click.option("--dest", required=True, metavar="PATH", help="Output: a .zip (uncompressed) or a folder; must not exist")
@click.option("--max-images", type=click.IntRange(min=1), help="Stop after this many images")
@click.option("--first", "first_image", type=click.IntRange(min=0), default=0, show_default=True,
              help="Skip this many source images first (with --max-images: disjoint splits)")
@click.option("--transform", type=click.Choice(TRANSFORMS), help="Crop before resizing (needs --resolution)")
@click.option("--resolution", metavar="WxH",
              help="Output size in pixels, e.g. 64x64 (Lanczos resize); 28x28 keeps (Fashion-)MNIST unpadded")
@click.option("--workers", type=click.IntRange(min=1), default=default_workers, show_default="CPU cores, at most 16",
              help="Processes that decode and resize")
@click.option("--skip-bad", is_flag=True, help="Leave out unreadable images (and count them) instead of stopping")
def convert(source, dest, max_images, first_image, transform, resolution, workers, skip_bad):
    """Convert SOURCE into a dataset of PNGs in subfolders of 1000 with dataset.json labels."""
    try:
        size = parse_resolution(resolution) if resolution is not None else None
        summary = convert_dataset(source, dest, max_images=max_images, first_image=first_image, transform=transform,
                                  resolution=size, workers=workers, skip_bad=skip_bad,
                                  log=lambda line: click.echo(line, err=True))
    except DatasetError as e:
        raise click.ClickException(str(e)) from None
    click.echo(str(summary))


def vae_options(fn):
    """The options encode and decode share: the VAE, how many images it takes at once, where it runs."""
    for decorator in reversed([
        click.option("--model-url", "vae_name", default=DEFAULT_VAE, show_default=True, metavar="NAME|DIR",
                     help="The VAE: a Hugging Face hub name (downloaded once) or a diffusers AutoencoderKL folder"),
        click.option("--max-images", type=click.IntRange(min=1), help="Stop after this many images"),
        click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Images per VAE call"),
        click.option("--device", default=None, metavar="DEV", help="cpu, cuda, cuda:1  [default: CUDA if available]"),
    ]):
        fn = decorator(fn)
    return fn


@main.command()
@click.option("--source", required=True, metavar="PATH", help="Images: any source convert takes, e.g. a dataset ZIP")
@click.option("--dest", required=True, metavar="PATH", help="Output: a .zip (uncompressed) or a folder; must not exist")
@vae_options
def encode(source, dest, vae_name, max_images, batch, device):
    """Encode images into raw latents of Stability's VAE (EDM2's ImageNet-512 format): one .npy per image."""
    with user_errors():
        summary = encode_dataset(source, dest, vae_name, max_images=max_images, batch=batch,
                                 device=device_option(device))
    click.echo(str(summary))


@main.command()
@click.option("--source", required=True, metavar="PATH", help="A dataset of latents, as encode writes it")
@click.option("--dest", required=True, metavar="PATH", help="Output: a .zip (uncompressed) or a folder; must not exist")
@vae_options
def decode(source, dest, vae_name, max_images, batch, device):
    """Decode a dataset of latents into images (each latent's mean, through the VAE's decoder)."""
    with user_errors():
        summary = decode_dataset(source, dest, vae_name, max_images=max_images, batch=batch,
                                 device=device_option(device))
    click.echo(str(summary))


@contextlib.contextmanager
def user_errors():
    """Bad input, a missing VAE or diffusers as one line (click's 'Error: ...'), never a traceback."""
    try:
        yield
    except (DatasetError, VAEError) as e:
        raise click.ClickException(str(e).splitlines()[0]) from None


def device_option(device: str | None):
    try:
        return pick_device(device)
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    main()
