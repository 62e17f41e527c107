"""Post-hoc EMA (training/ema/, reconstruct_phema.py): sigma_rel <-> gamma, the per-step beta, the
least-squares coefficients against the official EDM2 code's, the tracked EMAs against the profile they
discretise, a post-hoc reconstruction against an EMA tracked directly, and the command line end to end."""

from __future__ import annotations

import os
import pickle
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dnnlib
from conftest import FIXTURES, _OfficialPersistentObject, as_official, make_tiny_net
from training.cli_options import parse_sigma_rel_list
from training.checkpoint import load_network_pkl, save_network_pkl
from training.loss import EDMLoss
from training.ema.phema import (SIGMA_REL_MAX, PowerFunctionEMA, gamma_to_sigma_rel, power_function_beta,
                                profile_inner_product, sigma_rel_to_gamma, solve_posthoc_coefficients, std_to_exp)
from training.ema.reconstruct import reconstruct
from training.run_files import (format_kimg, list_power_snapshots, nimg_from_kimg, parse_power_snapshot_name,
                                phema_name, power_snapshot_name, snapshot_time_at)


@pytest.fixture(scope="module")
def golden() -> dict:
    """What the official EDM2 code computed (tests/fixtures/edm2-vectors.pt, key 'phema')."""
    return torch.load(os.path.join(FIXTURES, "edm2-vectors.pt"), weights_only=True)["phema"]


def profile_moments(gamma: float, t: float = 1.0, points: int = 200_001) -> tuple[float, float, float]:
    """Integral, mean and std of p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t], by the
    trapezoidal rule (independent of the closed forms in training/ema/phema.py)."""
    tau = np.linspace(0, t, points)
    p = (gamma + 1) * (tau / t) ** gamma / t
    mass = np.trapezoid(p, tau)
    mean = np.trapezoid(p * tau, tau)
    return mass, mean, np.sqrt(np.trapezoid(p * (tau - mean) ** 2, tau))


# ----------------------------------------------------------------------------
# sigma_rel <-> gamma and beta.

def test_exponents_equal_official(golden):
    gamma = sigma_rel_to_gamma(golden["stds"])
    np.testing.assert_allclose(gamma, golden["exponents"], rtol=1e-9, atol=0)
    assert std_to_exp(0.05) == gamma[1]


@pytest.mark.parametrize("gamma", [0.5, 1.8262, 6.9372, 16.97, 97.0])
def test_sigma_rel_is_the_profile_std_over_its_length(gamma):
    mass, _, std = profile_moments(gamma, t=3.0)
    assert mass == pytest.approx(1, abs=1e-6)
    assert gamma_to_sigma_rel(gamma) == pytest.approx(std / 3.0, rel=1e-6)


def test_sigma_rel_gamma_round_trip():
    sigma_rel = np.geomspace(1e-3, 0.29, 60)
    gamma = sigma_rel_to_gamma(sigma_rel)
    np.testing.assert_allclose(gamma_to_sigma_rel(gamma), sigma_rel, rtol=1e-12)
    # The defining cubic, sigma_rel^2 (gamma + 2)^2 (gamma + 3) = gamma + 1, and the averaging branch.
    np.testing.assert_allclose(sigma_rel ** 2 * (gamma + 2) ** 2 * (gamma + 3), gamma + 1, rtol=1e-12)
    assert np.all(gamma > (np.sqrt(5) - 1) / 2 - 1) and np.all(np.diff(gamma) < 0)
    gamma = np.array([-0.3, 0.0, 1.0, 5.0, 50.0, 1000.0])
    np.testing.assert_allclose(sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)), gamma, rtol=1e-9)


@pytest.mark.parametrize("sigma_rel", [0.0, -0.1, 0.31])
def test_sigma_rel_outside_the_profiles_range_is_refused(sigma_rel):
    assert SIGMA_REL_MAX == pytest.approx(0.3003, abs=1e-4)
    with pytest.raises(ValueError, match="sigma_rel must lie in"):
        sigma_rel_to_gamma(sigma_rel)


def test_betas_equal_official(golden):
    betas = [power_function_beta(std, t_next=65536, t_delta=2048) for std in golden["stds"]]
    np.testing.assert_allclose(betas, golden["betas_t_next_65536_t_delta_2048"], rtol=1e-9, atol=0)
    assert power_function_beta(0.05, t_next=2048, t_delta=2048) == 0  # The first step copies the network.


