"""One training micro-step (``training_step``): noise and timesteps drawn for the global batch from the step's
seed, label dropout to the null class, noising, forward, loss, backward, clip and the optimizer/LR/EMA updates.
Import it to benchmark the real thing.

The noise and timesteps of micro-step k are drawn for the GLOBAL batch from a generator seeded by (seed, k) and
sliced per process, and so is the label-dropout mask (never the global RNG): a resumed run continues the same
trajectory, and N processes see exactly what one process with N times the batch sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import derive_seed
from .losses import compute_loss

__all__ = ["StepOutput", "draw_noise_and_timesteps", "drop_labels", "training_step"]


@dataclass
class StepOutput:
    loss: torch.Tensor  # detached mean loss of this process's micro-batch (float32, on device)
    grad_norm: torch.Tensor | None  # pre-clip global grad norm on optimizer steps, else None


def draw_noise_and_timesteps(x0, num_train_timesteps, step_seed, accelerator, importance_sampler=None):
    """Noise and timesteps for this process's slice of the global batch of one micro-step, drawn
    from a generator seeded by ``step_seed``. Returns (noise, timesteps, weights or None)."""
    local = x0.shape[0]
    start = accelerator.process_index * local
    total = local * accelerator.num_processes
    gen = torch.Generator(device=x0.device).manual_seed(step_seed)
    if importance_sampler is None:
        timesteps = torch.randint(0, num_train_timesteps, (total,), generator=gen, device=x0.device)
        weights = None
    else:
        timesteps, weights = importance_sampler.sample(total, device=x0.device, generator=gen)
        weights = weights[start : start + local]
    noise = torch.randn((total, *x0.shape[1:]), generator=gen, device=x0.device, dtype=torch.float32)
    return noise[start : start + local], timesteps[start : start + local], weights


def drop_labels(labels, null_class_id: int, class_dropout_prob: float, step_seed: int, accelerator):
    """This process's labels with each replaced by ``null_class_id`` with probability ``class_dropout_prob``:
    one uniform draw per example of the GLOBAL batch from a generator seeded by (``step_seed``, "labels"),
    sliced like the noise, so resuming and the number of processes do not change which labels drop."""
    if not class_dropout_prob:
        return labels
    local = labels.shape[0]
    start = accelerator.process_index * local
    gen = torch.Generator(device=labels.device).manual_seed(derive_seed(step_seed, "labels"))
    u = torch.rand(local * accelerator.num_processes, generator=gen, device=labels.device)[start : start + local]
    return torch.where(u < class_dropout_prob, torch.full_like(labels, null_class_id), labels)


def training_step(
    batch,
    unet,
    noise_scheduler,
    optimizer,
    lr_scheduler,
    accelerator,
    *,
    step_seed: int,
    loss_type: str = "simple",
    snr_gamma: float | None = None,
    max_grad_norm: float = 1.0,
    num_bins: int = 256,
    ema=None,
    importance_sampler=None,
    class_dropout_prob: float = 0.0,
) -> StepOutput:
    """One micro-step on ``batch["pixel_values"]`` (images in [-1, 1]), conditioned on ``batch["class_labels"]``
    when present (label dropout to the null class, the UNet's last class id: ``drop_labels``).

    Noising x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (docs/math.md eq. 16) and the loss are computed in
    float32 outside the model's autocast; under gradient accumulation the optimizer, LR scheduler
    (counted in optimizer steps) and EMA advance only when ``accelerator.sync_gradients``. No host
    synchronisation unless ``importance_sampler`` (vlb) must record the gathered losses.
    """
    x0 = batch["pixel_values"].to(torch.float32)
    noise, timesteps, weights = draw_noise_and_timesteps(
        x0, noise_scheduler.config.num_train_timesteps, step_seed, accelerator, importance_sampler
    )
    x_t = noise_scheduler.add_noise(x0, noise, timesteps)
    class_labels = batch.get("class_labels")
    if class_labels is not None:
        null_class_id = accelerator.unwrap_model(unet).config.num_class_embeds - 1
        class_labels = drop_labels(class_labels, null_class_id, class_dropout_prob, step_seed, accelerator)
    grad_norm = None
    with accelerator.accumulate(unet):
        model_output = unet(x_t, timesteps, class_labels=class_labels).sample.float()
        losses = compute_loss(
            noise_scheduler, model_output, x0, x_t, noise, timesteps,
            loss_type=loss_type, snr_gamma=snr_gamma, num_bins=num_bins,
        )  # fmt: skip
        loss = (losses * weights).mean() if weights is not None else losses.mean()
        accelerator.backward(loss)
        if accelerator.sync_gradients and max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(unet.parameters(), max_grad_norm)
        optimizer.step()
        if accelerator.sync_gradients:
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    if accelerator.sync_gradients and ema is not None:
        ema.step(unet.parameters())
    if importance_sampler is not None:
        all_t, all_losses = accelerator.gather((timesteps, losses.detach()))
        importance_sampler.update(all_t, all_losses)
    return StepOutput(loss=loss.detach(), grad_norm=grad_norm)
