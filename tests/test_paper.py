"""The paper in miniature (benchmarks/paper): the config table against the paper's Table 2 and Table 7, the
miniature's training options and the training_loop() arguments they become, the NFE count, the reports, and the
smoke size end to end through the command line (every promised file, resumption without retraining)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, make_tiny_net

# Table 2's rows with Table 7's hyperparameters (CIFAR-10, VP), written out independently of the code's table:
# (precond, loss, batch, lr, lr ramp-up Mimg, EMA half-life Mimg, dropout, channels per resolution, augment p,
# gradient clipping).
PAPER = {
    "A": ("vp", "vp", 128, 2e-4, 0.64, 0.89, 0.10, (1, 2, 2, 2), 0, True),
    "B": ("vp", "vp", 512, 10e-4, 10, 0.5, 0.13, (1, 2, 2, 2), 0, False),
    "C": ("vp", "vp", 512, 10e-4, 10, 0.5, 0.13, (2, 2, 2), 0, False),
    "D": ("edm", "vp", 512, 10e-4, 10, 0.5, 0.13, (2, 2, 2), 0, False),
    "E": ("edm", "edm", 512, 10e-4, 10, 0.5, 0.13, (2, 2, 2), 0, False),
    "F": ("edm", "edm", 512, 10e-4, 10, 0.5, 0.13, (2, 2, 2), 0.12, False),
}
FIELDS = ("precond", "loss", "batch", "lr", "lr_rampup_mimg", "ema_mimg", "dropout", "channel_mult", "augment",
          "gradient_clipping")
NETWORK = {"vp": "training.networks.VPPrecond", "edm": "training.networks.EDMPrecond"}
LOSS = {"vp": "training.loss.VPLoss", "edm": "training.loss.EDMLoss"}


def test_config_table_is_the_papers_table2_with_table7_hyperparameters():
    from benchmarks.paper.configs import PAPER_FID, TABLE2
    assert list(TABLE2) == list(PAPER)
    for name, expected in PAPER.items():
        assert tuple(getattr(TABLE2[name], field) for field in FIELDS) == expected, name
    assert PAPER_FID["unconditional VP"] == {"A": 3.01, "B": 2.51, "C": 2.31, "D": 2.29, "E": 2.05, "F": 1.97}


def test_each_config_changes_only_what_its_step_of_table2_changes():
    from benchmarks.paper.configs import TABLE2
    changed = {"B": {"batch", "lr", "lr_rampup_mimg", "ema_mimg", "dropout", "gradient_clipping"},
               "C": {"channel_mult"}, "D": {"precond"}, "E": {"loss"}, "F": {"augment"}}
    names = list(TABLE2)
    for previous, current in zip(names, names[1:]):
        a, b = dataclasses.asdict(TABLE2[previous]), dataclasses.asdict(TABLE2[current])
        assert {key for key in a if a[key] != b[key]} - {"title"} == changed[current], current


def test_miniature_options_keep_the_papers_differences_at_the_sizes_scale():
    from benchmarks.paper.configs import SIZES, train_options
    cpu = SIZES["cpu"]
    assert (cpu.kimg, cpu.batch_scale, cpu.cbase, cpu.blocks, cpu.seeds) == (6.4, 1 / 16, 16, 1, (0, 1, 2))
    for name, (precond, loss, batch, lr, rampup, ema, dropout, cres, augment, _) in PAPER.items():
        options = train_options(name, cpu, seed=2)
        assert options == dict(
            precond=precond, loss=loss, arch="ddpmpp", cond=False, cbase=16, cres=list(cres), blocks=1, attn=[16],
            batch=batch // 16, lr=lr, lr_rampup=pytest.approx(rampup / 200 * 6.4),
            ema=pytest.approx(ema / 200 * 6.4e-3), dropout=dropout, augment=augment, xflip=False,
            duration=pytest.approx(6.4e-3), seed=2), name


def test_every_config_sees_the_same_number_of_images_in_whole_batches():
    from benchmarks.paper.configs import SIZES, TABLE2, train_options
    for size in SIZES.values():
        assert len(size.seeds) >= (1 if size.name == "smoke" else 3)
        durations = {train_options(name, size, 0)["duration"] for name in TABLE2}
        assert durations == {size.kimg / 1000}, size.name
        for name in TABLE2:
            images = round(size.kimg * 1000)
            assert images == size.kimg * 1000 and images % train_options(name, size, 0)["batch"] == 0, (size, name)


def test_bad_config_or_size_is_one_clear_error():
    from benchmarks.paper.configs import check_config, check_size
    with pytest.raises(ValueError, match=r"^config 'G': expected one of A, B, C, D, E, F"):
        check_config("G")
    with pytest.raises(ValueError, match=r"^size 'huge': expected one of smoke, cpu, gpu$"):
        check_size("huge")


def test_kimg_changes_only_the_training_length_and_the_schedules_keep_their_share():
    from benchmarks.paper.configs import SIZES, TABLE2, train_options, with_training_length
    cpu = SIZES["cpu"]
    longer = with_training_length(cpu, 96)
    assert (longer.name, longer.kimg) == ("cpu-96kimg", 96)
    assert dataclasses.replace(longer, name="cpu", kimg=6.4) == cpu
    for name, (_, _, _, _, rampup, ema, *_) in PAPER.items():
        options = train_options(name, longer, seed=0)
        assert options["duration"] == pytest.approx(0.096) and options["batch"] == train_options(name, cpu, 0)["batch"]
        assert options["lr_rampup"] == pytest.approx(rampup / 200 * 96), name  # 5% of the run for B-F, as at 6.4.
        assert options["ema"] == pytest.approx(ema / 200 * 0.096), name
    for kimg in (90, 0.1, 0, -32):  # 90,000 images are 2,812.5 batches of 32; 100 are 12.5 batches of 8.
        with pytest.raises(ValueError, match=rf"^--kimg={kimg:g}: expected a positive number of images that every "
                                             r"config's batch \(8, 32 at size 'cpu'\) divides$"):
            with_training_length(cpu, kimg)
    assert len(TABLE2) == len(PAPER)


def test_kimg_that_a_batch_does_not_divide_is_one_line_on_the_command_line(tmp_path):
    result = _run(["fig2", "--size=smoke", "--kimg=0.01", f"--outdir={tmp_path}"], timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("Error: --kimg=0.01: expected a positive number of images "
                                                      "that every config's batch (4, 16 at size 'smoke') divides")
    assert not os.listdir(tmp_path)  # Refused before the folder was prepared.


def test_training_arguments_build_each_configs_network_loss_and_schedule(fashion_mnist_zip, tmp_path):
    """train.py's own parser and build_config turn each config's options into the training_loop() arguments; config
    D is EDM preconditioning with the VP loss, which train.py's --precond alone cannot express."""
    import torch
    from benchmarks.paper.configs import SIZES, train_options
    from benchmarks.paper.pieces import training_kwargs
    cpu = SIZES["cpu"]
    for name, (precond, loss, batch, lr, rampup, ema, dropout, cres, augment, _) in PAPER.items():
        c = training_kwargs(train_options(name, cpu, seed=1), fashion_mnist_zip, str(tmp_path / name),
                            torch.device("cpu"), tick_kimg=1)
        net = c["network_kwargs"]
        assert (net["class_name"], c["loss_kwargs"]["class_name"]) == (NETWORK[precond], LOSS[loss]), name
        assert (net["model_type"], net["model_channels"], net["channel_mult"], net["num_blocks"],
                net["attn_resolutions"], net["dropout"]) == ("SongUNet", 16, list(cres), 1, [16], dropout), name
        assert (c["batch_size"], c["optimizer_kwargs"]["lr"], c["seed"]) == (batch // 16, lr, 1), name
        assert c["lr_rampup_kimg"] == pytest.approx(rampup / 200 * 6.4) and c["total_kimg"] == pytest.approx(6.4)
        assert c["ema_halflife_kimg"] == pytest.approx(ema / 200 * 6.4), name
        assert c["dataset_kwargs"]["use_labels"] is False and c["dataset_kwargs"]["xflip"] is False
        if augment:
            assert c["augment_kwargs"]["p"] == augment and net["augment_dim"] == 9
        else:
            assert "augment_kwargs" not in c and "augment_dim" not in net


def test_measured_nfe_is_one_per_euler_step_and_two_per_heun_step_but_the_last():
    import torch
    from benchmarks.paper.experiments import FIG2_SAMPLERS, nfe_of
    from benchmarks.paper.pieces import CountingDenoiser
    from training.sampling import generate_images, sampler_spec
    for sampler in FIG2_SAMPLERS.values():
        for steps in (2, 5):
            net = CountingDenoiser(make_tiny_net(label_dim=0))
            with torch.no_grad():
                generate_images(net, [0, 1], sampler=sampler_spec(num_steps=steps, **sampler["kwargs"]))
            assert net.calls == nfe_of(sampler["kwargs"]["solver"], steps)
    assert nfe_of("heun", 18) == 35  # Table 2's NFE.


def _table2_data(fids: dict[str, list[float]]) -> dict:
    from benchmarks.paper import report
    from benchmarks.paper.configs import PAPER_FID, TABLE2
    configs = {}
    for name, values in fids.items():
        mean, std = report.mean_and_std(values)
        configs[name] = dict(title=TABLE2[name].title, paper_fid=PAPER_FID["unconditional VP"][name], fids=values,
                             fid_mean=mean, fid_std=std, kimg=6.0, train_seconds_mean=150.0, sec_per_kimg_mean=25.0,
                             params=450000)
    names = list(configs)
    steps = [dict(config=b, **report.step_effect(configs[a], configs[b])) for a, b in zip(names, names[1:])]
    machine = dict(cpu="AMD EPYC", cpu_count=2, avx512=False, torch="2.x", torch_threads=1, device="cpu",
                   load_average=[1.0, 1.0, 1.0])
    return dict(size="cpu", machine=machine, configs=configs, steps=steps,
                protocol=dict(num_samples=200, num_ref=1000, steps=18, nfe=35, training_seeds=[0, 1, 2], kimg=6,
                              floor=50.0),
                paper=dict(column="unconditional VP", nfe=35),
                ordering=dict(here=report.ordering({n: c["fid_mean"] for n, c in configs.items()}),
                              paper=report.ordering(PAPER_FID["unconditional VP"])))


def _markdown_rows(text: str, first_cell: str) -> list[list[str]]:
    rows = [line.strip("|").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0]]
    assert header[0] == first_cell
    return [[cell.strip() for cell in row] for row in rows[2:]]


