"""Pieces every kernel family shares: activations, dtype tables, output allocation, launch helpers."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mmfuse._dispatch import INTERPRET

# ----------------------------------------------------------------------------------------------
# Activations. Codes are constexpr ints so one kernel serves every activation.
# ----------------------------------------------------------------------------------------------
ACT_NONE, ACT_GELU, ACT_GELU_TANH = 0, 1, 2
ACTIVATIONS = {None: ACT_NONE, "gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH}

@triton.jit
def apply_activation(x, ACTIVATION: tl.constexpr):
    """act(x) on an fp32/fp64 tile. gelu_tanh uses 0.5*(1+tanh(u)) == sigmoid(2u): no tanh needed."""
    if ACTIVATION == 1:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == 2:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = x * tl.sigmoid(2.0 * u)
    return x

@triton.jit
def activation_grad(x, ACTIVATION: tl.constexpr):
    """act'(x) on an fp32/fp64 tile of pre-activations."""
    if ACTIVATION == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        g = cdf + x * pdf
    elif ACTIVATION == 2:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        s = tl.sigmoid(2.0 * u)
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
        g = s + x * s * (1.0 - s) * 2.0 * du
    else:
        g = tl.full(x.shape, 1.0, x.dtype)
    return g

@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in grouped order: consecutive programs walk down GROUP_M tile
    rows before moving right, so the B columns they share stay in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


# ----------------------------------------------------------------------------------------------
# Dtypes
# ----------------------------------------------------------------------------------------------
#: Floating dtypes the kernels take. float64 runs (for gradcheck) but is not tuned for speed.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

def acc_dtype(dtype: torch.dtype):
    """Accumulator type: fp32 for 16/32-bit inputs, fp64 for fp64."""
    return tl.float64 if dtype == torch.float64 else tl.float32

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
PEAK_FLOPS = 800e12
PEAK_BYTES = 3.0e12
LAUNCH_US = 3.0

def num_sms(device: torch.device | None) -> int:
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H100_SMS

__all__ = [
    "INTERPRET", "ACT_NONE", "ACT_GELU", "ACT_GELU_TANH", "ACTIVATIONS", "apply_activation",
    "activation_grad", "grouped_tile", "KERNEL_DTYPES", "acc_dtype", "dot_precision", "POISON_OUTPUTS", "empty",
    "cdiv", "next_pow2", "H100_SMS", "num_sms", "PEAK_FLOPS", "PEAK_BYTES", "LAUNCH_US",
]
