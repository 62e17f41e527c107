"""The names of the files a training run writes, and of post-hoc EMA reconstructions: one owner for each naming
scheme, and the one place that reads names back.

A point of training is named by its image count. Two schemes share the ``network-snapshot`` prefix:

- the traditional EMA's snapshot ``network-snapshot-KKKKKK.pkl``, the training state ``training-state-KKKKKK.pt``
  and the sample grid ``samples-KKKKKK.png``: six digits of whole kimg, the official EDM names, with ``.RRR`` (the
  images past whole kimg) where the count is not a whole kimg (``kimg_label``);
- a power-function EMA's snapshot ``network-snapshot-KKKKKKK-S.SSS.pkl`` (sigma_rel S.SSS) and a post-hoc
  reconstruction ``phema-KKKKKKK-S.SSS.pkl``: seven digits, the official EDM2 names (``power_snapshot_name``).

``labelled_nimg`` reads the first scheme only and ``parse_power_snapshot_name`` the second only, so neither
mistakes one kind of file for the other.
"""

from __future__ import annotations

import glob
import math
import os
import re
from typing import Iterable, NamedTuple, Sequence

SNAPSHOT_PREFIX, PHEMA_PREFIX = "network-snapshot", "phema"
STATE_PREFIX, SAMPLES_PREFIX = "training-state", "samples"
_LABELLED = tuple(re.compile(rf"{prefix}-(\d{{6,}})(?:\.(\d{{3}}))?\.{extension}")  # PREFIX-KKKKKK[.RRR].ext
                  for prefix, extension in ((SNAPSHOT_PREFIX, "pkl"), (STATE_PREFIX, "pt"), (SAMPLES_PREFIX, "png")))
_POWER_SNAPSHOT = re.compile(r"(?P<prefix>.+)-(?P<kimg>\d+)(?:\.(?P<rest>\d{3}))?-(?P<sigma_rel>\d+\.\d+)\.pkl")

# ----------------------------------------------------------------------------
# The traditional EMA's snapshots, training states and sample grids.


def kimg_label(nimg: int) -> str:
    """How snapshot, sample-grid and state files name a point of training: a whole kimg as six digits, the
    official 'KKKKKK'; otherwise the images past it as three decimals ('000000.224' is 0.224 kimg), so that
    fractional ticks never overwrite each other's files."""
    whole, rest = divmod(int(nimg), 1000)
    return f"{whole:06d}" if rest == 0 else f"{whole:06d}.{rest:03d}"


def snapshot_name(nimg: int) -> str:
    """``network-snapshot-KKKKKK.pkl``: the traditional EMA's snapshot."""
    return f"{SNAPSHOT_PREFIX}-{kimg_label(nimg)}.pkl"


def state_name(nimg: int) -> str:
    """``training-state-KKKKKK.pt``: the state a run resumes from."""
    return f"{STATE_PREFIX}-{kimg_label(nimg)}.pt"


def samples_name(nimg: int) -> str:
    """``samples-KKKKKK.png``: the sample grid saved with a snapshot."""
    return f"{SAMPLES_PREFIX}-{kimg_label(nimg)}.png"


def labelled_nimg(path: str) -> int | None:
    """The image count a snapshot, state or sample-grid name gives (``network-snapshot-000000.224.pkl`` -> 224);
    None for any other file, power-function EMA snapshots included."""
    for pattern in _LABELLED:
        match = pattern.fullmatch(os.path.basename(path))
        if match is not None:
            return int(match[1]) * 1000 + int(match[2] or 0)
    return None


def _labelled(run_dir: str, prefix: str, extension: str) -> list[str]:
    """The ``prefix-KKKKKK[.RRR].extension`` files of ``run_dir``, fewest images first (ties: the oldest written)."""
    candidates = [p for p in glob.glob(os.path.join(glob.escape(run_dir), f"{prefix}-*.{extension}"))
                  if labelled_nimg(p) is not None]
    return sorted(candidates, key=lambda p: (labelled_nimg(p), os.path.getmtime(p)))


def _newest(run_dir: str, prefix: str, extension: str) -> str | None:
    """The ``prefix-KKKKKK.extension`` file of ``run_dir`` with the most images (ties: the most recently written)."""
    files = _labelled(run_dir, prefix, extension)
    return files[-1] if files else None


def snapshots(run_dir: str) -> list[str]:
    """The traditional EMA's snapshots of ``run_dir`` (not the power-function EMAs'), fewest images first."""
    return _labelled(run_dir, SNAPSHOT_PREFIX, "pkl")


def newest_snapshot(run_dir: str) -> str | None:
    """The traditional EMA's snapshot with the most images in ``run_dir``, or None."""
    return _newest(run_dir, SNAPSHOT_PREFIX, "pkl")


def newest_sample_grid(run_dir: str) -> str | None:
    """The sample grid with the most images in ``run_dir``, or None."""
    return _newest(run_dir, SAMPLES_PREFIX, "png")


