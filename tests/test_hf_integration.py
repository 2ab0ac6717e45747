"""mmfuse.patch / unpatch on tiny transformers models built from configs (no download): outputs and
gradients equal the unpatched model within the error rule, a training step changes the same
parameters, unsupported modules are left alone with a reason."""

import copy

import pytest
import torch
import torch.nn as nn

import mmfuse
from mmfuse.testing import assert_close

transformers = pytest.importorskip("transformers")
from _transformers_versions import merged_output  # noqa: E402


def _run(model, inputs, select):
    """Output and parameter gradients for a fixed upstream gradient."""
    model.zero_grad(set_to_none=True)
    out = select(model(*inputs))
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape))
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def check_patch_equivalence(model, inputs, select, expected_swaps, vision_tower=False):
    """Patched fp32 model vs the unpatched model in fp64 and fp32 (the flash-attention rule).
    ``expected_swaps``: replacement classes that must appear (other families may swap more)."""
    model = model.float().train()
    ref32 = _run(model, inputs, select)
    m64 = copy.deepcopy(model).double()
    ref64 = _run(m64, [t.double() if t.is_floating_point() else t for t in inputs], select)
    report = mmfuse.patch(model, vision_tower=vision_tower)
    swapped = [new for _, _, new in report.swapped]
    assert all(swapped.count(c) >= expected_swaps.count(c) for c in expected_swaps), str(report)
    out, grads = _run(model, inputs, select)
    assert_close("out", out, ref64[0], ref32[0])
    assert set(grads) == set(ref32[1])  # the same parameters receive gradients
    for name in grads:
        assert_close(f"grad {name}", grads[name], ref64[1][name], ref32[1][name])
    return model, report


def check_training_step(make_model, inputs, select, vision_tower=False):
    """One SGD step, patched and unpatched from the same init: the same parameters move, equally."""
    results = []
    for patched in (False, True):
        model = make_model().float()
        if patched:
            mmfuse.patch(model, vision_tower=vision_tower)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        select(model(*inputs)).square().mean().backward()
        opt.step()
        results.append({n: p.detach() - before[n] for n, p in model.named_parameters()})
    plain, fused = results
    assert set(plain) == set(fused)
    changed = {n for n, d in plain.items() if d.abs().max() > 0}
    assert changed == {n for n, d in fused.items() if d.abs().max() > 0}
    for n in plain:
        torch.testing.assert_close(fused[n], plain[n], rtol=1e-3, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------------------------
# LLaVA
# ----------------------------------------------------------------------------------------------
def tiny_llava(act="gelu"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              image_size=28, patch_size=14, projection_dim=32)
    text = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=128)
    cfg = LlavaConfig(vision_config=vision, text_config=text, projector_hidden_act=act, image_token_index=100)
    return LlavaForConditionalGeneration(cfg)


def _llava_inputs():
    ids = torch.tensor([[1, 100, 100, 100, 100, 5, 6]])  # 4 image tokens = (28/14)^2 patches
    return [ids, torch.randn(1, 3, 28, 28)]


def _llava_logits(out):
    return out.logits


class _LlavaCall(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, pixels):
        return self.model(input_ids=ids, pixel_values=pixels)


def test_llava_patched_model_matches():
    model, report = check_patch_equivalence(_LlavaCall(tiny_llava()), _llava_inputs(), _llava_logits,
                                            ["MLPProjector"])
    assert ("model.model.multi_modal_projector", "LlavaMultiModalProjector", "MLPProjector") in report.swapped


def test_llava_training_step_changes_the_same_parameters():
    check_training_step(lambda: _LlavaCall(tiny_llava()), _llava_inputs(), _llava_logits)


def test_unpatch_restores_the_original_modules():
    model = tiny_llava()
    original = model.model.multi_modal_projector
    report = mmfuse.patch(model)
    assert model.model.multi_modal_projector is not original
    restored = mmfuse.unpatch(model)
    assert "model.multi_modal_projector" in restored and len(restored) == len(report.swapped)
    assert model.model.multi_modal_projector is original
    assert all(not type(m).__module__.startswith("mmfuse") for m in model.modules())


