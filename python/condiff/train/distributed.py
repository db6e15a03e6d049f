"""Process-group setup and model wrapping: single process, DDP, or FSDP2 (`fully_shard`).

Launch:
  * single process: `condiff train ...` (no torchrun variables; world size 1, no process group);
  * one node:  `torchrun --nproc_per_node=N -m condiff.train --config ...`;
  * many nodes: `torchrun --nnodes=M --nproc_per_node=N --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT
    --rdzv_id=JOB -m condiff.train ...` on every node (torchrun's rendezvous sets RANK / WORLD_SIZE /
    LOCAL_RANK / MASTER_ADDR / MASTER_PORT; we only read them).
Backend: NCCL when the device is CUDA, gloo on the CPU.

Wrapping (`wrap_model`): "ddp" replicates the model (gradients all-reduced); "fsdp" shards every
block and then the root with FSDP2 (`torch.distributed.fsdp.fully_shard`, parameters become DTensors;
optimizer state is sharded too), for models whose weights + Adam state do not fit one device.
Optional per-block activation checkpointing (recompute in backward) and torch.compile are applied
before wrapping. Blocks are found as the children of the model's `blocks` ModuleList(s) (DiT-style
naming: any attribute that is an nn.ModuleList of modules with parameters counts).
"""

from __future__ import annotations


import torch
import torch.distributed as dist
from torch import nn

# process group and collectives (re-exported: the trainer reaches everything distributed through this module)
from condiff.distributed import (DistInfo, all_gather_object, all_reduce_sum, barrier,  # noqa: F401
                                 broadcast_object, init, shutdown)


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer / UNet blocks: members of every nn.ModuleList attribute (recursively) whose
    entries hold parameters. These are the units of FSDP sharding and activation checkpointing."""
    blocks: list[nn.Module] = []
    for module in model.modules():
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                blocks.extend(b for b in child if any(True for _ in b.parameters()) and not isinstance(b, nn.ModuleList))
    # keep only outermost blocks (a block's own ModuleLists must not be wrapped twice)
    ids = {id(b) for b in blocks}
    nested = {id(m) for b in blocks for m in b.modules() if m is not b and id(m) in ids}
    return [b for b in blocks if id(b) not in nested]


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each block's activations in the backward pass (memory for compute). Returns the
    number of blocks wrapped. Parameter names are unchanged (forward is patched in place)."""
    from torch.utils.checkpoint import checkpoint

    blocks = find_blocks(model)
    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return len(blocks)


def wrap_model(model: nn.Module, info: DistInfo, parallel: str, *, mixed_bf16: bool = False) -> nn.Module:
    """Wrap `model` (already on info.device) for data-parallel training; returns the module to call.

    parallel: "none" | "ddp" | "fsdp" | "auto" (ddp when world > 1). With "fsdp" the model itself is
    sharded in place (the returned object is the same module); bf16 autocast is applied by the loop,
    FSDP2 keeps fp32 parameters and reduces gradients in fp32 (`mixed_bf16` casts the all-gathered
    parameters to bf16 and keeps fp32 reductions, the usual FSDP2 mixed-precision policy).
    """
    if parallel == "auto":
        parallel = "ddp" if info.enabled else "none"
    if parallel == "none" or (parallel == "ddp" and not info.enabled):
        return model
    if not info.enabled and parallel == "fsdp":
        # a 1-process FSDP2 is valid and useful for testing the code path; needs a process group
        raise RuntimeError("parallel=fsdp needs torchrun (a process group); use parallel=none for one process")
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_bf16 else MixedPrecisionPolicy()
        for block in find_blocks(model):
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    raise ValueError(f"parallel: expected none/ddp/fsdp/auto, got {parallel!r}")


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict of `model`, materialised on rank 0 only (other ranks get {}).
    Collective under FSDP2: every rank must call it (each tensor is all-gathered in turn)."""
    keep = is_main_process()
    out = {}
    for name, value in model.state_dict().items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        if keep:
            out[name] = value.detach().to("cpu")
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict into `model` (plain or FSDP2-sharded: each rank keeps its shard)."""
    from torch.distributed.tensor import distribute_tensor

    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name, target in own.items():
        src = state[name]
        if hasattr(target, "device_mesh"):
            target.copy_(distribute_tensor(src.to(target.device, target.dtype), target.device_mesh, target.placements))
        else:
            target.copy_(src.to(target.device, target.dtype))
