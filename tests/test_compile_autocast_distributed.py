"""The layers survive what users do to models: torch.compile (fullgraph), torch.export, custom-op
checks, autocast with fp32 master weights, DDP and FSDP2 across processes (gloo, CPU)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import mmfuse
from mmfuse.ops import linear as ops_linear


def _model():
    torch.manual_seed(0)
    return nn.Sequential(mmfuse.nn.MLPProjector((16, 32, 24)), mmfuse.nn.Linear(24, 8, activation="gelu_tanh"))


def _grads(model, x):
    for p in model.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    return y.detach(), [x.grad] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    model = _model()
    x = torch.randn(2, 5, 16)
    y_eager, g_eager = _grads(model, x)
    compiled = torch.compile(model, fullgraph=True, backend=backend)  # raises on any graph break
    y_comp, g_comp = _grads(compiled, x)
    torch.testing.assert_close(y_comp, y_eager, rtol=0, atol=0)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_export_keeps_the_fused_ops():
    with torch.no_grad():
        ep = torch.export.export(_model(), (torch.randn(2, 5, 16),))
    code = ep.graph_module.code
    assert "torch.ops.mmfuse.mlp_fwd" in code and "torch.ops.mmfuse.linear_fwd" in code
    x = torch.randn(2, 5, 16)  # exported for this shape (static)
    torch.testing.assert_close(ep.module()(x), _model()(x), rtol=0, atol=0)


def test_custom_ops_pass_opcheck():
    x = torch.randn(7, 12, requires_grad=True)
    w = torch.randn(9, 12, requires_grad=True)
    b = torch.randn(9, requires_grad=True)
    torch.library.opcheck(ops_linear.linear_fwd_op, (x, w, b, "gelu", True))
    torch.library.opcheck(ops_linear.linear_fwd_op, (x, w, None, None, False))
    ws = [torch.randn(10, 12, requires_grad=True), torch.randn(6, 10, requires_grad=True)]
    bs = [torch.randn(10, requires_grad=True), torch.empty(0)]
    torch.library.opcheck(ops_linear.mlp_fwd_op, (x, ws, bs, [True, False], "gelu", True))


def test_autocast_computes_in_the_autocast_dtype_like_nn_linear():
    torch.manual_seed(0)
    lin = nn.Linear(24, 40)  # fp32 master weights
    fused = mmfuse.nn.Linear.from_module(lin)
    x = torch.randn(6, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = lin(x)
        out = fused(x)
    assert ref.dtype == out.dtype == torch.bfloat16
    # Same bf16 inputs, fp32 accumulation on both sides: equal within one bf16 rounding.
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    out.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32 and lin.bias.grad.dtype == torch.float32


def test_autocast_mlp_projector_fp32_masters_bf16_activations():
    proj = mmfuse.nn.MLPProjector((16, 32, 8))
    seq = nn.Sequential(getattr(proj, "0"), nn.GELU(), getattr(proj, "2"))  # same parameters
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = proj(x)
        ref = seq(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in proj.parameters())


def test_mixed_dtypes_without_autocast_are_rejected():
    with pytest.raises(TypeError, match="weight: expected dtype torch.bfloat16"):
        mmfuse.linear(torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(4, 8))


def test_layers_hold_plain_parameters_and_no_global_state():
    model = _model()
    assert all(type(p) is nn.Parameter for p in model.parameters())
    clone = _model()
    clone.load_state_dict(model.state_dict())
    x = torch.randn(2, 16)
    torch.testing.assert_close(clone(x), model(x))


# ----------------------------------------------------------------------------------------------
# Distributed: two gloo processes on CPU (tests/_distributed_worker.py)
# ----------------------------------------------------------------------------------------------
WORKER = os.path.join(os.path.dirname(__file__), "_distributed_worker.py")


def _single_process_reference(mode):
    sys.path.insert(0, os.path.dirname(WORKER))
    try:
        import _distributed_worker as w
    finally:
        sys.path.pop(0)
    if mode == "fsdp2-meta":  # the unpatched transformers modules, materialised normally
        model, batch = w.build_hf_model(), w.hf_batch
    else:
        model, batch = w.build_model(), w.batch
    loss = sum(model(batch(rank)).square().mean() for rank in range(2)) / 2  # DDP averages ranks
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_distributed_gradients_match_single_process(tmp_path):
    """DDP, FSDP2, and FSDP2 after meta-device init + mmfuse.patch: rank 0's full gradients equal one
    process's. The three modes run in one spawn of two processes (their start-up is most of the time)."""
    modes = ("ddp", "fsdp2", "fsdp2-meta")
    r = subprocess.run([sys.executable, WORKER, "--modes", ",".join(modes), "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for mode in modes:
        got = torch.load(tmp_path / f"{mode}.pt")
        ref = _single_process_reference(mode)
        assert set(got) == set(ref), mode
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=f"{mode}: {name}")


class _PatchThenProject(nn.Module):
    """Patch embedding (with a position table) feeding a GELU MLP: the image side of a projector."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 4, stride=4)
        self.pos = nn.Parameter(torch.randn(6, 16))
        self.proj = mmfuse.nn.MLPProjector((16, 24, 8))

    def forward(self, pixels):
        return self.proj(mmfuse.patch_embed(pixels, self.conv.weight, self.conv.bias, self.pos))


def test_patch_embed_compiles_fullgraph():
    torch._dynamo.reset()
    model = _PatchThenProject()
    x = torch.randn(2, 3, 8, 12)
    y_eager, g_eager = _grads(model, x)
    y_comp, g_comp = _grads(torch.compile(model, fullgraph=True, backend="inductor"), x)
    torch.testing.assert_close(y_comp, y_eager, rtol=0, atol=0)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        assert "torch.ops.mmfuse.patch_embed_fwd" in torch.export.export(model, (x,)).graph_module.code


def test_patch_embed_op_passes_opcheck():
    from mmfuse.ops import patch_embed as ops_patch

    pixels = torch.randn(2, 3, 8, 12, requires_grad=True)
    w = torch.randn(16, 3, 4, 4, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    pos = torch.randn(6, 16, requires_grad=True)
    torch.library.opcheck(ops_patch.patch_embed_fwd_op, (pixels, w, b, pos, None, None))
    cls = torch.randn(16, requires_grad=True)
    torch.library.opcheck(ops_patch.patch_embed_fwd_op, (pixels, w, None, torch.randn(7, 16), cls, None))


def test_cross_attention_compiles_fullgraph_and_passes_opcheck():
    from mmfuse.ops import cross_attention as ops_attn

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = mmfuse.nn.CrossAttention(16, heads=4, dim_head=8, kv_heads=2)
    queries = nn.Parameter(torch.randn(1, 5, 16))

    def step(ctx):
        return model(queries, ctx)

    ctx = torch.randn(2, 9, 16)
    eager = step(ctx)
    compiled = torch.compile(step, fullgraph=True, backend="inductor")(ctx)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    q = torch.randn(1, 4, 5, 8, requires_grad=True)
    k = torch.randn(2, 2, 9, 8, requires_grad=True)
    v = torch.randn(2, 2, 9, 8, requires_grad=True)
    torch.library.opcheck(ops_attn.cross_attention_fwd_op, (q, k, v, torch.tensor([9, 4]), None, 0.35, 0))


def test_autocast_patch_embed_and_cross_attention_like_conv_and_sdpa():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, 4, stride=4)  # fp32 master weights
    pixels = torch.randn(2, 3, 8, 8)
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = conv(pixels).flatten(2).transpose(1, 2)
        out = mmfuse.patch_embed(pixels, conv.weight, conv.bias)
        attn = mmfuse.cross_attention(q, k, v)
        attn_ref = torch.nn.functional.scaled_dot_product_attention(q.expand(2, -1, -1, -1), k, v)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    assert attn.dtype == attn_ref.dtype == torch.bfloat16
    torch.testing.assert_close(attn.float(), attn_ref.float(), rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32


def test_autocast_leaves_fp64_inputs_in_fp64_like_f_linear():
    x, w, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64), torch.randn(7).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.linear(x, w, b)
        out = mmfuse.linear(x, w, b)
    assert out.dtype == ref.dtype == torch.float64
    torch.testing.assert_close(out, ref)
