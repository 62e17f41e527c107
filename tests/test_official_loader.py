"""Our snapshots open in the official EDM code: plain ``pickle.load`` with the official ``dnnlib`` and
``torch_utils`` on the path (stand-ins in tests/fixtures/official_loader that load as the official loader does:
execute ``module_src`` as a new module, ``__new__`` + ``__setstate__``), in a process that cannot import the
project. What the objects compute there must equal what our own loader's objects compute."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES
from torch_utils import snapshot_source
from torch_utils.misc import randomize_parameters
from training.data.augment import AugmentPipe
from training.checkpoint import load_network_pkl, save_network_pkl
from training.loss import EDMLoss, VELoss, VPLoss
from training.networks import EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond
from training.sampling import SeedRNG, draw_class_labels, draw_latents, edm_sampler

ARCHITECTURES = {
    "ddpmpp": dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                   decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1]),
    "ncsnpp": dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual",
                   decoder_type="standard", channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),
    "songunet-skip": dict(model_type="SongUNet", encoder_type="skip", decoder_type="skip"),
    "adm": dict(model_type="DhariwalUNet"),
}
PRECONDS = {"vp": (VPPrecond, VPLoss), "ve": (VEPrecond, VELoss), "iddpm": (iDDPMPrecond, EDMLoss),
            "edm": (EDMPrecond, EDMLoss)}
CASES = [(arch, precond) for arch in ("ddpmpp", "ncsnpp", "adm") for precond in PRECONDS] + [("songunet-skip", "edm")]
SAMPLED = [("ddpmpp", "edm"), ("adm", "iddpm")]
LABEL_DIM, CHANNELS, RESOLUTION = 4, 3, 16


def make_snapshot_objects(arch: str, precond: str, seed: int):
    net_class, loss_class = PRECONDS[precond]
    augment_pipe = AugmentPipe(p=1, xflip=1, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1,
                               brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)
    torch.manual_seed(seed)
    net = net_class(img_resolution=RESOLUTION, img_channels=CHANNELS, label_dim=LABEL_DIM,
                    augment_dim=augment_pipe.label_dim, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                    attn_resolutions=[8], dropout=0, **ARCHITECTURES[arch])
    net = randomize_parameters(net, seed).eval()  # Zero-initialised output layers would hide the U-Net.
    return net, loss_class(), augment_pipe


def make_job(path: str, net, seed: int, sample: bool) -> dict:
    g = torch.Generator().manual_seed(seed)
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    job = dict(snapshot=path, seed=seed, x=torch.randn([3, *shape], generator=g) * 3,
               sigma=torch.tensor([0.03, 0.9, 25.0]), labels=torch.eye(net.label_dim)[[0, 2, 3]],
               augment_labels=torch.randn([3, net.model.map_augment.in_features], generator=g) * 0.5,
               images=torch.rand([4, *shape], generator=g) * 2 - 1,
               loss_labels=torch.eye(net.label_dim)[[1, 1, 0, 3]])
    if sample:
        rng = SeedRNG([5, 6, 7])
        job.update(latents=draw_latents(net, rng), sample_labels=draw_class_labels(net, rng), num_steps=5)
    return job


def our_results(job: dict) -> dict:
    """What the job computes with our loader's objects (rebuilt as our classes, module_src never run)."""
    data = load_network_pkl(job["snapshot"])
    net, loss_fn, augment_pipe = data["ema"], data["loss_fn"], data["augment_pipe"]
    result = {}
    with torch.no_grad():
        result["D"] = net(job["x"], job["sigma"], job["labels"], augment_labels=job["augment_labels"])
        result["F"] = net.model(job["x"], job["sigma"].log(), job["labels"], augment_labels=job["augment_labels"])
        if "latents" in job:
            result["images"] = edm_sampler(net, job["latents"], job["sample_labels"], num_steps=job["num_steps"])
    torch.manual_seed(job["seed"])
    result["augmented"], result["augment_labels_out"] = augment_pipe(job["images"])
    torch.manual_seed(job["seed"])
    net.requires_grad_(True)
    loss = loss_fn(net=net, images=job["images"], labels=job["loss_labels"], augment_pipe=augment_pipe)
    loss.sum().backward()
    result["loss"] = loss.detach()
    result["grad_norm"] = torch.stack([p.grad.norm() for p in net.parameters() if p.grad is not None]).norm()
    return result