def newest_state_file(run_dir: str) -> str | None:
    """The training-state file with the most images in ``run_dir`` (ties: the most recently written), or None."""
    return _newest(run_dir, STATE_PREFIX, "pt")

# ----------------------------------------------------------------------------
# Power-function EMA snapshots and post-hoc reconstructions: PREFIX-KKKKKKK-S.SSS.pkl.


class SnapshotName(NamedTuple):
    prefix: str          # SNAPSHOT_PREFIX for the EMAs our training loop saves, PHEMA_PREFIX for reconstructions.
    nimg: int            # Images seen (see nimg_from_kimg).
    sigma_rel: float


def power_snapshot_name(nimg: int, sigma_rel: float, prefix: str = SNAPSHOT_PREFIX) -> str:
    """``network-snapshot-KKKKKKK-S.SSS.pkl`` (or another prefix), the official name, whenever ``nimg_from_kimg``
    reads the count back from it exactly (EDM2's power-of-two batches); otherwise ``KKKKKKK.RRR`` with RRR the
    images past whole kimg, so that small runs' names never collide and every count stays exact."""
    kimg, rest = divmod(int(nimg), 1000)
    label = f"{kimg:07d}" if nimg_from_kimg(kimg) == nimg else f"{kimg:07d}.{rest:03d}"
    return f"{prefix}-{label}-{sigma_rel:.3f}.pkl"


def phema_name(nimg: int, sigma_rel: float) -> str:
    """``phema-KKKKKKK-S.SSS.pkl``: a post-hoc reconstruction."""
    return power_snapshot_name(nimg, sigma_rel, PHEMA_PREFIX)


def nimg_from_kimg(kimg: int) -> int:
    """The image count behind a file name's KKKKKKK = images // 1000. EDM2 runs save at multiples of 1024 images
    (power-of-two batches), and exactly one multiple of 1024 can fall in [1000 KKKKKKK, 1000 KKKKKKK + 999]: where
    one does, it is the count (as the official reconstruction takes it too); otherwise 1000 KKKKKKK."""
    first, multiple = kimg * 1000, -(-kimg * 1000 // 1024) * 1024
    return multiple if multiple < first + 1000 else first


def format_kimg(nimg: int) -> str:
    """An image count in kimg as ``--outkimg`` takes it: '16' for 16,000 or 16,384 images, '16.032' for 16,032."""
    whole, rest = divmod(nimg, 1000)
    return str(whole) if rest == 0 or nimg == nimg_from_kimg(whole) else f"{whole}.{rest:03d}"


def snapshot_time_at(times: Sequence[int], kimg: float) -> int | None:
    """The snapshot time (images) among ``times`` that ``kimg`` names: an exact count (16.032 -> 16,032 images),
    or a file name's KKKKKKK (16 -> 16,384 in the official runs; our runs' 16,032 where it is the only snapshot
    between 16,000 and 16,999 images). None where none or several match."""
    if round(kimg * 1000) in times:
        return round(kimg * 1000)
    if kimg != int(kimg):
        return None
    if nimg_from_kimg(int(kimg)) in times:
        return nimg_from_kimg(int(kimg))
    within = [t for t in times if t // 1000 == int(kimg)]
    return within[0] if len(within) == 1 else None


def parse_power_snapshot_name(filename: str) -> SnapshotName | None:
    """Prefix, image count and sigma_rel of a ``PREFIX-KKKKKKK[.RRR]-S.SSS.pkl`` name (any folder); None for
    others."""
    match = _POWER_SNAPSHOT.fullmatch(os.path.basename(filename))
    if match is None:
        return None
    kimg = int(match["kimg"])
    nimg = nimg_from_kimg(kimg) if match["rest"] is None else kimg * 1000 + int(match["rest"])
    return SnapshotName(match["prefix"], nimg, float(match["sigma_rel"]))


def list_power_snapshots(indir: str, prefix: str | None = None, exclude_prefix: str | None = PHEMA_PREFIX,
                         sigma_rels: Iterable[float] | None = None) -> list[tuple[str, SnapshotName]]:
    """The snapshots ``PREFIX-KKKKKKK-S.SSS.pkl`` in ``indir``, sorted by time, then sigma_rel: those of
    ``prefix`` if given (ours are ``network-snapshot``; the official EDM2 release names its raw snapshots
    after the model), else of any prefix but ``exclude_prefix``; only those of ``sigma_rels`` if given."""
    found = []
    for entry in sorted(os.listdir(indir)):
        name = parse_power_snapshot_name(entry)
        if name is None or not os.path.isfile(os.path.join(indir, entry)):
            continue
        if (prefix is not None and name.prefix != prefix) or (prefix is None and name.prefix == exclude_prefix):
            continue
        if sigma_rels is not None and not any(math.isclose(name.sigma_rel, s, abs_tol=5e-4) for s in sigma_rels):
            continue
        found.append((os.path.join(indir, entry), name))
    return sorted(found, key=lambda item: (item[1].nimg, item[1].sigma_rel))
