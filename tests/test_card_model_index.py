"""set_card_evaluation(model_index=...): the figures go into the card's Hub ``model-index`` metadata,
read back with huggingface_hub's own ModelCard; entries use ``EvalResult``'s own field names and are passed
through (hub.py holds no metric names of its own)."""

import math

import pytest
import yaml
from huggingface_hub import ModelCard

from ddpm_plus.hub import set_card_evaluation, write_model_card

ROWS = {"fid": 12.3, "fd_dinov2": 345.6}


def _entries(fid=12.3, fd=345.6):
    return [
        {
            "metric_type": "fid",
            "metric_name": "FID@5k",
            "metric_value": fid,
            "dataset_name": "cifar10",
            "dataset_type": "cifar10",
            "dataset_split": "test",
            "dataset_config": None,
            "metric_args": {"num_samples": 5000, "num_reference": 10000, "feature_extractor": "inception-v3-compat"},
        },
        {
            "metric_type": "fd_dinov2",
            "metric_name": "FD-DINOv2@5k",
            "metric_value": fd,
            "dataset_name": "cifar10",
            "dataset_type": "cifar10",
            "dataset_split": "test",
            "metric_args": {"num_samples": 5000, "num_reference": 10000, "feature_extractor": "dinov2-vit-s14"},
        },
    ]


def _metadata(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


@pytest.fixture
def card_dir(tmp_path):
    out = tmp_path / "my-ddpm"
    out.mkdir()
    write_model_card(out, None, training_config={"learning_rate": 1e-4}, dataset_name="cifar10")
    return out


def test_model_index_goes_into_the_card_metadata(card_dir):
    path = card_dir / "README.md"
    before = _metadata(path)
    assert "model-index" not in before

    set_card_evaluation(card_dir, ROWS, model_index=_entries())

    meta = _metadata(path)
    assert "model-index" in meta and meta["model-index"][0]["name"] == "my-ddpm"
    for key, value in before.items():  # tags, library_name, license, pipeline_tag, datasets, ...
        assert meta[key] == value, key

    card = ModelCard.load(path)
    assert card.data.model_name == "my-ddpm"
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"fid", "fd_dinov2"}
    fid, fd = results["fid"], results["fd_dinov2"]
    assert fid.metric_value == 12.3 and fid.metric_name == "FID@5k"
    assert fd.metric_value == 345.6 and fd.metric_name == "FD-DINOv2@5k"
    for r in (fid, fd):
        assert r.task_type == "unconditional-image-generation"
        assert (r.dataset_type, r.dataset_name, r.dataset_split) == ("cifar10", "cifar10", "test")
    assert fid.metric_args == {"num_samples": 5000, "num_reference": 10000, "feature_extractor": "inception-v3-compat"}
    assert fd.metric_args["feature_extractor"] == "dinov2-vit-s14"
    assert "| `fid` | 12.3 |" in card.text and "| `fd_dinov2` | 345.6 |" in card.text
    assert "Not evaluated." not in card.text and "## Training" in card.text
    assert card.text.count("## Evaluation") == 1


def test_second_call_replaces_results_and_keeps_an_existing_model_name(card_dir):
    path = card_dir / "README.md"
    before = _metadata(path)
    set_card_evaluation(card_dir, ROWS, model_index=_entries())
    card = ModelCard.load(path)
    card.data.model_name = "renamed"
    card.save(path)

    set_card_evaluation(card_dir, {"fid": 9.5}, model_index=_entries(fid=9.5, fd=300.0))

    card = ModelCard.load(path)
    assert card.data.model_name == "renamed"
    assert len(card.data.eval_results) == 2
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {"fid": 9.5, "fd_dinov2": 300.0}
    meta = _metadata(path)
    assert len(meta["model-index"]) == 1 and len(meta["model-index"][0]["results"]) == 1
    assert all(meta[key] == value for key, value in before.items())
    assert "| 9.5 |" in card.text and "| 12.3 |" not in card.text


