"""CUDA graphs: each public op's forward (linear, mlp, gated_mlp, merged_mlp, cross_attention, patch_embed)
captured once and replayed on new inputs, bit for bit against the same op called directly, and a drop-in
projector's forward and backward through ``make_graphed_callables`` (GPU only; ``mmfuse gpu-check`` runs
this file with its value tests).

Why: the measured small calls are host-bound (bench/NOTES.md: ~21-34 µs of Triton's launch path per
launch, plus mmfuse's own Python), and a CUDA graph is how a user removes the host from a step
(``torch.cuda.graph``, ``make_graphed_callables``, ``torch.compile(mode="reduce-overhead")``). Capture
fails on any host synchronisation and replays whatever the capture recorded, so this also checks that
nothing on these paths reads a device value on the host or keeps per-call state a replay would not
refresh (the in-kernel split merge's arrival counters: warm-up and capture run on one stream, so the
captured launches use the counters the warm-up left at zero, and every replay must leave them so)."""

from __future__ import annotations

import pytest
import torch

import mmfuse

pytestmark = pytest.mark.skipif(mmfuse.INTERPRET or not torch.cuda.is_available(),
                                reason="GPU only: CUDA graphs need a CUDA device (run by `mmfuse gpu-check`)")


def _graphed(fn, static):
    """(graph, output) of ``fn(*static)`` captured after a warm-up on the same side stream (compiles, tile
    choices, per-stream state and the allocator's first blocks happen outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        out = fn(*static)
    return graph, out


def _replays_match(fn, make_inputs, rounds: int = 3):
    static = make_inputs()
    graph, out = _graphed(fn, static)
    for _ in range(rounds):
        fresh = make_inputs()
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        torch.cuda.synchronize()
        want = fn(*fresh)
        assert torch.equal(out, want), (out - want).abs().max()


def _randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def test_linear_and_gated_mlp_replay_bit_for_bit():
    w = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16) * 0.03
    b = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    _replays_match(lambda x: mmfuse.linear(x, w, b, "gelu"), lambda: [_randn(577, 1024)])
    wg, wu = (torch.randn(2816, 1024, device="cuda", dtype=torch.bfloat16) * 0.03 for _ in range(2))
    wd = torch.randn(1024, 2816, device="cuda", dtype=torch.bfloat16) * 0.02
    _replays_match(lambda x: mmfuse.gated_mlp(x, wg, wu, wd, None, None, None, "silu"), lambda: [_randn(577, 1024)])


def test_mlp_replays_bit_for_bit():
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.03 for k, n in ((1024, 4096), (4096, 4096))]
    bs = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for n in (4096, 4096)]
    _replays_match(lambda x: mmfuse.mlp(x, ws, bs), lambda: [_randn(577, 1024)])


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_merged_mlp_replays_bit_for_bit(norm):
    """Qwen2.5-VL's merger form (RMSNorm: the folded forward from 192 merged rows) and Qwen2-VL's
    (LayerNorm, normalised in the load)."""
    C, G = 1280, 4
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for k, n in ((G * C, G * C), (G * C, 3584))]
    gamma = torch.rand(C, device="cuda", dtype=torch.bfloat16) + 0.5
    beta = torch.randn(C, device="cuda", dtype=torch.bfloat16) if norm == "layer" else None
    _replays_match(lambda x: mmfuse.merged_mlp(x, ws, None, group=G, norm=norm, norm_weight=gamma, norm_bias=beta),
                   lambda: [_randn(4 * 300, C)])


@pytest.mark.parametrize("combine", ["auto", "launch", "kernel"])
def test_split_cross_attention_replays_bit_for_bit(monkeypatch, combine):
    """Idefics2's resampler at batch 1, split over keys (4 ways, whatever this GPU's SM count makes the
    rule choose), merged by a launch or in the kernel ("auto", the default, and "kernel": on counters the
    capture allocates for its graph, reset by each replay's last program)."""
    from mmfuse.kernels import cross_attention as KA

    monkeypatch.setattr(KA, "SPLIT_COMBINE", combine)
    seen, real = [], KA._arrival_counters
    monkeypatch.setattr(KA, "_arrival_counters",
                        lambda device, n: seen.append((KA._capturing(device), real(device, n))) or seen[-1][1])
    _replays_match(lambda q, k, v: mmfuse.cross_attention(q, k, v, _splits=4),
                   lambda: [_randn(1, 16, 64, 96), _randn(1, 4, 4964, 96), _randn(1, 4, 4964, 96)])
    assert all(not c.any() for c in KA._ARRIVALS.values())
    in_capture = [t for capturing, t in seen if capturing]
    if combine == "launch":
        assert not seen
    else:  # the capture merged in the kernel, on counters of its own (none of the cached sets)
        assert len(in_capture) == 1 and all(in_capture[0] is not c for c in KA._ARRIVALS.values())


def test_patch_embed_replays_bit_for_bit():
    w = torch.randn(1024, 3, 14, 14, device="cuda", dtype=torch.bfloat16) * 0.02
    b = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    pos = torch.randn(576, 1024, device="cuda", dtype=torch.bfloat16)
    _replays_match(lambda px: mmfuse.patch_embed(px, w, b, pos), lambda: [_randn(2, 3, 336, 336)])


def test_a_graphed_training_step_matches_the_direct_one():
    """Forward and backward of LLaVA's projector as a drop-in (``mmfuse.nn.MLPProjector``) through
    ``torch.cuda.make_graphed_callables``: outputs and every gradient equal the direct module's."""
    torch.manual_seed(0)
    module = mmfuse.nn.MLPProjector([1024, 4096, 4096]).cuda().to(torch.bfloat16)
    reference = mmfuse.nn.MLPProjector([1024, 4096, 4096]).cuda().to(torch.bfloat16)
    reference.load_state_dict(module.state_dict())
    x = torch.randn(577, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(module, (x,))
    module.zero_grad(set_to_none=True)  # (whatever the warm-up left)
    for _ in range(2):
        fresh = torch.randn_like(x).requires_grad_()
        direct_in = fresh.detach().clone().requires_grad_()
        out = graphed(fresh)
        want = reference(direct_in)
        g = torch.randn_like(out)
        out.backward(g)
        want.backward(g)
        assert torch.equal(out, want)
        assert torch.equal(fresh.grad, direct_in.grad)
        for p, q in zip(module.parameters(), reference.parameters()):
            assert torch.equal(p.grad, q.grad)
        module.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
