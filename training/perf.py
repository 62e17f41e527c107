"""Fast paths for training and sampling, each a switch that keeps results equal within a stated tolerance.

``FastPaths`` names the switches; ``REFERENCE`` is the official way (fp32, contiguous tensors, the explicit
einsum/softmax attention, no compilation, the for-loop Adam, no TF32), which every fast path is tested
against (tests/test_perf.py) and benchmarked beside (benchmarks/benchmark.py). ``default_fast_paths(device)``
picks the defaults: the switches that measured faster on that device type and keep float32 results equal up
to float rounding. Reduced precision (bf16, fp16 with loss scaling) and TF32 change results beyond float32
rounding, so they are opt-in (``--bf16``, ``--fp16``, ``--tf32``), as in the official code.

Tolerances, tested in tests/test_perf.py on tiny networks on the CPU (relative L2 error of the denoiser
output against ``REFERENCE``): sdpa, channels_last: 1e-5 (float32 rounding); compile: 1e-6 for outputs, 1e-5
for gradients (one graph, with the eager backend and with inductor's CPU kernels); fused Adam: weights within
1e-6 after 5 steps; EMA: bit-identical; retained host memory: allocation only, values untouched; bf16: 2e-2;
fp16: 5e-3. tests/test_cuda.py checks the same on a CUDA device, when there is one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import platform
from dataclasses import dataclass

import torch

from training.networks.edm2 import Precond as EDM2Precond
from training.networks.layers import ATTENTION_IMPLS, UNetBlock

FLAG_NAMES = ("sdpa", "channels_last", "fused_adam", "compile", "tf32", "retain_memory")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class FastPaths:
    """Speed-ups that leave the computed function unchanged (up to rounding), plus the opt-in precision."""

    sdpa: bool = True               # F.scaled_dot_product_attention instead of the explicit einsum/softmax.
    channels_last: bool = False     # NHWC memory format for convolution weights and activations.
    fused_adam: bool = True         # torch.optim.Adam(fused=True): one kernel over all parameters.
    compile: bool = False           # torch.compile of the network (inductor).
    tf32: bool = False              # TF32 matmuls and convolutions on Ampere+ GPUs (10-bit mantissa).
    retain_memory: bool = False     # Keep freed host memory in the process (glibc malloc); see retain_freed_memory.
    precision: str = "fp32"         # 'fp32' | 'bf16' (U-Net in bfloat16) | 'fp16' (CUDA, with loss scaling).

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision='{self.precision}': expected one of {', '.join(PRECISIONS)}")

    @property
    def attention(self) -> str:
        return "sdpa" if self.sdpa else "einsum"

    def with_options(self, **changes) -> "FastPaths":
        """A copy with some switches changed; None leaves a switch as it is."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def describe(self) -> str:
        on = [name for name in FLAG_NAMES if getattr(self, name)]
        return "+".join(on + ([self.precision] if self.precision != "fp32" else [])) or "reference"


REFERENCE = FastPaths(sdpa=False, channels_last=False, fused_adam=False, compile=False, tf32=False,
                      retain_memory=False)


def default_fast_paths(device: torch.device | str, network: torch.nn.Module | type | None = None) -> FastPaths:
    """The defaults for a device type and (on a CPU) the network family: the switches that measured faster there
    and keep float32 results (the measurements: docs/performance.md).

    CPU: sdpa and fused Adam (float32-equal, no slower) and retained host memory (bit-identical; it spares the page
    faults of re-allocated activations). channels_last for EDM2's U-Net only (``network`` an EDM2 ``Precond``,
    instance or class): it speeds up EDM2's convolutions but slows the group norms of DDPM++ and ADM. compile is
    off: it gains little on a CPU for minutes of compilation per process.
    CUDA: additionally channels_last. compile, which costs minutes per process, stays opt-in there too; TF32 and
    bf16/fp16 are opt-in because they change float32 results.
    """
    if torch.device(device).type == "cuda":
        return FastPaths(sdpa=True, channels_last=True, fused_adam=True, compile=False)
    return FastPaths(sdpa=True, channels_last=_is_edm2(network), fused_adam=True, compile=False, retain_memory=True)


def _is_edm2(network: torch.nn.Module | type | None) -> bool:
    return isinstance(network, EDM2Precond) or isinstance(network, type) and issubclass(network, EDM2Precond)


def check_precision(precision: str, device: torch.device | str) -> None:
    """fp16 runs the U-Net in float16 only on CUDA devices (as the official code; PyTorch's CPU float16
    convolutions are slow); asked for elsewhere, refuse instead of silently running float32."""
    device_type = torch.device(device).type
    if precision == "fp16" and device_type != "cuda":
        raise ValueError(f"fp16 runs only on CUDA devices, and this run is on {device_type}: use bf16 (or fp32) there")