def test_without_model_index_the_metadata_is_untouched(card_dir):
    path = card_dir / "README.md"
    set_card_evaluation(card_dir, ROWS, model_index=_entries())
    header = path.read_text(encoding="utf-8").split("\n---\n", 1)[0]

    set_card_evaluation(card_dir, {"fid": 1.0})

    text = path.read_text(encoding="utf-8")
    assert text.split("\n---\n", 1)[0] == header
    assert {r.metric_value for r in ModelCard.load(path).data.eval_results} == {12.3, 345.6}
    assert "| `fid` | 1 |" in text or "| `fid` | 1.0 |" in text


def test_an_empty_model_index_drops_the_results(card_dir):
    path = card_dir / "README.md"
    before = _metadata(path)
    set_card_evaluation(card_dir, ROWS, model_index=_entries())
    set_card_evaluation(card_dir, ROWS, model_index=[])
    assert _metadata(path) == before
    assert ModelCard.load(path).data.eval_results is None


@pytest.mark.parametrize("field", ["metric_type", "metric_name", "metric_value", "dataset_name", "dataset_type"])
def test_an_entry_missing_a_field_is_refused_naming_it(card_dir, field):
    path = card_dir / "README.md"
    original = path.read_text(encoding="utf-8")
    entries = _entries()
    del entries[1][field]
    with pytest.raises(ValueError, match=rf"lacks '{field}'") as err:
        set_card_evaluation(card_dir, ROWS, model_index=entries)
    assert "cifar10" in str(err.value)  # the entry is shown
    assert path.read_text(encoding="utf-8") == original  # nothing was written


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "12.3", True])
def test_a_non_finite_value_is_refused(card_dir, value):
    path = card_dir / "README.md"
    original = path.read_text(encoding="utf-8")
    with pytest.raises(ValueError, match=r"'metric_value' must be a finite number") as err:
        set_card_evaluation(card_dir, ROWS, model_index=_entries(fid=value))
    assert "FID@5k" in str(err.value)
    assert path.read_text(encoding="utf-8") == original


def test_an_unknown_field_is_refused_naming_the_allowed_ones(card_dir):
    path = card_dir / "README.md"
    original = path.read_text(encoding="utf-8")
    entries = _entries()
    entries[0]["type"] = "fid"  # the old key: no longer understood, so it must not be silently dropped
    with pytest.raises(ValueError, match=r"unknown fields \['type'\]; allowed: metric_type, metric_name"):
        set_card_evaluation(card_dir, ROWS, model_index=entries)
    assert path.read_text(encoding="utf-8") == original


def test_the_metric_tables_entries_go_through_unchanged(card_dir):
    """What the evaluation's metric table makes is what the card holds: names, values, extractor, counts."""
    from ddpm_plus.evaluation.metrics_table import model_index_entries

    results = {"num_samples": 5000, "num_reference": 10000, "fid": 12.5, "kid_mean": 0.01, "kid_std": 0.001}
    results.update(bits_per_dim=1.25, fd_dinov2=300.0, dinov2_model="dinov2:facebook/dinov2-small")
    key = {"dataset": "cifar10", "split": "test", "config": None}
    set_card_evaluation(card_dir, ROWS, model_index=model_index_entries(results, key))
    got = {r.metric_type: r for r in ModelCard.load(card_dir / "README.md").data.eval_results}
    assert {t: (r.metric_name, r.metric_value) for t, r in got.items()} == {
        "bits_per_dim": ("bits/dim", 1.25),
        "fid": ("FID@5k", 12.5),
        "kid": ("KID@5k", 0.01),
        "fd_dinov2": ("FD_DINOv2@5k", 300.0),
    }
    assert got["fid"].metric_args == {
        "num_samples": 5000, "num_reference": 10000, "feature_extractor": "inception-v3-compat"
    }  # fmt: skip
    assert got["fd_dinov2"].metric_args["feature_extractor"] == "dinov2:facebook/dinov2-small"
    assert got["bits_per_dim"].metric_args is None and got["fid"].dataset_split == "test"
