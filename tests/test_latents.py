"""Latent diffusion (training/data/encoders.py, latents.py; dataset_tool.py encode/decode; train.py on latents), with a
tiny AutoencoderKL of random weights saved by diffusers' save_pretrained, so the real from_pretrained path runs."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import FIXTURES, REPO_ROOT, as_official
from training.checkpoint import load_network_pkl
from training.data.dataset import DatasetError, ImageFolderDataset
from training.data.encoders import StabilityVAEEncoder, StandardRGBEncoder, VAEError, load_vae
from training.data.latents import decode_dataset, encode_dataset, latent_archive_name

RAW_MEAN, RAW_STD = np.array([5.81, 3.25, 0.12, -2.15]), np.array([4.17, 4.62, 3.71, 3.28])


def make_tiny_vae(path: str, seed: int = 0) -> str:
    """An AutoencoderKL with Stability's layout at toy size (2 levels: latents at 1/2 resolution, 4 channels)."""
    import diffusers
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> str:
    return make_tiny_vae(str(tmp_path_factory.mktemp("vae") / "tiny-vae"))


@pytest.fixture(scope="module")
def image_zip(tmp_path_factory, fashion_mnist_16_zip) -> str:
    """12 of the embedded 16x16 Fashion-MNIST images, with labels."""
    from training.data.convert import convert_dataset
    dest = str(tmp_path_factory.mktemp("images") / "images.zip")
    convert_dataset(fashion_mnist_16_zip, dest, max_images=12, workers=1, progress=False)
    return dest


@pytest.fixture(scope="module")
def latent_zip(tmp_path_factory, image_zip, tiny_vae) -> str:
    dest = str(tmp_path_factory.mktemp("latents") / "latents.zip")
    encode_dataset(image_zip, dest, vae_name=tiny_vae, batch=5, progress=False)
    return dest


def test_standardization_is_the_official_affine_map(tiny_vae):
    """scale = final_std / raw_std, bias = final_mean - raw_mean scale (float32); encode_latents draws mean + n std
    with the device's generator, then scales and shifts per channel; decode undoes exactly that before the VAE."""
    encoder = StabilityVAEEncoder(vae_name=tiny_vae, final_mean=0.25, final_std=0.5)
    scale = np.float32(0.5) / RAW_STD.astype(np.float32)
    assert np.array_equal(encoder.scale, scale) and encoder.scale.dtype == np.float32
    assert np.array_equal(encoder.bias, np.float32(0.25) - RAW_MEAN.astype(np.float32) * scale)
    raw = torch.randn([2, 8, 3, 3], generator=torch.Generator().manual_seed(1)).abs()
    torch.manual_seed(5)
    final = encoder.encode_latents(raw)
    torch.manual_seed(5)
    noise = torch.randn([2, 4, 3, 3])
    mean, std = raw[:, :4], raw[:, 4:]
    expected = (mean + noise * std) * torch.tensor(scale).reshape(1, 4, 1, 1) + torch.tensor(
        encoder.bias).reshape(1, 4, 1, 1)
    torch.testing.assert_close(final, expected, rtol=0, atol=1e-6)
    assert torch.equal(encoder.encode_latents(raw, sample=False), mean * torch.tensor(scale).reshape(1, 4, 1, 1)
                       + torch.tensor(encoder.bias).reshape(1, 4, 1, 1))

    seen = []
    encoder.init("cpu")
    encoder._vae.decode = lambda x: seen.append(x) or type("Out", (), {"sample": torch.full_like(x[:, :3], 0.5)})()
    pixels = encoder.decode(encoder.encode_latents(raw, sample=False))
    torch.testing.assert_close(seen[0], mean, rtol=0, atol=1e-5)  # The VAE decodes the raw mean: a round trip.
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 3, 3, 3) and bool((pixels == 127).all())


def test_rgb_encoder_is_the_pixel_scaling():
    x = torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8)
    rgb = StandardRGBEncoder()
    assert torch.equal(rgb.encode(x), x.float() / 127.5 - 1) and torch.equal(rgb.decode(rgb.encode(x)), x)
    assert rgb.latent_channels(3) == 3 and StabilityVAEEncoder().latent_channels(8) == 4