def test_tracked_ema_weights_are_the_profile_integrated_over_each_step():
    """With beta_k = (1 - 1/k)^(gamma + 1), the EMA after K steps puts the weight
    integral_{k-1}^{k} p_{K,gamma}(tau) dtau = (k/K)^(gamma+1) - ((k-1)/K)^(gamma+1) on step k's weights."""
    steps, batch, stds = 300, 64, (0.05, 0.2)
    net = torch.nn.Linear(steps, 1, bias=False).double()
    ema = PowerFunctionEMA(net, stds)
    with torch.no_grad():
        for k in range(1, steps + 1):
            net.weight.zero_()
            net.weight[0, k - 1] = 1  # The trajectory is one-hot, so the EMA is its weight on each step.
            ema.update(cur_nimg=k * batch, batch_size=batch)
    k = np.arange(1, steps + 1)
    for std, tracked in ema.emas.items():
        exponent = sigma_rel_to_gamma(std) + 1
        expected = (k / steps) ** exponent - ((k - 1) / steps) ** exponent
        np.testing.assert_allclose(tracked.weight[0].numpy(), expected, rtol=1e-10, atol=1e-15)


def test_ema_state_dict_resumes_exactly():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))

    def train(ema, first_step, last_step):
        for k in range(first_step, last_step + 1):
            with torch.no_grad():
                for p in net.parameters():
                    p.copy_(torch.sin(k * torch.arange(p.numel(), dtype=p.dtype) + k).reshape(p.shape))
                net[1].running_mean.fill_(k)
            ema.update(cur_nimg=k * 32, batch_size=32)

    straight = PowerFunctionEMA(net, (0.05, 0.1))
    train(straight, 1, 40)
    interrupted = PowerFunctionEMA(net, (0.05, 0.1))
    train(interrupted, 1, 17)
    state = pickle.loads(pickle.dumps(interrupted.state_dict()))
    resumed = PowerFunctionEMA(net, (0.05, 0.1))
    resumed.load_state_dict(state)
    train(resumed, 18, 40)
    for std in (0.05, 0.1):
        for a, b in zip(straight.emas[std].state_dict().values(), resumed.emas[std].state_dict().values()):
            assert torch.equal(a, b)
    assert straight.emas[0.1][1].running_mean[0] == 40  # Buffers follow the network.
    with pytest.raises(ValueError, match="tracks sigma_rel"):
        PowerFunctionEMA(net, (0.05,)).load_state_dict(state)


# ----------------------------------------------------------------------------
# The least-squares solve.

@pytest.mark.parametrize("gammas, times", [((6.94, 6.94), (1.0, 1.0)), ((16.97, 1.83), (0.3, 1.0)),
                                           ((97.0, 3.0), (1.0, 0.45))])
def test_profile_inner_product_is_the_integral(gammas, times):
    tau = np.linspace(0, min(times), 400_001)  # Where both profiles are nonzero.
    profiles = [(g + 1) * (tau / t) ** g / t for g, t in zip(gammas, times)]
    expected = np.trapezoid(profiles[0] * profiles[1], tau)
    assert profile_inner_product(times[0], gammas[0], times[1], gammas[1]) == pytest.approx(expected, rel=1e-5)


def test_coefficients_equal_official(golden):
    coefficients = solve_posthoc_coefficients(golden["in_nimg"], golden["in_std"], golden["out_nimg"],
                                              golden["out_std"])
    expected = golden["coefficients"].numpy()
    assert coefficients.shape == expected.shape == (16, 2)
    np.testing.assert_allclose(coefficients, expected, rtol=1e-10, atol=0)  # Measured: 2.3e-13.
    np.testing.assert_allclose(coefficients.sum(axis=0), 1, rtol=0, atol=1e-13)


def test_coefficients_reproduce_a_tracked_profile_exactly():
    """A requested profile that is one of the inputs is that input alone."""
    in_nimg, in_std = [1000, 1000, 2000, 2000, 3000, 3000], [0.05, 0.1] * 3
    coefficients = solve_posthoc_coefficients(in_nimg, in_std, 2000, [0.1, 0.05])
    np.testing.assert_allclose(coefficients[:, 0], np.eye(6)[3], atol=1e-8)
    np.testing.assert_allclose(coefficients[:, 1], np.eye(6)[2], atol=1e-8)