def test_steps_are_read_against_the_seeds_spread_and_shown_as_in_the_json():
    from benchmarks.paper import report
    data = _table2_data({"A": [100, 104, 102], "B": [90, 91, 92], "C": [91, 89, 93], "D": [95, 96, 97],
                         "E": [80, 80, 80], "F": [81, 80, 79]})
    assert [s["verdict"] for s in data["steps"]] == ["lower", "within spread", "higher", "lower", "within spread"]
    assert data["steps"][0]["delta"] == pytest.approx(-11) and data["steps"][0]["spread"] == pytest.approx(3)
    assert data["steps"][0]["paper_delta"] == pytest.approx(2.51 - 3.01)
    assert data["ordering"]["here"] == "E < F < B < C < D < A" and data["ordering"]["paper"] == "F < E < D < C < B < A"
    rows = _markdown_rows(report.table2_markdown(data), "config")
    assert [row[0] for row in rows] == list("ABCDEF")
    assert rows[0][2:5] == ["3.01", "102.00 ± 2.00", "100.00, 104.00, 102.00"] and rows[0][5] == ""
    assert rows[1][5] == "-11.00: lower (-0.50)"


def test_interrupted_training_run_is_trained_again_from_the_start(tmp_path):
    import torch
    from benchmarks.paper.configs import SIZES
    from benchmarks.paper.pieces import Workspace
    ws = Workspace(str(tmp_path), SIZES["smoke"], torch.device("cpu"))
    ws.prepare()
    leftover = tmp_path / "train" / "B-seed0" / "network-snapshot-000000.048.pkl"  # Newer than the run's.
    leftover.parent.mkdir(parents=True)
    leftover.write_text("an interrupted run's file")
    torch.set_num_threads(1)
    result = ws.trained("B", 0)
    assert not leftover.exists() and result["images"] == 32 and result["kimg"] == 0.032
    assert os.path.isfile(tmp_path / result["snapshot"]) and result["loss_class"] == LOSS["vp"]


