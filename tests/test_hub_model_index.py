"""The evaluation figures go into the model card's Hub `model-index` metadata (so the Hub shows them)."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from ddpm_plus import hub

ENTRIES = [
    {
        "type": "fid", "name": "FID@5k", "value": 12.5, "dataset_name": "cifar10", "dataset_type": "cifar10",
        "dataset_split": "test", "args": {"num_samples": 5000, "num_reference": 10000,
                                          "feature_extractor": "inception-v3-compat"},
    },
    {
        "type": "fd_dinov2", "name": "FD_DINOv2@5k", "value": 301.0, "dataset_name": "cifar10",
        "dataset_type": "cifar10", "dataset_split": "test", "args": {"num_samples": 5000},
    },
]  # fmt: skip


@pytest.fixture
def card_dir(tmp_path):
    hub.write_model_card(tmp_path, train_steps=10)
    return tmp_path


def test_model_index_is_written_replaced_and_keeps_the_rest(card_dir):
    before = ModelCard.load(card_dir / "README.md").data.to_dict()
    hub.set_card_evaluation(card_dir, {"FID@5k": 12.5}, model_index=ENTRIES)
    text = (card_dir / "README.md").read_text()
    assert "model-index:" in text and "| `FID@5k` | 12.5" in text
    card = ModelCard.load(card_dir / "README.md")
    results = {r.metric_type: r for r in card.data.eval_results}
    assert results["fid"].metric_value == 12.5 and results["fid"].dataset_split == "test"
    assert results["fid"].metric_args["num_samples"] == 5000 and results["fd_dinov2"].metric_name == "FD_DINOv2@5k"
    after = card.data.to_dict()
    for key, value in before.items():
        assert after[key] == value, key
    hub.set_card_evaluation(card_dir, {"FID@5k": 11.0}, model_index=[{**ENTRIES[0], "value": 11.0}])
    card = ModelCard.load(card_dir / "README.md")
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("fid", 11.0)]


def test_without_model_index_the_metadata_is_untouched(card_dir):
    before = ModelCard.load(card_dir / "README.md").data.to_dict()
    hub.set_card_evaluation(card_dir, {"bits/dim": 3.1})
    assert ModelCard.load(card_dir / "README.md").data.to_dict() == before


@pytest.mark.parametrize(
    "change, match",
    [({"value": float("nan")}, "finite"), ({"dataset_name": None}, "dataset_name"), ({"type": ""}, "type")],
)
def test_bad_entries_are_refused_and_the_card_is_kept(card_dir, change, match):
    text = (card_dir / "README.md").read_text()
    with pytest.raises(ValueError, match=match):
        hub.set_card_evaluation(card_dir, {"x": 1}, model_index=[{**ENTRIES[0], **change}])
    assert (card_dir / "README.md").read_text() == text