def test_unsupported_activation_is_left_alone_with_a_reason():
    model = tiny_llava(act="relu6")  # no kernel computes ReLU6
    report = mmfuse.patch(model)
    left = {name: why for name, _, why in report.left_alone}
    assert "model.multi_modal_projector" in left
    assert "ReLU6" in left["model.multi_modal_projector"]
    assert type(model.model.multi_modal_projector).__name__ == "LlavaMultiModalProjector"
    assert "left alone model.multi_modal_projector" in str(report)


def test_patch_refuses_a_bare_recognised_module():
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    proj = LlavaMultiModalProjector(tiny_llava().config)
    with pytest.raises(ValueError, match="model: patch\\(\\) replaces submodules in place"):
        mmfuse.patch(proj)


# ----------------------------------------------------------------------------------------------
# Qwen2-VL vision tower: PatchEmbed (pre-cut patches -> one GEMM) and PatchMerger (LN + 2x2 merge + MLP)
# ----------------------------------------------------------------------------------------------
def tiny_qwen2_vl_vision():
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    cfg = Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=32, hidden_size=48, num_heads=2, mlp_ratio=2, in_channels=3,
                           patch_size=4, temporal_patch_size=2, spatial_merge_size=2),
        text_config=dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         vocab_size=64, intermediate_size=64, bos_token_id=0, eos_token_id=1))
    torch.manual_seed(0)
    return Qwen2VisionTransformerPretrainedModel._from_config(cfg.vision_config)


def _qwen_inputs():
    grid = torch.tensor([[1, 4, 6]])  # 24 patches, merged 2x2 into 6 tokens
    return [torch.randn(24, 3 * 2 * 4 * 4), grid]


class _QwenCall(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels, grid):
        return self.model(pixels, grid_thw=grid)


def test_qwen2_vl_vision_patched_matches():
    model, report = check_patch_equivalence(_QwenCall(tiny_qwen2_vl_vision()), _qwen_inputs(),
                                            merged_output, ["Qwen2VLPatchEmbed", "FusedPatchMerger"])
    # The merger runs mmfuse.merged_mlp on its own children (LayerNorm read in the first GEMM's loads):
    # the Sequential and its state_dict stay the original's.
    assert isinstance(model.model.merger.mlp, torch.nn.Sequential)


def test_qwen2_vl_training_step():
    check_training_step(lambda: _QwenCall(tiny_qwen2_vl_vision()), _qwen_inputs(), merged_output)


def test_qwen2_vl_merge_is_a_view_not_a_copy(monkeypatch):
    """The 2x2 merge costs nothing: the MLP receives a view of the LayerNorm output's storage."""
    merger = mmfuse.nn.PatchMerger.from_module(tiny_qwen2_vl_vision().merger)
    seen = {}
    real = merger.mlp.forward

    def spy(x):
        seen["x"] = x
        return real(x)

    ln_out = {}
    merger.ln_q.register_forward_hook(lambda m, i, o: ln_out.setdefault("o", o))
    monkeypatch.setattr(merger.mlp, "forward", spy)
    merger(torch.randn(24, 32))
    assert seen["x"].shape == (6, 128)
    assert seen["x"].data_ptr() == ln_out["o"].data_ptr()


# ----------------------------------------------------------------------------------------------
# InternVL projector
# ----------------------------------------------------------------------------------------------
def tiny_internvl_projector(act="gelu"):
    from transformers import InternVLConfig
    from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

    cfg = InternVLConfig(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=[28, 28], patch_size=[14, 14]),
        text_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=64),
        downsample_ratio=0.5, projector_hidden_act=act)
    torch.manual_seed(0)
    return nn.Sequential(InternVLMultiModalProjector(cfg))


def test_internvl_projector_patched_matches():
    model, _ = check_patch_equivalence(tiny_internvl_projector(), [torch.randn(2, 9, 64)], lambda o: o,
                                       ["FusedInternVLMultiModalProjector"])
    assert list(model.state_dict()) == list(tiny_internvl_projector().state_dict())


def test_internvl_training_step():
    check_training_step(tiny_internvl_projector, [torch.randn(2, 9, 64)], lambda o: o)


def test_transformers_version_is_recorded():
    # The README states the tested version; keep them in sync.
    import pathlib

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    assert f"transformers {transformers.__version__}" in readme


class _DoubledGELU(nn.GELU):
    def forward(self, x):
        return 2 * super().forward(x)


class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return 3 * super().forward(x)


