"""One rank of tests/test_distributed.py: train a generated model for a few steps under DDP or FSDP2.

Run as `python distributed_worker.py RANK MODEL_FILE STATE_FILE DATA_FILE OUT_DIR PORT`, once per
rank (two processes, gloo backend, CPU); each trains every configuration on its half of each
batch, and rank 0 saves the first step's gradients and the final weights of each to OUT_DIR.
Not a test itself (no test_ prefix): the test runs it in a fresh process.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

WORLD = 2
STEPS = 2
LR, MOMENTUM = 0.1, 0.9
CONFIGS = [
    (wrapper, memory_efficient, bn)
    for wrapper in ("ddp", "fsdp")
    for memory_efficient in (False, True)
    for bn in ("train", "frozen")
]


def config_name(wrapper: str, memory_efficient: bool, bn: str) -> str:
    return f"{wrapper}-{'memeff' if memory_efficient else 'plain'}-{bn}"


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("generated_tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def freeze_bn(model: nn.Module) -> nn.Module:
    """Train mode, but every BatchNorm in eval mode: running statistics, no per-batch ones."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (FSDP2 shards parameters and gradients) or a tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(model: nn.Module, wrapped: nn.Module, batches: torch.Tensor, rank: int) -> dict:
    opt = torch.optim.SGD(wrapped.parameters(), lr=LR, momentum=MOMENTUM)
    grads = {}
    # -O1: whether its training path ran fused under the wrapper (None) or why not
    fused = getattr(model.features, "fused_reason", lambda x: "no fused path (-O0)")(batches[0])
    for step, batch in enumerate(batches):
        half = batch.shape[0] // WORLD
        out = wrapped(batch[rank * half : (rank + 1) * half])
        out.square().mean().backward()
        if step == 0:
            grads = {name: full(p.grad).detach().clone() for name, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    weights = {name: full(p).detach().clone() for name, p in model.named_parameters()}
    return {"grads": grads, "weights": weights, "fused": fused}


def run_rank(rank: int, model_file: str, state_file: str, data_file: str, out_dir: str, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    module = load_module(model_file)
    state = torch.load(state_file, weights_only=True)
    batches = torch.load(data_file, weights_only=True)
    out = Path(out_dir)
    for wrapper, memory_efficient, bn in CONFIGS:
        name = config_name(wrapper, memory_efficient, bn)
        model = module.DenseNet(memory_efficient=memory_efficient)
        model.load_state_dict(state, strict=True)
        freeze_bn(model) if bn == "frozen" else model.train()
        try:
            if wrapper == "ddp":
                wrapped = nn.parallel.DistributedDataParallel(model)
            else:
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard

                mesh = init_device_mesh("cpu", (WORLD,))
                for layer in [m for m in model.modules() if type(m).__name__.endswith("DenseLayer")]:
                    fully_shard(layer, mesh=mesh)
                wrapped = fully_shard(model, mesh=mesh)
            result = train(model, wrapped, batches, rank)
        except Exception as err:  # FSDP2 on CPU/gloo may not work in this torch: say why
            if rank == 0:
                why = "".join(traceback.format_exception_only(err)).strip().splitlines()[-1]
                (out / f"{name}.unsupported").write_text(why)
            dist.barrier()
            continue
        if rank == 0:
            torch.save(result, out / f"{name}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    rank, model_file, state_file, data_file, out_dir, port = sys.argv[1:7]
    run_rank(int(rank), model_file, state_file, data_file, out_dir, int(port))
