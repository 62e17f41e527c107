"""EDM2 in the training loop and train.py: the learning-rate decay, label dropout, power-function EMAs tracked per
step (against the formula), their snapshots and exact resume, and the official presets."""

import math
import os
import re

import pytest
import torch
from click.testing import CliRunner

from conftest import FIXTURES
from training.loop.schedules import learning_rate
from training.loop.step import drop_labels
from training.loop.training_loop import training_loop
from training.loop.state import read_state_file
from training.run_files import newest_state_file

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_EDM2 = dict(class_name="training.networks.edm2.Precond", model_channels=16, channel_mult=[1, 2], num_blocks=1,
                 attn_resolutions=[8], dropout=0.1)


def edm2_config(data: str, run_dir: str, **overrides) -> dict:
    config = dict(
        run_dir=run_dir,
        dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path=data, use_labels=True, cache=True),
        data_loader_kwargs=dict(num_workers=0), network_kwargs=TINY_EDM2,
        loss_kwargs=dict(class_name="training.loss.EDM2Loss", P_mean=-0.8, P_std=1.6),
        optimizer_kwargs=dict(class_name="torch.optim.Adam", lr=0.01, betas=[0.9, 0.99], eps=1e-8),
        seed=5, batch_size=16, total_kimg=0.128, lr_rampup_kimg=0.032, lr_decay_batches=2, ema_stds=[0.05, 0.1],
        label_dropout=0.2, kimg_per_tick=0.032, snapshot_ticks=2, state_dump_ticks=2, grid_images=4, grid_steps=2,
        device="cpu", tensorboard=False)
    config.update(overrides)
    return config


def test_learning_rate_decay_is_the_official_schedule():
    golden = torch.load(os.path.join(FIXTURES, "edm2-vectors.pt"), weights_only=True)
    args = golden["lr_args"]
    for nimg, expected in golden["lr_schedule"].items():
        lr = learning_rate(args["ref_lr"], int(nimg), args["rampup_Mimg"] * 1000, args["batch_size"],
                           args["ref_batches"])
        assert lr == pytest.approx(expected, rel=1e-12, abs=1e-15), nimg
    # The formula: ramp-up to 10 Mimg, then ref_lr / sqrt(steps / ref_batches) once past ref_batches steps.
    assert learning_rate(0.01, 5e6, 10000, 2048, 70000) == pytest.approx(0.005)
    steps = 4 * 70000
    assert learning_rate(0.01, steps * 2048, 10000, 2048, 70000) == pytest.approx(0.01 / math.sqrt(4))
    assert learning_rate(0.01, 5e6, 10000, 2048, 0) == learning_rate(0.01, 5e6, 10000) == pytest.approx(0.005)


def test_the_cooldown_takes_the_rate_linearly_to_zero_over_the_runs_end():
    """lr(n) = schedule(n) min((N - n) / (f N), 1) for a run of N images with --lr-cooldown=f, on EDM's constant
    rate and on EDM2's decay alike."""
    total = 100_000
    for decay in (0, 500):
        def lr(n, f=0.25):
            return learning_rate(0.04, n, 1, 32, decay, total_nimg=total, lr_cooldown=f)
        plain = [learning_rate(0.04, n, 1, 32, decay) for n in (50_000, 75_000, 87_500, 95_000)]
        assert lr(50_000) == plain[0] and lr(75_000) == plain[1]  # Before and at the cooldown's start.
        assert lr(87_500) == pytest.approx(plain[2] * 0.5, rel=1e-12)  # Half-way through it.
        assert lr(95_000) == pytest.approx(plain[3] * 0.2, rel=1e-12)
        assert lr(total) == 0 and lr(total + 32) == 0
        assert lr(87_500, f=0) == plain[2] and lr(87_500, f=1) == pytest.approx(plain[2] * 0.125, rel=1e-12)
    assert learning_rate(0.04, 5_000, 1, 32, 500) == pytest.approx(0.04)  # Unchanged without a cooldown.