def test_the_vae_loads_by_folder_and_by_hub_name_from_the_cache(tiny_vae, tmp_path, monkeypatch):
    """A folder loads as it is; a hub name loads from the project's cache (diffusers' layout under 'diffusers'),
    without the network when it is there."""
    cache = tmp_path / "cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_vae, cache / "diffusers" / "models--someone--tiny-vae" / "snapshots" / commit)
    (cache / "diffusers" / "models--someone--tiny-vae" / "refs").mkdir()
    (cache / "diffusers" / "models--someone--tiny-vae" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("EDM_CACHE_DIR", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    by_folder, by_name = load_vae(tiny_vae), load_vae("someone/tiny-vae")
    assert not by_name.training and not any(p.requires_grad for p in by_name.parameters())
    assert all(torch.equal(a, b) for a, b in zip(by_folder.state_dict().values(), by_name.state_dict().values()))


def test_missing_vae_and_missing_diffusers_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(VAEError, match=f"^VAE '{tmp_path / 'none'}': no such folder"):
        load_vae(str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VAEError, match=f"^VAE '{tmp_path / 'empty'}': cannot load it"):
        load_vae(str(tmp_path / "empty"))
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(VAEError, match="^latent diffusion needs the diffusers package: pip install -r "
                                       "requirements-extras.txt$"):
        load_vae(str(tmp_path))


def test_a_hub_name_that_is_not_cached_is_one_line_at_once_when_the_hub_cannot_be_reached(tmp_path, monkeypatch):
    """Offline, huggingface_hub would retry for about 25 s a call; load_vae asks it nothing. HF_HUB_OFFLINE set after
    the hub library was imported counts, and so does an endpoint that refuses the connection (a port just closed)."""
    import socket

    import huggingface_hub  # noqa: F401  (imported first: the variable below is set after it has read its own)
    from training.data import encoders
    monkeypatch.setenv("EDM_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    asked = []

    def from_pretrained(*args, **kwargs):
        asked.append(kwargs)
        raise OSError("not cached")

    monkeypatch.setattr("diffusers.AutoencoderKL.from_pretrained", from_pretrained)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VAEError, match=r"^VAE 'someone/absent-vae': cannot load it \(not in the cache .*diffusers, "
                                       r"and HF_HUB_OFFLINE is set\); give a diffusers"):
        load_vae("someone/absent-vae")
    assert [kwargs["local_files_only"] for kwargs in asked] == [True]  # The cache only, never the hub.

    monkeypatch.delenv("HF_HUB_OFFLINE")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert encoders.hub_unreachable_reason().startswith(f"127.0.0.1:{port} cannot be reached")
    asked.clear()
    with pytest.raises(VAEError, match=f"cannot load it .*127.0.0.1:{port} cannot be reached"):
        load_vae("someone/absent-vae")
    assert [kwargs.get("local_files_only") for kwargs in asked] == [True]

    # Reachable (a listening socket), or behind a proxy: the download is attempted.
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listening.getsockname()[1]}")
        assert encoders.hub_unreachable_reason() is None
        asked.clear()
        with pytest.raises(VAEError, match="cannot load it \\(not cached\\)"):
            load_vae("someone/absent-vae")
        assert [kwargs.get("local_files_only") for kwargs in asked] == [True, None]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert encoders.hub_unreachable_reason() is None


def test_encode_writes_the_official_layout_of_raw_latents(latent_zip, image_zip, tiny_vae):
    """One float32 [8, H/2, W/2] .npy per image named as the official tool names it, the VAE's latent mean and std of
    the image / 255 (grayscale repeated to RGB), labels in dataset.json; read back as a dataset of latents."""
    names = sorted(zipfile.ZipFile(latent_zip).namelist())
    assert names == sorted(["dataset.json"] + [latent_archive_name(i) for i in range(12)])
    assert latent_archive_name(1234) == "00001/img-mean-std-00001234.npy"
    images = ImageFolderDataset(image_zip, use_labels=True)
    latents = ImageFolderDataset(latent_zip, use_labels=True)
    assert latents.is_latent and latents.num_channels == 8 and latents.resolution == 8 and len(latents) == 12
    pixels = torch.from_numpy(np.stack([images[i][0] for i in range(12)])).repeat(1, 3, 1, 1)
    vae = load_vae(tiny_vae)
    with torch.no_grad():
        distribution = vae.encode(pixels.float() / 255).latent_dist
    expected = torch.cat([distribution.mean, distribution.std], dim=1)
    stored = torch.from_numpy(np.stack([latents[i][0] for i in range(12)]))
    torch.testing.assert_close(stored, expected, rtol=1e-5, atol=1e-6)
    assert all(np.array_equal(latents.get_label(i), images.get_label(i)) for i in range(12))


def test_decode_turns_latents_back_into_images_of_their_means(latent_zip, tiny_vae, tmp_path):
    summary = decode_dataset(latent_zip, str(tmp_path / "decoded.zip"), vae_name=tiny_vae, batch=4, progress=False)
    decoded = ImageFolderDataset(str(tmp_path / "decoded.zip"), use_labels=True)
    latents = ImageFolderDataset(latent_zip, use_labels=True)
    assert summary.num_images == 12 and decoded.image_shape == [3, 16, 16] and not decoded.is_latent
    encoder = StabilityVAEEncoder(vae_name=tiny_vae)
    raw = torch.from_numpy(np.stack([latents[i][0] for i in range(12)]))
    with torch.no_grad():
        expected = encoder.decode(encoder.encode_latents(raw, sample=False))
    assert np.array_equal(np.stack([decoded[i][0] for i in range(12)]), expected.numpy())
    assert all(np.array_equal(decoded.get_label(i), latents.get_label(i)) for i in range(12))


def test_dataset_tool_encode_and_decode_refuse_the_wrong_kind_and_leave_nothing(image_zip, latent_zip, tiny_vae,
                                                                               tmp_path):
    from dataset_tool import main
    runner = CliRunner()
    cases = [("encode", latent_zip, tiny_vae, "a dataset of latents already; encode takes images"),
             ("decode", image_zip, tiny_vae, "a dataset of images, not latents"),
             ("encode", image_zip, str(tmp_path / "no-vae"), "no such folder")]
    for command, source, vae, message in cases:
        result = runner.invoke(main, [command, f"--source={source}", f"--dest={tmp_path / 'out.zip'}",
                                      f"--model-url={vae}"])
        assert result.exit_code != 0 and message in result.output and result.output.count("\n") == 1, result.output
        assert os.listdir(tmp_path) == []
    odd = tmp_path / "odd"
    os.makedirs(odd)
    result = runner.invoke(main, ["encode", f"--source={FIXTURES}/../../data/fashion-mnist/t10k-images-idx3-ubyte.gz",
                                  f"--dest={odd / 'x.zip'}", f"--model-url={tiny_vae}", "--max-images=2"])
    assert result.exit_code == 0, result.output  # 32x32 padded MNIST: divisible by 2.
    plain = runner.invoke(main, [f"--source={image_zip}", f"--dest={tmp_path / 'plain.zip'}", "--max-images=3"])
    assert plain.exit_code == 0 and "Wrote 3 images" in plain.output  # No command: convert, as before.


def test_a_latent_dataset_is_never_mirrored(latent_zip):
    with pytest.raises(DatasetError, match="cannot be mirrored"):
        ImageFolderDataset(latent_zip, xflip=True)


def _train(outdir, data, vae, *extra):
    return subprocess.run([sys.executable, "train.py", f"--outdir={outdir}", "--nosubdir", f"--data={data}", "--cond=1",
                           "--preset=edm2-img512-xs", "--cbase=8", "--cres=1,1", "--blocks=1", "--attn=4",
                           "--batch=4", "--lr-rampup=0", "--duration=0.000016", "--tick=0.008", "--snap=1", "--dump=1",
                           "--grid=4", "--workers=0", "--device=cpu", f"--vae={vae}", "--seed=0", *extra],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def test_latent_preset_trains_and_its_snapshot_holds_the_encoder(latent_zip, image_zip, tiny_vae, tmp_path):
    """train.py --preset=edm2-img512-xs on latents at smoke size: the network works on the 4 channels of the final
    latents, the snapshot holds the VAE encoder (by name, without the VAE), the grids are decoded pixels; pixels with
    a latent preset, and latents with augmentation or x-flips, are refused in one line."""
    result = _train(tmp_path / "run", latent_zip, tiny_vae)
    assert result.returncode == 0, result.stderr[-2000:]
    snapshot = load_network_pkl(str(tmp_path / "run" / "network-snapshot-000000.016.pkl"))
    assert (snapshot["ema"].img_channels, snapshot["ema"].img_resolution) == (4, 8)
    encoder = snapshot["encoder"]
    assert type(encoder).__name__ == "StabilityVAEEncoder" and encoder.vae_name == tiny_vae and encoder._vae is None
    assert b"diffusion_pytorch_model" not in (tmp_path / "run" / "network-snapshot-000000.016.pkl").read_bytes()
    options = json.loads((tmp_path / "run" / "training_options.json").read_text())
    assert options["encoder_kwargs"] == dict(class_name="training.encoders.StabilityVAEEncoder", vae_name=tiny_vae)
    import PIL.Image
    assert PIL.Image.open(tmp_path / "run" / "samples-000000.016.png").mode == "RGB"
    # Resumed from its state after the second tick, the run ends where it ended: the latents drawn from the raw ones
    # come from the generators that the state restores.
    resumed = _train(tmp_path / "resumed", latent_zip, tiny_vae, "--grid=0",
                     f"--resume={tmp_path / 'run' / 'training-state-000000.012.pt'}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight, again = (torch.load(tmp_path / run / "training-state-000000.016.pt", weights_only=True)
                       for run in ("run", "resumed"))
    assert all(torch.equal(straight["net"][k], again["net"][k]) for k in straight["net"])
    import train
    for data, extra, message in ((image_zip, (), "trains on latents of Stability's VAE, but --data"),
                                 (latent_zip, ("--xflip=1",), "cannot be mirrored"),
                                 (latent_zip, ("--arch=ddpmpp", "--augment=0.1"), "holds latents")):
        refused = CliRunner().invoke(train.main, [f"--outdir={tmp_path / 'refused'}", f"--data={data}",
                                                  "--preset=edm2-img512-xs", "--cond=1", "--device=cpu", *extra])
        assert refused.exit_code != 0 and message in refused.output.strip().splitlines()[-1], refused.output
        assert refused.exception is None or isinstance(refused.exception, SystemExit)
        assert not (tmp_path / "refused").exists()


def test_official_encoder_pickle_loads_without_running_code_and_decodes_the_same(tiny_vae, tmp_path):
    """An encoder pickled as the official EDM2 training loop pickles it (its state: vae_name, scale, bias,
    batch_size, _vae None; module_src that must not run) loads through our loader as our class, and decodes the pixels
    of an encoder made directly."""
    from training.networks import EDMPrecond
    official = StabilityVAEEncoder(vae_name=tiny_vae, batch_size=3)
    net = EDMPrecond(img_resolution=8, img_channels=4, model_type="SongUNet", model_channels=8, channel_mult=[1],
                     num_blocks=1, attn_resolutions=[])
    path = tmp_path / "official.pkl"
    path.write_bytes(pickle.dumps(dict(ema=as_official(net), loss_fn=None, augment_pipe=None, dataset_kwargs=None,
                                       encoder=as_official(official)), protocol=4))
    encoder = load_network_pkl(str(path))["encoder"]
    assert type(encoder) is StabilityVAEEncoder and encoder.batch_size == 3 and encoder._vae is None
    assert np.array_equal(encoder.scale, official.scale) and np.array_equal(encoder.bias, official.bias)
    latents = torch.randn([2, 4, 8, 8], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(encoder.decode(latents), StabilityVAEEncoder(vae_name=tiny_vae).decode(latents))


OFFICIAL_CHILD = """
import pickle, sys, torch
data = pickle.load(open(sys.argv[1], "rb"))
encoder = data["encoder"]
encoder.init("cpu")
encoder.batch_size = 2
torch.save(dict(cls=type(encoder).__name__, images=encoder.decode(torch.load(sys.argv[2]))), sys.argv[3])
"""


def test_our_latent_snapshot_decodes_in_the_official_loader(latent_zip, tiny_vae, tmp_path):
    """The official generate_images.py takes the snapshot's encoder, calls init(device) and decode(latents): in the
    stand-in official environment (module_src executed, no project importable) our encoder does that, loading the
    VAE by the name it carries, and gives our pixels."""
    from training.checkpoint import save_network_pkl
    from training.networks import EDMPrecond
    net = EDMPrecond(img_resolution=8, img_channels=4, model_type="SongUNet", model_channels=8, channel_mult=[1],
                     num_blocks=1, attn_resolutions=[])
    path = tmp_path / "snapshot.pkl"
    save_network_pkl(str(path), dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={},
                                     encoder=StabilityVAEEncoder(vae_name=tiny_vae)))
    root = tmp_path / "official"
    shutil.copytree(os.path.join(FIXTURES, "official_loader"), root)
    (root / "child.py").write_text(OFFICIAL_CHILD)
    latents = torch.randn([3, 4, 8, 8], generator=torch.Generator().manual_seed(2))
    torch.save(latents, root / "latents.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | dict(OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "child.py", str(path), "latents.pt", "out.pt"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(root / "out.pt", weights_only=True)
    with torch.no_grad():
        ours = load_network_pkl(str(path))["encoder"].decode(latents)
    assert theirs["cls"] == "StabilityVAEEncoder" and torch.equal(theirs["images"], ours)


# ----------------------------------------------------------------------------
# Everything that makes images decodes: generate.py (with guidance), fid.py calc --network, ema_sweep.py and the
# in-training metrics all turn a latent network's samples into pixels through the snapshot's encoder.

STEPS = 2


def tiny_latent_net(seed: int):
    from training.networks import EDM2Precond
    torch.manual_seed(seed)
    net = EDM2Precond(img_resolution=8, img_channels=4, label_dim=0, model_channels=8, channel_mult=[1],
                      num_blocks=1, attn_resolutions=[], logvar_channels=8).eval()
    with torch.no_grad():
        net.unet.out_gain.fill_(1)  # Initialized to 0: every network would denoise alike.
    return net


def official_latent_pickle(path, net, vae: str) -> str:
    """A snapshot as the official EDM2 code writes its img512 models: an EasyDict whose encoder is
    ``training.encoders.StabilityVAEEncoder`` and whose network is float16 without gradients."""
    import copy

    import dnnlib
    from test_edm2_network import OFFICIAL_MODULE_SRC
    ema = copy.deepcopy(net).to(torch.float16).requires_grad_(False)
    data = dnnlib.EasyDict(encoder=as_official(StabilityVAEEncoder(vae_name=vae)), loss_fn=None,
                           dataset_kwargs=dnnlib.EasyDict(class_name="training.dataset.ImageFolderDataset",
                                                          path="img512-sd.zip"),
                           ema=as_official(ema, OFFICIAL_MODULE_SRC))
    path.write_bytes(pickle.dumps(data, protocol=4))
    return str(path)


def decoded_by_formula(vae: str, latents: torch.Tensor) -> torch.Tensor:
    """Final latents -> uint8 pixels written out: in float32, undo x * scale + bias with EDM2's constants, the VAE's
    decoder (loaded directly by diffusers), [0, 1] -> [0, 255] truncated."""
    import diffusers
    model = diffusers.AutoencoderKL.from_pretrained(vae).eval()
    scale = torch.tensor(np.float32(0.5) / RAW_STD.astype(np.float32)).reshape(1, 4, 1, 1)
    bias = -torch.tensor(RAW_MEAN.astype(np.float32)).reshape(1, 4, 1, 1) * scale
    with torch.no_grad():
        return (model.decode((latents.to(torch.float32) - bias) / scale).sample.clamp(0, 1) * 255).to(torch.uint8)


def sampled_latents(net, seeds, **kwargs) -> torch.Tensor:
    from training.sampling import generate_images, sampler_spec
    return generate_images(net, seeds, decode=lambda x: x, sampler=sampler_spec(num_steps=STEPS, **kwargs))


class RecordingDetector(torch.nn.Module):
    """Stands in for the FID Inception: keeps every batch of images it is shown; features from their means."""

    name, feature_dim = "inception", 2048
    weights_sha256, preprocess_mode = "0" * 64, "recording"  # What the sweep's summary records of a detector.

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images.cpu().clone())
        return images.to(torch.float32).mean(dim=(1, 2, 3))[:, None].repeat(1, self.feature_dim)


@pytest.fixture
def recorder(monkeypatch):
    import metrics.detector
    import metrics.evaluate
    detector = RecordingDetector()
    monkeypatch.setattr(metrics.detector, "load_detector", lambda *args, **kwargs: detector)
    monkeypatch.setattr(metrics.evaluate, "frechet_distance",  # The 2048-D eigendecompositions are not the point.
                        lambda mu1, sigma1, mu2, sigma2: float(np.sum((mu1 - mu2) ** 2)))
    return detector


@pytest.fixture(scope="module")
def zero_ref(tmp_path_factory) -> str:
    from metrics.reference import save_reference
    path = str(tmp_path_factory.mktemp("ref") / "zero.npz")
    save_reference(path, dict(mu=np.zeros(2048), sigma=np.zeros([2048, 2048])))
    return path


def test_generate_and_fid_decode_official_latent_pickles_with_and_without_guidance(tiny_vae, tmp_path, recorder,
                                                                                   zero_ref, single_thread):
    """generate.py on an official-format img512 pickle writes the VAE's decoding of the sampler's latents (as the
    official generate_images.py: sample, then encoder.decode); with --gnet (autoguidance by another latent network)
    the guided latents; fid.py calc --network shows its detector those same pixels."""
    import PIL.Image

    from fid import main as fid_main
    from generate import main as generate_main
    from training.sampling import guided
    net, guide = tiny_latent_net(0), tiny_latent_net(1)
    main_pkl = official_latent_pickle(tmp_path / "main.pkl", net, tiny_vae)
    guide_pkl = official_latent_pickle(tmp_path / "guide.pkl", guide, tiny_vae)
    # The stored float16 weights, in the memory format that the CLIs give EDM2's U-Net on a CPU (channels_last): the
    # same kernels as theirs, so the same float rounding.
    net16, guide16 = (load_network_pkl(p)["ema"].to(memory_format=torch.channels_last) for p in (main_pkl, guide_pkl))
    seeds = [0, 1, 2, 3]

    def by_formula(denoiser, batch: int) -> torch.Tensor:
        """In the CLI's batches of seeds: a seed's float latents match across batch sizes only to rounding (the kernels
        may differ with the batch), which the truncation to uint8 can turn into a level."""
        return torch.cat([decoded_by_formula(tiny_vae, sampled_latents(denoiser, seeds[i:i + batch]))
                          for i in range(0, len(seeds), batch)])

    plain, autoguided = by_formula(net16, 3), by_formula(guided(net16, guide16, 2.0), 3)
    assert plain.shape == (4, 3, 16, 16) and not torch.equal(plain, autoguided)

    for name, extra, expected in (("plain", [], plain), ("guided", [f"--gnet={guide_pkl}", "--guidance=2"], autoguided)):
        out = tmp_path / name
        result = CliRunner().invoke(generate_main, [f"--network={main_pkl}", f"--outdir={out}", "--seeds=0-3",
                                                    f"--steps={STEPS}", "--batch=3", "--device=cpu", *extra])
        assert result.exit_code == 0, result.output
        for i, seed in enumerate(seeds):
            written = torch.from_numpy(np.array(PIL.Image.open(out / f"{seed:06d}.png"))).permute(2, 0, 1)
            assert torch.equal(written, expected[i]), (name, seed)

    result = CliRunner().invoke(fid_main, ["calc", f"--network={main_pkl}", "--seeds=0-3", f"--ref={zero_ref}",
                                           f"--steps={STEPS}", "--batch=4", "--device=cpu", f"--gnet={guide_pkl}",
                                           "--guidance=2"])
    assert result.exit_code == 0, result.output
    assert torch.equal(torch.cat(recorder.seen), by_formula(guided(net16, guide16, 2.0), 4))


def test_ema_sweep_and_in_training_metrics_decode_latent_runs(tiny_vae, tmp_path, recorder, zero_ref, single_thread):
    """A latent run's power-function EMA snapshots hold the encoder: ema_sweep.py measures the decoded samples of each
    reconstructed network; the in-training metrics measure the decoded samples of the network they are given."""
    from ema_sweep import main as sweep_main
    from training.checkpoint import save_network_pkl
    from training.ema.reconstruct import plan_reconstruction, reconstructed_networks
    from training.loop.monitor import InTrainingMetrics, MetricsOptions
    from training.run_files import power_snapshot_name

    run = tmp_path / "run"
    run.mkdir()
    for seed, (nimg, std) in enumerate((n, s) for n in (8192, 16384) for s in (0.05, 0.10)):
        save_network_pkl(str(run / power_snapshot_name(nimg, std)),
                         dict(ema=tiny_latent_net(seed), loss_fn=None, augment_pipe=None, dataset_kwargs={},
                              encoder=StabilityVAEEncoder(vae_name=tiny_vae)))
    result = CliRunner().invoke(sweep_main, [f"--indir={run}", f"--ref={zero_ref}", "--outstd=0.08", "--num=4",
                                             f"--steps={STEPS}", "--batch=4", "--device=cpu"])
    assert result.exit_code == 0, result.output
    plan = plan_reconstruction(str(run), [0.08])
    [(_, reconstructed)] = list(reconstructed_networks(plan, progress=False))
    assert torch.equal(torch.cat(recorder.seen), decoded_by_formula(tiny_vae, sampled_latents(reconstructed.eval(),
                                                                                              [0, 1, 2, 3])))

    recorder.seen.clear()
    encoder = StabilityVAEEncoder(vae_name=tiny_vae)
    options = MetricsOptions(metrics=["fid"], num_images=4, num_steps=STEPS, batch=4, ref=zero_ref)
    monitor = InTrainingMetrics(options, "unused-latents.zip", torch.device("cpu"), decode=encoder.decode)
    net = tiny_latent_net(7)
    [record] = monitor.evaluate({"ema": net}, kimg=1.0)
    assert torch.equal(torch.cat(recorder.seen), decoded_by_formula(tiny_vae, sampled_latents(net, [0, 1, 2, 3])))
    expected = float(np.sum(torch.cat(recorder.seen).to(torch.float32).mean(dim=(1, 2, 3)).mean().numpy() ** 2)
                     * 2048)
    assert record["metric"] == "fid" and record["value"] == pytest.approx(expected, rel=1e-5)


def test_latent_snapshot_whose_vae_is_missing_is_one_line_before_sampling(tmp_path, zero_ref, monkeypatch):
    """generate.py, fid.py and ema_sweep.py name the snapshot and the VAE, and write nothing."""
    from ema_sweep import main as sweep_main
    from fid import main as fid_main
    from generate import main as generate_main
    from training.run_files import power_snapshot_name
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("EDM_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    run.mkdir()
    pkl = official_latent_pickle(run / power_snapshot_name(8192, 0.05), tiny_latent_net(0), "someone/absent-vae")
    out = tmp_path / "out"
    for main, args in ((generate_main, [f"--network={pkl}", f"--outdir={out}", "--seeds=0-3"]),
                       (fid_main, ["calc", f"--network={pkl}", "--seeds=0-3", f"--ref={zero_ref}"]),
                       (sweep_main, [f"--indir={run}", f"--ref={zero_ref}", "--outstd=0.05", "--num=4"])):
        result = CliRunner().invoke(main, [*args, "--device=cpu", "--detector=/no/detector/needed.pt"]
                                    if main is not generate_main else [*args, "--device=cpu"])
        message = result.output.strip()
        assert result.exit_code == 1 and "\n" not in message and "Traceback" not in message, result.output
        assert message.startswith(f"Error: {pkl}: VAE 'someone/absent-vae': cannot load it"), message
    assert not out.exists() and os.listdir(run) == [os.path.basename(pkl)]


def test_metrics_and_fid_references_refuse_latent_datasets(latent_zip, image_zip, tmp_path):
    """FID compares images: a latent dataset as a reference is refused in one line (fid.py ref, calc --ref), and a
    latent run's in-training metrics need --metrics-ref."""
    from fid import main as fid_main
    for args in (["ref", f"--data={latent_zip}", f"--dest={tmp_path / 'ref.npz'}"],
                 ["calc", f"--images={image_zip}", f"--ref={latent_zip}", "--num=4"]):
        result = CliRunner().invoke(fid_main, [*args, "--device=cpu"])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert f"{latent_zip}: holds latents (dataset_tool.py encode), not images" in result.output.strip()
    assert not (tmp_path / "ref.npz").exists()
    result = _train(tmp_path / "run", latent_zip, "/unused/vae", "--metrics=fid")
    assert result.returncode != 0 and "holds latents; give the reference of the images they were encoded from with " \
                                      "--metrics-ref" in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]