def run_official_style(tmp_path, jobs: list[dict]) -> list[dict]:
    """Run the jobs in a child process that has only the stand-in official tree on its path."""
    root = tmp_path / "official"
    shutil.copytree(os.path.join(FIXTURES, "official_loader"), root)
    torch.save(jobs, root / "jobs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | dict(OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(root / "official_child.py"), "jobs.pt", "results.pt"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(root / "results.pt", weights_only=True)


def train_tiny_snapshot(outdir, data: str) -> str:
    """A network snapshot written by train.py (16 images of training, augmentation on)."""
    import train
    from click.testing import CliRunner

    result = CliRunner().invoke(train.main, [f"--outdir={outdir}", f"--data={data}", "--cond=1", "--cbase=8",
                                             "--cres=1,2", "--batch=16", "--seed=1", "--grid=0", "--workers=0",
                                             "--augment=0.5", "--duration=0.000016"])
    assert result.exit_code == 0, result.output
    (run_dir,) = os.listdir(outdir)
    return os.path.join(outdir, run_dir, "network-snapshot-000000.016.pkl")


@pytest.fixture(scope="module")
def official_and_ours(tmp_path_factory, fashion_mnist_8_zip):
    """(jobs, results in the official-style process, our results), first the train.py snapshot, then CASES."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Tiny networks: one thread is faster on the test machine's two shared cores.
    try:
        yield _official_and_ours(tmp_path_factory.mktemp("snapshots"), fashion_mnist_8_zip)
    finally:
        torch.set_num_threads(threads)


def _official_and_ours(tmp_path, fashion_mnist_8_zip):
    train_snapshot = train_tiny_snapshot(tmp_path / "train", fashion_mnist_8_zip)
    jobs = [make_job(train_snapshot, load_network_pkl(train_snapshot)["ema"], seed=99, sample=True)]
    expected = [our_results(jobs[0])]
    for seed, (arch, precond) in enumerate(CASES):
        net, loss_fn, augment_pipe = make_snapshot_objects(arch, precond, seed)
        path = str(tmp_path / f"network-snapshot-{arch}-{precond}.pkl")
        save_network_pkl(path, dict(ema=net, loss_fn=loss_fn, augment_pipe=augment_pipe,
                                    dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset")))
        jobs.append(make_job(path, net, seed, sample=(arch, precond) in SAMPLED))
        expected.append(our_results(jobs[-1]))
    return jobs, run_official_style(tmp_path, jobs), expected


def test_train_py_snapshot_runs_and_samples_in_official_loader(official_and_ours):
    """The snapshot train.py wrote (EMA network, EDMLoss, the training AugmentPipe) opens there; its network
    computes our D (and its U-Net our F, which after 16 images is still small beside c_skip x) and Algorithm 1
    there gives our sampler's images."""
    job, theirs, ours = (entry[0] for entry in official_and_ours)
    assert (theirs["net_class"], theirs["model_class"]) == ("EDMPrecond", "SongUNet")
    torch.testing.assert_close(theirs["D"], ours["D"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(theirs["F"], ours["F"], rtol=1e-5, atol=1e-5 * ours["F"].abs().max().item())
    torch.testing.assert_close(theirs["loss"], ours["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theirs["images"], ours["images"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{a}-{p}" for a, p in CASES])
def test_snapshot_runs_in_official_loader(official_and_ours, case):
    jobs, theirs, ours = (entry[case + 1] for entry in official_and_ours)
    arch, precond = CASES[case]
    assert theirs["net_class"] == PRECONDS[precond][0].__name__
    assert theirs["model_class"] == ARCHITECTURES[arch]["model_type"]
    # Same function in float32 on the CPU; the U-Net's output must matter (the weights are random).
    torch.testing.assert_close(theirs["D"], ours["D"], rtol=1e-6, atol=1e-6)
    assert (ours["D"] - jobs["x"]).abs().mean() > 1e-2
    torch.testing.assert_close(theirs["F"], ours["F"], rtol=1e-5, atol=1e-5 * ours["F"].abs().max().item())
    for variant in ("D_deepcopy", "D_repickled"):
        torch.testing.assert_close(theirs[variant], ours["D"], rtol=1e-6, atol=1e-6)
    # The loss and the augmentation pipe run there and draw the same random numbers in the same order.
    torch.testing.assert_close(theirs["augmented"], ours["augmented"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(theirs["augment_labels_out"], ours["augment_labels_out"], rtol=0, atol=0)
    torch.testing.assert_close(theirs["loss"], ours["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theirs["grad_norm"], ours["grad_norm"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", [CASES.index(c) for c in SAMPLED], ids=[f"{a}-{p}" for a, p in SAMPLED])
def test_official_loader_samples_our_images(official_and_ours, case):
    """Algorithm 1 run on the network opened there gives our sampler's images (to float rounding; uint8 equal)."""
    _, theirs, ours = (entry[case + 1] for entry in official_and_ours)
    torch.testing.assert_close(theirs["images"], ours["images"], rtol=0, atol=1e-4)
    uint8 = lambda images: (images * 127.5 + 128).clip(0, 255).to(torch.uint8)  # noqa: E731
    assert (uint8(theirs["images"]).int() - uint8(ours["images"]).int()).abs().max() <= 1


def test_every_snapshot_class_shares_one_self_contained_text(tmp_path):
    """All networks, losses and the augmentation pipe carry the same module text (one module in the official
    loader, so isinstance between them holds), which imports nothing of the project."""
    import ast
    net, loss_fn, augment_pipe = make_snapshot_objects("ncsnpp", "vp", 0)
    objects = [loss_fn, augment_pipe, *(m for m in net.modules() if type(m) is not torch.nn.ModuleDict)]
    texts = {obj.__reduce__()[1][0]["module_src"] for obj in objects}
    assert len(texts) == 1
    (text,) = texts
    imported = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports cannot run outside a package"
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "contextlib", "math", "typing", "numpy", "torch", "torch_utils"}


def test_bundle_refuses_what_the_official_loader_cannot_run(tmp_path, monkeypatch):
    package = tmp_path / "bundlepkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("import numpy as np\n\ndef helper():\n    return 1\n")
    (package / "b.py").write_text("from .a import helper\nimport click\n")
    (package / "c.py").write_text("from .a import helper\n\nnp = 3\n")
    (package / "d.py").write_text("from .a import helper\n\ndef f():\n    return helper()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"bundlepkg.b line 2: 'import click' is not available"):
        snapshot_source.joined_source(("bundlepkg.a", "bundlepkg.b"))
    with pytest.raises(ValueError, match=r"top-level names with two meanings: np"):
        snapshot_source.joined_source(("bundlepkg.a", "bundlepkg.c"))
    with pytest.raises(ValueError, match=r"must be a top-level 'from bundlepkg.a import name' of a module listed"):
        snapshot_source.joined_source(("bundlepkg.d", "bundlepkg.a"))
    text = snapshot_source.joined_source(("bundlepkg.a", "bundlepkg.d"))
    namespace: dict = {}
    exec(compile(text, "joined", "exec"), namespace)
    assert namespace["f"]() == 1 and "from .a" not in text
