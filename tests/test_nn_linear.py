"""mmfuse.nn.Linear / MLPProjector: drop-in state_dicts, from_module, mmfuse.patch on transformers' LLaVA."""

import pytest
import torch
import torch.nn as nn

import mmfuse
from mmfuse.nn import Linear, MLPProjector
from mmfuse.testing import assert_close
from _adapters import AdapterStandIn


def _grads(module, x, dy):
    x = x.detach().clone().requires_grad_()
    out = module(x)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(out, [x, *params], dy)
    return out, grads


def _check_module_pair(original, replacement, x):
    """Replacement (mmfuse) vs original in fp64 and same precision: outputs, input and parameter grads.

    The two share parameters; ``original.to(float64)`` converts them in place and back (exactly)."""
    with torch.no_grad():
        dy = torch.randn_like(original(x))
    ref = {}
    for dtype in (torch.float64, x.dtype):
        o, g = _grads(original.to(dtype), x.to(dtype), dy.to(dtype))
        ref[dtype] = (o.detach(), [t.detach() for t in g])
    original.to(x.dtype)
    out, grads = _grads(replacement, x, dy)
    assert_close("out", out, ref[torch.float64][0], ref[x.dtype][0])
    assert len(grads) == len(ref[x.dtype][1])
    for i, (g, r64, rlp) in enumerate(zip(grads, ref[torch.float64][1], ref[x.dtype][1])):
        assert_close(f"grad {i}", g, r64, rlp)


@pytest.mark.parametrize("activation", [None, "gelu_tanh"])
def test_linear_from_module_shares_parameters(activation):
    lin = nn.Linear(24, 40)
    fused = Linear.from_module(lin, activation=activation)
    assert fused.weight is lin.weight and fused.bias is lin.bias
    assert list(fused.state_dict()) == list(lin.state_dict())
    x = torch.randn(3, 7, 24)
    act = {None: nn.Identity(), "gelu_tanh": nn.GELU(approximate="tanh")}[activation]
    _check_module_pair(nn.Sequential(lin, act), fused, x)


def test_linear_module_loads_nn_linear_state_dict():
    lin = nn.Linear(16, 8, bias=False)
    fused = Linear(16, 8, bias=False, activation="gelu")
    fused.load_state_dict(lin.state_dict())  # strict: same keys and shapes
    x = torch.randn(5, 16)
    torch.testing.assert_close(fused(x), nn.functional.gelu(lin(x)))


def test_mlp_projector_from_sequential():
    seq = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 48), nn.GELU(), nn.Linear(48, 20))
    proj = MLPProjector.from_module(seq)
    assert list(proj.state_dict()) == list(seq.state_dict())  # "0.weight", ..., "4.bias"
    assert proj.activation == "gelu"
    _check_module_pair(seq, proj, torch.randn(2, 11, 32))


def test_mlp_projector_fresh_loads_llava_checkpoint_layout():
    seq = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 48))
    proj = MLPProjector((32, 48, 48))
    proj.load_state_dict(seq.state_dict())
    x = torch.randn(9, 32)
    torch.testing.assert_close(proj(x), seq(x), rtol=1e-5, atol=1e-5)


def test_mlp_projector_rejects_unsupported_sequences():
    with pytest.raises(ValueError, match="activation: expected nn.GELU, nn.SiLU, nn.ReLU.*got Tanh"):
        MLPProjector.from_module(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)))
    with pytest.raises(TypeError, match=r"module\[2\]: expected nn.Linear, got Conv1d"):
        MLPProjector.from_module(nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Conv1d(4, 4, 1)))
    # mmfuse.patch leaves what it does not recognise alone
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)))
    assert len(mmfuse.patch(model)) == 0


def test_activation_names_of_torch_and_transformers_modules():
    from transformers.activations import ACT2FN

    from mmfuse.nn._activations import activation_name

    expected = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh", "quick_gelu": "quick_gelu",
                "silu": "silu", "swish": "silu", "relu": "relu", "relu2": "relu2", "linear": None}
    for key, name in expected.items():
        module = ACT2FN[key]
        assert activation_name(module) == name, key
        # the name's reference computes what the module computes
        x = torch.linspace(-5, 5, 41, dtype=torch.float64)
        torch.testing.assert_close(mmfuse.linear_reference(x[None], torch.eye(41, dtype=torch.float64),
                                                           activation=name)[0], module(x), rtol=1e-9, atol=1e-9)
    assert activation_name(nn.GELU(approximate="tanh")) == "gelu_tanh"
    for unsupported in ("relu6", "gelu_10", "gelu_accurate", "mish", "leaky_relu", "tanh"):
        with pytest.raises(ValueError, match="activation: expected"):
            activation_name(ACT2FN[unsupported])


