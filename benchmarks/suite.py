"""Throughput and memory of training, sampling and FID features, for variants of the fast paths side by side.

A variant is a ``training.perf.FastPaths`` (see ``parse_variant``: 'reference', 'default', 'default+bf16',
...). Each measurement runs every variant in a fresh process of its own, so that its process-wide switches (TF32,
retained host memory) are its alone and nothing else ran in it before, with its own networks (same seed, same
weights), warmed up (compiled) first; then rounds time every variant once while the others wait, so that a
machine whose load changes affects all variants alike; the reported time is the median over rounds.

Measured, per variant (images per second of wall-clock time):
- train: one full optimizer step of the training loop on a batch of random images: EDM loss, backward,
  gradient clean-up, Adam, EMA (``training.loop``'s pieces); also reported as s/kimg.
- forward: one denoiser evaluation D(x; sigma) of a batch (eval mode, no gradients).
- sample: ``generate_images`` with the EDM sampler, ``num_steps`` Heun steps (18 steps = NFE 35).
- fid: Inception pool3 features of uint8 images (resized to 299x299) with randomly initialised weights (speed
  does not depend on them), by the detector as fid.py runs it (float32, NHWC on the CPU, no TF32); of a variant's
  switches only the retained host memory applies, as FID must stay standard.
- process settings: the process-wide switches (TF32, retained host memory) in effect in each measurement's
  process, as the process reports them (``training.perf.process_settings``).
- data: the training loop's data stream (``open_data_stream``: the dataset's PNGs decoded by ``workers``
  DataLoader processes, in pinned memory on CUDA) with each batch copied to the device as the training step copies
  it; a dataset given as ``data``, or random images of the config's shape. Measured once, in the first variant's
  process (no fast path changes loading), without the dataset cache (every image decoded, as in the first epoch);
  each timed call first takes the batches the workers had ready, so that the rate is the one they produce at.
- peak memory: the variant process's resident set size (sampled every 5 ms) and, on CUDA, allocated GPU memory.
- error: the relative L2 error of the variant's denoiser output D(x; sigma) against the first variant's, on
  fixed inputs at sigma from 0.002 to 80, with every weight random (the zero-initialised output layers would
  otherwise hide the U-Net behind c_skip x). This checks each fast path on the device it is timed on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import platform
import statistics
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import psutil
import torch

from torch_utils.misc import randomize_parameters
from training.data.dataset import DATASET_JSON
from training.data.convert import DatasetWriter, archive_name, encode_png
from training.loss import EDM2Loss, EDMLoss
from training.networks import EDMPrecond
from training.networks.edm2 import Precond as EDM2Precond
from training.perf import FastPaths, apply_process_settings, as_memory_format, check_precision, maybe_compile, \
    parse_variant, prepare_network, process_settings
from training.sampling import PaperSampler, generate_images
from training.sampling.time_steps import DEFAULT_NUM_STEPS
from training.loop.schedules import ema_beta
from training.loop.setup import build_optimizer
from training.loop.step import sanitize_gradients, update_ema

# The network of each config as train.py builds it: EDMPrecond around a SongUNet with EDM's loss, unless the config
# names its own preconditioner ('precond') and loss ('loss').
DDPMPP = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
              channel_mult_noise=1, resample_filter=[1, 1], channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13)
CONFIGS = {
    # The official CIFAR-10 DDPM++ (cond, 56M parameters): train.py --arch=ddpmpp --cond=1.
    "cifar10-ddpmpp": dict(resolution=32, channels=3, label_dim=10, network=dict(DDPMPP, model_channels=128)),
    # The same architecture at a quarter of the width (3.5M parameters), for CPUs.
    "cifar10-ddpmpp-c32": dict(resolution=32, channels=3, label_dim=10, network=dict(DDPMPP, model_channels=32)),
    # quickstart.py's cpu preset: EDM2's U-Net (train.py --arch=edm2 --cbase=32 --cres=1,1,2 --blocks=1 --attn=
    # --dropout=0) on 28x28 Fashion-MNIST, with EDM2's loss at --arch=edm2's P_mean and P_std.
    "fmnist-edm2-cpu": dict(resolution=28, channels=1, label_dim=10, precond=EDM2Precond,
                            loss=lambda: EDM2Loss(P_mean=-0.8, P_std=1.6),
                            network=dict(model_channels=32, channel_mult=[1, 1, 2], num_blocks=1, attn_resolutions=[],
                                         dropout=0, use_fp16=False)),
    # A few-hundred-thousand-parameter 16x16 network, for tests.
    "tiny": dict(resolution=16, channels=3, label_dim=10,
                 network=dict(DDPMPP, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])),
}
MEASUREMENTS = ("train", "forward", "sample", "fid", "data")
DATA_BATCHES = 16        # Batches per timed call of the data measurement.
RANDOM_DATASET_SIZE = 1024
LOSS_SCALING_FP16 = 100  # As the official ImageNet fp16 config (--ls=100).


@dataclass
class Settings:
    config: str = "cifar10-ddpmpp-c32"
    device: str = "cpu"
    batch: int = 32
    num_steps: int = DEFAULT_NUM_STEPS  # Sampler steps: NFE = 2 * num_steps - 1.
    fid_batch: int = 8
    rounds: int = 3
    measurements: tuple = MEASUREMENTS
    seed: int = 0
    data: str | None = None             # Dataset ZIP or folder of the data measurement (None: random images).
    workers: int = 1                    # DataLoader processes of the data measurement (train.py --workers).


@dataclass
class Result:
    variant: str
    fast: FastPaths
    seconds: dict = field(default_factory=dict)     # measurement -> median seconds per call
    images: dict = field(default_factory=dict)      # measurement -> images per call
    warmup_seconds: float = 0.0                     # first calls (compilation included)
    peak_rss_gb: float = 0.0
    peak_gpu_gb: float = 0.0
    denoiser_output: torch.Tensor | None = None     # D on the check inputs (float64, CPU)
    denoiser_rel_error: float | None = None         # against the first variant's
    process_settings: dict = field(default_factory=dict)  # measurement -> its process's process-wide switches

    def add_peak_memory(self, rss_gb: float, gpu_gb: float) -> None:
        self.peak_rss_gb, self.peak_gpu_gb = max(self.peak_rss_gb, rss_gb), max(self.peak_gpu_gb, gpu_gb)

    def images_per_second(self, measurement: str) -> float | None:
        if measurement not in self.seconds:
            return None
        return self.images[measurement] / self.seconds[measurement]

    def as_dict(self) -> dict:
        rates = {f"{m}_img_per_s": self.images_per_second(m) for m in MEASUREMENTS}
        train = rates["train_img_per_s"]
        return dict(variant=self.variant, fast_paths=self.fast.describe(), **rates,
                    train_s_per_kimg=1000 / train if train else None, seconds=self.seconds,
                    warmup_seconds=self.warmup_seconds, peak_rss_gb=self.peak_rss_gb, peak_gpu_gb=self.peak_gpu_gb,
                    denoiser_rel_error=self.denoiser_rel_error, process_settings=self.process_settings)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"{name}, {threads} thread{'s' if threads > 1 else ''}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak resident set size of this process (sampled by a thread) and peak allocated CUDA memory, in GB."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # The CUDA memory API wants an index.
        self.device, self.interval = device, interval
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        process = psutil.Process(os.getpid())
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.init()  # The allocator's statistics exist only once CUDA is initialised.
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, psutil.Process(os.getpid()).memory_info().rss)

    @property
    def rss_gb(self) -> float:
        return self.peak_rss / 2 ** 30

    @property
    def gpu_gb(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) / 2 ** 30 if self.device.type == "cuda" else 0.0


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference.double()).norm() / reference.double().norm()).item()


def build_denoiser(config: dict, fast: FastPaths, device: torch.device, seed: int) -> torch.nn.Module:
    """The config's network with seeded weights and the variant's attention, memory format and precision."""
    torch.manual_seed(seed)
    net = config.get("precond", EDMPrecond)(img_resolution=config["resolution"], img_channels=config["channels"],
                                            label_dim=config["label_dim"], **config["network"])
    return prepare_network(net.to(device), fast)


class VariantBench:
    """The callables one variant is timed with; each runs one unit of work (and waits for the device)."""

    def __init__(self, variant: str, settings: Settings, device: torch.device):
        self.variant, self.settings, self.device = variant, settings, device
        self.config = CONFIGS[settings.config]
        self.fast = parse_variant(variant, device, self.config.get("precond", EDMPrecond))
        self.calls: dict[str, Callable[[], float | None]] = {}  # None: time the whole call; else its timed part
        self.images: dict[str, int] = {}
        generator = torch.Generator().manual_seed(settings.seed)
        res, ch, labels = self.config["resolution"], self.config["channels"], self.config["label_dim"]
        n = settings.batch
        self.uint8_images = torch.randint(0, 256, [n, ch, res, res], generator=generator, dtype=torch.uint8).to(device)
        self.labels = torch.eye(labels)[torch.randint(labels, [n], generator=generator)].to(device)
        for m in settings.measurements:
            getattr(self, f"_setup_{m}")()

    def _setup_train(self) -> None:
        net = build_denoiser(self.config, self.fast, self.device, self.settings.seed).train().requires_grad_(True)
        ema = build_denoiser(self.config, self.fast.with_options(channels_last=False), self.device,
                             self.settings.seed).eval().requires_grad_(False)
        optimizer = build_optimizer(dict(class_name="torch.optim.Adam", lr=1e-4, betas=[0.9, 0.999], eps=1e-8),
                                    net.parameters(), self.fast)
        forward = maybe_compile(net, self.fast)
        loss_fn = self.config.get("loss", EDMLoss)()
        loss_scaling = LOSS_SCALING_FP16 if self.fast.precision == "fp16" else 1
        batch = self.settings.batch

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            images = as_memory_format(self.uint8_images.to(torch.float32) / 127.5 - 1, self.fast)
            loss = loss_fn(net=forward, images=images, labels=self.labels)
            loss.sum().mul(loss_scaling / batch).backward()
            sanitize_gradients(net)
            optimizer.step()
            update_ema(ema, net, ema_beta(10 ** 6, batch, 500, 0.05))
            synchronize(self.device)

        self.calls["train"], self.images["train"] = step, batch

    def _eval_denoiser(self) -> torch.nn.Module:
        if not hasattr(self, "_eval_net"):
            net = build_denoiser(self.config, self.fast, self.device, self.settings.seed).eval().requires_grad_(False)
            self._eval_net = maybe_compile(randomize_parameters(net, self.settings.seed), self.fast)
        return self._eval_net

    @torch.no_grad()
    def denoiser_output(self) -> torch.Tensor | None:
        """D(x; sigma) of the eval network on fixed inputs (sigma 0.002 ... 80), as float64 on the CPU; None when
        neither forward nor sample is measured."""
        if not hasattr(self, "_eval_net"):
            return None
        generator = torch.Generator().manual_seed(self.settings.seed + 2)
        n = self.settings.batch
        x = torch.randn(self.uint8_images.shape, generator=generator)
        sigma = torch.logspace(math.log10(0.002), math.log10(80), n)
        x = as_memory_format((x * sigma.reshape(-1, 1, 1, 1)).to(self.device), self.fast)
        return self._eval_net(x, sigma.to(self.device), self.labels).double().cpu()

    def _setup_forward(self) -> None:
        net = self._eval_denoiser()
        generator = torch.Generator().manual_seed(self.settings.seed + 1)
        x = as_memory_format(torch.randn(self.uint8_images.shape, generator=generator).to(self.device) * 2, self.fast)
        sigma = torch.full([x.shape[0]], 2.0, device=self.device)

        @torch.no_grad()
        def forward() -> None:
            net(x, sigma, self.labels)
            synchronize(self.device)

        self.calls["forward"], self.images["forward"] = forward, self.settings.batch

    def _setup_sample(self) -> None:
        net = self._eval_denoiser()
        seeds = list(range(self.settings.batch))

        def sample() -> None:
            generate_images(net, seeds, device=self.device, sampler=PaperSampler(num_steps=self.settings.num_steps))
            synchronize(self.device)

        self.calls["sample"], self.images["sample"] = sample, self.settings.batch

    def _setup_fid(self) -> None:
        from metrics.inception import FIDDetector, InceptionV3

        torch.manual_seed(self.settings.seed)
        detector = FIDDetector(InceptionV3()).to(self.device)  # As fid.py runs it; it picks its memory format.
        images = self.uint8_images[:self.settings.fid_batch]
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)

        def features() -> None:
            detector(images)
            synchronize(self.device)

        self.calls["fid"], self.images["fid"] = features, len(images)

    def _setup_data(self) -> None:
        from training.data.dataset import ImageFolderDataset
        from training.loop.setup import PREFETCH_BATCHES, data_loader_kwargs, open_data_stream

        dataset = ImageFolderDataset(self.settings.data, use_labels=True, cache=False)
        stream = open_data_stream(dataset, self.settings.seed, 0, self.settings.batch,
                                  data_loader_kwargs(self.device, self.settings.workers))
        ready = self.settings.workers * PREFETCH_BATCHES

        def load() -> float:
            for _ in range(ready):  # Made while the process waited; the timed batches are made while timed.
                next(stream)
            start = time.perf_counter()
            for _ in range(DATA_BATCHES):
                images, labels = next(stream)
                images.to(self.device, non_blocking=True).to(torch.float32)
                labels.to(self.device, non_blocking=True)
            synchronize(self.device)
            return time.perf_counter() - start

        self.calls["data"], self.images["data"] = load, DATA_BATCHES * self.settings.batch


def _variant_process(conn, variant: str, settings: Settings, threads: int) -> None:
    """One variant's worker process: applies its process-wide switches, builds and warms up its calls, reports,
    then times every call once per "round" request until "stop"."""
    try:
        torch.set_num_threads(threads)
        device = torch.device(settings.device)
        apply_process_settings(parse_variant(variant, device))
        with PeakMemory(device) as memory:
            bench = VariantBench(variant, settings, device)
            start = time.perf_counter()
            for call in bench.calls.values():
                call()
            warmup_seconds = time.perf_counter() - start
            output = bench.denoiser_output()
        conn.send(dict(images=bench.images, warmup_seconds=warmup_seconds, peak=(memory.rss_gb, memory.gpu_gb),
                       process_settings=process_settings(), denoiser_output=None if output is None else output.numpy()))
        while conn.recv() == "round":
            seconds = {}
            with PeakMemory(device) as memory:
                for m, call in bench.calls.items():
                    start = time.perf_counter()
                    timed = call()
                    seconds[m] = time.perf_counter() - start if timed is None else timed
            conn.send(dict(seconds=seconds, peak=(memory.rss_gb, memory.gpu_gb)))
    except Exception as e:
        traceback.print_exc()
        conn.send(dict(error=f"{type(e).__name__}: {e}"))


class VariantProcesses:
    """A worker process per variant, for one measurement: each variant's process-wide switches (TF32, retained
    host memory) hold for it alone, and, as in a user's train.py or generate.py process, nothing else has run in
    it (the allocator's state after a training step changes the speed of sampling, and the other way round). The
    processes wait while another one is timed."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.workers: list[tuple] = []

    def __enter__(self) -> "VariantProcesses":
        return self

    def start(self, variant: str) -> dict:
        """Start the variant's process; returns its warm-up report."""
        context = multiprocessing.get_context("spawn")  # Fork is unsafe once CUDA or OpenMP threads exist.
        conn, child_conn = context.Pipe()
        # Not a daemon: the data measurement's DataLoader starts processes of its own.
        process = context.Process(target=_variant_process, daemon=False,
                                  args=(child_conn, variant, self.settings, torch.get_num_threads()))
        process.start()
        child_conn.close()
        self.workers.append((variant, conn, process))
        return self._receive(len(self.workers) - 1)

    def time_round(self, index: int) -> dict:
        self.workers[index][1].send("round")
        return self._receive(index)

    def _receive(self, index: int) -> dict:
        variant, conn, _ = self.workers[index]
        try:
            reply = conn.recv()
        except EOFError:
            raise RuntimeError(f"variant '{variant}': its benchmark process died (out of memory?)") from None
        if "error" in reply:
            raise RuntimeError(f"variant '{variant}': {reply['error']}")
        return reply

    def __exit__(self, *exc) -> None:
        for _, conn, process in self.workers:
            try:
                conn.send("stop")
            except (BrokenPipeError, OSError):
                pass
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


def write_random_dataset(path: str, config: dict, size: int, seed: int) -> str:
    """A dataset ZIP of ``size`` uniformly random images (and class labels) of the config's shape, as
    dataset_tool.py writes datasets; random pixels make PNGs about as large as real photos' at this size."""
    rng = np.random.default_rng(seed)
    res, channels, label_dim = config["resolution"], config["channels"], config["label_dim"]
    writer = DatasetWriter(path)
    labels = []
    for i in range(size):
        writer.add(archive_name(i), encode_png(rng.integers(0, 256, [res, res, channels], dtype=np.uint8)))
        labels.append([archive_name(i), int(rng.integers(label_dim))])
    writer.add(DATASET_JSON, json.dumps(dict(labels=labels if label_dim else None)).encode())
    writer.commit()
    return path


def _measure(measurement: str, results: list[Result], settings: Settings, progress: Callable[[str], None]) -> None:
    """Time one measurement for ``results``' variants, each in a process of its own, in side-by-side rounds."""
    m = measurement
    with VariantProcesses(dataclasses.replace(settings, measurements=(m,))) as processes:
        for result in results:
            progress(f"{m}: {result.variant}: building and warming up")
            reply = processes.start(result.variant)
            result.images.update(reply["images"])
            result.warmup_seconds += reply["warmup_seconds"]
            result.add_peak_memory(*reply["peak"])
            result.process_settings[m] = reply["process_settings"]
            if result.denoiser_output is None and reply["denoiser_output"] is not None:
                result.denoiser_output = torch.from_numpy(reply["denoiser_output"])
        times = [[] for _ in results]
        for round_idx in range(settings.rounds):
            progress(f"{m}: round {round_idx + 1}/{settings.rounds}")
            for i, result in enumerate(results):
                reply = processes.time_round(i)
                times[i].append(reply["seconds"][m])
                result.add_peak_memory(*reply["peak"])
    for result, t in zip(results, times):
        result.seconds[m] = statistics.median(t)


def run_benchmark(variants: list[str], settings: Settings, progress: Callable[[str], None] = lambda s: None
                  ) -> dict:
    """Measure every variant (rounds of side-by-side timings, each variant in its own process); returns the
    JSON-ready report."""
    unknown = [m for m in settings.measurements if m not in MEASUREMENTS]
    if unknown:
        raise ValueError(f"unknown measurement(s) {', '.join(unknown)}; expected {', '.join(MEASUREMENTS)}")
    if settings.config not in CONFIGS:
        raise ValueError(f"config '{settings.config}': expected one of {', '.join(CONFIGS)}")
    device = torch.device(settings.device)
    for variant in variants:  # Fail on a bad name before any work.
        fast = parse_variant(variant, device)
        try:
            check_precision(fast.precision, device)
        except ValueError as e:
            raise ValueError(f"variant '{variant}': {e}") from None

    if settings.data is not None and not os.path.exists(settings.data):
        raise ValueError(f"data '{settings.data}': no such dataset ZIP or folder (make one with dataset_tool.py)")

    results = [Result(variant, parse_variant(variant, device)) for variant in variants]
    random_zip = None
    with tempfile.TemporaryDirectory(prefix="edm-benchmark-") as tmp:
        if "data" in settings.measurements and settings.data is None:
            random_zip = write_random_dataset(os.path.join(tmp, "random.zip"), CONFIGS[settings.config],
                                              RANDOM_DATASET_SIZE, settings.seed)
            settings = dataclasses.replace(settings, data=random_zip)
        for m in settings.measurements:
            # No fast path changes data loading: it is measured in the first variant's process only.
            _measure(m, results[:1] if m == "data" else results, settings, progress)
    if results[0].denoiser_output is not None:
        for result in results[1:]:
            result.denoiser_rel_error = relative_error(result.denoiser_output, results[0].denoiser_output)
    data_loader = None
    if "data" in settings.measurements:
        data_loader = dict(img_per_s=results[0].images_per_second("data"), variant=results[0].variant,
                           workers=settings.workers, pin_memory=device.type == "cuda", cache=False,
                           dataset=f"{RANDOM_DATASET_SIZE} random images" if settings.data == random_zip
                           else settings.data)

    return dict(device=str(device), device_name=device_name(device), torch=torch.__version__,
                config=settings.config, batch=settings.batch, num_steps=settings.num_steps,
                nfe=2 * settings.num_steps - 1, fid_batch=settings.fid_batch, rounds=settings.rounds,
                data_loader=data_loader, results=[r.as_dict() for r in results])


def format_table(report: dict) -> str:
    """A Markdown table of the report, with speed-ups and denoiser errors relative to the first variant."""
    header = ["variant", "train img/s", "s/kimg", f"sample img/s (NFE {report['nfe']})", "denoiser fwd img/s",
              "FID feat img/s", "D rel. err.", "peak RSS GB", "peak GPU GB", "warm-up s"]
    rows = [header, ["---"] * len(header)]
    base = report["results"][0]

    def rate(r: dict, key: str) -> str:
        value = r[f"{key}_img_per_s"]
        if value is None:
            return "-"
        speedup = value / base[f"{key}_img_per_s"] if base[f"{key}_img_per_s"] else None
        return f"{value:.3g}" + (f" ({speedup:.2f}x)" if speedup is not None and r is not base else "")

    for r in report["results"]:
        rows.append([r["variant"], rate(r, "train"), f"{r['train_s_per_kimg']:.1f}" if r["train_s_per_kimg"] else "-",
                     rate(r, "sample"), rate(r, "forward"), rate(r, "fid"),
                     "-" if r["denoiser_rel_error"] is None else f"{r['denoiser_rel_error']:.1e}",
                     f"{r['peak_rss_gb']:.2f}", f"{r['peak_gpu_gb']:.2f}", f"{r['warmup_seconds']:.1f}"])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + _data_loader_line(report)


def _data_loader_line(report: dict) -> str:
    loader = report.get("data_loader")
    if not loader:
        return ""
    workers = f"{loader['workers']} worker" + ("" if loader["workers"] == 1 else "s")
    line = (f"\n\nData loader: {loader['img_per_s']:.4g} img/s ({workers}, "
            f"{'pinned' if loader['pin_memory'] else 'unpinned'}, no cache; {loader['dataset']})")
    train = [r["train_img_per_s"] for r in report["results"] if r["train_img_per_s"]]
    if train:
        line += f", {loader['img_per_s'] / max(train):.1f}x the fastest training step above ({max(train):.3g} img/s)"
    return line
