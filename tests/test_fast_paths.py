"""The fast sampler (ddpm_plus/fast_sampling.py) samples the same chain as the regular pipeline.

- float32: the same generator gives the pipeline's images (it draws the same noise in the same order);
- bf16 / channels_last with the exact Gaussian ε-predictor: output mean and variance match the exact
  linear Gaussian chain (iterated in float64 from ddpm_reference) within sampling error;
- bf16 with a real (tiny, random-init) UNet: per-channel mean/std match the float32 pipeline's;
- no host synchronisation inside the loop (CPU proxy: no tensor -> Python conversion is called);
- benchmarks/run.py runs end to end on tiny sizes (no timing is asserted).
CUDA graphs and torch.compile run only on a GPU (benchmarks/gpu_check.sh); their step function is
the one tested here.
"""

import math
import types

import ddpm_reference as R
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from ddpm_plus import DDPMPlusPipeline, DDPMPlusScheduler
from ddpm_plus.pipelines.fast_sampling import FastSampler, fast_sample

TAB = R.Tables(R.betas())


pytestmark = pytest.mark.usefixtures("one_thread")


MU = (0.3, -0.2)  # per-channel data mean and std of the Gaussian data
S = (0.5, 0.8)


class GaussianEpsModel(torch.nn.Module):
    """The optimal ε-predictor for x_0 ~ N(μ_c, s_c²) per channel: a drop-in for a UNet2DModel.

    E[ε|x_t] = √(1−ᾱ)(x − √ᾱ μ)/(ᾱ s² + 1 − ᾱ), computed in float32 from the (possibly bf16) input and
    returned in the model's dtype, as a half-precision UNet would."""

    def __init__(self, size=16):
        super().__init__()
        # plain attributes, not buffers: Module.to(dtype) must not round them to half precision
        self.abar = torch.from_numpy(TAB.abar).float()
        self.mu = torch.tensor(MU).reshape(1, -1, 1, 1)
        self.s2 = torch.tensor(S).reshape(1, -1, 1, 1) ** 2
        self.dtype_marker = torch.nn.Parameter(torch.zeros(()))
        self.config = types.SimpleNamespace(
            sample_size=size, in_channels=len(MU), out_channels=len(MU), num_class_embeds=None, class_embed_type=None
        )

    @property
    def dtype(self):
        return self.dtype_marker.dtype

    @property
    def device(self):
        return self.dtype_marker.device

    def forward(self, x, timestep, class_labels=None):
        ab = self.abar.to(x.device)[timestep.reshape(-1)].reshape(-1, 1, 1, 1)
        mu, s2, x = self.mu.to(x.device), self.s2.to(x.device), x.float()
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * s2 + 1 - ab)
        return types.SimpleNamespace(sample=eps.to(self.dtype))


def tiny_unet(out_channels=3, seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=out_channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=None,
    ).eval()


