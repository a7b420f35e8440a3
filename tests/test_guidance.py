"""Classifier-free guidance and class labels in DDPMPlusPipeline and FastSampler: the guidance arithmetic
against a hand-made UNet whose conditional and null outputs are known, w = 1 as plain conditional sampling
(bit for bit, one UNet call per step), x0/v prediction and learned variances, any hosted diffusers
scheduler, labels by id or name, the clear errors (all before the first UNet call), and id2label/null id/
dropout round-tripping through save_pretrained/from_pretrained."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DModel,
)

from ddpm_plus import DDPMPlusPipeline, DDPMPlusScheduler
from ddpm_plus.pipelines.fast_sampling import FastSampler
from ddpm_plus.pipelines.pipeline_ddpm_plus import apply_guidance, guided_unet_output

NUM_CLASSES = 3
NAMES = {0: "zero", 1: "one", 2: "two"}
CLASSES = {"id2label": NAMES, "null_class_id": NUM_CLASSES, "class_dropout_prob": 0.1}


class KnownUNet(torch.nn.Module):
    """out(x, t, c) = 0.5 x + bias[c] (per class, per output channel), float64; records every call's labels.
    With ``out_channels = 2`` the second channel is a learned-variance output (``variance[c]``)."""

    def __init__(self, out_channels=1, same_for_all_classes=False, size=4):
        super().__init__()
        bias = torch.tensor([0.3, -0.2, 0.1, 0.05], dtype=torch.float64)  # classes 0, 1, 2 and the null class
        variance = torch.tensor([0.9, -0.9, 0.4, -0.4], dtype=torch.float64)
        if same_for_all_classes:
            bias, variance = bias[:1].expand(4).clone(), variance[:1].expand(4).clone()
        self.register_buffer("bias", bias)
        self.register_buffer("variance", variance)
        self.out_channels = out_channels
        self.calls = []
        self.config = SimpleNamespace(
            sample_size=size, in_channels=1, num_class_embeds=NUM_CLASSES + 1, class_embed_type=None
        )

    @property
    def dtype(self):
        return torch.float64

    @property
    def device(self):
        return self.bias.device

    def forward(self, x, t, class_labels=None):
        self.calls.append(class_labels.tolist())
        out = 0.5 * x + self.bias[class_labels].view(-1, 1, 1, 1)
        if self.out_channels == 2:
            out = torch.cat([out, self.variance[class_labels].view(-1, 1, 1, 1).expand_as(x)], dim=1)
        return SimpleNamespace(sample=out)


def known_pipe(scheduler=None, unet=None, **classes):
    pipe = DDPMPlusPipeline(
        unet=unet or KnownUNet(), scheduler=scheduler or DDPMPlusScheduler(), **{**CLASSES, **classes}
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_conditional_unet(num_class_embeds=NUM_CLASSES + 1, out_channels=1):
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=out_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        num_class_embeds=num_class_embeds,
    )


def run(pipe, steps=4, batch=3, seed=0, **kwargs):
    return pipe(
        batch_size=batch,
        generator=torch.Generator().manual_seed(seed),
        num_inference_steps=steps,
        output_type="pt",
        **kwargs,
    ).images


# ----------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("w", [0.0, 0.5, 2.0, 4.0, -1.0])
def test_guided_output_is_the_formula_in_one_call_of_2b(w):
    unet = KnownUNet()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    labels, nulls = torch.tensor([0, 1, 2]), torch.full((3,), NUM_CLASSES)
    out = guided_unet_output(unet, x, 10, labels, nulls, w, channels=1)
    assert unet.calls == [[0, 1, 2, NUM_CLASSES, NUM_CLASSES, NUM_CLASSES]]  # one call, batch 2B, [c, null]
    b = unet.bias
    expected = (0.5 * x + b[NUM_CLASSES]) + w * ((0.5 * x + b[labels].view(-1, 1, 1, 1)) - (0.5 * x + b[NUM_CLASSES]))
    assert torch.equal(out, expected)  # the same float64 operations, in the same order
    assert torch.allclose(out, 0.5 * x + (b[NUM_CLASSES] + w * (b[labels] - b[NUM_CLASSES])).view(-1, 1, 1, 1))


def test_learned_variance_guides_the_mean_only_and_keeps_the_conditional_variance():
    unet = KnownUNet(out_channels=2)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    out = guided_unet_output(unet, x, 10, labels, torch.full((3,), NUM_CLASSES), 3.0, channels=1)
    b, v = unet.bias, unet.variance
    assert out.shape == (3, 2, 4, 4)
    assert torch.allclose(out[:, :1], 0.5 * x + (b[NUM_CLASSES] + 3 * (b[labels] - b[NUM_CLASSES])).view(-1, 1, 1, 1))
    assert torch.equal(out[:, 1:], v[labels].view(-1, 1, 1, 1).expand_as(x))  # the conditional branch's


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_guiding_x0_or_v_equals_guiding_eps(prediction_type):
    """The documented choice: guide the UNet's own output. At fixed x_t, t the maps to and from eps are
    affine in the prediction (docs/math.md eqs. (33), (47)) and 1 - w + w = 1, so this is the same as
    converting both branches to eps, guiding and converting back."""
    s = DDPMPlusScheduler(prediction_type=prediction_type)
    t, w = 700, 3.0
    a = torch.as_tensor(s.alphas_cumprod[t], dtype=torch.float64).sqrt()
    b = (1 - a * a).sqrt()
    g = torch.Generator().manual_seed(0)
    x_t, cond, uncond = (torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    if prediction_type == "sample":  # eq. (33) and its inverse (32)
        to_eps, from_eps = (lambda p: (x_t - a * p) / b), (lambda e: (x_t - b * e) / a)
    else:  # eq. (47): eps = b x_t + a v, so v = (eps - b x_t) / a
        to_eps, from_eps = (lambda p: b * x_t + a * p), (lambda e: (e - b * x_t) / a)
    via_eps = from_eps(to_eps(uncond) + w * (to_eps(cond) - to_eps(uncond)))
    torch.testing.assert_close(apply_guidance(cond, uncond, w, 1), via_eps, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- w = 1 and the sampling loop


def test_w1_is_plain_conditional_sampling_bit_for_bit_with_one_call_per_step():
    unet = tiny_conditional_unet()
    guided = known_pipe(unet=unet)
    plain = DDPMPlusPipeline(unet=unet, scheduler=DDPMPlusScheduler())  # a conditional UNet, no null class
    plain.set_progress_bar_config(disable=True)
    calls = []
    hook = unet.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(kwargs["class_labels"].tolist()), with_kwargs=True
    )
    try:
        a = run(guided, class_labels=[0, 2, 1], guidance_scale=1.0)
        assert calls == [[0, 2, 1]] * 4  # once per step, the conditional batch only
        b = run(plain, class_labels=[0, 2, 1])
    finally:
        hook.remove()
    assert torch.equal(a, b)
    assert not torch.equal(a, run(guided, class_labels=[0, 2, 1], guidance_scale=3.0))


def test_guided_sampling_calls_the_unet_once_per_step_on_2b_and_differs_from_w1():
    pipe = known_pipe()
    images = run(pipe, class_labels=["two", "zero", "one"], guidance_scale=2.0)
    assert pipe.unet.calls == [[2, 0, 1, 3, 3, 3]] * 4
    assert images.shape == (3, 1, 4, 4)
    assert not torch.equal(images, run(pipe, class_labels=[2, 0, 1]))


@pytest.mark.parametrize(
    "scheduler_cls", [DDPMPlusScheduler, DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler]
)
def test_any_hosted_scheduler_guides(scheduler_cls):
    """With identical conditional and null outputs every w gives the w = 1 chain (up to rounding); with
    different ones guidance moves the samples."""
    scheduler = scheduler_cls.from_config(DDPMPlusScheduler(clip_sample=False).config)
    flat = known_pipe(scheduler=scheduler, unet=KnownUNet(same_for_all_classes=True))
    torch.testing.assert_close(
        run(flat, class_labels=1, guidance_scale=4.0), run(flat, class_labels=1), atol=1e-6, rtol=0
    )
    pipe = known_pipe(scheduler=scheduler_cls.from_config(DDPMPlusScheduler(clip_sample=False).config))
    assert not torch.allclose(run(pipe, class_labels=1, guidance_scale=4.0), run(pipe, class_labels=1))
    assert all(len(c) == 6 for c in pipe.unet.calls[: len(pipe.unet.calls) // 2])


@pytest.mark.parametrize("scheduler_cls", [DDPMPlusScheduler, DDIMScheduler])
def test_learned_variance_unet_samples_with_guidance(scheduler_cls):
    config = DDPMPlusScheduler(variance_type="learned_range").config
    pipe = known_pipe(scheduler=scheduler_cls.from_config(config), unet=KnownUNet(out_channels=2))
    images = run(pipe, class_labels=0, guidance_scale=3.0)
    assert images.shape == (3, 1, 4, 4) and torch.isfinite(images).all()


@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
@pytest.mark.parametrize("w", [1.0, 3.0])
def test_fast_sampler_matches_the_pipeline(variance_type, w):
    out_channels = 2 if variance_type == "learned_range" else 1
    unet = tiny_conditional_unet(out_channels=out_channels)
    pipe = known_pipe(unet=unet, scheduler=DDPMPlusScheduler(variance_type=variance_type))
    expected = run(pipe, class_labels=["one", "two", "zero"], guidance_scale=w)
    sampler = FastSampler(pipe, dtype=torch.float32, channels_last=False, cuda_graph=False)
    got = sampler(
        batch_size=3,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        class_labels=["one", "two", "zero"],
        guidance_scale=w,
        output_type="pt",
    ).images
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_fast_sampler_refuses_guidance_without_a_null_class():
    sampler = FastSampler(known_pipe(unet=tiny_conditional_unet(), class_dropout_prob=0.0), dtype=torch.float32)
    with pytest.raises(ValueError, match="class_dropout_prob=0"):
        sampler(batch_size=2, num_inference_steps=2, class_labels=0, guidance_scale=2.0)


# ----------------------------------------------------------------------------- labels and errors


def test_labels_by_name_or_id_one_per_image_or_one_for_the_batch():
    pipe = known_pipe()
    assert pipe.get_label_ids(["two", "zero"]) == [2, 0] and pipe.get_label_ids("one") == [1]
    by_name = run(pipe, class_labels=["two", "two", "two"])
    assert torch.equal(by_name, run(pipe, class_labels=2))
    assert torch.equal(by_name, run(pipe, class_labels="two"))
    assert torch.equal(by_name, run(pipe, class_labels=torch.tensor([2])))
    assert torch.equal(run(pipe, class_labels=["one", 0, "two"]), run(pipe, class_labels=[1, 0, 2]))


@pytest.mark.parametrize("sampler", ["pipeline", "fast"])
def test_class_labels_set_the_batch_size_when_none_is_given(sampler):
    """The README's ``pipe(class_labels=["3", "7"], guidance_scale=3.0)``: one image per label, no batch_size."""
    pipe = known_pipe()
    sample = pipe if sampler == "pipeline" else FastSampler(pipe, dtype=torch.float32)

    def call(**kwargs):
        generator = torch.Generator().manual_seed(0)
        return sample(num_inference_steps=3, generator=generator, output_type="pt", **kwargs).images

    by_labels = call(class_labels=["two", "zero"], guidance_scale=2.0)
    assert by_labels.shape[0] == 2
    assert torch.equal(by_labels, call(batch_size=2, class_labels=["two", "zero"], guidance_scale=2.0))
    assert call(class_labels=torch.tensor([1, 2, 0])).shape[0] == 3
    assert call(class_labels="one").shape[0] == 1  # one label and no batch size: one image
    latents = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    assert call(class_labels=1, latents=latents).shape[0] == 4  # the latents set it
    with pytest.raises(ValueError, match="one label per image"):
        call(class_labels=[0, 1], latents=latents)


