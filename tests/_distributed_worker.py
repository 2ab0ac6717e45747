"""Run by tests/test_compile_autocast_distributed.py as a script: two gloo processes on CPU train one
step of a model built from mmfuse layers under DDP or FSDP2 and save rank 0's full gradients."""

import argparse
import os
import socket

os.environ["TRITON_INTERPRET"] = "1"  # before mmfuse is imported, here and in the spawned children

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import mmfuse  # noqa: E402


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(mmfuse.nn.MLPProjector((16, 32, 24)), mmfuse.nn.Linear(24, 8, activation="gelu_tanh"))


def batch(rank):
    return torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(100 + rank))


class VisionToText(nn.Module):
    """A tiny transformers vision embedding + LLaVA-NeXT projector: what mmfuse.patch swaps."""

    def __init__(self):
        super().__init__()
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig
        from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings
        from transformers.models.llava_next.modeling_llava_next import LlavaNextMultiModalProjector

        vision = CLIPVisionConfig(hidden_size=16, image_size=28, patch_size=14, num_attention_heads=2)
        text = LlamaConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
        self.embeddings = CLIPVisionEmbeddings(vision)
        self.projector = LlavaNextMultiModalProjector(LlavaNextConfig(vision_config=vision, text_config=text))

    def forward(self, pixels):
        return self.projector(self.embeddings(pixels))


def build_hf_model():
    torch.manual_seed(0)
    return VisionToText()


def hf_batch(rank):
    return torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(100 + rank))


def meta_init_fsdp2(full_state):
    """The big-model flow: build on meta, mmfuse.patch, fully_shard, to_empty, load the weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        model = VisionToText()
    report = mmfuse.patch(model)
    assert len(report.swapped) == 2, str(report)
    fully_shard(model.embeddings)
    fully_shard(model.projector)
    fully_shard(model)
    model.to_empty(device="cpu")
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True))
    with torch.no_grad():  # non-persistent buffer: re-initialised as transformers' _init_weights does
        model.embeddings.position_ids.copy_(torch.arange(model.embeddings.position_ids.numel())[None])
    return model


def worker(rank, world, port, modes, out_dir):
    """Each mode in turn in one process group (one spawn for all: the two processes' start-up, torch
    and transformers imports, is most of each mode's time); rank 0 saves ``out_dir/<mode>.pt``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for mode in modes:
            run_mode(rank, mode, os.path.join(out_dir, f"{mode}.pt"))
            # Both ranks leave each mode together: a rank tearing gloo down while the other is still
            # saving aborted once under load ("terminate called without an active exception", DDP).
            dist.barrier()
    finally:
        dist.destroy_process_group()


def run_mode(rank, mode, out):
    """One DDP / FSDP2 / FSDP2-from-meta training step; rank 0 saves the full gradients to ``out``."""
    if mode == "fsdp2-meta":
        model = wrapped = meta_init_fsdp2(build_hf_model().state_dict())
        data = hf_batch(rank)
    else:
        model = build_model()
        data = batch(rank)
    if mode == "fsdp2-meta":
        pass
    elif mode == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for sub in model:
            fully_shard(sub)
        wrapped = fully_shard(model)
    wrapped(data).square().mean().backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        if hasattr(g, "full_tensor"):  # FSDP2 keeps a DTensor shard: gather the full gradient
            g = g.full_tensor()
        grads[name] = g.detach().clone()
    if rank == 0:
        torch.save(grads, out)


if __name__ == "__main__":
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", default="ddp,fsdp2,fsdp2-meta", help="comma-separated: ddp, fsdp2, fsdp2-meta")
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args()
    modes = args.modes.split(",")
    if not set(modes) <= {"ddp", "fsdp2", "fsdp2-meta"}:
        parser.error(f"--modes: expected ddp, fsdp2, fsdp2-meta, got {args.modes!r}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(2, port, modes, args.out_dir), nprocs=2, join=True, start_method="spawn")
