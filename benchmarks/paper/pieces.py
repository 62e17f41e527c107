"""The pieces every experiment of the miniature is made of, each resumable: the data, the reference statistics, one
training run per (config, seed), and one FID evaluation per (network, sampler settings).

A piece is finished when its JSON result exists; results are written atomically (a temporary file, then a
rename), so an interrupted command leaves no half-written result, and running it again skips every finished
piece. A training run that was interrupted leaves its run directory without a result; it is trained again from
the start (a piece is a few minutes at most).

Layout of an output folder (one per size):

    size.json                       the Size it was made with (another size or changed settings are refused)
    data/train.zip ...              the embedded Fashion-MNIST: training images, reference images, floor images
    reference.npz                   Inception statistics of the reference images (computed once, then reused)
    train/<config>-seed<k>/         the training run (log.txt, stats.jsonl, training_options.json, snapshot)
    train/<config>-seed<k>.json     its result: images seen, wall-clock, parameters, options, snapshot
    eval/<experiment>/<piece>.json  one FID evaluation: FID, measured NFE, samples, seconds (or a sampling error)
    eval/converged/<...>.npy        the images a sampling error is measured against (many steps), made once
    eval/floor-<n>.json             the real-data floor at n images
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import shutil
import time
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

import dnnlib
from benchmarks.paper.configs import LOSS_CLASSES, Size, train_args, train_options
from dnnlib.util import atomic_write_bytes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(REPO, "data", "fashion-mnist", "t10k-images-idx3-ubyte.gz")
NUM_SOURCE_IMAGES = 10000
HELD_OUT_START = NUM_SOURCE_IMAGES // 2  # Images from here on are never trained on.


def write_json(path: str, data: dict) -> None:
    """Write ``data`` as JSON atomically (folders made as needed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode(), fsync=False)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def machine_description(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: CPU model and cores, GPU, PyTorch, threads, load."""
    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
        flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    info = dict(cpu=cpu, cpu_count=os.cpu_count(), avx512=any(flag.startswith("avx512") for flag in flags),
                torch=torch.__version__, torch_threads=torch.get_num_threads(), device=str(device),
                load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


@dataclasses.dataclass
class Piece:
    """One resumable unit of work: ``compute()`` returns the dict written to ``key`` (a path in the output folder)."""
    key: str
    label: str
    compute: Callable[[], dict]


@dataclasses.dataclass
class RunSummary:
    total: int
    ran: int
    seconds: float

    def line(self, name: str) -> str:
        done_before = self.total - self.ran
        return (f"{name}: {self.total} pieces ({self.ran} run now, {done_before} done before) in "
                f"{self.seconds / 60:.1f} min")


class Workspace:
    """The output folder of one size: paths, data, detector, reference statistics, and the pieces' results."""

    def __init__(self, outdir: str, size: Size, device: torch.device):
        self.outdir = os.path.abspath(outdir)
        self.size = size
        self.device = device
        self._detector = None
        self._reference: dict[str, np.ndarray] | None = None

    def path(self, *parts: str) -> str:
        return os.path.join(self.outdir, *parts)

    # ------------------------------------------------------------------------
    # Set-up: the size check and the data.

    def prepare(self) -> None:
        """Record the size (refusing a folder made with another size or other settings) and convert the data."""
        settings = dict(dataclasses.asdict(self.size), seeds=list(self.size.seeds))
        settings = json.loads(json.dumps(settings))  # Tuples as lists, as they read back.
        path = self.path("size.json")
        if os.path.isfile(path):
            earlier = read_json(path)
            changed = sorted(key for key in set(settings) | set(earlier) if settings.get(key) != earlier.get(key))
            if changed:
                raise ValueError(f"--outdir={self.outdir} holds results of size '{earlier.get('name')}' with other "
                                 f"settings ({', '.join(changed)}); use another --outdir")
        else:
            write_json(path, settings)
        for name, first, count in self.data_splits():
            self._convert(name, first, count)

    def data_splits(self) -> list[tuple[str, int, int]]:
        """(file, first embedded image, count): the training images, the held-out reference images, and the floor's
        real images (held-out after the reference where enough are left, else the first training images)."""
        size = self.size
        num_floor = max(size.table2_samples, size.fig2_samples, size.fig5b_samples)
        if size.train_images > HELD_OUT_START or size.num_ref > NUM_SOURCE_IMAGES - HELD_OUT_START:
            raise ValueError(f"size '{size.name}': at most {HELD_OUT_START} training and {HELD_OUT_START} "
                             f"reference images")
        floor_first = HELD_OUT_START + size.num_ref
        if floor_first + num_floor > NUM_SOURCE_IMAGES:
            floor_first = 0
        return [("train.zip", 0, size.train_images), ("reference.zip", HELD_OUT_START, size.num_ref),
                ("floor.zip", floor_first, num_floor)]

    def data(self, name: str) -> str:
        return self.path("data", name)

    def _convert(self, name: str, first: int, count: int) -> None:
        from training.data.convert import convert_dataset

        dest = self.data(name)
        if os.path.isfile(dest):
            return
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = dest + ".tmp.zip"
        if os.path.exists(tmp):
            os.remove(tmp)  # Left by an interrupted conversion.
        convert_dataset(SOURCE, tmp, max_images=count, first_image=first, workers=1, progress=False)
        os.replace(tmp, dest)

    # ------------------------------------------------------------------------
    # FID: the detector, the reference statistics, features of real and generated images.

    def detector(self):
        if self._detector is None:
            from metrics.detector import load_detector
            self._detector = load_detector(device=self.device)
        return self._detector

    def reference(self) -> dict[str, np.ndarray]:
        """Statistics of the held-out reference images: computed once per output folder, then read back."""
        from metrics.evaluate import reference_from_features
        from metrics.reference import load_reference, save_reference

        if self._reference is None:
            path = self.path("reference.npz")
            if not os.path.isfile(path):
                save_reference(path, reference_from_features(self.real_features("reference.zip", self.size.num_ref)))
            self._reference = load_reference(path)
        return self._reference

    def real_features(self, name: str, count: int) -> np.ndarray:
        from metrics.features import compute_features, dataset_batches
        from training.data.dataset import ImageFolderDataset

        dataset = ImageFolderDataset(self.data(name), max_size=count)
        return compute_features(self.detector(), dataset_batches(dataset, num_workers=0), len(dataset),
                                self.size.batch, self.device, progress=False)

    def fid_of_features(self, features: np.ndarray) -> float:
        from metrics.evaluate import compute_metrics
        return float(compute_metrics(features, self.reference(), ["fid"])["fid"])

    # ------------------------------------------------------------------------
    # Pieces.

    def finished(self, key: str) -> bool:
        return os.path.isfile(self.path(key))

    def result(self, piece: Piece) -> dict:
        """The piece's result, computed (and written) first if it is not there yet."""
        path = self.path(piece.key)
        if not os.path.isfile(path):
            start = time.time()
            result = dict(piece.compute(), seconds=round(time.time() - start, 2))
            write_json(path, result)
        return read_json(path)

    def run(self, pieces: list[Piece], desc: str) -> RunSummary:
        """Every piece not finished yet, in order, under a progress bar over pieces."""
        start = time.time()
        todo = [piece for piece in pieces if not self.finished(piece.key)]
        with tqdm(total=len(pieces), initial=len(pieces) - len(todo), desc=desc, unit="piece",
                  dynamic_ncols=True) as bar:
            for piece in todo:
                bar.set_postfix_str(piece.label)
                if not self.finished(piece.key):  # A later piece may have needed (and made) it already.
                    self.result(piece)
                bar.update(1)
        return RunSummary(total=len(pieces), ran=len(todo), seconds=time.time() - start)

    # ------------------------------------------------------------------------
    # The two kinds of work.

    def train_piece(self, config: str, seed: int) -> Piece:
        return Piece(f"train/{config}-seed{seed}.json", f"train {config} seed {seed}",
                     lambda: self._train(config, seed))

    def trained(self, config: str, seed: int) -> dict:
        """The training result of (config, seed), training it first if needed."""
        return self.result(self.train_piece(config, seed))

    def _train(self, config: str, seed: int) -> dict:
        from training.loop.training_loop import training_loop
        from training.run_files import newest_snapshot

        options = train_options(config, self.size, seed)
        run_dir = self.path("train", f"{config}-seed{seed}")
        if os.path.isdir(run_dir):
            shutil.rmtree(run_dir)  # An interrupted run: start it again.
        kwargs = training_kwargs(options, self.data("train.zip"), run_dir, self.device, self.size.tick_kimg)
        start = time.time()
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # log.txt keeps the log.
            state = training_loop(**kwargs)
        seconds = time.time() - start
        snapshot = newest_snapshot(run_dir)
        kimg = state.cur_nimg / 1e3
        return dict(config=config, seed=seed, options=options, train_args=train_args(options),
                    network_class=kwargs["network_kwargs"]["class_name"],
                    loss_class=kwargs["loss_kwargs"]["class_name"], augment=kwargs.get("augment_kwargs") is not None,
                    params=sum(p.numel() for p in state.net.parameters()), images=state.cur_nimg, kimg=kimg,
                    train_seconds=round(seconds, 2), sec_per_kimg=round(seconds / kimg, 3),
                    snapshot=os.path.relpath(snapshot, self.outdir), device=str(self.device))

    def fid_piece(self, key: str, label: str, config: str, seed: int, sampler_kwargs: dict,
                  num_samples: int) -> Piece:
        return Piece(key, label, lambda: self._fid(config, seed, sampler_kwargs, num_samples))

    def _fid(self, config: str, seed: int, sampler_kwargs: dict, num_samples: int) -> dict:
        """FID of ``num_samples`` images (seeds 0..N-1, as generate.py makes them) of a trained network with these
        sampler options, made in memory; the NFE is counted, not computed from the step count."""
        from training.checkpoint import load_network
        from training.sampling import sampler_spec
        from training.sampling.generation import generated_features

        trained = self.trained(config, seed)
        net = CountingDenoiser(load_network(self.path(trained["snapshot"]), device=self.device))
        seeds = list(range(num_samples))
        features = generated_features(net, seeds, self.detector(), self.device, self.size.batch,
                                      sampler=sampler_spec(**sampler_kwargs), progress=False)
        nfe = net.calls / math.ceil(num_samples / self.size.batch)  # Every batch runs the whole sampler.
        return dict(config=config, seed=seed, sampler_kwargs=sampler_kwargs, num_samples=num_samples,
                    num_ref=self.size.num_ref, nfe=int(nfe) if nfe.is_integer() else nfe,
                    fid=self.fid_of_features(features))

    def error_piece(self, key: str, label: str, config: str, seed: int, sampler_kwargs: dict,
                    converged_kwargs: dict, num_samples: int) -> Piece:
        return Piece(key, label, lambda: self._sampling_error(config, seed, sampler_kwargs, converged_kwargs,
                                                              num_samples))

    def _sampling_error(self, config: str, seed: int, sampler_kwargs: dict, converged_kwargs: dict,
                        num_samples: int) -> dict:
        """The sampler's discretization error: the RMS difference, in 8-bit levels (images in [-1, 1] times 127.5),
        between its images and the same seeds' images at ``converged_kwargs`` (the same sampler with many more
        steps), before rounding to pixels. It depends on the solver, not on how good the network's images are."""
        images = self.samples(config, seed, sampler_kwargs, num_samples)
        converged = self.converged_samples(config, seed, converged_kwargs, num_samples)
        rms = float(np.sqrt(np.mean((images.astype(np.float64) - converged) ** 2)) * 127.5)
        return dict(config=config, seed=seed, sampler_kwargs=sampler_kwargs, converged_kwargs=converged_kwargs,
                    num_samples=num_samples, rms_error=rms)

    def samples(self, config: str, seed: int, sampler_kwargs: dict, num_samples: int) -> np.ndarray:
        """Images [N, C, H, W] float32 in about [-1, 1] for seeds 0..N-1, as the sampler leaves them (not rounded)."""
        from training.checkpoint import load_network
        from training.sampling import generate_images, sampler_spec

        net = load_network(self.path(self.trained(config, seed)["snapshot"]), device=self.device)
        seeds = list(range(num_samples))
        sampler = sampler_spec(**sampler_kwargs)
        batches = [generate_images(net, seeds[i:i + self.size.batch], device=self.device, decode=lambda x: x,
                                   sampler=sampler) for i in range(0, num_samples, self.size.batch)]
        return torch.cat(batches).float().cpu().numpy()

    def converged_samples(self, config: str, seed: int, sampler_kwargs: dict, num_samples: int) -> np.ndarray:
        """``samples`` at these settings, made once per output folder (an .npy beside the results), then read back."""
        name = "-".join(f"{k}{v}" for k, v in sorted(sampler_kwargs.items()))
        path = self.path("eval", "converged", f"{config}-seed{seed}-{name}-n{num_samples}.npy")
        if not os.path.isfile(path):
            buffer = io.BytesIO()
            np.save(buffer, self.samples(config, seed, sampler_kwargs, num_samples))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write_bytes(path, buffer.getvalue(), fsync=False)
        return np.load(path)

    def floor_piece(self, num_images: int) -> Piece:
        return Piece(f"eval/floor-{num_images}.json", f"floor {num_images}", lambda: self._floor(num_images))

    def _floor(self, num_images: int) -> dict:
        """FID of real images outside the reference against the reference: the best a model can do at these
        image counts."""
        features = self.real_features("floor.zip", num_images)
        return dict(num_images=num_images, num_ref=self.size.num_ref, fid=self.fid_of_features(features))


class CountingDenoiser:
    """A denoiser that counts its calls (the sampler's network evaluations) and is otherwise the network: every
    attribute (sigma range, round_sigma, image shape, parameters) is the network's."""

    def __init__(self, net):
        self.net = net
        self.calls = 0

    def __getattr__(self, name: str):
        return getattr(self.__dict__["net"], name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)


def training_kwargs(options: dict[str, Any], data: str, run_dir: str, device: torch.device,
                    tick_kimg: float) -> dnnlib.EasyDict:
    """training_loop() keyword arguments for ``options`` (``configs.train_options``), made by train.py's own
    parser and ``build_config``, so that every option means what it means on train.py's command line; then the
    loss is set from ``options['loss']`` (train.py ties it to --precond, and config D separates them)."""
    import train as train_cli

    args = train_args(options) + [f"--outdir={run_dir}", f"--data={data}", "--nosubdir", "--workers=0",
                                  f"--tick={tick_kimg:g}", "--snap=1000000", "--dump=1000000", "--grid=0"]
    opts = train_cli.resolve_defaults(dnnlib.EasyDict(train_cli.main.make_context("train.py", args).params))
    c = train_cli.build_config(opts, train_cli.open_dataset(opts))
    c.loss_kwargs = dnnlib.EasyDict(class_name=LOSS_CLASSES[options["loss"]])
    c.update(run_dir=run_dir, device=str(device), tensorboard=False)
    return c
