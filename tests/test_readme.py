"""The README's command lines work as written.

Every line of the README and of docs/pretrained.md that runs one of this repository's scripts parses with that
script's own options; the paths a user takes after the quickstart run end to end, at toy size: the README's block is
run by bash as it stands, each script's line with options appended that shrink the job (click takes an option's last
value, so every option the README gives is still parsed and used unless a shrinking one replaces it).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import subprocess
import sys

import click
import numpy as np
import pytest

from conftest import FASHION_MNIST_T10K, REPO_ROOT

SCRIPTS = ("train.py", "generate.py", "fid.py", "dataset_tool.py", "reconstruct_phema.py", "ema_sweep.py",
           "quickstart.py", "plot_run.py")
DOCUMENTS = ("README.md", "docs/pretrained.md")


def bash_blocks(document: str) -> list[str]:
    with open(os.path.join(REPO_ROOT, document)) as f:
        return re.findall(r"```bash\n(.*?)```", f.read(), re.S)


def section_block(heading: str) -> str:
    """The first bash block under the README's ``## heading``."""
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        section = f.read().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def command_lines(block: str) -> list[str]:
    """The block's commands, continuation lines joined, comments and blank lines dropped."""
    lines = block.replace("\\\n", " ").splitlines()
    return [line for line in lines if shlex.split(line, comments=True)]


def script_call(line: str) -> tuple[str, list[str]] | None:
    """(script, its arguments) where the line runs one of SCRIPTS (directly, with python3 or under torchrun)."""
    words = shlex.split(line, comments=True)
    for i, word in enumerate(words):
        if word in SCRIPTS:
            return word, words[i + 1:]
    return None


def parse(script: str, args: list[str]) -> None:
    """What the script's click parser does with ``args`` (a group: its subcommand too), without running it."""
    command = importlib.import_module(script[:-3]).main
    ctx = command.make_context(script, list(args))
    if isinstance(command, click.Group):
        unparsed = [*getattr(ctx, "_protected_args", []), *ctx.args]  # The subcommand's name and its arguments.
        name, subcommand, rest = command.resolve_command(ctx, unparsed)
        subcommand.make_context(name, rest, parent=ctx)


def documented_calls() -> list[tuple[str, str, list[str]]]:
    return [(document, *call) for document in DOCUMENTS for block in bash_blocks(document)
            for call in map(script_call, command_lines(block)) if call is not None]


def test_every_documented_command_line_parses_with_its_scripts_options():
    calls = documented_calls()
    assert len(calls) >= 60 and {script for _, script, _ in calls} >= {"train.py", "generate.py", "fid.py",
                                                                       "dataset_tool.py", "reconstruct_phema.py",
                                                                       "ema_sweep.py"}
    for document, script, args in calls:
        try:
            parse(script, args)
        except click.ClickException as e:
            pytest.fail(f"{document}: {script} {shlex.join(args)}: {e.format_message()}")


def test_the_parse_check_refuses_what_a_script_refuses():
    with pytest.raises(click.ClickException, match="No such option"):
        parse("generate.py", ["--network=n", "--outdir=o", "--stpes=32"])
    with pytest.raises(click.ClickException):
        parse("fid.py", ["calc", "--num=ten"])
    with pytest.raises(click.ClickException, match="unexpected extra argument"):
        parse("dataset_tool.py", ["encdoe", "--source=s", "--dest=d"])
    with pytest.raises(click.ClickException, match="No such option"):
        parse("dataset_tool.py", ["encode", "--source=s", "--dest=d", "--batchsize=2"])
    assert script_call("torchrun --standalone --nproc_per_node=8 -- fid.py calc --num=10") == \
        ("fid.py", ["calc", "--num=10"])


def shrunk(block: str, extra: dict[str, str]) -> str:
    """The block with ``extra[script]`` (or ``extra['script command']``) appended to each line that runs the script:
    the same commands at toy size."""
    out = []
    for line in command_lines(block):
        call = script_call(line)
        keys = [] if call is None else [f"{call[0]} {call[1][0]}" if call[1] else call[0], call[0]]
        key = next((key for key in keys if key in extra), None)
        out.append(line if key is None else f"{line} {extra[key]}")
    return "\n".join(out) + "\n"