def trajectory(k: np.ndarray) -> np.ndarray:
    """Made-up weights of 5 parameters after step k (of 2000): drifts and oscillations of several periods."""
    s = np.asarray(k, dtype=np.float64)[..., None] / 2000
    return np.concatenate([np.sin(2 * np.pi * s * [1, 3, 7]), s ** 2, np.exp(-4 * s)], axis=-1)


@pytest.mark.parametrize("out_step", [2000, 1200])
def test_reconstruction_matches_an_ema_tracked_directly(out_step):
    """Train 2000 steps of 100 images along ``trajectory``, tracking sigma_rel 0.05 and 0.10 (snapshots every 100
    steps) and, for comparison, 0.07 directly. Reconstructing 0.07 from the snapshots lands within 0.3% of the
    distance between the two tracked EMAs (measured: 0.06% at step 2000, 0.12% at step 1200; with every gamma of
    the fit 10% off, 0.6%)."""
    steps, batch, every = 2000, 100, 100
    net = torch.nn.Linear(5, 1, bias=False).double()
    tracked, direct = PowerFunctionEMA(net, (0.05, 0.10)), PowerFunctionEMA(net, (0.07,))
    snapshots, in_nimg, in_std = [], [], []
    with torch.no_grad():
        for k in range(1, out_step + 1):
            net.weight[0] = torch.from_numpy(trajectory(k))
            tracked.update(cur_nimg=k * batch, batch_size=batch)
            direct.update(cur_nimg=k * batch, batch_size=batch)
            if k % every == 0:
                for std, ema in tracked.emas.items():
                    snapshots.append(ema.weight[0].numpy().copy())
                    in_nimg.append(k * batch)
                    in_std.append(std)
    coefficients = solve_posthoc_coefficients(in_nimg, in_std, out_step * batch, [0.07])
    reconstructed = coefficients[:, 0] @ np.stack(snapshots)
    want = direct.emas[0.07].weight[0].numpy()
    error = np.abs(reconstructed - want).max()
    spread = np.abs(tracked.emas[0.05].weight[0].numpy() - tracked.emas[0.10].weight[0].numpy()).max()
    assert spread > 0.01  # The two tracked EMAs are far apart: the test is not trivially passed.
    assert error < 0.003 * spread, (error, spread)


# ----------------------------------------------------------------------------
# File names and the command line.

def test_snapshot_names_round_trip():
    assert power_snapshot_name(2_147_483_648, 0.05) == "network-snapshot-2147483-0.050.pkl"
    assert phema_name(524_288, 0.15) == "phema-0000524-0.150.pkl"
    assert parse_power_snapshot_name("/runs/network-snapshot-0000524-0.100.pkl") == ("network-snapshot", 524_288, 0.1)
    assert parse_power_snapshot_name("phema-0000524-0.150.pkl") == ("phema", 524_288, 0.15)
    assert parse_power_snapshot_name("edm2-img512-xs-2147483-0.050.pkl") == ("edm2-img512-xs", 2_147_483_648, 0.05)
    for other in ("network-snapshot-000524.pkl", "network-snapshot-0000524-0.100.pkl.tmp", "training-state-1.pt"):
        assert parse_power_snapshot_name(other) is None


def test_counts_the_official_name_cannot_hold_get_the_images_past_whole_kimg():
    """Small runs snapshot at counts like 32 or 1056 images: KKKKKKK.RRR keeps them exact and distinct."""
    names = [power_snapshot_name(n, 0.1) for n in (32, 1000, 1024, 1056, 2048, 3000)]
    assert names == ["network-snapshot-0000000.032-0.100.pkl", "network-snapshot-0000001.000-0.100.pkl",
                     "network-snapshot-0000001-0.100.pkl", "network-snapshot-0000001.056-0.100.pkl",
                     "network-snapshot-0000002-0.100.pkl", "network-snapshot-0000003.000-0.100.pkl"]  # 3072 is 0000003.
    assert [parse_power_snapshot_name(name).nimg for name in names] == [32, 1000, 1024, 1056, 2048, 3000]
    assert phema_name(1056, 0.15) == "phema-0000001.056-0.150.pkl"


