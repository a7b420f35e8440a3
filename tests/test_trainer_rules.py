"""The trainer's rules that are decided in one place each: which loss goes with which variance type
(ddpm_plus.trainer.loss_types, for compute_loss and the flags alike), how many output channels the UNet gets for a
variance type, and what follows from the data flags (ddpm_plus.data.DatasetSource: channels, grey levels, card)."""

from __future__ import annotations

import itertools

import pytest

from ddpm_plus.trainer.args import parse_args
from ddpm_plus.trainer.loss_types import LOSS_TYPES, LossType, check_loss_variance

# Written out here, not derived from the library: the variance types, the ones the model predicts, and the losses
# that put a gradient on the variance channels (improved DDPM: hybrid = L_simple + lambda L_vlb, vlb = L_vlb).
VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED = {"learned", "learned_range"}
TRAIN_THE_VARIANCE = {"hybrid", "vlb"}


def test_loss_types_are_the_three_objectives():
    assert LOSS_TYPES == ("simple", "hybrid", "vlb")
    assert {t.value for t in LossType if t.trains_variance} == TRAIN_THE_VARIANCE


@pytest.mark.parametrize("loss, variance", list(itertools.product(("simple", "hybrid", "vlb"), VARIANCES)))
def test_loss_and_variance_rule(loss, variance):
    """compute_loss's rule: a loss that trains the variance needs a learned one. The trainer's: both ways."""
    library_ok = loss not in TRAIN_THE_VARIANCE or variance in LEARNED
    trainer_ok = (loss in TRAIN_THE_VARIANCE) == (variance in LEARNED)
    for strict, ok in ((False, library_ok), (True, trainer_ok)):
        if ok:
            check_loss_variance(loss, variance, variance_must_be_trained=strict)
            continue
        with pytest.raises(ValueError) as info:
            check_loss_variance(loss, variance, variance_must_be_trained=strict)
        message = str(info.value)
        assert f"loss_type={loss!r}" in message and f"variance_type={variance!r}" in message
        allowed = "'learned' or 'learned_range'" if loss in TRAIN_THE_VARIANCE else "'hybrid' or 'vlb'"
        assert allowed in message


def test_analytic_variance_is_not_learned():
    check_loss_variance("simple", "analytic")
    with pytest.raises(ValueError, match="loss_type='vlb' trains the variance"):
        check_loss_variance("vlb", "analytic")


@pytest.mark.parametrize(
    "loss, variance, message",
    [
        ("l2", "fixed_small", "loss_type must be one of ('simple', 'hybrid', 'vlb'), got 'l2'"),
        ("simple", "fixed", "variance_type must be one of ("),
    ],
)
def test_unknown_values_name_the_argument_and_the_allowed_values(loss, variance, message):
    with pytest.raises(ValueError) as info:
        check_loss_variance(loss, variance)
    assert message in str(info.value)


@pytest.mark.parametrize("variance", VARIANCES)
def test_unet_output_channels_follow_the_variance_type(variance):
    from ddpm_plus.trainer.loop import build_unet

    loss = "hybrid" if variance in LEARNED else "simple"
    args = parse_args(["--variance_type", variance, "--loss", loss, "--channels", "3", "--output_dir", "unused"])
    assert build_unet(args).config.out_channels == (6 if variance in LEARNED else 3)


def test_data_flags_decide_channels_and_card(tmp_path):
    from ddpm_plus.trainer.outputs import dataset_description

    digits = parse_args(["--output_dir", "unused"])
    folder = parse_args(["--train_data_dir", str(tmp_path), "--output_dir", "unused"])
    hub = parse_args(["--dataset_name", "user/faces", "--output_dir", "unused"])
    assert (digits.channels, folder.channels, hub.channels) == (1, 3, 3)
    assert "scikit-learn's digits" in dataset_description(digits) and "17 grey levels" in dataset_description(digits)
    assert dataset_description(folder) == f"image folder {tmp_path}"
    assert dataset_description(hub) is None  # the card names a Hub dataset by its id (dataset_name)


def test_the_digits_train_on_their_17_grey_levels():
    from accelerate import Accelerator
    from test_training import TINY, reset_accelerate

    from ddpm_plus.trainer.data import build_dataloader

    reset_accelerate()
    try:
        _, _, num_images, num_bins, id2label = build_dataloader(
            parse_args(TINY + ["--output_dir", "unused"]), Accelerator(cpu=True)
        )
    finally:
        reset_accelerate()
    assert (num_images, num_bins, id2label) == (1437, 17, None)
