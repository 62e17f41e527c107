"""train.py: the official options, run directories, resume, torchrun with two processes, and one clear error
line for each kind of bad input."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys

import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import train
from training.data.augment import AugmentPipe
from training.networks import EDMPrecond
from training.loop.state import read_state_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--cond=1", "--cbase=8", "--cres=1,2", "--batch=16", "--seed=1", "--grid=0"]
OFFICIAL_STATS = ["Loss/loss", "Progress/tick", "Progress/kimg", "Timing/total_sec", "Timing/sec_per_tick",
                  "Timing/sec_per_kimg", "Timing/maintenance_sec", "Timing/total_hours", "Timing/total_days",
                  "Resources/cpu_mem_gb", "Resources/peak_gpu_mem_gb", "Resources/peak_gpu_mem_reserved_gb"]



def invoke(*args: str):
    return CliRunner().invoke(train.main, list(args))


def read_stats(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "stats.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_one_error_line(result, *fragments: str) -> None:
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# ----------------------------------------------------------------------------
# Bad input.

def test_missing_data_option(tmp_path):
    assert_one_error_line(invoke(f"--outdir={tmp_path}"), "Missing option '--data'")


def test_cres_that_does_not_fit_the_resolution(fashion_mnist_8_zip, tmp_path):
    result = invoke(f"--outdir={tmp_path}", f"--data={fashion_mnist_8_zip}", "--cres=1,2,2,2,2")
    assert_one_error_line(result, "--cres=1,2,2,2,2", "8x8")
    assert os.listdir(tmp_path) == []


def test_patch_that_does_not_fit_the_resolution_or_the_network(fashion_mnist_8_zip, tmp_path):
    result = invoke(f"--outdir={tmp_path}", f"--data={fashion_mnist_8_zip}", "--arch=edm2", "--patch=3")
    assert_one_error_line(result, "--patch=3", "8x8")
    result = invoke(f"--outdir={tmp_path}", f"--data={fashion_mnist_8_zip}", "--arch=edm2", "--patch=2",
                    "--cres=1,1,2,2")  # 8x8 allows four levels, but 4x4 patches only three.
    assert_one_error_line(result, "--cres=1,1,2,2", "8x8", "(4x4 in patches of 2)")
    result = invoke(f"--outdir={tmp_path}", f"--data={fashion_mnist_8_zip}", "--arch=ddpmpp", "--patch=2")
    assert_one_error_line(result, "--patch=2", "--arch=edm2")
    assert os.listdir(tmp_path) == []


def test_corrupt_zip(tmp_path):
    corrupt = tmp_path / "broken.zip"
    corrupt.write_bytes(b"PK\x03\x04 this is not really a zip file")
    assert_one_error_line(invoke(f"--outdir={tmp_path / 'runs'}", f"--data={corrupt}"), f"--data={corrupt}", "ZIP")


def test_missing_dataset(tmp_path):
    assert_one_error_line(invoke(f"--outdir={tmp_path}", f"--data={tmp_path / 'nothing.zip'}"), "nothing.zip")


def test_unwritable_outdir(fashion_mnist_8_zip, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = invoke(f"--outdir={blocker / 'runs'}", f"--data={fashion_mnist_8_zip}", *TINY)
    assert_one_error_line(result, "--outdir", "cannot write")


def test_unreadable_resume_file(fashion_mnist_8_zip, tmp_path):
    state = tmp_path / "training-state-000001.pt"
    state.write_bytes(b"garbage")
    result = invoke(f"--outdir={tmp_path}", f"--data={fashion_mnist_8_zip}", f"--resume={state}")
    assert_one_error_line(result, "training-state-000001.pt", "unreadable")


def test_missing_or_hostile_transfer_file_is_one_line_and_writes_nothing(fashion_mnist_8_zip, tmp_path):
    class Hostile:
        def __reduce__(self):
            return os.system, ("echo this must never run",)

    hostile = tmp_path / "hostile.pkl"
    hostile.write_bytes(pickle.dumps(dict(ema=Hostile())))
    outdir = tmp_path / "runs"
    missing = invoke(f"--outdir={outdir}", f"--data={fashion_mnist_8_zip}", *TINY, f"--transfer={tmp_path / 'no.pkl'}")
    assert_one_error_line(missing, "--transfer=", "no.pkl: no such file")
    refused = invoke(f"--outdir={outdir}", f"--data={fashion_mnist_8_zip}", *TINY, f"--transfer={hostile}")
    assert_one_error_line(refused, "--transfer=", "refusing to load", "system")
    assert not outdir.exists()  # No run directory, no run number used up.


def test_fp16_on_a_cpu_is_refused_not_silently_float32(fashion_mnist_8_zip, tmp_path):
    result = invoke(f"--outdir={tmp_path / 'runs'}", f"--data={fashion_mnist_8_zip}", *TINY, "--device=cpu",
                    "--fp16=1")
    assert_one_error_line(result, "--fp16=1: fp16 runs only on CUDA devices", "use bf16")
    assert not (tmp_path / "runs").exists()


def test_transfer_and_resume_together(fashion_mnist_8_zip, tmp_path):
    result = invoke(f"--outdir={tmp_path}", f"--data={fashion_mnist_8_zip}", "--transfer=a.pkl", "--resume=auto")
    assert_one_error_line(result, "--transfer and --resume")


# ----------------------------------------------------------------------------
# Options and run directories.

def test_dry_run_prints_the_official_config_and_run_dir(fashion_mnist_8_zip, tmp_path):
    (tmp_path / "00007-earlier-run").mkdir()
    result = invoke(f"--outdir={tmp_path}", f"--data={fashion_mnist_8_zip}", "--cond=1", "--arch=ncsnpp",
                    "--precond=vp", "--batch=64", "--augment=0.15", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "00008-fmnist8-cond-ncsnpp-vp-gpus1-batch64-fp32" in result.output
    config = json.loads(result.output[result.output.index("{"):result.output.rindex("}") + 1])
    assert config["network_kwargs"]["class_name"] == "training.networks.VPPrecond"
    assert config["network_kwargs"]["embedding_type"] == "fourier"
    assert config["network_kwargs"]["augment_dim"] == 9 and config["network_kwargs"]["dropout"] == 0.13
    assert config["loss_kwargs"]["class_name"] == "training.loss.VPLoss"
    assert config["augment_kwargs"]["p"] == 0.15 and config["augment_kwargs"]["xflip"] == 1e8
    assert config["optimizer_kwargs"] == dict(class_name="torch.optim.Adam", lr=1e-3, betas=[0.9, 0.999], eps=1e-8)
    assert config["total_kimg"] == 200000 and config["ema_halflife_kimg"] == 500
    assert config["lr_rampup_kimg"] == 10000 and config["ema_rampup_ratio"] == 0.05
    assert config["dataset_kwargs"]["resolution"] == 8 and config["dataset_kwargs"]["max_size"] == 256
    assert sorted(os.listdir(tmp_path)) == ["00007-earlier-run"]
    assert "num_blocks" not in config["network_kwargs"]  # The architecture's own default (4) applies.
    assert "max_minutes" not in config  # No time limit unless asked for.


def test_a_run_that_ends_inside_its_learning_rate_ramp_up_is_warned_about(fashion_mnist_8_zip, tmp_path):
    """10 kimg against the official 10,000-kimg ramp-up: the learning rate ends at 10/10000 of --lr."""
    common = [f"--outdir={tmp_path}", f"--data={fashion_mnist_8_zip}", "--duration=0.01", "--dry-run"]
    warned = invoke(*common)
    assert warned.exit_code == 0, warned.output
    assert ("Warning: the run ends at 10 kimg, during the 10000-kimg learning-rate ramp-up: the learning rate only "
            "reaches 0.001 x --lr") in warned.output
    quiet = invoke(*common, "--lr-rampup=1")
    assert quiet.exit_code == 0 and "Warning" not in quiet.output


def test_blocks_and_attention_resolutions(fashion_mnist_8_zip, tmp_path):
    result = invoke(f"--outdir={tmp_path}", f"--data={fashion_mnist_8_zip}", "--cbase=16", "--cres=1,2",
                    "--blocks=2", "--attn=4", "--max-minutes=8.5", "--dry-run")
    assert result.exit_code == 0, result.output
    config = json.loads(result.output[result.output.index("{"):result.output.rindex("}") + 1])
    assert config["network_kwargs"]["num_blocks"] == 2 and config["network_kwargs"]["attn_resolutions"] == [4]
    assert config["max_minutes"] == 8.5


def test_adam_beta2_option_sets_the_optimizer(fashion_mnist_8_zip, tmp_path):
    result = invoke(f"--outdir={tmp_path}", f"--data={fashion_mnist_8_zip}", "--adam-beta2=0.99", "--dry-run")
    assert result.exit_code == 0, result.output
    config = json.loads(result.output[result.output.index("{"):result.output.rindex("}") + 1])
    assert config["optimizer_kwargs"]["betas"] == [0.9, 0.99]
    refused = invoke(f"--outdir={tmp_path}", f"--data={fashion_mnist_8_zip}", "--adam-beta2=1", "--dry-run")
    assert refused.exit_code != 0 and "--adam-beta2" in refused.output


def test_resume_auto_continues_the_newest_run_in_place(fashion_mnist_8_zip, tmp_path, single_thread):
    common = [f"--outdir={tmp_path}", f"--data={fashion_mnist_8_zip}", *TINY, "--workers=0", "--tick=0.016"]
    first = invoke(*common, "--duration=0.000032", "--resume=auto")  # Nothing to resume yet: a new run.
    assert first.exit_code == 0, first.output
    (run_dir,) = os.listdir(tmp_path)
    assert run_dir == "00000-fmnist8-cond-ddpmpp-edm-gpus1-batch16-fp32"
    second = invoke(*common, "--duration=0.000064", "--resume=auto")
    assert second.exit_code == 0, second.output
    assert os.listdir(tmp_path) == [run_dir]
    kimg = [s["Progress/kimg"]["mean"] for s in read_stats(os.path.join(tmp_path, run_dir))]
    assert kimg == pytest.approx([0.016, 0.032, 0.048, 0.064])

    snapshots = sorted(f for f in os.listdir(os.path.join(tmp_path, run_dir)) if f.startswith("network-snapshot-"))
    # Ticks of 0.016 kimg: the first tick's snapshot and both runs' final ones, none overwriting another.
    assert snapshots == ["network-snapshot-000000.016.pkl", "network-snapshot-000000.032.pkl",
                         "network-snapshot-000000.064.pkl"]
    snapshot = os.path.join(tmp_path, run_dir, snapshots[-1])
    transfer = invoke(f"--outdir={tmp_path / 'transfer'}", f"--data={fashion_mnist_8_zip}", *TINY, "--workers=0",
                      "--duration=0.000016", f"--transfer={snapshot}")
    assert transfer.exit_code == 0, transfer.output
    count = len(read_state_file(os.path.join(tmp_path, run_dir, "training-state-000000.064.pt"))["net"])
    assert f"Transferred {count} of {count} tensors" in transfer.output


# ----------------------------------------------------------------------------
# torchrun, two processes.

def torchrun_train(*args: str) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(REPO, "train.py"), *args]
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


def test_torchrun_two_processes_train_snapshot_and_resume(fashion_mnist_8_zip, tmp_path):
    common = [f"--outdir={tmp_path}", f"--data={fashion_mnist_8_zip}", *TINY, "--tick=0.032", "--snap=2", "--dump=2",
              "--grid=4"]
    out = torchrun_train(*common, "--duration=0.000128")
    run_dir = os.path.join(tmp_path, "00000-fmnist8-cond-ddpmpp-edm-gpus2-batch16-fp32")
    assert "2 processes on cpu" in out and out.count("Training from") == 1  # Only rank 0 prints.

    stats = read_stats(run_dir)
    assert all(key in stats[-1] for key in OFFICIAL_STATS + ["timestamp"])
    assert all(math.isfinite(s["Loss/loss"]["mean"]) and s["Loss/loss"]["num"] > 0 for s in stats)
    assert stats[0]["Loss/loss"]["num"] == 16 * 8 * 8  # Per pixel, over both processes.
    kimg = [s["Progress/kimg"]["mean"] for s in stats]
    assert kimg == sorted(kimg) and kimg[-1] == pytest.approx(0.128)
    with open(os.path.join(run_dir, "network-snapshot-000000.128.pkl"), "rb") as f:
        snapshot = pickle.load(f)
    assert isinstance(snapshot["ema"], EDMPrecond) and isinstance(snapshot["augment_pipe"], AugmentPipe)
    assert snapshot["dataset_kwargs"]["path"] == fashion_mnist_8_zip and snapshot["ema"].label_dim == 10
    state_file = os.path.join(run_dir, "training-state-000000.128.pt")
    state = read_state_file(state_file)
    assert state["cur_nimg"] == 128 and state["world_size"] == 2 and len(state["rng_states"]) == 2
    assert os.path.isfile(os.path.join(run_dir, "log.txt"))
    grid = PIL.Image.open(os.path.join(run_dir, "samples-000000.016.png"))
    assert grid.size == (16, 16) and grid.mode == "L"  # 4 grayscale 8x8 samples, 2x2.
    assert os.path.isfile(os.path.join(run_dir, "samples-data.png"))

    torchrun_train(*common, "--duration=0.000192", f"--resume={state_file}")
    resumed = read_stats(os.path.join(tmp_path, "00001-fmnist8-cond-ddpmpp-edm-gpus2-batch16-fp32"))
    assert resumed[0]["Progress/kimg"]["mean"] == pytest.approx(0.128 + 0.032)  # The next tick of the schedule.
    assert resumed[-1]["Progress/kimg"]["mean"] == pytest.approx(0.192)
    assert resumed[0]["Progress/tick"]["mean"] > stats[-1]["Progress/tick"]["mean"]