def test_a_run_with_a_cooldown_reports_the_cooled_rate(fashion_mnist_16_zip, tmp_path):
    """--lr-cooldown reaches the loop: the last step of a 128-image run (batch 16) with half of it cooling down
    runs at 0.01 * (128 - 112) / 64 (the rate logged per tick is the last step's)."""
    result = run_train(f"--outdir={tmp_path}", f"--data={fashion_mnist_16_zip}", "--arch=edm2", "--cbase=16",
                       "--cres=1,2", "--blocks=1", "--attn=", "--batch=16", "--lr=0.01", "--lr-decay=0",
                       "--lr-rampup=0", "--lr-cooldown=0.5", "--duration=0.000128", "--tick=0.064", "--snap=1000",
                       "--dump=1000", "--grid=0", "--ema-std=none", "--seed=0", "--nosubdir", "--workers=0")
    assert result.exit_code == 0, result.output
    import json
    with open(tmp_path / "stats.jsonl") as f:
        ticks = [json.loads(line) for line in f]
    lrs = {round(t["Progress/kimg"]["mean"] * 1000): t["Progress/lr"]["mean"] for t in ticks}
    assert lrs[80] == pytest.approx(0.01, rel=1e-6)  # The step from 64 images: where the cooldown starts.
    assert lrs[128] == pytest.approx(0.01 * 16 / 64, rel=1e-6)
    with open(tmp_path / "training_options.json") as f:
        assert json.load(f)["lr_cooldown"] == 0.5


def test_label_dropout_zeroes_whole_label_vectors_with_its_probability():
    torch.manual_seed(0)
    labels = torch.eye(10)[torch.randint(10, [20000])]
    dropped = drop_labels(labels, 0.3)
    zeroed = (dropped == 0).all(dim=1)
    assert abs(zeroed.float().mean().item() - 0.3) < 0.015
    assert torch.equal(dropped[~zeroed], labels[~zeroed])
    state = torch.get_rng_state()
    assert drop_labels(labels, 0) is labels and torch.equal(torch.get_rng_state(), state)  # No draw at p = 0.


def gamma_of(sigma_rel: float) -> float:
    """The largest root of sigma_rel^2 (g + 2)^2 (g + 3) = g + 1, by bisection (independent of training.ema.phema)."""
    lo, hi = -1 + (5 ** 0.5 - 1) / 2, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        if (mid + 1) / ((mid + 2) ** 2 * (mid + 3)) > sigma_rel ** 2:
            lo = mid
        else:
            hi = mid
    return lo


def test_power_function_emas_follow_the_formula_at_every_step(fashion_mnist_16_zip, tmp_path):
    """The loop's train_step with two sigma_rel: after the step that reaches n images, each EMA is
    beta * ema + (1 - beta) * net with beta = (1 - batch / n)^(gamma + 1), applied to the recorded weights."""
    from conftest import tiny_training_run
    from training.loop.step import train_step

    run = tiny_training_run(str(tmp_path), fashion_mnist_16_zip, "cpu")
    from training.ema.phema import PowerFunctionEMA
    run.state.phema = PowerFunctionEMA(run.state.net, [0.05, 0.1])
    expected = {std: None for std in (0.05, 0.1)}
    for _ in range(4):
        train_step(run)
        n, net = run.state.cur_nimg, [p.detach().clone() for p in run.state.net.parameters()]
        for std in expected:
            beta = (1 - 8 / n) ** (gamma_of(std) + 1)
            expected[std] = net if expected[std] is None else [beta * e + (1 - beta) * p
                                                               for e, p in zip(expected[std], net)]
            for want, got in zip(expected[std], run.state.phema.emas[std].parameters()):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert gamma_of(0.05) == pytest.approx(16.972198602303447, rel=1e-9)  # The official exponent.
    assert not torch.equal(next(run.state.phema.emas[0.05].parameters()), next(run.state.phema.emas[0.1].parameters()))


