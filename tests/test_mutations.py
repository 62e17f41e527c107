"""The mutation check (tests/mutations.py) stays applicable, and its runner tells caught from surviving bugs."""

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import mutations  # noqa: E402


@pytest.mark.parametrize("mutation", mutations.MUTATIONS, ids=lambda m: m.name)
def test_every_mutation_still_applies_to_the_code(mutation):
    assert mutations.check_applies(mutation) is None, mutations.check_applies(mutation)


def test_the_list_covers_every_area_the_issue_names():
    files = {m.path for m in mutations.MUTATIONS}
    for area in ("training/loss.py", "training/loop/step.py", "training/loop/schedules.py", "training/data/augment.py",
                 "training/data/dataset.py", "training/sampling/paper.py", "training/sampling/solvers.py",
                 "metrics/frechet.py", "training/checkpoint.py", "training/sampling/generation.py"):
        assert area in files
    assert len(mutations.MUTATIONS) >= 27 and len({m.name for m in mutations.MUTATIONS}) == len(mutations.MUTATIONS)


def test_runner_reports_a_caught_bug_and_a_harmless_edit_as_survivor(tmp_path):
    """End to end on a scratch copy: the noise-std bug fails tests/test_loss.py; an edit to a docstring does not."""
    caught = next(m for m in mutations.MUTATIONS if m.name.startswith("loss: noise std"))
    harmless = mutations.Mutation("docstring edit", "training/loss.py", "Draw sigma ~ p_train", "Draw sigma",
                                  ("tests/test_loss.py::test_edm_sigma_is_lognormal",))
    assert mutations.check_applies(harmless) is None
    lines = []
    outcomes = mutations.run_mutations([caught, harmless], jobs=2, timeout=300, report=lines.append)
    assert [o.verdict for o in outcomes] == ["caught", "SURVIVED"], lines
    assert len(lines) == 2


def test_cli_lists_and_filters():
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "mutations.py"), "--list",
                          "-k", "augment:"], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out and all(line.startswith("augment:") for line in out)
