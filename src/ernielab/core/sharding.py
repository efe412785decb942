"""FSDP2 for the engine: shard parameters, gradients and optimizer state across processes.

accelerate (1.16) applies its FSDP plugin only on accelerator back-ends, so on CPU/gloo it silently falls back
to DDP. The engine therefore calls torch's `fully_shard` itself, as torchtitan does: each unit the task names
(the transformer blocks) is sharded, then the root, so a block's weights are gathered only while it runs.
Checkpoints stay the same safetensors files as unsharded runs: full tensors are gathered before saving, and
a sharded run's weights load into an unsharded model (export, `ernielab image export`, inference) unchanged.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

MIXED_PRECISION_DTYPES = {"no": None, "bf16": torch.bfloat16}


def default_units(model: nn.Module) -> list[nn.Module]:
    """The elements of the model's top-level ModuleLists (its blocks): one all-gather per block."""
    return [m for child in model.children() if isinstance(child, nn.ModuleList) for m in child]


def shard(model: nn.Module, units: list[nn.Module], mixed_precision: str = "no") -> nn.Module:
    """Shard `units` and then the root in place. bf16 computes in bf16 and reduces gradients in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mixed_precision not in MIXED_PRECISION_DTYPES:
        raise ValueError(f"fsdp supports mixed_precision 'no' or 'bf16', not {mixed_precision!r}")
    dtype = MIXED_PRECISION_DTYPES[mixed_precision]
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    # The root returns a view (the unpatchified image); FSDP2 warns in case the caller edits it in place,
    # which the engine's tasks never do.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for unit in units:
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of an unsharded model whose parameters live on the meta device (no memory), taken before
    sharding: the shell the gathered weights are loaded into at export. Buffers are copied as they are
    (non-persistent ones such as RoPE tables are not in a state dict)."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def full_tensor(value):
    """A DTensor's full value (a collective: every process must call it), anything else unchanged."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def shard_like(full: torch.Tensor, like):
    """`full` split across processes as the DTensor `like` is (each process passes the same full tensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements)


def full_model_state(model: nn.Module, to_cpu: bool = True) -> dict[str, torch.Tensor]:
    """The full state dict (a collective). With `to_cpu`, only rank 0 receives it (the others an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=to_cpu))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name, gathered on rank 0 (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a name-keyed full optimizer state (every process read it from the checkpoint) into the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not isinstance(state.get("state"), dict) or any(not isinstance(k, str) for k in state["state"]):
        raise ValueError("this checkpoint's optimizer state was saved by an unsharded run; resume it with fsdp off, "
                         "or start the sharded run from its weights (branch_from or init_from)")
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def unsharded(template: nn.Module, sharded: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """An ordinary module holding the sharded model's current weights, on every process (a collective)."""
    state = full_model_state(sharded, to_cpu=False)
    plain = copy.deepcopy(template).to_empty(device=device)
    for name, buffer in template.named_buffers():  # to_empty dropped the buffers' values; put them back
        plain.get_buffer(name).copy_(buffer)
    plain.load_state_dict({k: v.detach() for k, v in state.items()})
    return plain
