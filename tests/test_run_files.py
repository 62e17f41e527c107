"""The names of a run's files (training/run_files.py): the two schemes that share the 'network-snapshot' prefix are
each read back only by their own reader, so no caller has to tell them apart."""

from __future__ import annotations

import os
import time

import pytest

from training.run_files import (SnapshotName, kimg_label, labelled_nimg, newest_sample_grid, newest_snapshot,
                                newest_state_file, parse_power_snapshot_name, phema_name, power_snapshot_name,
                                samples_name, snapshot_name, snapshots, state_name)


def test_each_kind_of_file_is_named_by_its_image_count():
    assert snapshot_name(16000) == "network-snapshot-000016.pkl" and kimg_label(224) == "000000.224"
    assert state_name(16032) == "training-state-000016.032.pt" and samples_name(5000) == "samples-000005.png"
    assert power_snapshot_name(16384, 0.05) == "network-snapshot-0000016-0.050.pkl"  # EDM2's power-of-two counts.
    assert power_snapshot_name(16032, 0.1) == "network-snapshot-0000016.032-0.100.pkl"
    assert phema_name(16384, 0.125) == "phema-0000016-0.125.pkl"


@pytest.mark.parametrize("nimg", [0, 224, 16000, 16032, 1_234_567])
def test_names_read_back_as_the_count_they_were_made_from(nimg):
    for name in (snapshot_name(nimg), state_name(nimg), samples_name(nimg)):
        assert labelled_nimg(os.path.join("run", name)) == nimg
        assert parse_power_snapshot_name(name) is None
    for name in (power_snapshot_name(nimg, 0.05), phema_name(nimg, 0.05)):
        assert labelled_nimg(name) is None
        parsed = parse_power_snapshot_name(name)
        assert (parsed.nimg, parsed.sigma_rel) == (nimg, 0.05)


def test_other_files_are_no_ones():
    for name in ("samples-data.png", "log.txt", "network-snapshot-16.pkl", "training-state-000016.pkl",
                 "network-snapshot-000016.pkl.tmp"):
        assert labelled_nimg(name) is None, name
    assert parse_power_snapshot_name("phema-0000016-0.125.pkl") == SnapshotName("phema", 16384, 0.125)


def test_newest_snapshot_is_the_traditional_emas_even_beside_later_power_function_ones(tmp_path):
    assert newest_snapshot(str(tmp_path)) is None and newest_state_file(str(tmp_path)) is None
    for name in (snapshot_name(16000), snapshot_name(32000), power_snapshot_name(48000, 0.05),
                 power_snapshot_name(32000, 0.1), state_name(16000), state_name(8000)):
        (tmp_path / name).write_bytes(b"")
    assert os.path.basename(newest_snapshot(str(tmp_path))) == "network-snapshot-000032.pkl"
    assert os.path.basename(newest_state_file(str(tmp_path))) == "training-state-000016.pt"
    assert [os.path.basename(p) for p in snapshots(str(tmp_path))] == ["network-snapshot-000016.pkl",
                                                                       "network-snapshot-000032.pkl"]


def test_the_newest_sample_grid_is_the_one_of_most_images_not_the_last_by_name(tmp_path):
    assert newest_sample_grid(str(tmp_path)) is None
    for nimg in (9000, 10000, 9500):
        (tmp_path / samples_name(nimg)).write_bytes(b"")
    (tmp_path / "samples-data.png").write_bytes(b"")  # A file of another kind, last by name.
    assert os.path.basename(newest_sample_grid(str(tmp_path))) == "samples-000010.png"


def test_a_tie_goes_to_the_file_written_last(tmp_path):
    older, newer = tmp_path / "training-state-000016.pt", tmp_path / "training-state-000016.000.pt"
    older.write_bytes(b""), newer.write_bytes(b"")
    now = time.time()
    os.utime(older, (now - 60, now - 60))
    assert newest_state_file(str(tmp_path)) == str(newer)
