"""Classifier guidance (Dhariwal & Nichol 2021) in DDPMPlusPipeline, against float64 chains written out here:
Algorithm 1 (ancestral: x_prev = μ + Σ·s∇log p(y|x_t) + σz) and Algorithm 2 (DDIM: ε̂ − √(1−ᾱ)·s∇log p),
for a linear classifier whose ∇ log p(y|x) = w_y − Σ_k p_k w_k is known in closed form; composition with
classifier-free guidance; an unconditional model steered by the classifier alone; errors before any model call."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ddpm_plus import DDPMPlusPipeline, DDPMPlusScheduler
from ddpm_plus.pipelines.classifier_guidance import shift_prediction_by_score

SIZE, CLASSES, T = 4, 3, 10


class LinearClassifier(torch.nn.Module):
    """logits = W·vec(x): ∇_x log softmax(W x)_y = w_y − Σ_k softmax_k w_k (no dependence on t)."""

    def __init__(self, classes=CLASSES, size=SIZE):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.weight = torch.nn.Parameter(torch.randn(classes, size * size, generator=g, dtype=torch.float64) * 0.5)
        self.config = SimpleNamespace(num_classes=classes, image_size=size)
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return x.flatten(1) @ self.weight.T

    def score(self, x, labels):
        p = torch.softmax(x.flatten(1) @ self.weight.T, dim=-1)
        return (self.weight[labels] - p @ self.weight).view_as(x)


class EpsModel(torch.nn.Module):
    """ε(x, t) = 0.3·x + 0.01·t (float64), optionally class-conditional (adds 0.1·c) with a null class."""

    def __init__(self, conditional=False):
        super().__init__()
        self.register_buffer("anchor", torch.zeros((), dtype=torch.float64))
        classes = CLASSES + 1 if conditional else None
        self.config = SimpleNamespace(
            sample_size=SIZE, in_channels=1, out_channels=1, num_class_embeds=classes, class_embed_type=None
        )
        self.calls = 0

    @property
    def dtype(self):
        return torch.float64

    @property
    def device(self):
        return self.anchor.device

    def forward(self, x, t, class_labels=None):
        self.calls += 1
        out = 0.3 * x + 0.01 * torch.as_tensor(t, dtype=torch.float64)
        if class_labels is not None:
            out = out + 0.1 * class_labels.to(torch.float64).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=out)


def pipe_with(scheduler, conditional=False):
    classes = {"id2label": {0: "a", 1: "b", 2: "c"}, "null_class_id": CLASSES, "class_dropout_prob": 0.1}
    pipe = DDPMPlusPipeline(unet=EpsModel(conditional), scheduler=scheduler, **(classes if conditional else {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def final_latents(pipe, **kwargs):
    seen = {}

    def keep(_pipe, i, t, tensors):
        seen["x"] = tensors["latents"]
        return tensors

    pipe(generator=torch.Generator().manual_seed(0), output_type="pt", callback_on_step_end=keep, **kwargs)
    return seen["x"]


def reference_chain(betas, timesteps, eps_fn, score_fn, ancestral, batch):
    """The guided chain by hand in float64 from the β table: Algorithm 1 or 2 of Dhariwal & Nichol 2021."""
    alphas_bar = torch.cumprod(1 - betas.to(torch.float64), 0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, SIZE, SIZE, generator=g, dtype=torch.float64)
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        ab, ab_prev = alphas_bar[t], (alphas_bar[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64))
        eps, grad = eps_fn(x, t), score_fn(x)
        if ancestral:
            x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
            beta = 1 - ab / ab_prev
            mean = beta * ab_prev.sqrt() / (1 - ab) * x0 + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * x
            var = beta * (1 - ab_prev) / (1 - ab)  # β̃ (0 at the last step)
            x = mean + var * grad
            if prev >= 0:
                x = x + var.sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
        else:
            eps = eps - (1 - ab).sqrt() * grad
            x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
            x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    return x


@pytest.mark.parametrize("ancestral", [True, False], ids=["algorithm1_ancestral", "algorithm2_ddim"])
@pytest.mark.parametrize("steps", [T, 4])
def test_guided_chain_matches_the_algorithms_in_float64(ancestral, steps):
    scheduler = DDPMPlusScheduler(num_train_timesteps=T, clip_sample=False, eta=1.0 if ancestral else 0.0)
    pipe, clf = pipe_with(scheduler), LinearClassifier()
    labels, scale = [0, 2, 1], 2.5
    got = final_latents(pipe, num_inference_steps=steps, class_labels=labels, classifier=clf, classifier_scale=scale)
    ids = torch.tensor(labels)
    expected = reference_chain(
        scheduler.betas,
        scheduler.timesteps.tolist(),
        lambda x, t: 0.3 * x + 0.01 * t,
        lambda x: scale * clf.score(x, ids),
        ancestral,
        batch=3,
    )
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    unguided = final_latents(pipe, num_inference_steps=steps, batch_size=3)
    assert (got - unguided).abs().max() > 1e-2  # the classifier moved the samples


def test_guidance_moves_samples_towards_the_class():
    scheduler = DDPMPlusScheduler(num_train_timesteps=T, clip_sample=False)
    pipe, clf = pipe_with(scheduler), LinearClassifier()
    plain = final_latents(pipe, num_inference_steps=T, batch_size=64)
    shares = [(clf(plain, None).argmax(-1) == 1).double().mean().item()]
    for scale in (4.0, 10.0, 20.0):
        x = final_latents(pipe, num_inference_steps=T, class_labels=[1] * 64, classifier=clf, classifier_scale=scale)
        shares.append((clf(x, None).argmax(-1) == 1).double().mean().item())
    assert shares == sorted(shares) and shares[0] < 0.5 and shares[-1] > 0.9, shares  # more scale, more class 1


def test_composes_with_classifier_free_guidance_and_ddim_scheduler():
    """A conditional model with w = 2: the guided output ε_null + w(ε_c − ε_null), then Algorithm 2 on it; a
    diffusers DDIMScheduler gets Algorithm 2 too."""
    scheduler = DDIMScheduler(num_train_timesteps=T, clip_sample=False, beta_schedule="linear", set_alpha_to_one=True)
    pipe, clf = pipe_with(scheduler, conditional=True), LinearClassifier()
    labels, w, scale = [2, 0], 2.0, 1.5
    got = final_latents(
        pipe, num_inference_steps=T, class_labels=labels, guidance_scale=w, classifier=clf, classifier_scale=scale
    )
    ids = torch.tensor(labels, dtype=torch.float64).view(-1, 1, 1, 1)

    def guided_eps(x, t):
        null = 0.3 * x + 0.01 * t + 0.1 * CLASSES
        return null + w * (0.3 * x + 0.01 * t + 0.1 * ids - null)

    expected = reference_chain(
        scheduler.betas, scheduler.timesteps.tolist(), guided_eps, lambda x: scale * clf.score(x, torch.tensor(labels)),
        ancestral=False, batch=2,
    )  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["sample", "v_prediction"])
def test_algorithm2_shift_in_x0_and_v_parameterisations_equals_the_epsilon_shift(kind):
    """δx̂_0 = (b²/a)·g and δv = −(b/a)·g are the ε̂ − b·g shift seen through eqs. (32) and (47)."""
    g = torch.Generator().manual_seed(0)
    x_t, eps, score = (torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    ab = 0.37
    a, b = math.sqrt(ab), math.sqrt(1 - ab)
    to_kind = {"sample": lambda e: (x_t - b * e) / a, "v_prediction": lambda e: a * e - b * (x_t - b * e) / a}[kind]
    shifted = shift_prediction_by_score(to_kind(eps), score, ab, kind, channels=1)
    torch.testing.assert_close(shifted, to_kind(eps - b * score), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "make, kwargs, match",
    [
        (lambda: LinearClassifier(classes=5), {"class_labels": [0]}, "classifier` has 5 classes but the model has 3"),
        (lambda: LinearClassifier(size=8), {"class_labels": [0]}, r"takes \(8, 8\) images but the model samples"),
        (LinearClassifier, {}, "needs `class_labels`"),
        (LinearClassifier, {"class_labels": [7]}, "out of range"),
        (LinearClassifier, {"class_labels": [0], "classifier_scale": float("nan")}, "finite"),
        (lambda: torch.nn.Linear(2, 2), {"class_labels": [0]}, "config naming its classes"),
        (lambda: None, {"classifier_scale": 3.0}, "needs a `classifier`"),
    ],
)
def test_errors_before_any_model_call(make, kwargs, match):
    pipe = pipe_with(DDPMPlusScheduler(num_train_timesteps=T))
    conditional = pipe_with(DDPMPlusScheduler(num_train_timesteps=T), conditional=True)
    target = conditional if "has 5 classes" in match else pipe
    with pytest.raises(ValueError, match=match):
        target(num_inference_steps=2, classifier=make(), **kwargs)
    assert target.unet.calls == 0


def test_diffusers_ddpm_scheduler_is_refused_with_a_reason():
    pipe = pipe_with(DDPMScheduler(num_train_timesteps=T))
    with pytest.raises(ValueError, match="DDPMPlusScheduler"):
        pipe(num_inference_steps=2, class_labels=[0], classifier=LinearClassifier())
    assert pipe.unet.calls == 0
