"""One view of the denoisers a pipeline may host: diffusers' ``UNet2DModel``, ``DiTTransformer2DModel`` and any
model whose config uses ``UNet2DModel``'s field names (``sample_size``, ``in_channels``, ``out_channels``,
``num_class_embeds``, ``class_embed_type``), such as an ADM UNet.

The sampling helpers of :mod:`.pipeline_ddpm_plus` read a UNet2DModel config and call
``model(x, t, class_labels=...).sample``; :func:`denoiser_config` and :class:`DenoiserCall` give them exactly that
for a DiT, whose config names its classes ``num_embeds_ada_norm`` (its label table has one more row, the null class
that label dropout trained, when built with dropout) and whose forward needs one timestep per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding


@dataclass(frozen=True)
class DenoiserConfig:
    """The fields of a denoiser's config that sampling needs, under ``UNet2DModel``'s names."""

    sample_size: int | tuple[int, int]
    in_channels: int
    out_channels: int
    num_class_embeds: int | None = None
    class_embed_type: str | None = None


@dataclass(frozen=True)
class NullClass:
    """A denoiser's built-in null class: its id and the label dropout it was trained with."""

    null_class_id: int
    class_dropout_prob: float


def denoiser_config(model) -> DenoiserConfig:
    """The :class:`DenoiserConfig` of a UNet2DModel-like model or a DiTTransformer2DModel (its class table
    counted with the null row, as ``num_class_embeds`` counts it for a ddpm_plus UNet)."""
    config = model.config
    if isinstance(model, DiTTransformer2DModel):
        label = _label_embedding(model)
        rows = label.embedding_table.num_embeddings if label is not None else config.num_embeds_ada_norm
        return DenoiserConfig(
            config.sample_size, config.in_channels, config.out_channels or config.in_channels, rows, None
        )
    missing = [k for k in ("sample_size", "in_channels") if getattr(config, k, None) is None]
    if missing:
        raise ValueError(
            f"denoiser {type(model).__name__} has no {missing} in its config: pass a UNet2DModel, a "
            "DiTTransformer2DModel or a model whose config uses UNet2DModel's field names."
        )
    return DenoiserConfig(
        config.sample_size,
        config.in_channels,
        getattr(config, "out_channels", None) or config.in_channels,
        getattr(config, "num_class_embeds", None),
        getattr(config, "class_embed_type", None),
    )


def builtin_null_class(model) -> NullClass | None:
    """The null class a DiT carries in its architecture (id ``num_embeds_ada_norm``, with its label dropout);
    None for other models and for a DiT built without label dropout."""
    label = _label_embedding(model) if isinstance(model, DiTTransformer2DModel) else None
    if label is None or not label.dropout_prob > 0:
        return None
    return NullClass(int(label.num_classes), float(label.dropout_prob))


def _label_embedding(model) -> LabelEmbedding | None:
    return next((m for m in model.modules() if isinstance(m, LabelEmbedding)), None)


class DenoiserCall:
    """``model(x, t, class_labels=...)`` with ``t`` (a number, 0-d or 1-element tensor) expanded to one timestep
    per sample, as a DiT needs (a UNet2DModel gives the same output either way)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None):
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(sample.shape[0]) if t.numel() == 1 else t
        return self.model(sample, t, class_labels=class_labels)