def parse_variant(spec: str, device: torch.device | str, network: torch.nn.Module | type | None = None
                  ) -> FastPaths:
    """'reference', 'default', or either followed by '+flag' parts: e.g. 'default+bf16', 'reference+sdpa',
    'channels_last+compile' (a bare flag list starts from the reference). 'no_<flag>' switches one off. 'default'
    is ``default_fast_paths(device, network)``."""
    parts = [p for p in spec.split("+") if p]
    base = REFERENCE
    if parts and parts[0] in ("reference", "default"):
        base = REFERENCE if parts.pop(0) == "reference" else default_fast_paths(device, network)
    changes = {}
    for part in parts:
        name, value = (part[3:], False) if part.startswith("no_") else (part, True)
        if name in PRECISIONS:
            changes["precision"] = name if value else "fp32"
        elif name in FLAG_NAMES:
            changes[name] = value
        else:
            raise ValueError(f"variant '{spec}': unknown part '{part}'; expected reference, default, "
                             f"{', '.join(FLAG_NAMES)}, {', '.join(PRECISIONS)} (or no_<flag>)")
    return base.with_options(**changes)


# ----------------------------------------------------------------------------
# Applying the switches.

def set_attention_impl(net: torch.nn.Module, impl: str) -> torch.nn.Module:
    """Use ``impl`` ('sdpa' | 'einsum') in every attention block of ``net`` (in place; not saved in snapshots)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl='{impl}': expected one of {', '.join(ATTENTION_IMPLS)}")
    for module in net.modules():
        if isinstance(module, UNetBlock):
            module.attention_impl = impl
    return net


def set_precision(net: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Run the U-Net of a preconditioned network in ``precision`` (its ``use_fp16`` / ``use_bf16`` switches;
    weights stay float32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision='{precision}': expected one of {', '.join(PRECISIONS)}")
    if hasattr(net, "use_fp16"):
        net.use_fp16 = precision == "fp16"
        net.use_bf16 = precision == "bf16"
    return net


def set_tf32(enabled: bool) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions (process-wide, as PyTorch keeps it); the official code
    turns both off so that float32 means float32. Uses the ``fp32_precision`` API where PyTorch has it (mixing
    it with the legacy ``allow_tf32`` flags makes PyTorch refuse to read them)."""
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        matmul.fp32_precision = conv.fp32_precision = "tf32" if enabled else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def tf32_enabled() -> bool:
    """Whether TF32 is on for CUDA matmuls (as ``set_tf32`` left it; it sets convolutions alike)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision == "tf32"
    return bool(matmul.allow_tf32)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_RETAINED_TOP_BYTES = 2 ** 31 - 1  # The largest int: up to 2 GB free at the heap's top stay in the process.
_retaining_freed_memory = False  # Set once retain_freed_memory succeeded; glibc has no call to read it back.


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process for reuse: every block comes from the heap (no
    per-allocation mmap) and the heap is not trimmed (up to 2 GB free). For the whole process, for good.

    By default glibc serves large blocks (activations of a few MB) with fresh mmaps, or trims them off the heap
    when freed, so each new activation tensor page-faults and is zeroed by the kernel page by page, thousands of
    times per network call (counted in docs/performance.md). Values are unchanged; the process's resident memory
    stays at its peak instead of shrinking. Returns False where the C library has no ``mallopt`` (not glibc) and nothing changed.
    """
    if platform.libc_ver()[0] != "glibc":
        return False  # macOS has no mallopt; musl's accepts these and ignores them.
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    retained = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _RETAINED_TOP_BYTES))
    global _retaining_freed_memory
    _retaining_freed_memory = _retaining_freed_memory or retained
    return retained


def apply_process_settings(fast: FastPaths) -> None:
    """The switches that act on the whole process rather than on a network: TF32 (set either way, as the
    official code does) and retained host memory (only switched on; glibc cannot switch it back)."""
    set_tf32(fast.tf32)
    if fast.retain_memory:
        retain_freed_memory()


def process_settings() -> dict:
    """The process-wide switches in effect in this process (what ``apply_process_settings`` left):
    ``{'tf32': bool, 'retain_memory': bool}``."""
    return dict(tf32=tf32_enabled(), retain_memory=_retaining_freed_memory)


def prepare_network(net: torch.nn.Module, fast: FastPaths, precision: bool = True) -> torch.nn.Module:
    """Attention implementation, memory format and (with ``precision``) the U-Net's dtype, in place.
    Compilation is separate (``maybe_compile``): it wraps the module instead of changing it."""
    set_attention_impl(net, fast.attention)
    if precision:
        set_precision(net, fast.precision)
    return net.to(memory_format=torch.channels_last if fast.channels_last else torch.contiguous_format)


def maybe_compile(module: torch.nn.Module, fast: FastPaths, **compile_kwargs) -> torch.nn.Module:
    """``torch.compile(module, **compile_kwargs)`` when the switch is on. The result calls like the module and
    shares its parameters and attributes; snapshots are still taken from the module itself."""
    return torch.compile(module, **compile_kwargs) if fast.compile else module


def as_memory_format(x: torch.Tensor, fast: FastPaths) -> torch.Tensor:
    """Images [N, C, H, W] in the memory format of the fast paths (values unchanged)."""
    return x.contiguous(memory_format=torch.channels_last) if fast.channels_last and x.ndim == 4 else x


def adam_kwargs(fast: FastPaths) -> dict:
    """Extra torch.optim.Adam arguments: fused (one kernel over all tensors, CUDA and CPU) or the official
    for-loop implementation (``foreach=False``)."""
    return dict(fused=True) if fast.fused_adam else dict(foreach=False, fused=False)