def test_image_count_is_recovered_from_the_name(golden):
    """KKKKKKK = images // 1000: counts that are multiples of 1024 (EDM2's power-of-two batches) come back
    exactly, the golden snapshot times among them; where no multiple of 1024 has that KKKKKKK, 1000 KKKKKKK."""
    for nimg in list(golden["in_nimg"]) + [golden["out_nimg"], 2 ** 31, 1024 * 41, 1024 * 42, 1024]:
        assert nimg_from_kimg(nimg // 1000) == nimg
    assert nimg_from_kimg(42) == 42_000 and nimg_from_kimg(0) == 0  # 41 * 1024 = 41984, 42 * 1024 = 43008.


def test_list_snapshots_by_prefix_and_sigma_rel(tmp_path):
    names = ["network-snapshot-0000016-0.050.pkl", "network-snapshot-0000008-0.100.pkl",
             "edm2-img64-s-0000008-0.050.pkl", "phema-0000016-0.130.pkl", "network-snapshot-000016.pkl", "log.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "run-0000001-0.050.pkl").mkdir()

    def listed(**kwargs):
        return [os.path.basename(path) for path, _ in list_power_snapshots(str(tmp_path), **kwargs)]

    assert listed() == ["edm2-img64-s-0000008-0.050.pkl", "network-snapshot-0000008-0.100.pkl",
                        "network-snapshot-0000016-0.050.pkl"]  # By time, then sigma_rel; not phema-*.
    assert listed(prefix="network-snapshot", sigma_rels=[0.05]) == ["network-snapshot-0000016-0.050.pkl"]
    assert listed(prefix="phema") == ["phema-0000016-0.130.pkl"]


@pytest.mark.parametrize("text, values", [("0.1", [0.1]), ("0.15,0.05,0.1,0.1", [0.05, 0.1, 0.15]),
                                          ("0.010,0.015,...,0.030", [0.01, 0.015, 0.02, 0.025, 0.03]),
                                          ("0.25,0.2,...,0.1,0.08,...,0.02",
                                           [0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.25])])
def test_sigma_rel_lists(text, values):
    assert parse_sigma_rel_list(text) == pytest.approx(values, abs=1e-12)


@pytest.mark.parametrize("text, message", [("0.1,x", "'x' is not a number"), ("0.05,...,0.1", "two numbers before"),
                                           ("0.01,0.02,...", "one after"),
                                           ("0.01,0.02,...,0.035", "not an evenly spaced range"),
                                           ("0.01,0.01,...,0.02", "not an evenly spaced range"),
                                           ("0.29,0.3,...,0.31", "must lie in (0, 0.3003]"), ("", "must lie in")])
def test_bad_sigma_rel_lists(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_sigma_rel_list(text)


def _run_cli(*args: str):
    from reconstruct_phema import main
    return CliRunner().invoke(main, [str(a) for a in args])


SNAPSHOT_NIMG = {8: 8192, 16: 16384, 24: 24576}  # kimg in the file name: images (multiples of 1024).


def _tiny_fourier_net(seed: int) -> torch.nn.Module:
    """A few-thousand-parameter NCSN++-style EDMPrecond: its Fourier embedding holds a float buffer (``freqs``),
    which is averaged like the parameters. Parameters and buffer random per seed."""
    from torch_utils.misc import randomize_parameters
    from training.networks import EDMPrecond
    net = EDMPrecond(img_resolution=8, img_channels=3, label_dim=4, model_type="SongUNet", model_channels=8,
                     channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0, embedding_type="fourier",
                     channel_mult_noise=2)
    net = randomize_parameters(net, seed)
    torch.manual_seed(seed)
    net.model.map_noise.freqs.copy_(torch.randn_like(net.model.map_noise.freqs))
    return net.eval()


# An official EDM2 snapshot's encoder, of a class we do not have: it must come back exactly as it was.
ENCODER_META = dict(type="class", version=6, module_src="raise SystemExit('never run')\n",
                    class_name="StandardRGBEncoder", state=dict(_init_args=(), _init_kwargs={}))


@pytest.fixture(scope="module")
def snapshot_dir(tmp_path_factory):
    """Raw snapshots of tiny networks (independent random weights) at 8, 16 and 24 kimg for sigma_rel 0.05 and
    0.10, the last one in the official EDM2 layout (an EasyDict with 'encoder' and no 'augment_pipe'), plus
    files that are not raw snapshots."""
    folder = tmp_path_factory.mktemp("snapshots")
    for seed, (nimg, std) in enumerate((nimg, std) for nimg in SNAPSHOT_NIMG.values() for std in (0.05, 0.10)):
        path, net = folder / power_snapshot_name(nimg, std), _tiny_fourier_net(seed)
        if (nimg, std) == (24576, 0.10):
            data = dnnlib.EasyDict(encoder=_OfficialPersistentObject(ENCODER_META),
                                   dataset_kwargs=dict(resolution=8), loss_fn=None, ema=as_official(net))
            path.write_bytes(pickle.dumps(data, protocol=4))
        else:
            save_network_pkl(str(path), dict(ema=net, loss_fn=EDMLoss(), augment_pipe=None,
                                             dataset_kwargs=dict(resolution=8)))
    (folder / "network-snapshot-000024.pkl").write_bytes(b"an EDM snapshot, not a power-function EMA")
    (folder / "phema-0000024-0.070.pkl").write_bytes(b"an earlier output")
    return folder


@pytest.fixture(scope="module")
def snapshot_states(snapshot_dir) -> dict[tuple[int, float], dict[str, torch.Tensor]]:
    """The snapshots' networks' state_dicts in float64, by (images, sigma_rel)."""
    states = {}
    for nimg in SNAPSHOT_NIMG.values():
        for std in (0.05, 0.10):
            net = load_network_pkl(str(snapshot_dir / power_snapshot_name(nimg, std)))["ema"]
            states[(nimg, std)] = {key: tensor.double() for key, tensor in net.state_dict().items()}
    return states


def _assert_weighted_sum(path, states: dict, out_nimg: int, out_std: float) -> dict:
    """The network in ``path`` is sum_i c_i theta_i over the snapshots up to ``out_nimg``, with the coefficients
    solved here; returns the output's snapshot dict."""
    inputs = sorted(key for key in states if key[0] <= out_nimg)
    coefficients = solve_posthoc_coefficients([nimg for nimg, _ in inputs], [std for _, std in inputs],
                                              out_nimg, [out_std])[:, 0]
    data = load_network_pkl(str(path))
    state = data["ema"].state_dict()
    assert set(state) == set(states[inputs[0]]) and "model.map_noise.freqs" in state
    for key, tensor in state.items():
        expected = sum(float(c) * states[name][key] for c, name in zip(coefficients, inputs))
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-5, atol=1e-6, msg=key)
    return data


class _MetaUnpickler(pickle.Unpickler):
    """Reads a snapshot as pickled, each persistent object as its description (trusted test files only)."""

    def find_class(self, module, name):
        if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
            return lambda meta: meta
        return super().find_class(module, name)


def test_cli_writes_the_weighted_sums_of_the_snapshots(snapshot_dir, snapshot_states, tmp_path):
    """Three outputs in two passes over the six inputs (--batch 2), at the latest snapshot."""
    result = _run_cli("--indir", snapshot_dir, "--outdir", tmp_path, "--outstd", "0.2,0.07,0.13", "--batch", "2")
    assert result.exit_code == 0, result.output
    assert ("Reconstructed 3 network(s) (sigma_rel 0.070, 0.130, 0.200 at 24 kimg) from 6 snapshots, 2 pass(es)"
            in result.output)
    names = ["phema-0000024-0.070.pkl", "phema-0000024-0.130.pkl", "phema-0000024-0.200.pkl"]
    assert sorted(os.listdir(tmp_path)) == names
    for name, std in zip(names, (0.07, 0.13, 0.2)):
        data = _assert_weighted_sum(tmp_path / name, snapshot_states, 24576, std)
        assert type(data["encoder"]).__name__ == "StandardRGBEncoder"  # The official class loads as ours.
        # The rest is the latest input's as it was pickled: the official EDM2 layout, its encoder verbatim.
        with open(tmp_path / name, "rb") as f:
            raw = _MetaUnpickler(f).load()
        assert type(raw) is dnnlib.EasyDict and list(raw) == ["encoder", "dataset_kwargs", "loss_fn", "ema"]
        assert raw.encoder == ENCODER_META and raw.loss_fn is None and raw.dataset_kwargs == dict(resolution=8)


def test_cli_reconstructs_as_of_an_earlier_snapshot_and_skips_existing(snapshot_dir, snapshot_states, tmp_path):
    result = _run_cli("--indir", snapshot_dir, "--outdir", tmp_path, "--outstd", "0.13", "--outkimg", "16")
    assert result.exit_code == 0, result.output
    assert "(sigma_rel 0.130 at 16 kimg) from 4 snapshots, 1 pass(es)" in result.output
    assert os.listdir(tmp_path) == ["phema-0000016-0.130.pkl"]
    data = _assert_weighted_sum(tmp_path / "phema-0000016-0.130.pkl", snapshot_states, 16384, 0.13)
    assert isinstance(data["loss_fn"], EDMLoss) and "encoder" not in data

    (tmp_path / "phema-0000016-0.130.pkl").write_bytes(b"kept")
    result = _run_cli("--indir", snapshot_dir, "--outdir", tmp_path, "--outstd", "0.13,0.2", "--outkimg", "16",
                      "--skip", "--instd", "0.1,0.05")
    assert result.exit_code == 0, result.output
    assert "Reconstructed 1 network(s) (sigma_rel 0.130, 0.200 at 16 kimg, 1 left as they were)" in result.output
    assert (tmp_path / "phema-0000016-0.130.pkl").read_bytes() == b"kept"
    _assert_weighted_sum(tmp_path / "phema-0000016-0.200.pkl", snapshot_states, 16384, 0.2)


def test_outkimg_names_official_and_fractional_snapshot_times():
    """--outkimg takes a file name's KKKKKKK (the official runs' multiples of 1024, or our runs' only snapshot in
    that thousand, e.g. 16,032 images at batch 32) or an exact time such as 16.032; error lists show the latter."""
    assert snapshot_time_at([8192, 16384], 16) == 16384 and snapshot_time_at([8192, 16384], 16.384) == 16384
    assert snapshot_time_at([16032, 32000], 16) == 16032 and snapshot_time_at([16032, 32000], 16.032) == 16032
    assert snapshot_time_at([16032, 32000], 32) == 32000
    assert snapshot_time_at([16032, 32000], 17) is None and snapshot_time_at([16032, 32000], 16.03) is None
    assert snapshot_time_at([16032, 16500], 16) is None and snapshot_time_at([16032, 16500], 16.5) == 16500
    assert [format_kimg(n) for n in (16000, 16384, 16032, 500)] == ["16", "16", "16.032", "0.500"]


def test_reconstruct_writes_each_sigma_rel_once(snapshot_dir, tmp_path):
    summary = reconstruct(str(snapshot_dir), str(tmp_path), [0.2, 0.13, 0.2], outkimg=8, progress=False)
    assert summary["outstd"] == [0.13, 0.2] and summary["coefficients"].shape == (2, 2)
    assert summary["paths"] == [str(tmp_path / "phema-0000008-0.130.pkl"), str(tmp_path / "phema-0000008-0.200.pkl")]
    assert sorted(os.listdir(tmp_path)) == ["phema-0000008-0.130.pkl", "phema-0000008-0.200.pkl"]


def test_cli_errors_are_one_line(snapshot_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _run_cli("--indir", empty, "--outdir", tmp_path / "out", "--outstd", "0.1")
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {empty}: no raw EMA snapshots (PREFIX-KKKKKKK-S.SSS.pkl) in this folder"
    result = _run_cli("--indir", tmp_path / "missing", "--outdir", tmp_path / "out", "--outstd", "0.1")
    assert result.exit_code == 1 and result.output.strip() == f"Error: {tmp_path / 'missing'}: no such folder"
    result = _run_cli("--indir", snapshot_dir, "--outdir", tmp_path / "out", "--outstd", "0.1", "--outkimg", "20")
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: {snapshot_dir}: no snapshot at 20 kimg to reconstruct at "
                                     f"(snapshots at 8, 16, 24 kimg)")
    for outstd in ("0.5", "0.1,x", "0"):
        result = _run_cli("--indir", empty, "--outdir", tmp_path / "out", "--outstd", outstd)
        assert result.exit_code == 2 and "Invalid value for '--outstd'" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_cli_refuses_snapshots_of_different_networks(tmp_path):
    for nimg, label_dim in ((8192, 4), (16384, 2)):
        save_network_pkl(str(tmp_path / power_snapshot_name(nimg, 0.05)), dict(ema=make_tiny_net(label_dim=label_dim),
                                                                        loss_fn=None, augment_pipe=None,
                                                                        dataset_kwargs=None))
    result = _run_cli("--indir", tmp_path, "--outdir", tmp_path / "out", "--outstd", "0.1")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (f"Error: {tmp_path / 'network-snapshot-0000016-0.050.pkl'}: "
                                                      f"its network's tensors differ from those of the snapshots "
                                                      f"before it")  # After the progress bar.
    assert not os.listdir(tmp_path / "out")
