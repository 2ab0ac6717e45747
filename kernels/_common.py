"""Pieces every kernel family shares: activations, dtype tables, output allocation, launch helpers."""

from __future__ import annotations

import contextlib
import math
import struct

import torch
import triton
import triton.language as tl

from mmfuse._dispatch import INTERPRET

# ----------------------------------------------------------------------------------------------
# Activations. Codes are constexpr ints so one kernel serves every activation.
# ----------------------------------------------------------------------------------------------
ACT_NONE, ACT_GELU, ACT_GELU_TANH, ACT_QUICK_GELU, ACT_SILU, ACT_RELU, ACT_RELU2 = 0, 1, 2, 3, 4, 5, 6
ACTIVATIONS = {None: ACT_NONE, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH, "quick_gelu": ACT_QUICK_GELU,
               "silu": ACT_SILU, "relu": ACT_RELU, "relu2": ACT_RELU2}

@triton.jit
def apply_activation(x, ACTIVATION: tl.constexpr):
    """act(x) on an fp32/fp64 tile. gelu_tanh uses 0.5*(1+tanh(u)) == sigmoid(2u): no tanh needed.
    quick_gelu (CLIP's) is x*sigmoid(1.702x); silu x*sigmoid(x); relu max(x, 0) (NaN-propagating,
    as torch's: a where on x > 0 would turn NaN into 0); relu2 (Nemotron's squared ReLU) relu(x)^2."""
    if ACTIVATION == 1:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == 2:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = x * tl.sigmoid(2.0 * u)
    elif ACTIVATION == 3:
        x = x * tl.sigmoid(1.702 * x)
    elif ACTIVATION == 4:
        x = x * tl.sigmoid(x)
    elif ACTIVATION == 5:
        x = tl.where(x < 0.0, 0.0, x)
    elif ACTIVATION == 6:
        x = tl.where(x < 0.0, 0.0, x)
        x = x * x
    return x

@triton.jit
def _sigmoid_and_slope(z):
    """(s, s * (1 - s)) for s = sigmoid(z), from t = sigmoid(-|z|) <= 1/2: the slope is t - t^2 (even in z),
    and s is 1 - t or t by z's sign. Formed as s * (1 - s) from s itself, the slope cancels where s nears
    1 (1 - s keeps only the bits of s below 1): the act' of silu, quick_gelu and gelu_tanh lost up to
    ~1e-6 absolute at z ~ 5-17 in fp32 (PyTorch's own fp32 backward too: ~1e-6, against ~2e-7 in this
    form; bench/NOTES.md, session 19). t keeps its relative precision at every z, and the live values
    stay those of the old form (two per element): the dX * act' epilogue is at 255 registers on sm_80
    (128x64 tiles, bf16), where forms with a third one spilled 8-32 bytes. fp32: exp2 and an
    approximate (full-range, ~2 ulp) division, as tl.sigmoid's IEEE division spilled there too; fp64
    the exact ones. Saturates to (1, 0) and (0, 0); NaN propagates."""
    if z.dtype == tl.float32:
        t = tl.math.fdiv(tl.full(z.shape, 1.0, tl.float32), 1.0 + tl.math.exp2(tl.abs(z) * 1.4426950408889634))
    else:
        t = 1.0 / (1.0 + tl.exp(tl.abs(z)))
    return tl.where(z < 0.0, t, 1.0 - t), t - t * t

@triton.jit
def activation_grad(x, ACTIVATION: tl.constexpr):
    """act'(x) on an fp32/fp64 tile of pre-activations."""
    if ACTIVATION == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        g = cdf + x * pdf
    elif ACTIVATION == 2:
        # x * sigmoid(2u(x)): sigmoid(2u) + x * 2 sigmoid'(2u) * u'(x)
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        s, slope = _sigmoid_and_slope(2.0 * u)
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
        g = s + x * slope * 2.0 * du
    elif ACTIVATION == 3:
        s, slope = _sigmoid_and_slope(1.702 * x)
        g = s + 1.702 * x * slope
    elif ACTIVATION == 4:
        s, slope = _sigmoid_and_slope(x)
        g = s + x * slope
    elif ACTIVATION == 5:
        # torch's relu backward: gradient 1 where x > 0, else 0 (also at exactly 0)
        g = tl.where(x > 0.0, 1.0, 0.0).to(x.dtype)
    elif ACTIVATION == 6:
        # d relu(x)^2 = 2 relu(x): autograd through torch.square(relu(x)) gives the same, 0 at x <= 0
        g = tl.where(x > 0.0, 2.0 * x, 0.0).to(x.dtype)
    else:
        g = tl.full(x.shape, 1.0, x.dtype)
    return g