def make_pipe(unet, **scheduler_kwargs):
    pipe = DDPMPlusPipeline(unet, DDPMPlusScheduler(**scheduler_kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "out_channels,scheduler_kwargs",
    [
        (3, {}),
        (6, {"variance_type": "learned_range", "prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ],
)
def test_float32_fast_sampler_reproduces_pipeline(out_channels, scheduler_kwargs, channels_last):
    """Same generator -> the pipeline's images: the table, the noise order and the no-noise final step agree."""
    pipe = make_pipe(tiny_unet(out_channels), **scheduler_kwargs)
    ref = pipe(4, generator=torch.Generator().manual_seed(3), num_inference_steps=12, output_type="pt").images
    sampler = FastSampler(pipe, dtype=torch.float32, channels_last=channels_last)
    out = sampler(4, 12, torch.Generator().manual_seed(3), output_type="pt").images
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    # A different seed gives different images (the comparison above is not vacuous).
    other = sampler(4, 12, torch.Generator().manual_seed(4), output_type="pt").images
    assert (other - ref).abs().max() > 0.1
    # The pipeline object is untouched: still float32, contiguous weights, its own scheduler.
    assert pipe.unet.dtype == torch.float32 and pipe.scheduler is not sampler.scheduler


def test_output_types_and_fast_sample_helper():
    pipe = make_pipe(tiny_unet())
    np_images = fast_sample(pipe, 2, 3, torch.Generator().manual_seed(0), dtype=torch.float32, output_type="np").images
    assert np_images.shape == (2, 8, 8, 3) and np_images.min() >= 0 and np_images.max() <= 1
    pil = fast_sample(pipe, 2, 3, torch.Generator().manual_seed(0), output_type="pil").images
    assert len(pil) == 2 and pil[0].size == (8, 8)
    latent = fast_sample(pipe, 2, 3, torch.Generator().manual_seed(0), output_type="latent", return_dict=False)[0]
    assert latent.dtype == torch.float32
    np.testing.assert_allclose(np_images, (latent / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), atol=1e-6)


@pytest.mark.parametrize(
    "dtype,channels_last,steps,variance_type",
    [
        (torch.float32, False, 1000, "fixed_small"),
        (torch.bfloat16, True, 1000, "fixed_small"),
        (torch.bfloat16, True, 50, "fixed_large"),
        (torch.float16, False, 50, "fixed_small"),
    ],
)
def test_fast_sampler_matches_exact_gaussian_chain(dtype, channels_last, steps, variance_type):
    """Per channel, the output is N(m, v) of the exact chain within 5 standard errors. Half precision
    rounds the predictor's input and output (relative 2^-9 / 2^-12), far below the errors allowed here."""
    pipe = make_pipe(GaussianEpsModel(), clip_sample=False, variance_type=variance_type)
    sampler = FastSampler(pipe, dtype=dtype, channels_last=channels_last)
    x = sampler(64, steps, torch.Generator().manual_seed(steps), output_type="latent").images.double()
    timesteps = sampler.scheduler.timesteps.tolist()
    assert len(timesteps) == steps
    for c, (mu, s) in enumerate(zip(MU, S, strict=True)):
        m, v = R.gaussian_chain_moments(TAB, timesteps, mu, s, variance_type)
        xc = x[:, c].flatten()
        N = xc.numel()
        mean, var = xc.mean().item(), xc.var().item()
        se_m, se_v = math.sqrt(v / N), v * math.sqrt(2.0 / (N - 1))
        msg = f"{dtype} ch{c}: exact m={m:.5f} v={v:.5f}, measured mean={mean:.5f} var={var:.5f} (N={N})"
        print(msg)
        assert abs(mean - m) < 5 * se_m, msg
        assert abs(var - v) < 5 * se_v, msg


def test_bf16_unet_matches_float32_pipeline_statistics():
    """bf16 + channels_last vs the float32 pipeline with the same generator, a real (tiny) UNet.

    Tolerance: 3 standard errors of the per-channel mean (std/√N) and std (std/√(2N)) of N pixels, i.e.
    what two float32 runs with independent noise would be allowed to differ by. The two runs share
    their noise, so their actual difference is bf16 rounding alone, well inside; a wrong variance,
    clipping or coefficient row would move the statistics by many standard errors."""
    pipe = make_pipe(tiny_unet(seed=1))
    ref = pipe(32, generator=torch.Generator().manual_seed(5), num_inference_steps=25, output_type="pt").images
    out = FastSampler(pipe, dtype=torch.bfloat16, channels_last=True)(
        32, 25, torch.Generator().manual_seed(5), output_type="pt"
    ).images
    assert not torch.equal(out, ref)  # bf16 really ran
    N = ref[:, 0].numel()
    for c in range(3):
        r, o = ref[:, c].double(), out[:, c].double()
        sd = r.std().item()
        msg = f"ch{c}: fp32 mean={r.mean():.5f} std={sd:.5f} | bf16 mean={o.mean():.5f} std={o.std():.5f} (N={N})"
        print(msg)
        assert abs(o.mean().item() - r.mean().item()) < 3 * sd / math.sqrt(N), msg
        assert abs(o.std().item() - sd) < 3 * sd / math.sqrt(2 * N), msg


def test_no_host_sync_inside_the_sampling_loop(monkeypatch):
    """CPU proxy for "no host synchronisation": after the schedule is loaded, a whole sampling call
    converts no tensor to a Python value (on CUDA, benchmarks/gpu_check.sh runs it under
    torch.cuda.set_sync_debug_mode('error'))."""
    pipe = make_pipe(tiny_unet())
    sampler = FastSampler(pipe, dtype=torch.float32)
    sampler(2, 5, torch.Generator().manual_seed(0), output_type="latent")  # loads the schedule table

    def forbidden(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} called inside the sampling loop")

        return fail

    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    out = sampler(2, 5, torch.Generator().manual_seed(0), output_type="latent").images
    monkeypatch.undo()
    assert torch.isfinite(out).all()
    with pytest.raises(AssertionError, match="host sync"):  # the guard itself works
        monkeypatch.setattr(torch.Tensor, "item", forbidden("item"))
        torch.ones(()).item()


def test_invalid_arguments_fail_early():
    pipe = make_pipe(tiny_unet())
    with pytest.raises(ValueError, match="DDPMPlusScheduler"):
        FastSampler(DDPMPlusPipeline(pipe.unet, DDIMScheduler()))
    with pytest.raises(ValueError, match="cuda_graph"):
        FastSampler(pipe, cuda_graph=True)
    with pytest.raises(ValueError, match="`dtype`"):
        FastSampler(pipe, dtype=torch.float64)
    with pytest.raises(ValueError, match="`compile`"):
        FastSampler(pipe, compile="fast")
    sampler = FastSampler(pipe, dtype=torch.float32)
    with pytest.raises(ValueError, match="generator"):
        sampler(2, 3, [torch.Generator()])
    with pytest.raises(ValueError, match="output_type"):
        sampler(2, 3, output_type="jpg")
    with pytest.raises(ValueError, match="num_inference_steps"):
        sampler(2, 1001)
    with pytest.raises(ValueError, match="class_labels"):
        sampler(2, 3, class_labels=[0, 1])
    with pytest.raises(ValueError, match="latents"):
        sampler(2, 3, latents=torch.zeros(1, 3, 8, 8))


@pytest.mark.slow
def test_benchmark_entry_point_runs_every_section_on_tiny_sizes(tmp_path):
    """`python -m benchmarks.run` end to end on the CPU (tiny UNet, one round): every section produces finite,
    positive figures from the real code paths (train.py's training_step, the pipelines, FastSampler).
    It times nothing against a threshold; it keeps the benchmark in step with the APIs it drives."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--rounds",
        "1",
        "--sampling_batch",
        "2",
        "--sampling_steps",
        "2",
        "--training_batch",
        "2",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for section in ("scheduler", "sampling", "training"):
        assert "error" not in r[section], r[section]
    assert set(r["scheduler"]["cases"]) == {"step_int", "step_tensor", "add_noise"}
    ratios = [c["ratio_ours_over_diffusers"] for c in r["scheduler"]["cases"].values()]
    assert all(0 < x < math.inf for x in ratios)
    assert {"diffusers DDPMPipeline fp32", "DDPMPlusPipeline fp32", "fast fp32", "fast bf16"} <= set(
        r["sampling"]["rows"]
    )
    assert not r["sampling"]["errors"]
    assert all(0 < row["ms_per_step"] < math.inf for row in r["sampling"]["rows"].values())
    rows = r["training"]["rows"]
    assert len(rows) == 3 and all(
        math.isfinite(row["warmup_loss"]) and row["images_per_s"] > 0 for row in rows.values()
    )
