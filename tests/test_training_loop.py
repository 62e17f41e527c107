"""The training loop on CPU with tiny networks and real (embedded Fashion-MNIST) data: exact resume, gradient
accumulation, multi-process and multi-node equivalence, SIGTERM, and the pieces (schedules, stats, sampler)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from torch_utils.misc import InfiniteSampler
from torch_utils.training_stats import StatsCollector
from training.loop.config import batch_split
from training.loop.schedules import ema_beta, learning_rate
from training.loop.step import sanitize_gradients
from training.loop.training_loop import training_loop
from training.loop.state import atomic_torch_save, read_state_file
from training.run_files import kimg_label, labelled_nimg, newest_state_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUGMENT = dict(class_name="training.augment.AugmentPipe", p=0.5, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
               translate_frac=1)


def tiny_config(data: str, run_dir: str, **overrides) -> dict:
    """A 16x16 conditional DDPM++-style EDM run, small enough to take a step in ~0.1 s."""
    config = dict(
        run_dir=run_dir,
        dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path=data, use_labels=True, cache=True),
        data_loader_kwargs=dict(num_workers=0),
        network_kwargs=dict(class_name="training.networks.EDMPrecond", model_type="SongUNet", model_channels=16,
                            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.1, augment_dim=9),
        loss_kwargs=dict(class_name="training.loss.EDMLoss"),
        optimizer_kwargs=dict(class_name="torch.optim.Adam", lr=2e-3, betas=[0.9, 0.999], eps=1e-8),
        augment_kwargs=AUGMENT, seed=3, batch_size=16, total_kimg=0.128, ema_halflife_kimg=0.05,
        lr_rampup_kimg=0.05, kimg_per_tick=0.032, snapshot_ticks=2, state_dump_ticks=2, grid_images=4, grid_steps=2,
        device="cpu", tensorboard=False)
    config.update(overrides)
    return config


def split_invariant_config(data: str, run_dir: str, **overrides) -> dict:
    """Randomness that does not depend on the batch split (per-image seeded noise, no dropout or
    augmentation) and plain SGD, so different splits must give the same weights up to float rounding."""
    config = tiny_config(data, run_dir, loss_kwargs=dict(class_name="distributed_worker.ContentSeededLoss"),
                         augment_kwargs=None, optimizer_kwargs=dict(class_name="torch.optim.SGD", lr=0.05),
                         lr_rampup_kimg=0, total_kimg=0.048, snapshot_ticks=None, state_dump_ticks=None,
                         grid_images=0)
    config["network_kwargs"] = dict(config["network_kwargs"], dropout=0, augment_dim=0)
    config.update(overrides)
    return config


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ----------------------------------------------------------------------------
# Pieces.

def test_learning_rate_ramps_linearly_then_stays():
    assert learning_rate(1e-3, 0, 10) == 0
    assert learning_rate(1e-3, 5000, 10) == pytest.approx(5e-4)
    assert learning_rate(1e-3, 20000, 10) == 1e-3
    assert learning_rate(1e-3, 0, 0) == 0 and learning_rate(1e-3, 16, 0) == 1e-3


def test_ema_beta_has_the_requested_half_life_in_images():
    beta = ema_beta(cur_nimg=10 ** 9, batch_size=512, ema_halflife_kimg=500, ema_rampup_ratio=0.05)
    assert beta ** (500_000 / 512) == pytest.approx(0.5)
    ramped = ema_beta(cur_nimg=100_000, batch_size=512, ema_halflife_kimg=500, ema_rampup_ratio=0.05)
    assert ramped ** (0.05 * 100_000 / 512) == pytest.approx(0.5)  # Half-life = 5% of the images seen.
    assert ema_beta(cur_nimg=0, batch_size=512, ema_halflife_kimg=500, ema_rampup_ratio=0.05) == 0
    assert ema_beta(cur_nimg=0, batch_size=512, ema_halflife_kimg=500, ema_rampup_ratio=None) == beta


def test_batch_split_and_its_errors():
    assert batch_split(512, None, 8) == (64, 1)
    assert batch_split(512, 16, 8) == (16, 4)
    assert batch_split(512, 1000, 1) == (512, 1)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        batch_split(512, None, 3)
    with pytest.raises(ValueError, match="--batch-gpu=24 does not divide"):
        batch_split(512, 24, 8)


def test_nonfinite_gradients_are_counted_and_replaced():
    p = torch.nn.Parameter(torch.zeros(5))
    p.grad = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 2.0])
    module = torch.nn.Module()
    module.p = p
    assert int(sanitize_gradients(module)) == 3
    assert p.grad.tolist() == [1.0, 0.0, 1e5, -1e5, 2.0]


def test_gradient_clean_up_matches_nan_to_num_per_tensor():
    """The clean-up writes every gradient (any shape, channels_last too, None skipped) as nan_to_num would."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(5, 2), torch.nn.Linear(2, 2, bias=False))
    net[0].to(memory_format=torch.channels_last)
    for i, p in enumerate(net.parameters()):
        bad = (float("nan"), float("inf"), -float("inf"))[i % 3]
        p.grad = None if i == 1 else torch.randn_like(p).masked_fill_(torch.rand_like(p) < 0.3, bad)
    expected = [None if p.grad is None else torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5).clone()
                for p in net.parameters()]
    count = sum(int((~p.grad.isfinite()).sum()) for p in net.parameters() if p.grad is not None)
    assert count > 0 and int(sanitize_gradients(net)) == count
    for p, want in zip(net.parameters(), expected):
        assert (p.grad is None and want is None) or torch.equal(p.grad, want)
    assert net[0].weight.grad.is_contiguous(memory_format=torch.channels_last)


