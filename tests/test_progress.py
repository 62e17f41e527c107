"""What a run shows: log.txt, stats.jsonl, TensorBoard scalars (same numbers)."""

from __future__ import annotations

import json
import sys
import types

from training.loop.progress import RunLog, format_time


def test_format_time():
    assert [format_time(s) for s in (42, 185, 7385, 93784)] == ["42s", "3m 05s", "2h 03m 05s", "1d 02h 03m"]


def test_run_log_writes_log_stats_and_the_same_numbers_to_tensorboard(tmp_path, monkeypatch):
    scalars = []

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, name, value, global_step, walltime):
            scalars.append((name, value, global_step))

        def flush(self):
            pass

        def close(self):
            pass

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    log = RunLog(str(tmp_path))
    log.print("tick 0")
    stats = {"Loss/loss": dict(num=4, mean=0.25, std=0.1), "Progress/kimg": dict(num=1, mean=1.5, std=0.0)}
    log.write_stats(stats, kimg=1.5)
    log.close()
    assert (tmp_path / "log.txt").read_text() == "tick 0\n"
    line = json.loads((tmp_path / "stats.jsonl").read_text())
    assert line["Loss/loss"] == stats["Loss/loss"] and "timestamp" in line
    assert scalars == [("Loss/loss", 0.25, 1500), ("Progress/kimg", 1.5, 1500)]


def test_run_log_without_tensorboard_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # Import fails.
    RunLog(str(tmp_path)).close()
    assert "pip install tensorboard" in capsys.readouterr().out
