"""One evaluation engine for ``ddpm-plus evaluate`` and the trainer (same options, same checks, same class
labels, same figures), one metric table, and the CLI's behaviour for a new user: a missing ``[metrics]``
extra, a pipeline path that is not one, and the CPU thread count."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_evaluate import _save_tiny_pipeline
from test_guidance_evaluate import _save

from ddpm_plus import DDPMPlusPipeline, cli
from ddpm_plus.evaluation import engine, metrics_table, options
from ddpm_plus.evaluation.errors import EvaluationOptionsError, MissingExtraError
from ddpm_plus.evaluation.sample_metrics import InceptionFeatures

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """An 8x8 learned_range pipeline with T = 20."""
    return _save_tiny_pipeline(tmp_path_factory.mktemp("pipe"), size=8)


def _last_error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]  # after diffusers' loading bar, if any


# ---------------------------------------------------------------- options: one set of checks


def test_bound_timesteps_is_respace_linspace_and_refuses_k_outside_2_to_t():
    from ddpm_plus.schedulers.scheduling_ddpm_plus import respace

    for k in (2, 5, 20):
        want = respace(20, k, timestep_spacing="linspace").timesteps
        assert options.bound_timesteps(20, k).tolist() == want.tolist()
        assert options.bound_timesteps(20, k).tolist()[::-1][0] == 0  # holds 0 (the decoder L_0) and T-1
    assert options.bound_timesteps(20, None) is None
    for bad in (1, 0, 21, True, 2.0):
        with pytest.raises(EvaluationOptionsError, match="2 <= K <= num_train_timesteps=20") as err:
            options.bound_timesteps(20, bad)
        assert err.value.option == "bound_timesteps"


@pytest.mark.parametrize(
    "metrics, on_digits, minimum",
    [("bpd", False, 1), ("bpd", True, 2), ("fid", False, 2), ("kid", False, 2), ("fd_dinov2", False, 2),
     ("bpd,precision_recall", False, 4), ("precision_recall", True, 4)],
)  # fmt: skip
def test_one_minimum_for_samples_and_images(metrics, on_digits, minimum):
    options.EvaluationOptions(metrics=metrics, num_samples=minimum, max_images=minimum).check_for(on_digits=on_digits)
    for name in ("num_samples", "max_images"):
        values = {"num_samples": minimum, "max_images": minimum, name: minimum - 1}
        with pytest.raises(EvaluationOptionsError, match=f"must be an integer >= {minimum}") as err:
            options.EvaluationOptions(metrics=metrics, **values).check_for(on_digits=on_digits)
        assert err.value.option == name


@pytest.mark.parametrize(
    "field, value, match",
    [("metrics", "bpd,is", "unknown metric 'is'; choose from bpd, fid, kid, precision_recall, fd_dinov2"),
     ("metrics", " , ", "no metric given"), ("batch_size", 0, ">= 1"), ("num_inference_steps", 0, ">= 1"),
     ("guidance_scale", float("nan"), "finite number"), ("seed", -1, ">= 0")],
)  # fmt: skip
def test_bad_options_name_the_field(field, value, match):
    with pytest.raises(EvaluationOptionsError, match=match) as err:
        options.EvaluationOptions(**{"metrics": "bpd", field: value})
    assert err.value.option == field and isinstance(err.value, ValueError)


def _train_args(*extra):
    from ddpm_plus.trainer.args import parse_args

    return parse_args(["--resolution", "8", "--channels", "1", "--num_train_timesteps", "20", "--eval_steps", "1",
                       "--eval_inference_steps", "2", *map(str, extra)])  # fmt: skip


@pytest.mark.parametrize(
    "cli_flags, train_flags, message",
    [
        (["--timesteps_respaced", "21"], ["--eval_bound_timesteps", "21"], "2 <= K <= num_train_timesteps=20"),
        (["--timesteps_respaced", "1"], ["--eval_bound_timesteps", "1"], "must be an integer >= 2"),
        (["--metrics", "precision_recall", "--num_samples", "3"],
         ["--eval_metrics", "precision_recall", "--eval_num_samples", "3"], "must be an integer >= 4"),
        (["--metrics", "bpd,fid", "--max_images", "1"], ["--eval_metrics", "bpd,fid", "--eval_max_images", "1"],
         "must be an integer >= 2"),
    ],
)  # fmt: skip
def test_the_trainer_refuses_before_training_what_evaluate_refuses(
    tiny_pipeline, capsys, cli_flags, train_flags, message
):
    """Same options, same checks: the trainer once clamped K to T (min(k, T)) and took 3 samples for
    precision/recall, where `ddpm-plus evaluate` refused them."""
    argv = ["evaluate", str(tiny_pipeline), "--no_progress", "--inference_steps", "2", *cli_flags]
    assert cli.main(argv) == 2
    cli_error = _last_error_line(capsys)
    assert message in cli_error and f"argument {cli_flags[-2]}:" in cli_error
    with pytest.raises(SystemExit):
        _train_args(*train_flags)
    train_error = capsys.readouterr().err
    assert message in train_error and f"argument {train_flags[-2]}:" in train_error


def test_the_trainer_accepts_what_evaluate_accepts():
    args = _train_args("--eval_bound_timesteps", "20", "--eval_metrics", "bpd", "--eval_num_samples", "2")
    assert args.eval_bound_timesteps == 20 and args.eval_num_samples == 2  # the digits: 2 for the proxy


# ---------------------------------------------------------------- one engine: same labels, same figures


def test_class_balanced_labels_are_the_classes_in_turn():
    from ddpm_plus.pipelines.pipeline_ddpm_plus import Conditioning

    assert engine.class_balanced_labels(Conditioning(False, None, None, None, None), 5) is None
    three = Conditioning(True, 3, None, 3, 0.1)
    assert engine.class_balanced_labels(three, 7) == [0, 1, 2, 0, 1, 2, 0]


def test_trainer_and_evaluate_give_the_same_figures(tmp_path, random_inception_weights, monkeypatch):
    """A class-conditional digits pipeline, evaluated by the trainer's periodic evaluation (samples in batches
    of 3) and by `ddpm-plus evaluate` with the same options: the same class labels, bound, FID and proxy."""
    from ddpm_plus.trainer.periodic_evaluation import PeriodicEvaluation

    pipe_dir = _save(tmp_path / "pipe")
    calls = []
    real_call = DDPMPlusPipeline.__call__

    def spy(self, *args, **kwargs):
        calls.append(list(kwargs.get("class_labels") or []))
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(DDPMPlusPipeline, "__call__", spy)
    common = ["--inception_weights", random_inception_weights, "--stats_cache_dir", tmp_path / "cache"]
    args = _train_args(
        "--class_conditional", "--class_dropout_prob", "0.1", "--eval_guidance_scale", "2", "--eval_metrics",
        "bpd,fid", "--eval_num_samples", "7", "--eval_batch_size", "3", "--eval_inference_steps", "2",
        "--eval_max_images", "6", "--eval_bound_timesteps", "3", *common,
    )  # fmt: skip
    evaluation = PeriodicEvaluation.setup(args, torch.device("cpu"))
    logged = evaluation.evaluate(args, DDPMPlusPipeline.from_pretrained(pipe_dir), step=5)
    trainer_labels, calls[:] = sum(calls, []), []
    argv = ["evaluate", str(pipe_dir), "--guidance_scale", "2", "--metrics", "bpd,fid", "--num_samples", "7"]
    argv += ["--batch_size", "3", "--inference_steps", "2", "--max_images", "6", "--timesteps_respaced", "3"]
    argv += ["--classifier_cache_dir", str(tmp_path / "cache"), "--json", str(tmp_path / "r.json"), "--no_progress"]
    argv += ["--output_dir", str(tmp_path / "out"), *map(str, common)]
    assert cli.main(argv) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert trainer_labels == sum(calls, []) == [i % 10 for i in range(7)]
    for key in (
        "bits_per_dim",
        "bits_per_dim_stderr",
        "fid",
        "frechet_proxy_samples_vs_train",
        "sample_class_accuracy",
    ):
        assert evaluation.last[key] == pytest.approx(res[key], rel=1e-9), key
    assert logged == metrics_table.tracker_values(res)
    assert set(logged) == {"eval/bpd", "eval/fid@7", "eval/digits_frechet_proxy@7", "eval/class_accuracy@7"}
    rows, entries = evaluation.card()
    assert rows == {**metrics_table.card_rows(res), "training step": 5}
    assert entries == metrics_table.model_index_entries(res, res["dataset_key"])


# ---------------------------------------------------------------- one metric table


def test_every_view_of_a_figure_comes_from_the_one_table():
    results = {"dataset": "d", "num_samples": 5000, "num_reference": 100, "num_images": 100, "num_bins": 256}
    results.update(bits_per_dim=1.5, bits_per_dim_stderr=0.01, fid=12.25, kid_mean=0.002, kid_std=0.0005)
    results.update(precision=0.75, recall=0.5, fd_dinov2=300.5, dinov2_model="dinov2:m", step=3)
    rows = dict(metrics_table.metric_rows(results))
    assert rows == {
        "bits/dim": "1.5000 ± 0.0100 (100 images, 256 levels)",
        "FID@5k": "12.250 (reference: 100 images)",
        "KID@5k": "0.00200 ± 0.00050",
        "precision@5k": "0.7500",
        "recall@5k": "0.5000",
        "FD_DINOv2@5k": "300.500 (reference: 100 images)",
    }
    assert metrics_table.tracker_values(results) == {
        "eval/bpd": 1.5, "eval/fid@5k": 12.25, "eval/kid@5k": 0.002, "eval/precision@5k": 0.75,
        "eval/recall@5k": 0.5, "eval/fd_dinov2@5k": 300.5,
    }  # fmt: skip
    entries = metrics_table.model_index_entries(results, {"dataset": "d", "split": "test"})
    assert [(e["metric_type"], e["metric_name"]) for e in entries] == [
        ("bits_per_dim", "bits/dim"), ("fid", "FID@5k"), ("kid", "KID@5k"), ("precision", "precision@5k"),
        ("recall", "recall@5k"), ("fd_dinov2", "FD_DINOv2@5k"),
    ]  # fmt: skip
    assert {e["metric_name"] for e in entries} <= set(rows)  # the card's labels are the model-index names
    assert entries[1]["metric_args"] == {
        "num_samples": 5000,
        "num_reference": 100,
        "feature_extractor": InceptionFeatures.name,
    }
    table = metrics_table.format_table(results)
    assert "FID@5k" in table and "biased upward" in table
    # a missing or non-finite figure is in no view
    results["fid"] = float("nan")
    assert "FID@5k" not in dict(
        metrics_table.metric_rows(results)
    ) and "eval/fid@5k" not in metrics_table.tracker_values(results)
    assert "fid" not in {e["metric_type"] for e in metrics_table.model_index_entries(results, {"dataset": "d"})}


def test_count_label():
    assert [metrics_table.count_label(n) for n in (7, 999, 1000, 1500, 50000)] == ["7", "999", "1k", "1500", "50k"]


# ---------------------------------------------------------------- a new user's findings


def _hide(monkeypatch, module: str) -> None:
    """Make ``module`` (and its submodules, even when already imported) unimportable."""
    for name in [n for n in sys.modules if n == module or n.startswith(module + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, module, None)


@pytest.mark.parametrize("module, metric", [("torch_fidelity", "fid"), ("transformers", "fd_dinov2")])
def test_a_missing_metrics_extra_is_one_line_with_the_install_command(
    tiny_pipeline, tmp_path, monkeypatch, capsys, random_inception_weights, module, metric
):
    _hide(monkeypatch, module)
    argv = ["evaluate", str(tiny_pipeline), "--metrics", f"bpd,{metric}", "--inference_steps", "2", "--no_progress"]
    argv += ["--inception_weights", str(random_inception_weights), "--output_dir", str(tmp_path)]
    assert cli.main(argv) == 2
    err = _last_error_line(capsys)
    assert err.startswith("error: ") and f"needs {module}, which is not installed" in err
    assert 'pip install "ddpm-plus[metrics]"' in err
    assert not list(tmp_path.iterdir())  # refused before anything ran


def test_missing_torch_fidelity_in_the_library_is_a_missing_extra_error(monkeypatch, random_inception_weights):
    _hide(monkeypatch, "torch_fidelity")
    with pytest.raises(MissingExtraError, match=r'pip install "ddpm-plus\[metrics\]"') as err:
        InceptionFeatures(random_inception_weights)
    assert err.value.module == "torch_fidelity" and isinstance(err.value, ValueError)


@pytest.mark.parametrize("where", ["missing", "empty", "file", "repo"])
def test_a_pipeline_that_is_not_one_is_a_clear_error_with_status_2(tmp_path, capsys, hub_server, where):
    target = {
        "missing": str(tmp_path / "runs" / "nothing" / "here"),
        "empty": str(tmp_path),
        "file": str(tmp_path / "model.txt"),
        "repo": "someone/no-such-pipeline",  # looks like a repo id; the Hub says 404
    }[where]
    (tmp_path / "model.txt").write_text("x")
    assert cli.main(["evaluate", target, "--metrics", "bpd", "--no_progress"]) == 2
    err = _last_error_line(capsys)
    assert err.startswith("error: ") and repr(target) in err
    expected = {
        "missing": "is not a directory and not a Hub repo id",
        "empty": "a directory without model_index.json",
        "file": "is not a directory and not a Hub repo id",
        "repo": "no local directory, nor a loadable Hub repo",
    }[where]
    assert expected in err


def test_a_dataset_folder_that_does_not_exist_is_a_clear_error(tiny_pipeline, tmp_path, capsys):
    argv = ["evaluate", str(tiny_pipeline), "--dataset", str(tmp_path / "no" / "images"), "--metrics", "bpd"]
    assert cli.main([*argv, "--inference_steps", "2", "--no_progress"]) == 2
    err = _last_error_line(capsys)
    assert err.startswith("error: dataset ") and str(tmp_path / "no" / "images") in err


def test_num_threads_is_applied_while_evaluating_and_restored(tiny_pipeline, tmp_path, monkeypatch):
    seen = []
    real_call = DDPMPlusPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(DDPMPlusPipeline, "__call__", spy)
    before = torch.get_num_threads()
    argv = ["evaluate", str(tiny_pipeline), "--metrics", "bpd", "--max_images", "2", "--num_samples", "2"]
    argv += ["--inference_steps", "2", "--timesteps_respaced", "2", "--classifier_cache_dir", str(tmp_path / "c")]
    argv += ["--output_dir", str(tmp_path / "out"), "--no_progress", "--device", "cpu"]
    assert cli.main([*argv, "--num_threads", "3"]) == 0
    assert seen == [3] and torch.get_num_threads() == before
    monkeypatch.setattr(engine, "default_num_threads", lambda: 2)
    assert cli.main(argv) == 0  # on CPU without the flag: the documented default
    assert seen == [3, 2] and torch.get_num_threads() == before


@pytest.mark.parametrize("cores, threads", [(1, 1), (2, 1), (4, 2), (16, 8), (64, 8)])
def test_default_num_threads_is_half_the_cores_at_most_8(monkeypatch, cores, threads):
    monkeypatch.setattr(engine.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert engine.default_num_threads() == threads


def test_cpu_threads_leaves_a_gpu_run_at_torchs_count():
    before = torch.get_num_threads()
    with engine.cpu_threads(torch.device("cuda"), None) as n:
        assert n == before == torch.get_num_threads()
    with engine.cpu_threads(torch.device("cuda"), 1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_cache_dir_has_one_home(monkeypatch, tmp_path):
    from ddpm_plus.cache import default_cache_dir
    from ddpm_plus.evaluation import digits_proxy, sample_metrics

    monkeypatch.setenv("DDPM_PLUS_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    assert sample_metrics.reference_stats_path({"extractor": "x"}).parent == tmp_path / "reference_stats"
    # one definition, imported by its users (sample_metrics once imported it back from the digits proxy)
    assert sample_metrics.default_cache_dir is digits_proxy.default_cache_dir is default_cache_dir
    assert "default_cache_dir" not in digits_proxy.__all__
    monkeypatch.delenv("DDPM_PLUS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "ddpm_plus"


def test_cli_imports_nothing_from_the_train_extra_until_a_command_needs_it():
    """`ddpm-plus push` and `--help` work without the [train] extra: `datasets` is not imported."""
    code = "import sys, ddpm_plus.cli as c; c.build_parser(); print(sorted({'datasets', 'sklearn'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