def test_sampling_error_is_the_rms_difference_in_8_bit_levels_against_images_made_once(tmp_path):
    """Figure 2's error column: 127.5 sqrt(mean((x - x_converged)^2)) over every pixel of every image, the converged
    images sampled once and read back from the output folder."""
    import numpy as np
    import torch
    from benchmarks.paper.configs import SIZES
    from benchmarks.paper.pieces import Workspace
    ws = Workspace(str(tmp_path), SIZES["smoke"], torch.device("cpu"))
    rng = np.random.default_rng(0)
    made = {4: rng.uniform(-1, 1, (3, 1, 2, 2)).astype(np.float32), 16: rng.uniform(-1, 1, (3, 1, 2, 2))}
    calls = []

    def fake_samples(config, seed, kwargs, num):
        calls.append(kwargs["num_steps"])
        return made[kwargs["num_steps"]].astype(np.float32)

    ws.samples = fake_samples
    for _ in range(2):
        result = ws.result(ws.error_piece(f"eval/e{_}.json", "e", "A", 0, dict(num_steps=4), dict(num_steps=16), 3))
        a, b = made[4].astype(np.float64).ravel(), made[16].astype(np.float32).astype(np.float64).ravel()
        expected = 127.5 * (sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)) ** 0.5
        assert result["rms_error"] == pytest.approx(expected, rel=1e-12)
        assert result["converged_kwargs"] == dict(num_steps=16) and result["num_samples"] == 3
    assert calls == [4, 16, 4]  # The converged images were made once, then read back.
    assert len(os.listdir(tmp_path / "eval" / "converged")) == 1