@pytest.mark.parametrize("change, why", [
    ("gelu subclass", "expected nn.GELU, nn.SiLU, nn.ReLU, nn.Identity (exactly)"),
    ("linear subclass", "expected nn.Linear, got |._ScaledLinear"),  # (its module named: PEFT's is "Linear" too)
    ("hook on the projector", "hooks registered"),  # (LLaVA's drop-in is a new module: its hooks would be lost)
    ("hook on its Linear", "submodule linear_2 has hooks registered"),
    ("weight_norm", "submodule linear_1 has parametrized parameters"),
    ("instance forward", "forward replaced on the instance")])
def test_modules_that_would_compute_something_else_when_swapped_are_left_alone(change, why):
    """A subclass with its own forward, a hook the replacement would not run, a wrapper set on the instance,
    a parametrized weight: swapping would silently drop it, so patch leaves the projector alone and says why
    (found by an adversarial review: each but the instance forward was swapped before)."""
    model = tiny_llava()
    proj = model.model.multi_modal_projector
    if change == "gelu subclass":
        proj.act = _DoubledGELU()
    elif change == "linear subclass":
        old = proj.linear_1
        proj.linear_1 = _ScaledLinear(old.in_features, old.out_features)
    elif change == "hook on the projector":
        proj.register_forward_hook(lambda m, i, o: o * 0)
    elif change == "hook on its Linear":
        proj.linear_2.register_forward_pre_hook(lambda m, i: (i[0] * 0,))
    elif change == "weight_norm":
        proj.linear_1 = torch.nn.utils.parametrizations.weight_norm(proj.linear_1)
    else:  # what accelerate's add_hook_to_module does: a wrapper around the original bound forward
        original = proj.forward
        proj.forward = lambda *a, **k: 2 * original(*a, **k)
    x = torch.randn(2, 5, proj.linear_1.in_features)
    ref = proj(x)
    report = mmfuse.patch(model)
    left = {name: reason for name, _, reason in report.left_alone}
    assert "model.multi_modal_projector" in left, str(report)
    assert all(part in left["model.multi_modal_projector"] for part in why.split("|"))
    assert model.model.multi_modal_projector is proj
    assert not [name for name, _, _ in report.swapped if name.startswith("model.multi_modal_projector")]
    torch.testing.assert_close(model.model.multi_modal_projector(x), ref)


def test_patch_names_its_argument_on_a_non_module():
    with pytest.raises(TypeError, match="model: expected an nn.Module, got str"):
        mmfuse.patch("model")


def test_a_hook_on_a_copied_module_is_kept_and_runs():
    """Recipes that copy the module (Qwen2-VL's merger: the merge and norm read in the GEMM) carry its own
    hooks over, so a forward hook there (capturing features, say) does not stop the swap and still runs."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger

    torch.manual_seed(0)
    model = nn.Sequential(PatchMerger(dim=24, context_dim=16, spatial_merge_size=2))
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    x = torch.randn(8, 16)
    ref = model(x)
    report = mmfuse.patch(model)
    assert [name for name, _, _ in report.swapped] == ["0"], str(report)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-4)
    assert seen == ["PatchMerger", "FusedPatchMerger"]


class _Adapter(nn.Module):
    """What an adapter library puts in a Linear's place: the Linear inside, its own forward around it."""
    def __init__(self, base):
        super().__init__()
        self.base_layer = base

    @property
    def weight(self):
        return self.base_layer.weight

    def forward(self, x):
        return self.base_layer(x) + 1.0


def test_a_linear_replaced_after_patch_is_refused_not_ignored():
    """A recipe with its own fused forward reads its Linears' weights directly: one replaced after patch
    (an adapter) would be silently skipped, so the forward names it and says what to do instead."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger

    model = nn.Sequential(PatchMerger(dim=24, context_dim=16, spatial_merge_size=2))
    mmfuse.patch(model)
    model[0].mlp[0] = _Adapter(model[0].mlp[0])
    with pytest.raises(RuntimeError, match=r"mlp\.0: expected the torch\.nn\.modules\.linear\.Linear or "
                                           r"mmfuse\.nn\.linear\.Linear that mmfuse built this module with.*"
                                           r"apply adapters before mmfuse.patch"):
        model(torch.randn(8, 16))
