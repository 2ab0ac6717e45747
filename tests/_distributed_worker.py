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


def worker(rank, world, port, mode, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = build_model()
        if mode == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for sub in model:
                fully_shard(sub)
            wrapped = fully_shard(model)
        wrapped(batch(rank)).square().mean().backward()
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad
            if hasattr(g, "full_tensor"):  # FSDP2 keeps a DTensor shard: gather the full gradient
                g = g.full_tensor()
            grads[name] = g.detach().clone()
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ddp", "fsdp2"], required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(2, port, args.mode, args.out), nprocs=2, join=True, start_method="spawn")
