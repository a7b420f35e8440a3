"""The one table of evaluation figures: for each, its key in the results (and the JSON), the label of the
printed table and the model card (with the sample count: ``FID@5k``), its tracker key (``eval/fid@5k``) and
its Hub ``model-index`` type. The CLI table, the model cards, the trackers and the model-index entries are all
read from :data:`METRICS`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .sample_metrics import InceptionFeatures

__all__ = [
    "PROXY_NAME",
    "LATENT_BPD_LABEL",
    "SMALL_N",
    "SMALL_N_WARNING",
    "Metric",
    "METRICS",
    "count_label",
    "metric_rows",
    "card_rows",
    "format_table",
    "tracker_values",
    "model_index_entries",
]

SMALL_N = 10_000
SMALL_N_WARNING = (
    "a Frechet distance from fewer than 10,000 samples is biased upward; compare it only with figures at the same n"
)
PROXY_NAME = "digits Frechet distance (proxy, not FID)"
LATENT_BPD_LABEL = "latent bits/dim (not comparable with pixel bits/dim)"
REFERENCE_NOTE = "(reference: {num_reference} images)"


@dataclass(frozen=True)
class Metric:
    """One figure. ``label`` and ``tracker`` are templates filled from the results and ``n`` (the sample
    count, :func:`count_label`); ``spread`` is the key of its ± figure; ``note`` follows the shown value;
    ``extractor`` ("inception" or "dinov2") is named in its model-index entry."""

    key: str
    label: str
    decimals: int
    tracker: str | None = None
    model_index: str | None = None
    spread: str | None = None
    note: str = ""
    extractor: str | None = None

    @property
    def counted(self) -> bool:
        """A figure of the samples: it depends on how many (its label carries ``@n``)."""
        return "{n}" in self.label


METRICS = (
    Metric("bits_per_dim", "bits/dim", 4, "bpd", "bits_per_dim", "bits_per_dim_stderr",
           "({num_images} images, {num_bins} levels)"),
    Metric("bits_per_source_pixel", "bits per source 8x8 pixel (compare to baselines)", 4,
           spread="bits_per_source_pixel_stderr"),
    Metric("prior_bits_per_dim", "  prior L_T, bits/dim", 5),
    Metric("decoder_bits_per_dim", "  decoder L_0, bits/dim", 4),
    Metric("latent_bits_per_dim", LATENT_BPD_LABEL, 4, "latent_bpd", "latent_bits_per_dim",
           "latent_bits_per_dim_stderr", "({num_images} images' VAE latents)"),
    Metric("latent_prior_bits_per_dim", "  prior L_T, latent bits/dim", 5),
    Metric("latent_decoder_bits_per_dim", "  decoder L_0, latent bits/dim ({latent_num_bins}-level grid)", 4),
    Metric("fid", "FID@{n}", 3, "fid@{n}", "fid", note=REFERENCE_NOTE, extractor="inception"),
    Metric("kid_mean", "KID@{n}", 5, "kid@{n}", "kid", "kid_std", extractor="inception"),
    Metric("precision", "precision@{n}", 4, "precision@{n}", "precision", extractor="inception"),
    Metric("recall", "recall@{n}", 4, "recall@{n}", "recall", extractor="inception"),
    Metric("fd_dinov2", "FD_DINOv2@{n}", 3, "fd_dinov2@{n}", "fd_dinov2", note=REFERENCE_NOTE, extractor="dinov2"),
    Metric("frechet_proxy_samples_vs_train", PROXY_NAME + "@{n}", 3, "digits_frechet_proxy@{n}"),
    Metric("frechet_proxy_floor_heldout_vs_train", "  floor: held-out real vs train", 3,
           note="({frechet_proxy_floor_num_images} images)"),
    Metric("classifier_heldout_accuracy", "classifier held-out accuracy", 4),
    Metric("sample_class_accuracy", "samples classified as the requested digit (w = {guidance_scale:g})", 4,
           "class_accuracy@{n}"),
)  # fmt: skip


def count_label(n: int) -> str:
    """A sample count as labels write it: 5000 -> ``5k``, 64 -> ``64``."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _present(results: Mapping, metrics: Iterable[Metric] = METRICS) -> list[Metric]:
    return [m for m in metrics if _finite(results.get(m.key))]


def _fill(template: str, results: Mapping) -> str:
    return template.format(**{**results, "n": count_label(int(results.get("num_samples", 0)))})


def metric_rows(results: Mapping) -> list[tuple[str, str]]:
    """(label, shown value) of each figure in ``results``, in table order."""
    rows = []
    for m in _present(results):
        shown = f"{results[m.key]:.{m.decimals}f}"
        if m.spread and m.spread in results:
            shown += f" ± {results[m.spread]:.{m.decimals}f}"
        if m.note:
            shown += " " + _fill(m.note, results)
        rows.append((_fill(m.label, results), shown))
    return rows


def card_rows(results: Mapping) -> dict:
    """The model card's Evaluation table: the dataset, then :func:`metric_rows`."""
    return {"dataset": results["dataset"], **dict(metric_rows(results))}


def format_table(results: Mapping) -> str:
    """The printed table: dataset, figures, where the grid and the JSON are, and the small-n warning."""
    rows = [("dataset", results["dataset"]), *metric_rows(results)]
    rows += [("sample grid", results.get("sample_grid", "")), ("json", results.get("json", ""))]
    width = max(len(k) for k, _ in rows)
    table = "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
    if ("fid" in results or "fd_dinov2" in results) and results["num_samples"] < SMALL_N:
        table += f"\nwarning: {SMALL_N_WARNING} (n = {results['num_samples']})"
    return table


def tracker_values(results: Mapping, prefix: str = "eval/") -> dict[str, float]:
    """``{prefix + tracker key: value}`` of the figures that are logged (e.g. ``eval/fid@1k``, ``eval/bpd``)."""
    return {prefix + _fill(m.tracker, results): float(results[m.key]) for m in _present(results) if m.tracker}


def model_index_entries(results: Mapping, reals_key: Mapping) -> list[dict]:
    """The Hub ``model-index`` entries of ``results`` (fields of huggingface_hub's ``EvalResult``, as
    :func:`ddpm_plus.hub.set_card_evaluation` takes them) on the dataset ``reals_key`` names."""
    dataset = {
        "dataset_name": str(reals_key.get("dataset")),
        "dataset_type": str(reals_key.get("dataset")),
        "dataset_split": reals_key.get("split"),
        "dataset_config": reals_key.get("config"),
    }
    extractors = {"inception": InceptionFeatures.name, "dinov2": results.get("dinov2_model")}
    entries = []
    for m in _present(results):
        if m.model_index is None:
            continue
        args = {"num_samples": results.get("num_samples"), "num_reference": results.get("num_reference")}
        args = args if m.counted else {}
        if m.extractor:
            args["feature_extractor"] = extractors[m.extractor]
        entries.append(
            {
                "metric_type": m.model_index,
                "metric_name": _fill(m.label, results),
                "metric_value": float(results[m.key]),
                **dataset,
                "metric_args": args,
            }
        )
    return entries