@pytest.mark.parametrize(
    "pipe_kwargs, call_kwargs, match",
    [
        ({}, {"class_labels": ["three"]}, "unknown class name 'three'"),
        ({}, {"class_labels": [0, 5, 1]}, r"class id 5 is out of range: this model has 3 classes \(ids 0..2\)"),
        ({}, {"class_labels": [-1]}, "class id -1 is out of range"),
        ({}, {"class_labels": [3]}, "3 is the null class, sampled with guidance_scale=0"),
        ({}, {"class_labels": [0, 1]}, "one label per image"),
        ({}, {"class_labels": [0.5]}, "integer ids or class names"),
        ({}, {"class_labels": torch.tensor([1.0])}, "integer class ids"),
        ({}, {}, "class-conditional: pass `class_labels`"),
        ({}, {"class_labels": 0, "guidance_scale": float("nan")}, "finite"),
        ({"class_dropout_prob": 0.0}, {"class_labels": 0, "guidance_scale": 2.0}, "class_dropout_prob=0"),
        ({"null_class_id": None}, {"class_labels": 0, "guidance_scale": 2.0}, "needs a null class"),
        ({"id2label": None}, {"class_labels": "one"}, "stores no class names"),
    ],
)
def test_clear_errors_before_sampling_starts(pipe_kwargs, call_kwargs, match):
    unet = KnownUNet() if pipe_kwargs.get("null_class_id", 0) is not None else _unet_without_null()
    pipe = known_pipe(unet=unet, **pipe_kwargs)
    with pytest.raises(ValueError, match=match):
        run(pipe, **call_kwargs)
    assert unet.calls == []  # nothing was sampled


