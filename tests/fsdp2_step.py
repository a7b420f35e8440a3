"""Two training steps of a tiny UNet2DModel with ddpm_plus' loss and diffusers' EMAModel, either plainly (one
process, the global batch) or sharded with torch's FSDP2 ``fully_shard`` over a CPU device mesh (gloo; run
under ``torchrun``), each rank taking its slice of the global batch. Writes the full (gathered) weights and EMA
weights as safetensors. Used by tests/test_fsdp2_cpu.py."""

from __future__ import annotations

import sys

import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file

from ddpm_plus import DDPMPlusScheduler
from ddpm_plus.trainer.full_weights import is_sharded, unsharded_copy
from ddpm_plus.trainer.losses import compute_loss

GLOBAL_BATCH = 8
STEPS = 2  # EMAModel's first update copies the weights; the second averages (decay 0.5)


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=2, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip


def global_batch(scheduler: DDPMPlusScheduler):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(GLOBAL_BATCH, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (GLOBAL_BATCH,), generator=g)
    return x0, noise, t


def step(model, scheduler, x0, noise, t, optimizer, ema) -> None:
    x_t = scheduler.add_noise(x0, noise, t)
    out = model(x_t, t).sample
    compute_loss(scheduler, out, x0, x_t, noise, t, loss_type="hybrid").mean().backward()
    optimizer.step()
    ema.step(model.parameters())


def main(mode: str, out_path: str) -> None:
    scheduler = DDPMPlusScheduler(num_train_timesteps=50, variance_type="learned_range")
    model = tiny_unet()
    x0, noise, t = global_batch(scheduler)
    rank = 0
    if mode == "fsdp2":
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        mesh = init_device_mesh("cpu", (world,))
        for block in [*model.down_blocks, model.mid_block, *model.up_blocks]:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        x0, noise, t = (v.chunk(world)[rank] for v in (x0, noise, t))
    # SGD: the update is the gradient itself (Adam would amplify float rounding in near-zero gradients to ±lr)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = EMAModel(model.parameters(), decay=0.5, min_decay=0.5, update_after_step=0, use_ema_warmup=False)
    for _ in range(STEPS):
        step(model, scheduler, x0, noise, t, optimizer, ema)
    if mode == "fsdp2":
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=options)
        # the trainer's helper for the saved pipeline: a plain copy with the EMA weights on rank 0
        copy = unsharded_copy(model, ema, main_process=rank == 0)
        ema_weights = copy.state_dict() if copy is not None else None
        assert is_sharded(model) and (copy is None or not is_sharded(copy))
        dist.destroy_process_group()
    else:
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}  # copy_to writes in place
        ema.copy_to(model.parameters())
        ema_weights = model.state_dict()
    if rank == 0:
        tensors = {f"model.{k}": v.contiguous() for k, v in weights.items()}
        tensors.update({f"ema.{k}": v.contiguous() for k, v in ema_weights.items()})
        save_file(tensors, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