def test_edm2_run_writes_one_snapshot_per_sigma_rel_and_resumes_bit_exactly(fashion_mnist_16_zip, tmp_path):
    straight = edm2_config(fashion_mnist_16_zip, str(tmp_path / "straight"))
    training_loop(**straight)
    first = edm2_config(fashion_mnist_16_zip, str(tmp_path / "first"), total_kimg=0.064)
    training_loop(**first)
    torch.manual_seed(999)
    second = edm2_config(fashion_mnist_16_zip, str(tmp_path / "second"),
                         resume_state_dump=newest_state_file(first["run_dir"]))
    training_loop(**second)

    a = read_state_file(newest_state_file(straight["run_dir"]))
    b = read_state_file(newest_state_file(second["run_dir"]))
    assert a["cur_nimg"] == b["cur_nimg"] == 128
    # EDM2's U-Net trains channels_last on the CPU too (perf.default_fast_paths); snapshots stay contiguous.
    log = open(os.path.join(straight["run_dir"], "log.txt")).read()
    assert "Fast paths: sdpa+channels_last+fused_adam+retain_memory\n" in log
    for key in ("net", "ema"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key])
    assert a["phema"]["stds"] == [0.05, 0.1]
    for ema_a, ema_b in zip(a["phema"]["emas"], b["phema"]["emas"]):
        assert all(torch.equal(ema_a[name], ema_b[name]) for name in ema_a)

    files = os.listdir(straight["run_dir"])
    raw = sorted(f for f in files if re.fullmatch(r"network-snapshot-\d{7}(\.\d{3})?-\d\.\d{3}\.pkl", f))
    assert len(raw) == 2 * 3  # Ticks 0, 2 and the last, each with sigma_rel 0.050 and 0.100.
    from training.checkpoint import load_network_pkl
    from training.run_files import parse_power_snapshot_name
    last = [f for f in raw if parse_power_snapshot_name(f).nimg == 128]
    assert [parse_power_snapshot_name(f).sigma_rel for f in last] == [0.05, 0.1]
    for name, ema_state in zip(last, a["phema"]["emas"]):
        snapshot = load_network_pkl(os.path.join(straight["run_dir"], name))
        assert type(snapshot["ema"]).__name__ == "Precond" and type(snapshot["loss_fn"]).__name__ == "EDM2Loss"
        assert all(torch.equal(t, ema_state[n]) for n, t in snapshot["ema"].state_dict().items())


def test_resume_refuses_a_different_ema_std(fashion_mnist_16_zip, tmp_path):
    from training.loop.state import StateFileError
    first = edm2_config(fashion_mnist_16_zip, str(tmp_path / "first"), total_kimg=0.032)
    training_loop(**first)
    with pytest.raises(StateFileError, match="sigma_rel .*0.05, 0.1.*--ema-std"):
        training_loop(**edm2_config(fashion_mnist_16_zip, str(tmp_path / "second"), ema_stds=[0.2],
                                    resume_state_dump=newest_state_file(first["run_dir"])))


def run_train(*args):
    import train
    return CliRunner().invoke(train.main, list(args))


def test_preset_sets_the_official_hyperparameters(fashion_mnist_16_zip, tmp_path):
    result = run_train(f"--outdir={tmp_path}", f"--data={fashion_mnist_16_zip}", "--cond=1",
                       "--preset=edm2-img64-s", "--dry-run")
    assert result.exit_code == 0, result.output
    import json
    config = json.loads(result.output[result.output.index("{"):result.output.rindex("}") + 1])
    assert config["network_kwargs"]["class_name"] == "training.networks.edm2.Precond"
    assert config["network_kwargs"]["model_channels"] == 192 and config["network_kwargs"]["dropout"] == 0
    assert config["network_kwargs"]["channel_mult"] == [1, 2, 3, 4] and config["network_kwargs"]["num_blocks"] == 3
    assert config["loss_kwargs"] == dict(class_name="training.loss.EDM2Loss", P_mean=-0.8, P_std=1.6)
    assert config["optimizer_kwargs"]["lr"] == 0.01 and config["optimizer_kwargs"]["betas"] == [0.9, 0.99]
    assert config["lr_decay_batches"] == 35000 and config["lr_rampup_kimg"] == 10000
    assert config["ema_stds"] == [0.05, 0.1] and config["batch_size"] == 2048
    assert config["total_kimg"] == pytest.approx((1024 << 20) / 1000)
    assert "augment_kwargs" not in config

    # Explicit options win over the preset; img512 presets (latents) on images are refused in one line.
    result = run_train(f"--outdir={tmp_path}", f"--data={fashion_mnist_16_zip}", "--preset=edm2-img64-m",
                       "--cbase=32", "--cres=1,2", "--lr=0.02", "--ema-std=none", "--dry-run")
    config = json.loads(result.output[result.output.index("{"):result.output.rindex("}") + 1])
    assert config["network_kwargs"]["model_channels"] == 32 and config["network_kwargs"]["dropout"] == 0.1
    assert config["optimizer_kwargs"]["lr"] == 0.02 and "ema_stds" not in config
    result = run_train(f"--outdir={tmp_path}", f"--data={fashion_mnist_16_zip}", "--preset=edm2-img512-xs")
    assert result.exit_code != 0 and "trains on latents of Stability's VAE, but --data" in result.output
    result = run_train(f"--outdir={tmp_path}", f"--data={fashion_mnist_16_zip}", "--arch=edm2", "--augment=0.1")
    assert result.exit_code != 0 and "--augment=0.1: EDM2's network takes no augmentation labels" in result.output
    result = run_train(f"--outdir={tmp_path}", f"--data={fashion_mnist_16_zip}", "--ema-std=0.5", "--dry-run")
    assert result.exit_code != 0 and "--ema-std" in result.output
    assert not os.listdir(tmp_path)