def _unet_without_null():
    unet = KnownUNet()
    unet.config.num_class_embeds = NUM_CLASSES  # a conditional UNet without a null class
    return unet


def test_guidance_on_an_unconditional_model_is_refused():
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
    )  # fmt: skip
    pipe = DDPMPlusPipeline(unet=unet, scheduler=DDPMPlusScheduler())
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        run(pipe, guidance_scale=2.0)
    with pytest.raises(ValueError, match="need a UNet with a class embedding"):
        DDPMPlusPipeline(unet=unet, scheduler=DDPMPlusScheduler(), **CLASSES)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"null_class_id": 2}, "num_class_embeds - 1 = 3"),
        ({"class_dropout_prob": 1.0}, r"\[0, 1\)"),
        ({"id2label": {0: "a", 5: "b"}}, r"ids \[5\] outside"),
        ({"id2label": {0: "a", 1: "a"}}, "unique"),
        ({"id2label": {"x": "a"}}, "integer class ids"),
    ],
)
def test_inconsistent_class_metadata_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        known_pipe(**kwargs)


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("loader", [DDPMPlusPipeline.from_pretrained, DiffusionPipeline.from_pretrained])
def test_names_ids_null_and_dropout_round_trip_through_save_pretrained(tmp_path, loader):
    pipe = known_pipe(unet=tiny_conditional_unet())
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    loaded = loader(tmp_path)
    assert type(loaded) is DDPMPlusPipeline
    assert loaded.conditioning == pipe.conditioning
    assert loaded.config.id2label == {"0": "zero", "1": "one", "2": "two"}
    assert (loaded.config.null_class_id, loaded.config.class_dropout_prob) == (3, 0.1)
    assert loaded.get_label_ids(["two", "one"]) == [2, 1]
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(
        run(loaded, class_labels="two", guidance_scale=2.0), run(pipe, class_labels=2, guidance_scale=2.0)
    )


def test_unconditional_pipeline_writes_no_class_keys(tmp_path):
    import json

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
    )  # fmt: skip
    DDPMPlusPipeline(unet=unet, scheduler=DDPMPlusScheduler()).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert not {"id2label", "null_class_id", "class_dropout_prob"} & index.keys()