def _tiny_llava_config(act="gelu"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=28, patch_size=14, projection_dim=32)
    text = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=128)
    return LlavaConfig(vision_config=vision, text_config=text, projector_hidden_act=act, image_token_index=100)


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
def test_mlp_projector_from_transformers_llava(act):
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    torch.manual_seed(0)
    hf = LlavaMultiModalProjector(_tiny_llava_config(act))
    proj = MLPProjector.from_module(hf)
    assert proj.activation == {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}[act]
    assert list(proj.state_dict()) == list(hf.state_dict())
    # A fresh projector loads the HF checkpoint unchanged (strict).
    fresh = MLPProjector((32, 48, 48), activation=proj.activation, names=["linear_1", "linear_2"])
    fresh.load_state_dict(hf.state_dict())
    _check_module_pair(hf, proj, torch.randn(2, 5, 32))


def test_patch_swaps_projector_in_tiny_llava_model():
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(_tiny_llava_config()).eval()
    feats = torch.randn(1, 4, 32)
    before = model.model.multi_modal_projector(feats)
    report = mmfuse.patch(model)
    assert ("model.multi_modal_projector", "LlavaMultiModalProjector", "MLPProjector") in report.swapped
    assert isinstance(model.model.multi_modal_projector, MLPProjector)
    after = model.model.multi_modal_projector(feats)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make,name", [(lambda: MLPProjector([16, 24, 8]), "2"),
                                       (lambda: mmfuse.nn.GatedMLP(16, 24, 8), "up_proj")], ids=["mlp", "gated"])
def test_a_linear_wrapped_after_construction_is_refused_not_ignored(make, name):
    """MLPProjector / GatedMLP read their Linears' weights (one fused op): a Linear wrapped afterwards (an
    adapter) would be skipped, so the forward raises naming it."""
    m = make()
    setattr(m, name, AdapterStandIn(getattr(m, name)))
    with pytest.raises(RuntimeError, match=rf"{name}: expected the torch\.nn\.modules\.linear\.Linear or mmfuse\.nn\.linear\.Linear that mmfuse "
                                           r"built this module with, got .*AdapterStandIn"):
        m(torch.randn(3, 16))


def test_a_hook_added_to_a_layer_after_construction_is_refused_not_skipped():
    """A fused forward reads the Linears' weights without calling them: a hook added to one since (a
    pruning mask, the hook-based weight_norm, a sharding library's gather) would not run."""
    m = MLPProjector([16, 24, 8])
    handle = m.get_submodule("0").register_forward_hook(lambda mod, args, out: out * 0)
    with pytest.raises(RuntimeError, match=r"MLPProjector\.0 has hooks \(or an instance forward\) added since"):
        m(torch.randn(3, 16))
    handle.remove()
    m(torch.randn(3, 16))


def test_mlp_projector_of_mmfuse_linears_runs_and_one_with_a_fused_activation_is_refused():
    """Children that are mmfuse's own Linear compute F.linear too (a model patched layer by layer before);
    one with its activation fused would have it dropped by the fused MLP, so it is refused when building."""
    torch.manual_seed(0)
    seq = nn.Sequential(Linear(16, 24), nn.GELU(), Linear(24, 8))
    ref = seq(x := torch.randn(3, 16))
    torch.testing.assert_close(MLPProjector.from_module(seq)(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"module\[0\]: expected a plain Linear, got mmfuse's Linear with activation "
                                         r"'gelu'"):
        MLPProjector.from_module(nn.Sequential(Linear(16, 24, activation="gelu"), nn.GELU(), Linear(24, 8)))


@pytest.mark.parametrize("setting", ["pytorch", "mmfuse"])
def test_a_linear_without_activation_is_a_plain_gemm(setting, monkeypatch, launches):
    """Nothing to fuse: ``F.linear`` by default, mmfuse's GEMM with ``MMFUSE_PLAIN_GEMMS=mmfuse``; the same
    values and gradients either way. The attention drop-ins' projections take the same path."""
    from mmfuse.nn import CrossAttention

    monkeypatch.setattr(mmfuse._dispatch, "PLAIN_GEMMS", setting)
    lin = nn.Linear(24, 40)
    x = torch.randn(3, 7, 24)
    launches.clear()
    _check_module_pair(lin, Linear.from_module(lin), x)
    assert launches.count("fused_gemm_kernel") == (0 if setting == "pytorch" else 3)  # fwd, dX, dW
    attn = CrossAttention(dim=16, heads=2, dim_head=8, kv_dim=12)
    launches.clear()
    attn(torch.randn(2, 3, 16), torch.randn(2, 5, 12))
    assert "attn_fwd_kernel" in launches
    assert launches.count("fused_gemm_kernel") == (0 if setting == "pytorch" else 4)  # Q, K, V, O