def test_presets_train_conditional_and_in_fp16_on_cuda_as_train_edm2_py_unless_told(fashion_mnist_16_zip, tmp_path,
                                                                                      monkeypatch):
    """The official train_edm2.py defaults to --cond=1 and --fp16=1; EDM's train.py to neither. A preset takes the
    former (each overridable), a run without one the latter; where fp16 cannot run (not CUDA), a preset's run is
    float32 and says so in one line."""
    import json

    import dnnlib
    import train

    def dry_run(*args):
        result = run_train(f"--outdir={tmp_path}", f"--data={fashion_mnist_16_zip}", "--dry-run", "--device=cpu", *args)
        assert result.exit_code == 0, result.output
        notes = [line for line in result.output.splitlines() if line.startswith("Note: ")]
        return json.loads(result.output[result.output.index("{"):result.output.rindex("}") + 1]), notes

    config, notes = dry_run("--preset=edm2-img64-xs")
    assert config["dataset_kwargs"]["use_labels"] is True and config["network_kwargs"]["use_fp16"] is False
    assert notes == ["Note: --preset=edm2-img64-xs trains in fp16 as train_edm2.py does, which runs on CUDA only: this "
                     "run on cpu is float32 (--bf16=1 for mixed precision here, --fp16=0 to say float32)"]
    config, notes = dry_run("--preset=edm2-img64-xs", "--cond=0", "--fp16=0")
    assert config["dataset_kwargs"]["use_labels"] is False and config["network_kwargs"]["use_fp16"] is False and notes == []
    config, notes = dry_run("--preset=edm2-img64-xs", "--bf16=1")
    assert config["network_kwargs"]["use_fp16"] is False and config["network_kwargs"]["use_bf16"] is True and notes == []
    config, notes = dry_run("--arch=edm2")
    assert config["dataset_kwargs"]["use_labels"] is False and config["network_kwargs"]["use_fp16"] is False and notes == []
    assert not os.listdir(tmp_path)

    # On CUDA (decided from the device alone), the preset's fp16 is on unless --fp16=0 or --bf16=1 says otherwise.
    cuda = torch.device("cuda")
    for given, expected in ((dict(), True), (dict(fp16=False), False), (dict(bf16=True), False)):
        opts = train.resolve_defaults(dnnlib.EasyDict(preset="edm2-img64-xs", fp16=None, bf16=False) | given)
        assert train.resolve_fp16(opts, cuda) is None and opts.fp16 is expected
    opts = train.resolve_defaults(dnnlib.EasyDict(fp16=None, bf16=False))
    assert opts.fp16 is False and train.resolve_fp16(opts, cuda) is None and opts.fp16 is False


def test_ema_std_works_for_edm_networks_too(fashion_mnist_16_zip, tmp_path):
    result = run_train(f"--outdir={tmp_path}", f"--data={fashion_mnist_16_zip}", "--cbase=8", "--cres=1,2",
                       "--blocks=1", "--attn=", "--batch=16", "--duration=0.000032", "--tick=0.016", "--snap=1",
                       "--grid=0", "--ema-std=0.1", "--augment=0", "--seed=0", "--workers=0")
    assert result.exit_code == 0, result.output
    run_dir = os.path.join(tmp_path, os.listdir(tmp_path)[0])
    assert "network-snapshot-0000000.032-0.100.pkl" in os.listdir(run_dir)