# ----------------------------------------------------------------------------
# The smoke size end to end, through the command line.

def _run(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "benchmarks.paper", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _mtimes(folder) -> dict[str, float]:
    return {os.path.join(root, name): os.path.getmtime(os.path.join(root, name))
            for root, _, names in os.walk(folder) for name in names}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, fid_cache_dir):
    """The three experiments at smoke size (one command), then the same command again."""
    outdir = tmp_path_factory.mktemp("paper") / "smoke"
    first = _run(["all", "--size=smoke", f"--outdir={outdir}"])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = _mtimes(outdir / "train") | _mtimes(outdir / "eval")
    second = _run(["all", "--size=smoke", f"--outdir={outdir}"])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    after = _mtimes(outdir / "train") | _mtimes(outdir / "eval")
    return dict(outdir=outdir, first=first.stdout, second=second.stdout, before=before, after=after)


def _load(outdir, name: str) -> dict:
    return json.loads((outdir / f"{name}.json").read_text())


def test_smoke_writes_every_promised_file(smoke):
    import PIL.Image
    outdir = smoke["outdir"]
    for name in ("table2", "fig2", "fig5b"):
        assert PIL.Image.open(outdir / f"{name}.png").format == "PNG"
        assert (outdir / f"{name}.md").read_text().startswith("**")
        data = _load(outdir, name)
        assert data["experiment"] == name and data["size"] == "smoke" and data["machine"]["device"] == "cpu"
        assert f"{name}: " in smoke["first"]
    assert (outdir / "reference.npz").is_file() and json.loads((outdir / "size.json").read_text())["name"] == "smoke"
    for config in "ABCDEF":
        result = json.loads((outdir / "train" / f"{config}-seed0.json").read_text())
        assert result["images"] == 32 and result["train_seconds"] > 0 and (outdir / result["snapshot"]).is_file()
        assert (outdir / "train" / f"{config}-seed0" / "stats.jsonl").is_file()
    assert "Done: table2: 13 pieces (13 run now, 0 done before)" in smoke["first"]
    assert "fig2: 19 pieces (16 run now, 3 done before)" in smoke["first"]  # The floor and networks of table2.


def test_smoke_table2_numbers_and_markdown_agree(smoke):
    data = _load(smoke["outdir"], "table2")
    assert list(data["configs"]) == list("ABCDEF") and data["protocol"]["nfe"] == 7
    rows = _markdown_rows((smoke["outdir"] / "table2.md").read_text(), "config")
    for row, (name, c) in zip(rows, data["configs"].items()):
        assert len(c["fids"]) == 1 and math.isfinite(c["fid_mean"]) and c["fid_std"] is None
        piece = json.loads((smoke["outdir"] / "eval" / "table2" / f"{name}-seed0.json").read_text())
        assert piece["fid"] == c["fids"][0] and piece["nfe"] == 7 and piece["num_samples"] == 16
        assert row[:5] == [name, c["title"], f"{c['paper_fid']:.2f}", f"{c['fid_mean']:.2f}", f"{c['fids'][0]:.2f}"]
        assert row[6] == f"{c['kimg']:g}" and c["kimg"] == 0.032
        assert (c["network_class"], c["loss_class"]) == (NETWORK[PAPER[name][0]], LOSS[PAPER[name][1]])
    assert len(data["steps"]) == 5 and data["ordering"]["paper"] == "F < E < D < C < B < A"


