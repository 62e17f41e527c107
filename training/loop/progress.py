"""What a training run shows people: the log (console and ``log.txt``), ``stats.jsonl`` and TensorBoard scalars
(when ``tensorboard`` is installed); its image grids are written by ``training.images``. Only the main process writes;
elsewhere these are no-ops."""

from __future__ import annotations

import json
import math
import os
import time

from torch_utils import distributed as dist


# Units of a shown duration, largest first: (suffix, length in seconds).
TIME_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def format_time(seconds: float) -> str:
    """'42s', '3m 05s', '2h 03m 05s', '1d 02h 03m': whole seconds shown in at most three units, starting at the
    largest unit that is at least 1 (seconds below a minute, negatives included); later units are two digits."""
    total = int(round(seconds))
    first = next((i for i, (_, length) in enumerate(TIME_UNITS) if total >= length), len(TIME_UNITS) - 1)
    shown = TIME_UNITS[first:first + 3]
    (lead_suffix, lead_length), rest = shown[0], shown[1:]
    parts = [f"{total // lead_length}{lead_suffix}"]
    for (_, outer), (suffix, length) in zip(shown, rest):
        parts.append(f"{total // length % (outer // length):02d}{suffix}")
    return " ".join(parts)


class RunLog:
    """Log lines to the console and ``log.txt``; per-tick statistics to ``stats.jsonl`` and TensorBoard."""

    def __init__(self, run_dir: str, tensorboard: bool = True):
        self.active = dist.is_main()
        self.run_dir = run_dir
        self.tensorboard = None
        if not self.active:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._log = open(os.path.join(run_dir, "log.txt"), "a")
        self._stats = open(os.path.join(run_dir, "stats.jsonl"), "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(run_dir)
            except ImportError:
                self.print("TensorBoard logging is off: the 'tensorboard' package is not installed "
                           "(pip install tensorboard); the same numbers are in stats.jsonl.")

    def print(self, line: str = "") -> None:
        if self.active:
            print(line, flush=True)
            self._log.write(line + "\n")
            self._log.flush()

    def write_stats(self, stats: dict, kimg: float) -> None:
        """One JSON line ``{name: {num, mean, std}, ..., "timestamp"}``; the means go to TensorBoard at kimg."""
        if not self.active:
            return
        timestamp = time.time()
        self._stats.write(json.dumps(dict(stats, timestamp=timestamp)) + "\n")
        self._stats.flush()
        if self.tensorboard is not None:
            global_step = int(round(kimg * 1000))
            for name, value in stats.items():
                if not math.isnan(value["mean"]):
                    self.tensorboard.add_scalar(name, value["mean"], global_step=global_step, walltime=timestamp)
            self.tensorboard.flush()

    def write_metrics(self, records: list[dict]) -> None:
        """Append one JSON line per record (kimg, metric, value, network, ...) to ``metrics.jsonl``; the values go
        to TensorBoard as ``Metrics/fid-ema``, ``Metrics/kid-ema-0.050``, ... at kimg."""
        if not self.active or not records:
            return
        timestamp = time.time()
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
            for record in records:
                f.write(json.dumps(dict(record, timestamp=timestamp)) + "\n")
        if self.tensorboard is not None:
            for record in records:
                self.tensorboard.add_scalar(f"Metrics/{record['metric']}-{record['network']}", record["value"],
                                            global_step=int(round(record["kimg"] * 1000)), walltime=timestamp)
            self.tensorboard.flush()

    def close(self) -> None:
        if self.active:
            self._log.close()
            self._stats.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
