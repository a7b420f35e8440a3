"""Full (unsharded) weights of a model trained with FSDP2, for what must see the whole model on one process:
the saved pipeline and the sample grids. With FSDP (accelerate's ``fsdp_version: 2`` or torch's ``fully_shard``)
every parameter is a ``DTensor`` shard; diffusers' ``save_pretrained`` would write the local shard only, and a
forward pass on the main process alone would wait forever for the other ranks' all-gathers. Every rank calls
:func:`unsharded_copy`; the main process gets a plain copy of the model (EMA weights when asked), the others None.
Unsharded models (one process, DDP) are returned as they are: nothing is copied.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def unsharded_copy(model: torch.nn.Module, ema=None, *, main_process: bool = True) -> torch.nn.Module | None:
    """The model with its full weights (``ema``'s shadow weights when given), as a new unsharded module of the
    same class on the main process; the model itself when it is not sharded (``ema`` applied by the caller)."""
    if not is_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    try:
        state = get_model_state_dict(model, options=options)  # a collective: every rank takes part
    finally:
        if ema is not None:
            ema.restore(model.parameters())
    if not main_process:
        return None
    copy = type(model).from_config(model.config)
    copy.load_state_dict(state)
    return copy.eval()


def main_process_model(model: torch.nn.Module, ema, accelerator):
    """(model, ema) for what the main process alone samples or saves: under FSDP a gathered unsharded copy that
    holds the EMA weights (every rank must call this, it is a collective) with no EMA left to apply; else the
    model and its EMA as they are."""
    if not is_sharded(model):
        return model, ema
    return unsharded_copy(model, ema, main_process=accelerator.is_main_process), None
