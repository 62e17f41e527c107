"""ema_sweep.py and training/ema/sweep.py: the FID of each sigma_rel is the one fid.py computes for the pickle
reconstruct_phema.py writes for it; the JSON, the plot and the best network are written; bad input gets one line.
Latent runs (EDM2 img512): test_latents.py."""

from __future__ import annotations

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from conftest import make_tiny_net
from training.checkpoint import load_network_pkl, save_network_pkl
from training.run_files import power_snapshot_name

pytestmark = pytest.mark.usefixtures("single_thread")

SAMPLER = ["--steps=4", "--S_churn=10", "--S_min=0.01"]  # Stochastic (Algorithm 2): the seeds must drive the noise.
NIMG = (8192, 16384)  # The snapshots' times: 8 and 16 kimg.


def _invoke(main, *args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _sweep(*args):
    from ema_sweep import main
    return _invoke(main, *args)


@pytest.fixture
def run_dir(tmp_path):
    """A run's raw EMA snapshots: tiny networks (independent random weights) at 8 and 16 kimg, sigma_rel 0.05 and
    0.10."""
    folder = tmp_path / "run"
    folder.mkdir()
    for seed, (nimg, std) in enumerate((nimg, std) for nimg in NIMG for std in (0.05, 0.10)):
        save_network_pkl(str(folder / power_snapshot_name(nimg, std)), dict(ema=make_tiny_net(label_dim=4, seed=seed),
                                                                      loss_fn=None, augment_pipe=None,
                                                                      dataset_kwargs={}))
    return folder


@pytest.fixture(scope="module")
def ref_npz(tmp_path_factory) -> str:
    """A reference of zero mean and zero covariance: FID = |mu|^2 + Tr(sigma) of the evaluated features."""
    from metrics.reference import save_reference
    path = str(tmp_path_factory.mktemp("ref") / "zero.npz")
    save_reference(path, dict(mu=np.zeros(2048), sigma=np.zeros([2048, 2048])))
    return path


@pytest.fixture
def recorded_fids(monkeypatch, fid_detector):
    """Every FID that ``metrics.evaluate.compute_metrics`` computes, in order. Against the zero-covariance
    reference the FID is |mu - mu_ref|^2 + Tr(sigma) exactly; that closed form replaces the two 2048x2048
    eigendecompositions (about 10 s each on the test machine's 2 shared cores), in the sweep and in fid.py alike.
    ``fid_detector`` has converted the detector into this session's cache, which the commands read."""
    import metrics.evaluate
    values = []

    def closed_form(mu1, sigma1, mu2, sigma2) -> float:
        assert not np.any(sigma2), "the closed form holds for a zero-covariance reference only"
        values.append(float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1)))
        return values[-1]

    monkeypatch.setattr(metrics.evaluate, "frechet_distance", closed_form)
    return values


def test_sweep_reports_the_fid_of_the_reconstructed_pickle(run_dir, ref_npz, recorded_fids, tmp_path):
    """Sweep sigma_rel 0.07 and 0.15 over 4 seeds; then reconstruct_phema.py + fid.py calc --network for 0.15 with the
    same seeds and sampler options give the same FID, and --save-best wrote reconstruct_phema.py's pickle."""
    from fid import main as fid_main
    from reconstruct_phema import main as reconstruct_main

    result = _sweep(f"--indir={run_dir}", f"--ref={ref_npz}", "--outstd=0.07,0.15", "--num=4", "--batch=3",
                    "--device=cpu", "--save-best=1", *SAMPLER)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(recorded_fids) == 2 and recorded_fids[0] != recorded_fids[1]  # Telling the two networks apart.
    data = json.loads((run_dir / "ema-sweep.json").read_text())
    assert data["fid"] == {"0.07": recorded_fids[0], "0.15": recorded_fids[1]}
    best = 0.07 if recorded_fids[0] < recorded_fids[1] else 0.15
    assert data["best"] == dict(sigma_rel=best, fid=min(recorded_fids))
    assert (data["kimg"], data["nimg"], data["num_images"], data["seeds"]) == (16, 16384, 4, "0-3")
    assert data["sampler"]["kind"] == "PaperSampler" and data["sampler"]["num_steps"] == 4
    assert data["sampler"]["churn"]["S_max"] == "inf"  # JSON has no inf.
    assert data["inputs"] == [power_snapshot_name(n, s) for n in NIMG for s in (0.05, 0.1)]
    assert data["tracked_stds"] == [0.05, 0.1]
    for std, fid in zip((0.07, 0.15), recorded_fids):
        assert any(line.startswith(f"sigma_rel {std:.3f}: FID {fid:.4f}  (") for line in lines), lines
    assert f"Best: sigma_rel {best:.3f}, FID {min(recorded_fids):.4f}" in lines
    assert lines[-1].startswith("Swept 2 sigma_rel at 16 kimg, 4 images each, in ")
    assert lines[-1].endswith(f"-> {run_dir / 'ema-sweep.json'}, {run_dir / 'ema-sweep.png'}, "
                              f"{run_dir / power_snapshot_name(16384, best, 'phema')}")
    with PIL.Image.open(run_dir / "ema-sweep.png") as image:
        assert image.format == "PNG" and image.size == (768, 480)

    out = tmp_path / "phema"
    result = _invoke(reconstruct_main, "--indir", run_dir, "--outdir", out, "--outstd", "0.07,0.15")
    assert result.exit_code == 0, result.output
    saved, written = (load_network_pkl(str(folder / power_snapshot_name(16384, best, "phema")))["ema"].state_dict()
                      for folder in (run_dir, out))  # Pickles hold storage ids: compare the tensors.
    assert saved.keys() == written.keys() and all(torch.equal(saved[k], written[k]) for k in saved)
    result = _invoke(fid_main, "calc", f"--network={out / 'phema-0000016-0.150.pkl'}", "--seeds=0-3",
                     f"--ref={ref_npz}", "--batch=3", "--device=cpu", *SAMPLER)
    assert result.exit_code == 0, result.output
    assert recorded_fids[2] == data["fid"]["0.15"]  # The same images, the same features: the same FID.
    assert float(result.stdout.strip().splitlines()[-1]) == pytest.approx(data["fid"]["0.15"], rel=1e-5)