def test_stats_collector_reports_num_mean_std():
    stats = StatsCollector()
    values = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    stats.report("Loss/loss", values)
    stats.report("Loss/loss", 8.0)
    stats.report0("Progress/kimg", 1.5)
    result = stats.collect()
    expected = np.array([1, 2, 3, 6, 8], dtype=np.float64)
    assert result["Loss/loss"] == pytest.approx(dict(num=5, mean=expected.mean(), std=expected.std()))
    assert result["Progress/kimg"] == dict(num=1, mean=1.5, std=0.0)
    assert stats.collect() == {}  # A new tick starts empty.


def test_infinite_sampler_shards_one_stream_and_resumes():
    dataset = list(range(10))

    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    single = take(InfiniteSampler(dataset, seed=7), 40)
    assert sorted(single[:10]) == list(range(10)) and sorted(single[10:20]) == list(range(10))
    assert single[:10] != single[10:20]  # Each epoch is reshuffled.
    shards = [take(InfiniteSampler(dataset, rank=r, num_replicas=4, seed=7), 10) for r in range(4)]
    assert [shards[g % 4][g // 4] for g in range(40)] == single  # Ranks interleave into the global stream.
    assert take(InfiniteSampler(dataset, seed=7, start=24), 16) == single[24:40]
    resumed = [take(InfiniteSampler(dataset, rank=r, num_replicas=2, seed=7, start=24), 8) for r in range(2)]
    assert [resumed[g % 2][g // 2] for g in range(16)] == single[24:40]
    assert take(InfiniteSampler(dataset, seed=8), 10) != single[:10]


def test_state_writes_are_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "training-state-000001.pt")
    atomic_torch_save(dict(format="edm-training-state", version=1, x=torch.ones(3)), path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save(dict(x=torch.zeros(3)), path)
    monkeypatch.undo()
    assert torch.equal(read_state_file(path)["x"], torch.ones(3))
    assert os.listdir(tmp_path) == ["training-state-000001.pt"]


def test_file_labels_are_whole_kimg_as_officially_else_unique_per_image_count():
    assert [kimg_label(n) for n in (0, 71_000, 224, 1_000_224)] == ["000000", "000071", "000000.224", "001000.224"]
    assert len({kimg_label(n) for n in range(0, 5000, 8)}) == 625  # Ticks of 8 images never share a name.
    assert labelled_nimg("network-snapshot-000000.224.pkl") == 224
    assert labelled_nimg("/runs/x/training-state-000071.pt") == 71_000
    assert labelled_nimg("samples-001000.224.png") == 1_000_224 and labelled_nimg("samples-data.png") is None


# ----------------------------------------------------------------------------
# Whole runs, in this process.

def test_resumed_run_reaches_the_same_weights_bit_exactly(fashion_mnist_16_zip, tmp_path, single_thread):
    """8 steps straight == 4 steps, a state, a new process-like start from it, 4 more steps (with
    dropout, augmentation, a data-loader worker and the learning-rate and EMA ramps all active)."""
    loader = dict(num_workers=1)
    straight = tiny_config(fashion_mnist_16_zip, str(tmp_path / "straight"), data_loader_kwargs=loader)
    training_loop(**straight)
    first = tiny_config(fashion_mnist_16_zip, str(tmp_path / "first"), total_kimg=0.064, data_loader_kwargs=loader)
    training_loop(**first)
    state_file = newest_state_file(first["run_dir"])
    torch.manual_seed(12345)  # Whatever the generators hold now must not matter.
    second = tiny_config(fashion_mnist_16_zip, str(tmp_path / "second"), resume_state_dump=state_file,
                         data_loader_kwargs=loader)
    training_loop(**second)

    a = read_state_file(newest_state_file(straight["run_dir"]))
    b = read_state_file(newest_state_file(second["run_dir"]))
    assert a["cur_nimg"] == b["cur_nimg"] == 128
    assert_same_tensors(a["net"], b["net"])
    assert_same_tensors(a["ema"], b["ema"])
    assert_same_tensors(a["optimizer_state"]["state"][0], b["optimizer_state"]["state"][0])
    assert not torch.equal(a["net"]["model.enc.16x16_conv.weight"],
                           read_state_file(state_file)["net"]["model.enc.16x16_conv.weight"])

    # Ticks of 0.032 kimg: every snapshot, grid and state keeps its own file (named to the image).
    kimgs = ["000000.016", "000000.080", "000000.128"]
    files = set(os.listdir(straight["run_dir"]))
    assert {f"network-snapshot-{k}.pkl" for k in kimgs} | {f"samples-{k}.png" for k in kimgs} <= files
    assert sorted(f for f in files if f.startswith("training-state-")) == [
        "training-state-000000.080.pt", "training-state-000000.128.pt"]
    assert "samples-data.png" in files
    assert "samples-data.png" not in os.listdir(second["run_dir"])  # Only a fresh run shows the data.
    stats = [json.loads(line) for line in open(os.path.join(second["run_dir"], "stats.jsonl"))]
    # The resumed run continues the tick schedule (no early one-step tick, which only tick 0 has) and so ends at
    # the same tick number as the run that was never interrupted.
    assert stats[0]["Progress/kimg"]["mean"] == pytest.approx(0.064 + 0.032)
    straight_stats = [json.loads(line) for line in open(os.path.join(straight["run_dir"], "stats.jsonl"))]
    assert stats[-1]["Progress/tick"]["mean"] == straight_stats[-1]["Progress/tick"]["mean"] == 4
    assert all(math.isfinite(s["Loss/loss"]["mean"]) and s["Loss/loss"]["num"] > 0 for s in stats)


@pytest.fixture(scope="module")
def one_process_reference(fashion_mnist_16_zip, tmp_path_factory):
    """(initial weights, weights after 3 SGD steps) of the split-invariant config in one process, one
    forward pass per batch. The first step has learning rate 0 (ramp-up from 0 images), so a 1-step run
    gives the initial weights."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    initial = training_loop(**split_invariant_config(fashion_mnist_16_zip, str(tmp_path_factory.mktemp("init")),
                                                     total_kimg=0.001)).net.state_dict()
    reference_dir = str(tmp_path_factory.mktemp("reference"))
    final = training_loop(**split_invariant_config(fashion_mnist_16_zip, reference_dir)).net.state_dict()
    torch.set_num_threads(threads)
    return initial, final, reference_dir


def read_stats(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "stats.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_updates(weights: dict, reference: tuple[dict, dict, str]) -> None:
    """Each tensor's change from the initial weights agrees with the reference's to float rounding."""
    initial, final, _ = reference
    moved = 0
    for name in final:
        expected, got = final[name] - initial[name], weights[name] - initial[name]
        assert (got - expected).abs().max() <= 1e-3 * expected.abs().max() + 1e-6, name
        moved += bool(expected.abs().max() > 0)
    assert moved > len(final) // 2  # The steps did change the weights.


def test_gradient_accumulation_matches_one_full_batch(one_process_reference, fashion_mnist_16_zip, tmp_path,
                                                      single_thread):
    config = split_invariant_config(fashion_mnist_16_zip, str(tmp_path), batch_gpu=4)
    assert_same_updates(training_loop(**config).net.state_dict(), one_process_reference)


def test_sigterm_saves_a_state_and_stops_cleanly(fashion_mnist_16_zip, tmp_path, single_thread, capsys):
    config = tiny_config(fashion_mnist_16_zip, str(tmp_path), total_kimg=10, state_dump_ticks=None,
                         loss_kwargs=dict(class_name="distributed_worker.SigtermAtCall", at=3))

    def previous_handler(signum, frame):
        raise AssertionError("the loop's own handler must take SIGTERM while it runs")

    original = signal.signal(signal.SIGTERM, previous_handler)
    try:
        state = training_loop(**config)
        assert signal.getsignal(signal.SIGTERM) is previous_handler  # Exactly the handler from before the loop.
    finally:
        signal.signal(signal.SIGTERM, original)
    assert state.cur_nimg == 3 * 16
    assert read_state_file(newest_state_file(str(tmp_path)))["cur_nimg"] == 48
    assert "Stop requested (SIGTERM)" in capsys.readouterr().out


def test_time_limit_ends_the_run_with_a_final_snapshot(fashion_mnist_16_zip, tmp_path, single_thread, capsys):
    config = tiny_config(fashion_mnist_16_zip, str(tmp_path), total_kimg=10, max_minutes=1e-6)
    state = training_loop(**config)
    assert state.cur_nimg == 16  # The deadline had passed by the first step: one step, then the end.
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("network-snapshot-")) == [
        "network-snapshot-000000.016.pkl"]  # The final snapshot, at 0.016 kimg.
    out = capsys.readouterr().out
    assert "Time limit of 1e-06 min reached at 0.016 kimg" in out and "Done: 0.016 kimg" in out


# ----------------------------------------------------------------------------
# Several processes (torchrun).

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def subprocess_env() -> dict:
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.path.join(REPO, "tests"), OMP_NUM_THREADS="1")


def test_two_nodes_match_one_process(one_process_reference, fashion_mnist_16_zip, tmp_path):
    """Two `torchrun --nnodes=2` launchers on loopback (c10d rendezvous), one process each, 2 accumulation
    rounds per process: the same weights as one process with the same global batch."""
    config = split_invariant_config(fashion_mnist_16_zip, str(tmp_path), batch_gpu=4)
    port = free_port()
    command = torchrun("--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                       f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=edm-test-{port}", "--max_restarts=0",
                       os.path.join(REPO, "tests", "distributed_worker.py"), json.dumps(config))
    nodes = [subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=180)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(outputs)[-6000:]
    assert "2 processes on cpu" in "".join(outputs)
    assert_same_updates(torch.load(os.path.join(str(tmp_path), "final-net.pt"), weights_only=True),
                        one_process_reference)
    # The per-tick loss statistics gathered from both processes are those of the one process: count, mean, std.
    ours, reference = read_stats(str(tmp_path)), read_stats(one_process_reference[2])
    assert len(ours) == len(reference) >= 2
    for tick, expected in zip(ours, reference):
        assert tick["Loss/loss"]["num"] == expected["Loss/loss"]["num"] > 0
        for key in ("mean", "std"):
            assert tick["Loss/loss"][key] == pytest.approx(expected["Loss/loss"][key], rel=1e-4)


def test_time_limit_stops_every_process_at_the_same_step(fashion_mnist_16_zip, tmp_path):
    """Two processes past a tiny deadline agree on it (asynchronously, one step later) and end together, with a
    final snapshot, instead of one rank leaving the others waiting in a collective call."""
    config = tiny_config(fashion_mnist_16_zip, str(tmp_path), total_kimg=10, max_minutes=1e-6, snapshot_ticks=1000,
                         state_dump_ticks=None, grid_images=0)
    port = free_port()
    command = torchrun("--nnodes=1", "--nproc_per_node=2", "--rdzv_backend=c10d",
                       f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=edm-test-{port}", "--max_restarts=0",
                       os.path.join(REPO, "tests", "distributed_worker.py"), json.dumps(config))
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "Time limit of 1e-06 min reached at 0.032 kimg" in result.stdout  # Step 1 late, agreed at step 2.
    snapshots = sorted(f for f in os.listdir(tmp_path) if f.startswith("network-snapshot-"))
    assert snapshots == ["network-snapshot-000000.016.pkl", "network-snapshot-000000.032.pkl"]  # First tick, end.
    assert os.path.exists(tmp_path / "final-net.pt")


def test_each_step_ramps_the_learning_rate_and_moves_the_ema_by_the_formulas(fashion_mnist_16_zip, tmp_path,
                                                                           single_thread):
    """The loop's own train_step, 4 steps of 8 images: the learning rate is lr * min(n / ramp-up images, 1) for the
    n images seen before the step, and the EMA is beta * ema + (1 - beta) * net with beta = 0.5^(batch / half-life)
    (half-life 16 images here, no EMA ramp-up), applied to the weights recorded after each step."""
    from conftest import tiny_training_run
    from training.loop.step import train_step

    run = tiny_training_run(str(tmp_path), fashion_mnist_16_zip, "cpu")
    run.config.ema_halflife_kimg, run.config.ema_rampup_ratio = 0.016, None  # beta = 0.5^(8/16), far from 0 and 1.
    state, base_lr, batch = run.state, 1e-3, 8
    ema = [p.detach().clone() for p in state.ema.parameters()]
    for _ in range(4):
        seen = state.cur_nimg
        train_step(run)
        assert state.cur_nimg == seen + batch
        assert state.optimizer.param_groups[0]["lr"] == pytest.approx(base_lr * min(seen / 10, 1))  # Ramp: 10 images.
        beta = 0.5 ** (batch / 16)
        ema = [beta * e + (1 - beta) * p.detach() for e, p in zip(ema, state.net.parameters())]
        for expected, actual in zip(ema, state.ema.parameters()):
            torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
    assert not all(torch.equal(e, p) for e, p in zip(state.ema.parameters(), state.net.parameters()))


def test_transfer_copies_the_snapshot_values_and_names_what_it_kept(tmp_path):
    """--transfer: every tensor of matching name and shape gets the snapshot's EMA values exactly (network and
    EMA); the others keep their initialisation and are listed with the reason."""
    from torch_utils.misc import randomize_parameters
    from training.checkpoint import save_network_pkl
    from training.networks import EDMPrecond
    from training.loop.setup import transfer_weights

    def build(label_dim: int, augment_dim: int, seed: int) -> EDMPrecond:
        torch.manual_seed(seed)
        net = EDMPrecond(img_resolution=16, img_channels=3, label_dim=label_dim, augment_dim=augment_dim,
                         model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1,
                         attn_resolutions=[])
        return randomize_parameters(net, seed)

    source = build(label_dim=5, augment_dim=0, seed=1)
    path = str(tmp_path / "network-snapshot-000001.pkl")
    save_network_pkl(path, dict(ema=source, loss_fn=None, augment_pipe=None, dataset_kwargs={}))
    net, ema = build(label_dim=10, augment_dim=9, seed=2), build(label_dim=10, augment_dim=9, seed=3)
    before = {name: t.clone() for name, t in net.state_dict().items()}

    class Log:
        def __init__(self):
            self.lines = []

        def print(self, line):
            self.lines.append(line)

    log = Log()
    transfer_weights(path, net, ema, log)
    kept = {"model.map_label.weight", "model.map_augment.weight"}
    theirs = source.state_dict()
    for module in (net, ema):
        for name, tensor in module.state_dict().items():
            if name not in kept:
                assert torch.equal(tensor, theirs[name]), name
    for name in kept:
        assert torch.equal(net.state_dict()[name], before[name])
    total = len(net.state_dict())
    assert f"Transferred {total - 2} of {total} tensors" in log.lines
    (note,) = [line for line in log.lines if line.startswith("Kept the new initialisation")]
    assert "model.map_label.weight (shape [16, 5] there, [16, 10] here)" in note
    assert note.startswith("Kept the new initialisation of 2:")
    assert "model.map_augment.weight (not in the snapshot)" in note
