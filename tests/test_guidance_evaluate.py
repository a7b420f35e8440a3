"""`ddpm-plus evaluate` on a class-conditional pipeline: class-balanced samples at --guidance_scale, the share
classified as the requested digit, -log p(x|c) with each held-out digit's own label, and clear errors (before
the bound runs) for guidance a pipeline cannot do."""

import json

import pytest
import torch
from diffusers import UNet2DModel

import ddpm_plus  # noqa: F401
from ddpm_plus import DDPMPlusPipeline, DDPMPlusScheduler, cli
from ddpm_plus.data import digits_heldout_tensor, load_digits_arrays
from ddpm_plus.evaluation import bound
from ddpm_plus.evaluation.digits_proxy import class_accuracy, classify, load_or_train_digits_classifier
from ddpm_plus.evaluation.likelihood import _WithClassLabel, conditional_vlb_terms, vlb_terms
from ddpm_plus.evaluation.metrics_table import card_rows
from ddpm_plus.evaluation.options import bound_timesteps

# the bound is recomputed here and compared to 1e-9: the same thread count as the CLI's CPU default (1 here)
pytestmark = pytest.mark.usefixtures("one_thread")


def _save(path, num_classes=10, dropout=0.1, names=None):
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4,
        num_class_embeds=num_classes + 1,
    )  # fmt: skip
    sched = DDPMPlusScheduler(num_train_timesteps=20, beta_start=0.005, beta_end=0.5)
    names = names or {i: str(i) for i in range(num_classes)}
    DDPMPlusPipeline(
        unet, sched, id2label=names, null_class_id=num_classes, class_dropout_prob=dropout
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("classifier")
    load_or_train_digits_classifier(path)
    return path


def _argv(pipe, cache, tmp_path, *extra):
    return [
        "evaluate", str(pipe), "--metrics", "bpd", "--max_images", "12", "--num_samples", "20", "--inference_steps", "2",
        "--timesteps_respaced", "3", "--classifier_cache_dir", str(cache), "--json", str(tmp_path / "r.json"),
        "--output_dir", str(tmp_path / "out"), "--no_progress", *extra,
    ]  # fmt: skip


def test_conditional_evaluate_is_class_balanced_guided_and_conditions_the_bound(tmp_path, cache, monkeypatch):
    pipe_dir = _save(tmp_path / "pipe")
    seen = {}
    real_call = DDPMPlusPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        out = real_call(self, *args, **kwargs)
        seen["images"] = out.images
        return out

    monkeypatch.setattr(DDPMPlusPipeline, "__call__", spy)
    assert cli.main(_argv(pipe_dir, cache, tmp_path, "--guidance_scale", "2.5")) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert seen["class_labels"] == [i % 10 for i in range(20)] and seen["guidance_scale"] == 2.5
    assert res["guidance_scale"] == 2.5 and res["class_conditional"] is True
    classifier, _ = load_or_train_digits_classifier(cache)
    # every sample metric is computed on the uint8 samples (quantised once)
    samples = (torch.from_numpy(seen["images"]).permute(0, 3, 1, 2) * 255).round() / 127.5 - 1
    assert res["sample_class_accuracy"] == class_accuracy(classifier, samples, [i % 10 for i in range(20)])

    # the bound: each held-out image with its own digit (one vlb_terms call per class, same figure)
    pipe = DDPMPlusPipeline.from_pretrained(pipe_dir)
    images, digits = digits_heldout_tensor(8, 1)[:12], load_digits_arrays("test")[1][:12]
    assert len(set(digits.tolist())) > 1
    direct = conditional_vlb_terms(
        pipe.unet, pipe.scheduler, images, digits, timesteps=bound_timesteps(20, 3),
        num_bins=17, generator=torch.Generator().manual_seed(0), batch_size=256, progress=False,
    )["total_bpd"]  # fmt: skip
    assert res["bits_per_dim"] == pytest.approx(float(direct.mean()), rel=1e-9)
    one = digits == digits.min()  # the first class evaluated: it gets the generator's first draws
    alone = vlb_terms(
        _WithClassLabel(pipe.unet, int(digits.min())), pipe.scheduler, images[one],
        timesteps=bound_timesteps(20, 3), num_bins=17, generator=torch.Generator().manual_seed(0), progress=False,
    )["total_bpd"]  # fmt: skip
    torch.testing.assert_close(direct[one], alone)
    card = card_rows(res)
    assert any(k.startswith("samples classified as the requested digit (w = 2.5)") for k in card)


def test_class_accuracy_counts_the_requested_digit(cache):
    classifier, _ = load_or_train_digits_classifier(cache)
    images, digits = digits_heldout_tensor(8, 1)[:40], load_digits_arrays("test")[1][:40]
    predicted = classify(classifier, images)
    assert class_accuracy(classifier, images, predicted) == 1.0
    assert class_accuracy(classifier, images, (predicted + 1) % 10) == 0.0
    with pytest.raises(ValueError, match="one digit per image"):
        class_accuracy(classifier, images, digits[:3])


@pytest.mark.parametrize(
    "kwargs, extra, match",
    [
        ({"dropout": 0.0}, ["--guidance_scale", "2"], "class_dropout_prob=0"),
        ({"num_classes": 3}, [], "must have the 10 classes"),
        ({"names": {i: f"d{i}" for i in range(10)}}, [], "must have the 10 classes"),
    ],
)
def test_conditional_evaluate_errors_come_before_the_bound(tmp_path, cache, kwargs, extra, match, capsys, monkeypatch):
    monkeypatch.setattr(bound, "conditional_vlb_terms", lambda *a, **k: pytest.fail("the bound ran"))
    assert cli.main(_argv(_save(tmp_path / "pipe", **kwargs), cache, tmp_path, *extra)) == 2
    assert match in capsys.readouterr().err
