"""Convert images into the dataset format that train.py and fid.py read (the official EDM format).

Examples:
  python dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip
  python dataset_tool.py --source=data/fashion-mnist/t10k-images-idx3-ubyte.gz --dest=datasets/fmnist-32x32.zip
  python dataset_tool.py --source=downloads/ffhq/images1024x1024 --dest=datasets/ffhq-64x64.zip --resolution=64x64
See README.md, section "Datasets", docs/datasets.md (the rules in full) and training/data/sources.py and
convert.py for the sources and their labels.
"""

import click

from training.data.dataset import DatasetError
from training.data.convert import TRANSFORMS, convert_dataset, default_workers, parse_resolution


@click.command()
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
def main(source, dest, max_images, first_image, transform, resolution, workers, skip_bad):
    """Convert SOURCE into a dataset of PNGs in subfolders of 1000 with dataset.json labels."""
    try:
        size = parse_resolution(resolution) if resolution is not None else None
        summary = convert_dataset(source, dest, max_images=max_images, first_image=first_image, transform=transform, resolution=size,
                                  workers=workers, skip_bad=skip_bad, log=lambda line: click.echo(line, err=True))
    except DatasetError as e:
        raise click.ClickException(str(e)) from None
    click.echo(str(summary))


if __name__ == "__main__":
    main()
