"""The non-leaking augmentation pipe: identity at p=0, labels that describe the transform applied."""

import math
import pickle

import pytest
import torch

from training.data.augment import AugmentPipe, apply_geometric, rotate2d, scale2d, translate2d

OFFICIAL = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)


def smooth(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A band-limited test image, evaluated at centred pixel coordinates."""
    return (torch.sin(2 * math.pi * x / 13 + 0.3) * torch.cos(2 * math.pi * y / 11)
            + 0.5 * torch.sin(2 * math.pi * (x + y) / 17))


def centred_grid(size: int):
    c = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    return x, y


def test_official_config_has_9_labels_and_p0_is_exact_identity():
    images = torch.randn(16, 3, 16, 16)
    pipe = AugmentPipe(p=0, **OFFICIAL)
    out, labels = pipe(images)
    assert pipe.label_dim == 9 and labels.shape == (16, 9)
    assert torch.equal(out, images) and torch.count_nonzero(labels) == 0
    torch.manual_seed(0)
    _, labels = AugmentPipe(p=0.12, **OFFICIAL)(images)
    assert labels.shape == (16, 9) and labels.dtype == torch.float32


def test_probability_of_a_transform_is_p_times_multiplier():
    torch.manual_seed(1)
    _, labels = AugmentPipe(p=0.3, scale=1)(torch.randn(3000, 1, 8, 8))
    assert abs((labels[:, 0] != 0).float().mean().item() - 0.3) < 0.03


def test_xflip_label_says_which_images_were_flipped():
    torch.manual_seed(2)
    images = torch.randn(32, 3, 8, 8)
    out, labels = AugmentPipe(p=1, xflip=1)(images)
    flipped = labels[:, 0] == 1
    assert 0 < flipped.sum() < 32
    assert torch.equal(out[flipped], images[flipped].flip(3))
    assert torch.equal(out[~flipped], images[~flipped])


def test_integer_translation_is_an_exact_shift():
    torch.manual_seed(3)
    images = torch.randn(8, 1, 16, 16)
    pipe = AugmentPipe(p=1, translate_int=1, translate_int_max=0.125)
    out, labels = pipe(images)
    for image, shifted, (lx, ly) in zip(images, out, labels):
        tx, ty = round(float(lx) * 2), round(float(ly) * 2)  # label = shift / (16 * 0.125)
        assert torch.equal(shifted[:, max(ty, 0):16 + min(ty, 0), max(tx, 0):16 + min(tx, 0)],
                           image[:, max(-ty, 0):16 + min(-ty, 0), max(-tx, 0):16 + min(-tx, 0)])


def test_resampling_with_identity_returns_the_input():
    images = torch.randn(4, 3, 16, 16)
    assert torch.allclose(apply_geometric(images, torch.eye(3).repeat(4, 1, 1)), images, atol=1e-4)


@pytest.mark.parametrize("which", ["translate_frac", "rotate_frac", "scale", "aniso"])
def test_geometric_labels_recover_the_applied_transform(which):
    """Rebuild the inverse transform from the labels alone; the output must equal the smooth image
    evaluated at the mapped coordinates (away from the reflected borders)."""
    torch.manual_seed(4)
    size, N = 32, 6
    x, y = centred_grid(size)
    images = smooth(x, y).expand(N, 1, size, size).contiguous()
    # aniso with a rotated axis: the official label (w cos r, w sin r) cannot tell (w, r) from (-w, r + pi),
    # which are different transforms, so the axis is kept at r = 0 here.
    pipe = AugmentPipe(p=1, aniso_rotate_prob=0, **{which: 1})
    out, labels = pipe(images)
    if which == "translate_frac":
        G_inv = translate2d(-labels[:, 0] * size * 0.125, -labels[:, 1] * size * 0.125)
    elif which == "rotate_frac":
        G_inv = rotate2d(torch.atan2(labels[:, 1], labels[:, 0] + 1))
    elif which == "scale":
        s = torch.exp2(labels[:, 0] * 0.2)
        G_inv = scale2d(1 / s, 1 / s)
    else:
        s = torch.exp2(labels[:, 0] * 0.2)
        G_inv = scale2d(1 / s, s)
    assert torch.count_nonzero(labels) > 0
    points = torch.stack([x.flatten(), y.flatten(), torch.ones(size * size)])
    mapped = G_inv @ points
    expected = smooth(mapped[:, 0], mapped[:, 1]).reshape(N, 1, size, size)
    # Compare where the source point lies well inside the input (elsewhere the pipe reflects).
    inside = (mapped[:, :2].abs() < (size - 1) / 2 - 4).all(dim=1).reshape(N, 1, size, size)
    assert inside.float().mean() > 0.3
    assert (out - expected)[inside].abs().max() < 0.05
    assert (images - expected)[inside].abs().max() > 0.1  # The transform did move the content.


def test_brightness_label_is_the_offset_in_units_of_its_std():
    torch.manual_seed(5)
    images = torch.randn(16, 3, 4, 4)
    out, labels = AugmentPipe(p=1, brightness=1, brightness_std=0.2)(images)
    assert torch.allclose(out, images + 0.2 * labels[:, 0].reshape(-1, 1, 1, 1), atol=1e-5)


def test_pickles_in_the_official_format_and_round_trips():
    pipe = AugmentPipe(p=0.12, **OFFICIAL)
    reduced = pipe.__reduce__()
    assert reduced[0].__name__ == "_reconstruct_persistent_obj"
    assert reduced[1][0]["class_name"] == "AugmentPipe" and reduced[1][0]["state"]["_init_kwargs"]["p"] == 0.12
    copy = pickle.loads(pickle.dumps(pipe))
    assert type(copy) is AugmentPipe and copy.__dict__ == pipe.__dict__


def test_labels_replay_the_random_draws_in_their_fixed_order():
    """Snapshots and resumed runs depend on the order of the draws: per transform, a mask (rand < p * multiplier)
    before its values, except rotate_frac / translate_* / hue, whose values come first."""
    N, p = 64, 0.5
    images = torch.randn(N, 3, 8, 8)
    torch.manual_seed(6)
    _, labels = AugmentPipe(p=p, xflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1, hue=1)(images)
    torch.manual_seed(6)
    expected = []
    mask = torch.rand([N, 1, 1, 1]) < p
    expected.append(torch.where(mask, torch.randint(2, [N, 1, 1, 1]), 0).reshape(N))     # xflip
    mask = torch.rand([N]) < p
    expected.append(torch.where(mask, torch.randn([N]), 0))                               # scale
    angle = (torch.rand([N]) * 2 - 1) * math.pi
    angle = torch.where(torch.rand([N]) < p, angle, 0)                                    # rotate_frac
    expected += [angle.cos() - 1, angle.sin()]
    mask = torch.rand([N]) < p                                                            # aniso
    w = torch.where(mask, torch.randn([N]), 0)
    axis = (torch.rand([N]) * 2 - 1) * math.pi
    axis = torch.where(mask & (torch.rand([N]) < 0.5), axis, 0)
    expected += [w * axis.cos(), w * axis.sin()]
    shift = torch.randn([2, N])
    expected += list(torch.where(torch.rand([1, N]) < p, shift, 0))                       # translate_frac
    angle = (torch.rand([N]) * 2 - 1) * math.pi
    angle = torch.where(torch.rand([N]) < p, angle, 0)                                    # hue
    expected += [angle.cos() - 1, angle.sin()]
    expected = torch.stack([e.to(torch.float32) for e in expected], dim=1)
    assert 0 < torch.count_nonzero(expected[:, 1]) < N
    torch.testing.assert_close(labels, expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------
# Each transform against its matrix written out here, and the 9 labels of the official config in order.

def test_rotation_turns_content_by_the_labelled_angle_in_the_stated_direction():
    """Output pixel Y shows input point R(w) Y with R(w) = [[cos w, -sin w], [sin w, cos w]] (centred pixel
    coordinates, x right, y down), so a bright spot at input (d, 0) appears at (d cos w, -d sin w)."""
    torch.manual_seed(7)
    size, d = 33, 8.0
    x, y = centred_grid(size)
    spot = torch.exp(-((x - d) ** 2 + y ** 2) / (2 * 1.5 ** 2))
    images = spot.expand(8, 1, size, size).contiguous()
    out, labels = AugmentPipe(p=1, rotate_frac=1)(images)
    w = torch.atan2(labels[:, 1], labels[:, 0] + 1)
    assert (w.abs() > 0.3).sum() >= 4
    # Inside a disk of radius 13 only: the output's corners show the reflected padding.
    weight = out[:, 0].clamp(min=0) * (x ** 2 + y ** 2 < 13 ** 2)
    centroid_x = (weight * x).sum(dim=(1, 2)) / weight.sum(dim=(1, 2))
    centroid_y = (weight * y).sum(dim=(1, 2)) / weight.sum(dim=(1, 2))
    torch.testing.assert_close(centroid_x, d * w.cos(), rtol=0, atol=0.25)
    torch.testing.assert_close(centroid_y, -d * w.sin(), rtol=0, atol=0.25)


def test_quarter_turns_equal_rot90_by_the_number_read_from_the_labels():
    torch.manual_seed(8)
    images = torch.randn(64, 2, 6, 6)
    out, labels = AugmentPipe(p=1, rotate_int=1)(images)
    # Labels (x flipped, y flipped): 0 turns (0, 0), 1 turn (1, 0), 2 turns (1, 1), 3 turns (0, 1).
    turns_of = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}
    seen = set()
    for image, rotated, (fx, fy) in zip(images, out, labels):
        k = turns_of[(int(fx), int(fy))]
        seen.add(k)
        assert torch.equal(rotated, torch.rot90(image, k, dims=(1, 2)))
    assert seen == {0, 1, 2, 3}


def luma_components(images: torch.Tensor):
    """Split RGB pixels into the part along (1, 1, 1)/sqrt(3) and the part orthogonal to it."""
    along = images.mean(dim=1, keepdim=True).expand_as(images)
    return along, images - along


def rodrigues_about_luma(images: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """v cos a + (k x v) sin a + k (k . v)(1 - cos a), with k = (1, 1, 1)/sqrt(3), per image."""
    a = angle.reshape(-1, 1, 1, 1)
    r, g, b = images[:, 0:1], images[:, 1:2], images[:, 2:3]
    cross = torch.cat([g * 0 + (b - g), r - b, g - r], dim=1) / math.sqrt(3)  # k x v
    along, _ = luma_components(images)
    return images * a.cos() + cross * a.sin() + along * (1 - a.cos())


COLOR_FORMULAS = {
    # transform: (options, expected output from images and labels)
    "brightness": (dict(brightness=1, brightness_std=0.2),
                   lambda im, lab: im + 0.2 * lab[:, 0].reshape(-1, 1, 1, 1)),
    "contrast": (dict(contrast=1, contrast_std=0.5),
                 lambda im, lab: im * torch.exp2(0.5 * lab[:, 0]).reshape(-1, 1, 1, 1)),
    "lumaflip": (dict(lumaflip=1),
                 lambda im, lab: torch.where(lab[:, 0].reshape(-1, 1, 1, 1) == 1,
                                             im - 2 * luma_components(im)[0], im)),
    "hue": (dict(hue=1),
            lambda im, lab: rodrigues_about_luma(im, torch.atan2(lab[:, 1], lab[:, 0] + 1))),
    "saturation": (dict(saturation=1, saturation_std=1),
                   lambda im, lab: luma_components(im)[0]
                   + luma_components(im)[1] * torch.exp2(lab[:, 0]).reshape(-1, 1, 1, 1)),
}


@pytest.mark.parametrize("which", sorted(COLOR_FORMULAS))
def test_color_transform_on_rgb_equals_its_formula(which):
    torch.manual_seed(9)
    images = torch.randn(32, 3, 4, 4)
    options, formula = COLOR_FORMULAS[which]
    out, labels = AugmentPipe(p=0.7, **options)(images)
    assert 0 < torch.count_nonzero(labels[:, 0]) < 32
    torch.testing.assert_close(out, formula(images, labels), rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", sorted(COLOR_FORMULAS))
def test_color_transform_on_grayscale_is_its_rgb_effect_on_gray_averaged(which):
    """A gray image is the RGB image (y, y, y); its output is the mean of the three transformed channels, so
    hue and saturation leave it alone, lumaflip negates it, brightness and contrast act as on each channel."""
    torch.manual_seed(10)
    gray = torch.randn(32, 1, 4, 4)
    options, formula = COLOR_FORMULAS[which]
    out, labels = AugmentPipe(p=0.7, **options)(gray)
    expected = formula(gray.expand(-1, 3, -1, -1), labels).mean(dim=1, keepdim=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    if which in ("hue", "saturation"):
        torch.testing.assert_close(out, gray, rtol=0, atol=1e-5)
    if which == "lumaflip":
        flipped = labels[:, 0] == 1
        assert 0 < flipped.sum() < 32 and torch.allclose(out[flipped], -gray[flipped], atol=1e-6)


@pytest.mark.parametrize("channels", [3, 1])
def test_official_config_labels_are_the_9_entries_in_order(channels):
    """[xflip, yflip, scale, cos(rot) - 1, sin(rot), aniso w cos r, aniso w sin r, tx, ty], each replayed from
    the random stream, the same for RGB and grayscale images; the xflip entry says which images were mirrored."""
    N, p = 64, 0.12
    x, y = centred_grid(16)
    images = (smooth(x, y) * (1 + torch.arange(channels).reshape(channels, 1, 1))).expand(N, channels, 16, 16)
    torch.manual_seed(11)
    out, labels = AugmentPipe(p=p, **OFFICIAL)(images.contiguous())
    torch.manual_seed(11)
    xflip = torch.where(torch.rand([N, 1, 1, 1]) < min(1e8 * p, 1), torch.randint(2, [N, 1, 1, 1]), 0)
    yflip = torch.where(torch.rand([N, 1, 1, 1]) < p, torch.randint(2, [N, 1, 1, 1]), 0)
    scale = torch.where(torch.rand([N]) < p, torch.randn([N]), 0)
    angle = (torch.rand([N]) * 2 - 1) * math.pi
    angle = torch.where(torch.rand([N]) < p, angle, 0)
    mask = torch.rand([N]) < p
    w = torch.where(mask, torch.randn([N]), 0)
    axis = (torch.rand([N]) * 2 - 1) * math.pi
    axis = torch.where(mask & (torch.rand([N]) < 0.5), axis, 0)
    shift = torch.randn([2, N])
    shift = torch.where(torch.rand([1, N]) < p, shift, 0)
    expected = torch.stack([xflip.reshape(N).float(), yflip.reshape(N).float(), scale, angle.cos() - 1, angle.sin(),
                            w * axis.cos(), w * axis.sin(), shift[0], shift[1]], dim=1)
    torch.testing.assert_close(labels, expected, rtol=0, atol=1e-6)
    assert 0 < torch.count_nonzero(labels[:, 0]) < N and torch.count_nonzero(labels[:, 1]) > 0
    # Images with no transform but the x flip are exact mirrors (or copies) of the input.
    only_xflip = (labels[:, 1:] == 0).all(dim=1)
    assert only_xflip.sum() > 10
    for image, result, flipped in zip(images[only_xflip], out[only_xflip], labels[only_xflip, 0]):
        assert torch.equal(result, image.flip(2) if flipped else image)