@triton.jit
def grouped_tile_of(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile number ``tile`` in grouped order: consecutive tiles walk down
    GROUP_M tile rows before moving right, so the B columns they share stay in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program (one output tile per program) in grouped order."""
    return grouped_tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)


# ----------------------------------------------------------------------------------------------
# Dtypes
# ----------------------------------------------------------------------------------------------
#: Floating dtypes the kernels take. float64 runs (for gradcheck) but is not tuned for speed.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

def acc_dtype(dtype: torch.dtype):
    """Accumulator type: fp32 for 16/32-bit inputs, fp64 for fp64."""
    return tl.float64 if dtype == torch.float64 else tl.float32


#: Round fp32 operands to TF32 before a "tf32" ``tl.dot``. Triton's TF32 MMA hands the tensor cores the
#: raw fp32 bits, which drop the low 13 mantissa bits (round toward zero: twice a rounding's error);
#: on the fourth H100 run (bench/NOTES.md, session 14) the TF32 GEMMs came out at 3.0-3.1x the error of
#: PyTorch's TF32 reference (cuBLAS), past the tests' 3x. Off under the interpreter: its "tf32" dot is
#: exact fp32, as the CPU reference it is compared with (torch has no TF32 on the CPU), so rounding there
#: would compare TF32 with fp32; the rounding itself is tested there on its own (tests/test_tma_gemm.py).
ROUND_TF32_OPERANDS = tl.constexpr(not INTERPRET)


@triton.jit
def round_to_tf32(x):
    """fp32 -> the nearest TF32 value (10 mantissa bits; ties away from zero, as PTX's cvt.rna.tf32.f32),
    kept in fp32. Inf and NaN pass unchanged; a finite value at or past the midpoint above TF32's largest
    (bits 0x7F7FF000) rounds to inf, as rounding to nearest does."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return tl.where((bits & 0x7F800000) == 0x7F800000, x, rounded)


@triton.jit
def mma(a, b, acc, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``tl.dot(a, b, acc)`` with fp32 operands rounded to TF32 first under "tf32"
    (``ROUND_TF32_OPERANDS``); ``acc`` may be None."""
    if INPUT_PRECISION == "tf32" and ROUND_TF32_OPERANDS:
        if a.dtype == tl.float32:
            a = round_to_tf32(a)
        if b.dtype == tl.float32:
            b = round_to_tf32(b)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)


def fp32_pair(value: float, acc: torch.dtype) -> tuple[float, float]:
    """A float scalar as the kernels take it: (hi, lo), both fp32 values. A GPU launch passes a Python
    float as fp32 (so do Triton 3.6-3.8's interpreters; 3.9's keeps fp64), so an fp64 kernel given the
    value alone ran with it rounded to fp32: cross-attention's softmax scale then put ~6e-8 relative
    error in fp64 outputs. For an fp64 accumulator lo carries the rest (hi + lo = value to ~2^-48, for
    values in fp32's normal range); any other accumulator takes hi alone (lo = 0). The kernel reads the
    pair with ``pair_value``. The rounding to fp32 goes through ``struct`` (round to nearest even, as
    numpy's float32 does; 0.2 us against 2.2 under ``np.errstate``, on every launch with a scalar)."""
    try:
        hi = _FP32.unpack(_FP32.pack(value))[0]
    except OverflowError:  # (struct refuses some values far past fp32's range; others round to inf)
        hi = math.inf
    if math.isinf(hi) and math.isfinite(value):
        raise ValueError(f"fp32_pair: expected a value within fp32's range, got {value!r}")
    return hi, (_FP32.unpack(_FP32.pack(value - hi))[0] if acc == torch.float64 else 0.0)


_FP32 = struct.Struct("f")


@triton.jit
def pair_value(hi, lo, ACC_DTYPE: tl.constexpr):
    """The scalar ``fp32_pair`` split: hi + lo in fp64 for an fp64 accumulator; hi itself otherwise (a
    compile-time choice, so 16-bit and fp32 kernels compile exactly as with the plain scalar)."""
    if ACC_DTYPE == tl.float64:
        return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        return hi


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's TF32 switch, as DESIGN.md requires; other dtypes ignore it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"

# ----------------------------------------------------------------------------------------------
# Output allocation. Tests turn poisoning on so a kernel that skips an element is caught.
# ----------------------------------------------------------------------------------------------
POISON_OUTPUTS = False

def empty(shape, *, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS and t.numel():
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t

def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b

def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << math.ceil(math.log2(n))

#: Streaming multiprocessors of the default target (H100 SXM). Launchers use the real count on a GPU.
H100_SMS = 132
#: The roofline the split rules and `mmfuse report` model with (H100 SXM, as measured on one; DESIGN.md):
#: bf16 dense FLOP/s, HBM bytes/s, and a launch's fixed cost in µs (assumed).
#: Compile options every launch states rather than inherits. FMA fusion (a*b+c in one rounding) is on,
#: as every supported Triton defaults to; Triton 3.9 warns that 3.10 turns the default off, which would
#: change the kernels' rounding (not their determinism). The compile check compiles with the same.
LAUNCH_OPTIONS = dict(enable_fp_fusion=True)

PEAK_FLOPS = 800e12
PEAK_BYTES = 3.0e12
LAUNCH_US = 3.0

#: SM count per CUDA device index, queried once (the launchers ask on every launch).
_SMS_BY_INDEX: dict[int, int] = {}

def num_sms(device: torch.device | None) -> int:
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        sms = _SMS_BY_INDEX.get(index)
        if sms is None:
            sms = _SMS_BY_INDEX[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return sms
    return H100_SMS

# ----------------------------------------------------------------------------------------------
# GPU configs under the interpreter (tests/test_gpu_configs.py)
# ----------------------------------------------------------------------------------------------
#: Set by ``gpu_config``; None = launchers use their small interpreter blocks.
_GPU_TILES: dict | None = None

@contextlib.contextmanager
def gpu_config(tiles: dict | None = None):
    """Launch what a GPU would launch, also under the interpreter: attention takes its GPU blocks, and
    a GEMM kernel named in ``tiles`` ({kernel function name: (BLOCK_M, BLOCK_N, BLOCK_K for 2-byte
    dtypes, warps, stages)}) takes that tile, BLOCK_K halved for 4-byte dtypes as on the GPU (which
    autotunes among its tiles: the interpreter cannot benchmark, so the caller picks one). Lets the
    tests execute every config the compile check compiles."""
    global _GPU_TILES
    old, _GPU_TILES = _GPU_TILES, dict(tiles or {})
    try:
        yield
    finally:
        _GPU_TILES = old

def gpu_config_on() -> bool:
    return _GPU_TILES is not None

def forced_tile(kernel_name: str):
    """The tile ``gpu_config`` set for this GEMM kernel, or None."""
    return None if _GPU_TILES is None else _GPU_TILES.get(kernel_name)

__all__ = [
    "INTERPRET", "ACT_NONE", "ACT_GELU", "ACT_GELU_TANH", "ACT_QUICK_GELU", "ACT_SILU", "ACT_RELU",
    "ACTIVATIONS", "apply_activation",
    "activation_grad", "grouped_tile", "grouped_tile_of", "KERNEL_DTYPES", "acc_dtype", "dot_precision", "POISON_OUTPUTS", "empty",
    "ROUND_TF32_OPERANDS", "round_to_tf32", "mma",
    "cdiv", "next_pow2", "H100_SMS", "num_sms", "gpu_config", "gpu_config_on", "forced_tile",
    "PEAK_FLOPS", "PEAK_BYTES", "LAUNCH_US", "LAUNCH_OPTIONS",
]