def test_smoke_fig2_and_fig5b_curves_and_markdown_agree(smoke):
    fig2 = _load(smoke["outdir"], "fig2")
    assert list(fig2["networks"]) == ["A", "F"] and list(fig2["samplers"]) == ["original", "heun_edm_steps", "edm"]
    rows = iter(_markdown_rows((smoke["outdir"] / "fig2.md").read_text(), "network"))
    for network in fig2["networks"].values():
        assert [p["nfe"] for p in network["curves"]["original"]] == [2, 4]
        assert [p["nfe"] for p in network["curves"]["edm"]] == [3]
        for sampler, points in network["curves"].items():
            for p in points:
                assert next(rows) == [network["title"], fig2["samplers"][sampler]["title"], str(p["nfe"]),
                                      f"{p['fid']:.2f}", f"{p['rms_error']:.2f}"]
    fig5b = _load(smoke["outdir"], "fig5b")
    assert fig5b["network"]["config"] == "A" and [p["S_churn"] for p in fig5b["points"]] == [0, 40]
    # Algorithm 2's gamma_i = min(S_churn / N, sqrt(2) - 1) at N = 3 steps: 0, and 40 / 3 capped.
    assert [p["gamma"] for p in fig5b["points"]] == [0, pytest.approx(2 ** 0.5 - 1)]
    rows = _markdown_rows((smoke["outdir"] / "fig5b.md").read_text(), "S_churn")
    assert rows == [[f"{p['S_churn']:g}", f"{p['gamma']:.3f}", f"{p['fid']:.2f}"] for p in fig5b["points"]]


def test_smoke_fig2_error_is_the_images_distance_to_the_same_sampler_at_4x_its_most_steps(smoke):
    """The original sampler's point at 2 Euler steps against 16 (4 x its curve's most, 4), made here again from the
    snapshot with generate_images, unrounded."""
    import torch
    from training.checkpoint import load_network
    from training.sampling import generate_images, sampler_spec
    fig2 = _load(smoke["outdir"], "fig2")
    train = json.loads((smoke["outdir"] / "train" / "A-seed0.json").read_text())
    net = load_network(str(smoke["outdir"] / train["snapshot"]), device="cpu")
    kwargs = dict(solver="euler", discretization="vp", schedule="vp", scaling="vp")
    made = {n: generate_images(net, range(16), decode=lambda x: x, sampler=sampler_spec(num_steps=n, **kwargs)).double()
            for n in (2, 16)}
    expected = 127.5 * torch.sqrt(torch.mean((made[2] - made[16]) ** 2)).item()
    point = fig2["networks"]["A"]["curves"]["original"][0]
    assert point["steps"] == 2 and point["rms_error"] == pytest.approx(expected, rel=1e-5) and expected > 0
    assert fig2["protocol"]["converged_factor"] == 4


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_fig5b_churn_values_are_distinct_samplers(name):
    """Past S_churn = N (sqrt(2) - 1), Algorithm 2's gamma_i is capped and every S_churn is the same sampler, so a
    size's curve has at most one point there (the cpu size's first run had S_churn 10-80 at 18 steps: four
    identical FIDs)."""
    from benchmarks.paper.configs import SIZES
    size = SIZES[name]
    cap = size.fig5b_steps * (2 ** 0.5 - 1)
    assert list(size.fig5b_churn) == sorted(set(size.fig5b_churn)) and size.fig5b_churn[0] == 0
    assert sum(churn >= cap for churn in size.fig5b_churn) <= 1 and len(size.fig5b_churn) >= 5


def test_rerun_skips_every_finished_piece(smoke):
    assert smoke["after"] == smoke["before"]  # No training run, snapshot or evaluation was written again.
    for line in ("table2: 13 pieces (0 run now, 13 done before)", "fig2: 19 pieces (0 run now, 19 done before)",
                 "fig5b: 4 pieces (0 run now, 4 done before)"):
        assert line in smoke["second"]


def test_an_output_folder_of_another_size_is_refused(smoke):
    result = _run(["table2", "--size=cpu", f"--outdir={smoke['outdir']}"], timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"Error: --outdir={smoke['outdir']} holds results of "
                                                             f"size 'smoke'")