def run_bash(script: str, cwd) -> subprocess.CompletedProcess:
    shim = cwd / "bin"
    if not shim.exists():
        shim.mkdir()
        (shim / "python3").symlink_to(sys.executable)
    env = dict(os.environ, PATH=f"{shim}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1",
               PYTHONPATH=REPO_ROOT)
    for script_name in SCRIPTS:  # The README runs the scripts from the repository's root.
        if not (cwd / script_name).exists():
            (cwd / script_name).symlink_to(os.path.join(REPO_ROOT, script_name))
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1200)


def write_image_folder(folder, count: int = 24) -> None:
    """Non-square RGB PNGs made from the embedded Fashion-MNIST digits (so center-crop and resizing both act)."""
    import gzip

    import PIL.Image
    with gzip.open(FASHION_MNIST_T10K, "rb") as f:
        pixels = np.frombuffer(f.read(), np.uint8, offset=16)[:count * 784].reshape(count, 28, 28)
    folder.mkdir()
    for i, image in enumerate(pixels):
        rgb = np.stack([image, 255 - image, image // 2], axis=-1)
        PIL.Image.fromarray(np.pad(rgb, ((0, 0), (4, 4), (0, 0)))).save(folder / f"img{i:03d}.png")


TOY_TRAINING = ("--cbase=8 --cres=1,1 --blocks=1 --attn= --batch=8 --batch-gpu=4 --tick=0.008 --snap=1 --dump=1 "
                "--lr-rampup=0 --workers=0 --device=cpu")


def test_train_on_your_own_images_runs_as_written(tmp_path, fid_detector):
    """Folder -> dataset_tool.py -> fid.py ref -> train.py (with --batch-gpu and --resume=auto) -> generate.py ->
    fid.py calc; then the same lines again with a longer --duration continue the same run."""
    write_image_folder(tmp_path / "my-images")
    block = section_block("Train on your own images")
    extra = {"dataset_tool.py": "--resolution=16x16", "train.py": f"{TOY_TRAINING} --duration=0.000016",
             "generate.py": "--steps=2 --seeds=0-3", "fid.py calc": "--steps=2 --seeds=0-3 --num=4"}
    result = run_bash(shrunk(block, extra), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = os.listdir(tmp_path / "training-runs")
    assert run == "00000-mine-64x64-uncond-ddpmpp-edm-gpus1-batch8-fp32"
    options = json.load(open(tmp_path / "training-runs" / run / "training_options.json"))
    assert options["batch_gpu"] == 4 and options["augment_kwargs"]["p"] == 0.15
    assert options["optimizer_kwargs"]["lr"] == 2e-4 and options["network_kwargs"]["dropout"] == 0.05
    assert sorted(os.listdir(tmp_path / "samples")) == [f"{seed:06d}.png" for seed in range(4)]
    assert (tmp_path / "samples-grid.png").exists() and (tmp_path / "fid-refs" / "mine-64x64.npz").exists()
    fid = float(result.stdout.strip().splitlines()[-1])
    assert fid > 0

    # Run again, longer: --resume=auto continues the same run directory from its last state.
    extra["train.py"] = f"{TOY_TRAINING} --duration=0.000032"
    result = run_bash(command_lines(shrunk(block, extra))[2] + "\n", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.listdir(tmp_path / "training-runs") == [run]
    assert "resuming" in result.stdout and "training-state-000000.016.pt" in result.stdout
    assert (tmp_path / "training-runs" / run / "training-state-000000.032.pt").exists()


def test_few_step_example_tunes_the_quickstarts_network_as_written(tmp_path, fashion_mnist_8_zip):
    """After the quickstart (its train.zip at 28x28 and its training/ snapshots, made here at toy length with the
    cpu preset's architecture), the README's few-step lines tune the newest snapshot and sample it in 2 calls."""
    from quickstart import PRESETS, render
    from training.data.convert import convert_dataset
    out = tmp_path / "quickstart-out"
    out.mkdir()
    convert_dataset(FASHION_MNIST_T10K, str(out / "train.zip"), max_images=64, resolution=(28, 28), workers=1,
                    progress=False)
    teacher = {**PRESETS["cpu"].train_options, "bf16": False, "batch": 8, "duration": 0.000016, "tick": 0.008,
               "snap": 1, "dump": 1000}
    subprocess.run([sys.executable, "train.py", f"--outdir={out / 'training'}", "--nosubdir",
                    f"--data={out / 'train.zip'}", "--workers=0", "--device=cpu", *render(teacher)], cwd=REPO_ROOT,
                   check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    block = section_block("Few-step generation (consistency tuning)")
    extra = {"train.py": "--batch=8 --duration=0.000016 --tick=0.008 --snap=1 --dump=1000 --workers=0 --device=cpu",
             "generate.py": "--seeds=0-3 --device=cpu"}
    result = run_bash(shrunk(block, extra), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = os.listdir(tmp_path / "ct-runs")
    options = json.load(open(tmp_path / "ct-runs" / run / "training_options.json"))
    assert options["loss_kwargs"]["class_name"].endswith("ConsistencyLoss")
    assert options["network_kwargs"]["model_channels"] == 32 and options["network_kwargs"]["channel_mult"] == [1, 1, 2]
    assert "with consistency (NFE 2" in result.stdout
    assert sorted(os.listdir(tmp_path / "few-step")) == [f"{seed:06d}.png" for seed in range(4)]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation but hyphens dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_every_relative_link_of_the_readme_and_docs_resolves():
    """Each link to a file of the repository names one that exists, and each #anchor a heading of its page."""
    pages = ["README.md"] + [os.path.join("docs", name) for name in sorted(os.listdir(os.path.join(REPO_ROOT, "docs")))
                             if name.endswith(".md")]
    anchors = {}
    for page in pages:
        with open(os.path.join(REPO_ROOT, page)) as f:
            text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
        anchors[page] = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    checked = 0
    for page in pages:
        with open(os.path.join(REPO_ROOT, page)) as f:
            text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            assert os.path.exists(os.path.join(REPO_ROOT, resolved)), f"{page}: {target}: no such file"
            if anchor and resolved.endswith(".md"):
                assert anchor in anchors[resolved], f"{page}: {target}: no such heading"
            checked += 1
    assert checked > 50
    assert github_anchor("Few-step generation (consistency tuning)") == "few-step-generation-consistency-tuning"
    assert github_anchor("Autoguidance, first measured (2026-11-27)") == "autoguidance-first-measured-2026-11-27"


def python_blocks() -> list[tuple[str, str]]:
    """(page, code) of every Python block of the README and docs/."""
    pages = ["README.md"] + [os.path.join("docs", name) for name in sorted(os.listdir(os.path.join(REPO_ROOT, "docs")))
                             if name.endswith(".md")]
    blocks = []
    for page in pages:
        with open(os.path.join(REPO_ROOT, page)) as f:
            blocks += [(page, code) for code in re.findall(r"```python\n(.*?)```", f.read(), re.S)]
    return blocks


def test_every_python_block_of_the_readme_and_docs_runs(tmp_path, monkeypatch, single_thread):
    """Each block runs as written, with these stand-ins: for the names a block uses without defining them (``net``,
    ``latents``, ``class_labels``/``labels``, ``denoise``, ``x``, ``edm_sampler``) a tiny unconditional network and its
    noise; for any URL or file a block opens a tiny class-conditional snapshot; 'cuda' is this machine's device."""
    import torch

    from conftest import make_tiny_net, serve_every_url_from
    from torch_utils.distributed import pick_device
    from training.sampling import SeedRNG, draw_latents, edm_sampler, registry

    opened = serve_every_url_from(monkeypatch, str(tmp_path / "stand-in.pkl"), resolution=4)
    for name, value in (("SEARCH_BATCH", 4), ("SEARCH_REFERENCE_LEVELS", 64), ("SEARCH_MAX_EVALS", 12)):
        monkeypatch.setattr(registry, name, value)  # A short 'optimized' search: seconds, not a minute.
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    assert {page for page, _ in blocks} >= {"README.md", "docs/samplers.md", "docs/formats.md"}
    device = str(pick_device())
    for page, code in blocks:
        net = make_tiny_net(label_dim=0, resolution=4)
        latents = draw_latents(net, SeedRNG([0, 1]))
        namespace = dict(net=net, latents=latents, class_labels=None, labels=None, edm_sampler=edm_sampler,
                         denoise=lambda x, sigma: net(x, sigma).to(torch.float64))
        namespace["x"] = latents.to(torch.float64) * 80
        with torch.no_grad():
            exec(compile(code.replace('"cuda"', repr(device)), page, "exec"), namespace)
    assert len(opened) >= 2  # The README's pretrained name and formats.md's snapshot file.