def test_format_int_list_round_trips():
    from dnnlib.util import parse_int_list
    from training.ema.sweep import format_int_list
    for values in ([0, 1, 2, 3], [5], [0, 2, 3, 4, 9, 11, 12]):
        assert parse_int_list(format_int_list(values)) == values
    assert format_int_list([0, 2, 3, 4, 9]) == "0,2-4,9"


# ----------------------------------------------------------------------------
# Bad input: one line, before the detector is loaded, nothing written.

def _assert_one_line_error(result, expected: str, exit_code: int = 1):
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    message = result.output.strip()
    assert "\n" not in message and expected in message, result.output


def test_bad_input_gets_one_line(run_dir, ref_npz, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = [f"--ref={ref_npz}", "--outstd=0.1", "--num=4", "--device=cpu", "--detector=/no/detector/needed.pt"]
    _assert_one_line_error(_sweep(f"--indir={empty}", *base),
                           f"Error: {empty}: no raw EMA snapshots (PREFIX-KKKKKKK-S.SSS.pkl) in this folder")
    _assert_one_line_error(_sweep(f"--indir={run_dir}", *base, "--outkimg=12"),
                           f"Error: {run_dir}: no snapshot at 12 kimg to reconstruct at (snapshots at 8, 16 kimg)")
    _assert_one_line_error(_sweep(f"--indir={run_dir}", *base, f"--ref={tmp_path / 'missing.npz'}"),
                           f"Error: {tmp_path / 'missing.npz'}: cannot read reference statistics")
    _assert_one_line_error(_sweep(f"--indir={run_dir}", *base, f"--ref={tmp_path / 'missing-dataset'}"),
                           f"Error: {tmp_path / 'missing-dataset'}: no such file or folder")
    _assert_one_line_error(_sweep(f"--indir={run_dir}", *base, "--class=4"), "--class=4: ")
    _assert_one_line_error(_sweep(f"--indir={run_dir}", *base, "--seeds=0-2"),
                           "Error: --num=4 and --seeds (3 seeds) disagree; give one of them")
    result = _sweep(f"--indir={run_dir}", *base, "--outstd=0.1,0.31")
    assert result.exit_code == 2 and "Invalid value for '--outstd': each sigma_rel must lie in (0, 0.3003]" in \
        result.output, result.output
    assert sorted(os.listdir(run_dir)) == sorted(power_snapshot_name(n, s) for n in NIMG for s in (0.05, 0.1))


def test_library_checks_sigma_rel_and_seeds(run_dir, ref_npz):
    from training.ema.sweep import EMASweepOptions, ema_sweep
    with pytest.raises(ValueError, match=r"--outstd: each sigma_rel must lie in \(0, 0.3003\]; got 0.4"):
        ema_sweep(EMASweepOptions(indir=str(run_dir), ref=ref_npz, outstd=[0.1, 0.4]))
    with pytest.raises(ValueError, match="--seeds: FID needs at least 2 images, got 1"):
        ema_sweep(EMASweepOptions(indir=str(run_dir), ref=ref_npz, outstd=[0.1], seeds=[7]))
