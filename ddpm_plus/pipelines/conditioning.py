"""Class conditioning of a pipeline (ids, names, null class, label dropout) and classifier-free guidance
(Ho & Salimans 2022): with guidance scale w the model output is out(x, null) + w·(out(x, c) − out(x, null)), from
one UNet call on the batch [x, x] with labels [c, null]."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Conditioning(NamedTuple):
    """A pipeline's class conditioning. ``num_classes`` is None for an unconditional UNet, and for class
    embeddings that take no ids (``class_embed_type`` "timestep"/"identity"): labels are then not checked."""

    conditional: bool
    num_classes: int | None
    id2label: dict[str, str] | None  # keys: the ids as strings (as JSON stores them)
    null_class_id: int | None
    class_dropout_prob: float | None


def is_class_conditional(unet_config) -> bool:
    """Whether a UNet with this config takes ``class_labels`` (a class embedding of any kind)."""
    return (
        getattr(unet_config, "num_class_embeds", None) is not None
        or getattr(unet_config, "class_embed_type", None) is not None
    )


def _embeds_ids(unet_config) -> bool:
    return unet_config.class_embed_type is None and unet_config.num_class_embeds is not None


def check_conditioning(unet_config, id2label, null_class_id, class_dropout_prob) -> Conditioning:
    """Validate a pipeline's class metadata against its UNet; returns it normalised (``id2label`` keys as
    strings, ordered by id)."""
    if not _embeds_ids(unet_config):
        raise ValueError(
            "`id2label`, `null_class_id` and `class_dropout_prob` need a UNet with a class embedding "
            "(num_class_embeds set, class_embed_type None)."
        )
    embeds = int(unet_config.num_class_embeds)
    if null_class_id is not None and (isinstance(null_class_id, bool) or null_class_id != embeds - 1):
        raise ValueError(
            f"`null_class_id` must be the UNet's last class id, num_class_embeds - 1 = {embeds - 1}; got {null_class_id!r}."
        )
    num_classes = embeds if null_class_id is None else embeds - 1
    if class_dropout_prob is not None and not (
        isinstance(class_dropout_prob, (int, float)) and 0 <= class_dropout_prob < 1
    ):
        raise ValueError(f"`class_dropout_prob` must be in [0, 1); got {class_dropout_prob!r}.")
    names = None
    if id2label is not None:
        try:
            ids = {int(k): str(v) for k, v in dict(id2label).items()}
        except (TypeError, ValueError):
            raise ValueError(f"`id2label` must map integer class ids to names; got {id2label!r}.") from None
        bad = sorted(i for i in ids if not 0 <= i < num_classes)
        if bad:
            raise ValueError(f"`id2label` has ids {bad} outside the {num_classes} classes 0..{num_classes - 1}.")
        if len(set(ids.values())) != len(ids):
            raise ValueError("`id2label` names must be unique (a name must resolve to one class id).")
        names = {str(i): ids[i] for i in sorted(ids)}
    dropout = None if class_dropout_prob is None else float(class_dropout_prob)
    return Conditioning(True, num_classes, names, null_class_id, dropout)


def conditioning_of(pipe) -> Conditioning:
    """The :class:`Conditioning` of ``pipe`` (its UNet's class embedding and the metadata in its config)."""
    unet_config = pipe.unet.config
    config = getattr(pipe, "config", {}) or {}
    if not _embeds_ids(unet_config):
        conditional = unet_config.class_embed_type is not None
        return Conditioning(conditional, None, None, None, None)
    null = config.get("null_class_id")
    embeds = int(unet_config.num_class_embeds)
    return Conditioning(
        True, embeds if null is None else embeds - 1, config.get("id2label"), null, config.get("class_dropout_prob")
    )


def label_id(label, conditioning: Conditioning) -> int:
    """One class label (an id, or a name of ``id2label``) as a checked class id."""
    n = conditioning.num_classes
    if isinstance(label, str):
        names = {v: int(k) for k, v in (conditioning.id2label or {}).items()}
        if not names:
            raise ValueError(f"class name {label!r} given, but this pipeline stores no class names (`id2label`).")
        if label not in names:
            raise ValueError(f"unknown class name {label!r}; the classes are {sorted(names, key=names.get)}.")
        return names[label]
    if isinstance(label, bool) or not isinstance(label, int):
        raise ValueError(f"class labels must be integer ids or class names; got {label!r}.")
    if n is not None and not 0 <= label < n:
        null = conditioning.null_class_id
        note = (
            f"; {null} is the null class, sampled with guidance_scale=0" if null is not None and label == null else ""
        )
        raise ValueError(f"class id {label} is out of range: this model has {n} classes (ids 0..{n - 1}){note}.")
    return label


def labels_tensor(class_labels, batch_size: int, device, conditioning: Conditioning | None = None):
    """``class_labels`` (ids or names; one per image, or one for the batch) as a 1-D id tensor on ``device``
    (None stays None); ids are checked against ``conditioning``'s classes when it knows them."""
    if class_labels is None:
        return None
    conditioning = conditioning or Conditioning(True, None, None, None, None)
    if torch.is_tensor(class_labels):
        if class_labels.dtype.is_floating_point or class_labels.dtype.is_complex or class_labels.dtype == torch.bool:
            raise ValueError(f"`class_labels` must be integer class ids; got a {class_labels.dtype} tensor.")
        items = class_labels.reshape(-1).tolist()
    elif isinstance(class_labels, (str, int)):
        items = [class_labels]
    else:
        items = list(class_labels)
        items = [x.item() if torch.is_tensor(x) or hasattr(x, "dtype") else x for x in items]
    ids = [label_id(x, conditioning) for x in items]
    if len(ids) == 1:
        ids = ids * batch_size
    if len(ids) != batch_size:
        raise ValueError(
            f"`class_labels` must hold one label per image (batch_size={batch_size}) or one for the batch; "
            f"got {len(ids)}."
        )
    return torch.tensor(ids, dtype=torch.long, device=device)


def guidance_labels(conditioning: Conditioning, class_labels, batch_size: int, guidance_scale, device):
    """Check ``class_labels`` and ``guidance_scale`` before sampling; returns (labels, null labels), the
    null labels None when the UNet is called once per step (w = 1, or an unconditional model)."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise ValueError(f"`guidance_scale` must be a number; got {guidance_scale!r}.")
    if not math.isfinite(guidance_scale):
        raise ValueError(f"`guidance_scale` must be finite; got {guidance_scale!r}.")
    labels = labels_tensor(class_labels, batch_size, device, conditioning)
    if guidance_scale == 1:
        return labels, None
    if not conditioning.conditional:
        raise ValueError(
            f"`guidance_scale`={guidance_scale} needs a class-conditional model; this UNet has no class embedding."
        )
    if conditioning.null_class_id is None:
        raise ValueError(
            f"`guidance_scale`={guidance_scale} needs a null class, and this pipeline has none (`null_class_id` "
            "is not set: it was not trained for classifier-free guidance, e.g. by ddpm_plus --class_conditional). "
            "Sample it with guidance_scale=1."
        )
    if not conditioning.class_dropout_prob:
        raise ValueError(
            f"`guidance_scale`={guidance_scale} needs a model trained with label dropout, but this one was trained "
            "with class_dropout_prob=0: its null class never saw training. Sample it with guidance_scale=1."
        )
    return labels, torch.full_like(labels, conditioning.null_class_id)


def apply_guidance(conditional: torch.Tensor, unconditional: torch.Tensor, guidance_scale: float, channels: int):
    """out(null) + w (out(c) - out(null)) on the first ``channels`` channels (the prediction); any further
    channels (learned variances) are the conditional branch's. In at least float32."""
    dtype = torch.promote_types(conditional.dtype, torch.float32)
    cond, uncond = conditional[:, :channels].to(dtype), unconditional[:, :channels].to(dtype)
    guided = uncond + guidance_scale * (cond - uncond)
    if conditional.shape[1] == channels:
        return guided
    return torch.cat([guided, conditional[:, channels:].to(dtype)], dim=1)


def guided_unet_output(unet, model_input, t, class_labels, null_labels, guidance_scale, channels: int):
    """The UNet output for ``class_labels``, guided when ``null_labels`` is given: one call on the batch
    [x, x] with labels [c, null] (2B), then :func:`apply_guidance`. Without null labels, one plain call."""
    if null_labels is None:
        return unet(model_input, t, class_labels=class_labels).sample
    both = unet(torch.cat([model_input, model_input]), t, class_labels=torch.cat([class_labels, null_labels])).sample
    conditional, unconditional = both.chunk(2)
    return apply_guidance(conditional, unconditional, guidance_scale, channels)
