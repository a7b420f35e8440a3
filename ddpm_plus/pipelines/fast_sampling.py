"""Fast ancestral sampling with a ``DDPMPlusPipeline``: half-precision UNet, channels_last, the
scheduler's per-step coefficients in one device table, and the denoising step captured as a CUDA
graph (or compiled with ``torch.compile``), with no host synchronisation inside the loop.

    sampler = FastSampler(pipe)                  # bf16 + channels_last + CUDA graph on a GPU
    images = sampler(batch_size=256, num_inference_steps=1000, generator=g).images

It also samples with a ``LatentDDPMPlusPipeline`` (its ``unet`` or DiT ``transformer``, see
ddpm_plus/pipelines/denoisers.py): the chain runs on the latents, which the pipeline's VAE decodes at the end.

The sampled chain is the scheduler's own: its public ``step_coefficients()`` (cast to float32) and its
step formula ``ancestral_step``. The noise is drawn from ``generator`` in the same order and shapes as
``DDPMPlusPipeline`` draws it, so a float32, non-channels_last ``FastSampler`` reproduces the pipeline's
images for the same generator up to float32 rounding; other settings change only the UNet's arithmetic
(tests/test_fast_paths.py). Classifier-free guidance (``guidance_scale``) is the pipeline's: one UNet call
on the batch of 2B inside the step (see ddpm_plus/pipeline_ddpm_plus.py), captured in the same graph.
"""

from __future__ import annotations

import copy

import torch
from diffusers import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..schedulers.scheduling_ddpm_plus import DDPMPlusScheduler, StepCoefficients
from .denoisers import DenoiserCall, denoiser_config
from .pipeline_ddpm_plus import OUTPUT_TYPES as PIPELINE_OUTPUT_TYPES
from .pipeline_ddpm_plus import check_sampling_inputs, guidance_labels, guided_unet_output, postprocess

OUTPUT_TYPES = PIPELINE_OUTPUT_TYPES + ("latent",)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_GRAPHED_COMPILE_MODES = ("reduce-overhead", "max-autotune")  # modes that capture CUDA graphs themselves


class FastSampler:
    """Samples like ``DDPMPlusPipeline.__call__`` with the speed-ups below; build once, call many times.

    dtype: the UNet's dtype (None: bfloat16 on a GPU that supports it, else float32). The chain itself
        (latents, x̂_0, posterior mean, noise) stays float32.
    channels_last: run the UNet on NHWC-strided tensors (None: on CUDA, where tensor-core convolutions
        prefer it; on the CPU it is usually slower).
    cuda_graph: capture one whole denoising step (UNet + scheduler update) as a CUDA graph and replay it
        (None: on CUDA unless ``compile`` captures graphs itself; must be False on the CPU).
    compile: None or a ``torch.compile`` mode for the step ("reduce-overhead" and "max-autotune"
        capture CUDA graphs themselves). Compilation happens on the first call (about a minute).

    The pipeline is not modified: the sampler works on a converted copy of its UNet (in eval mode,
    i.e. without dropout) and its own copy of the scheduler.
    """

    def __init__(self, pipe, *, dtype=None, channels_last=None, cuda_graph=None, compile=None):
        if not isinstance(pipe.scheduler, DDPMPlusScheduler):
            raise ValueError(
                f"FastSampler needs a DDPMPlusScheduler; got {type(pipe.scheduler).__name__}. "
                "Use the pipeline itself for other schedulers."
            )
        self.device = pipe._execution_device
        on_cuda = self.device.type == "cuda"
        if dtype is None:
            dtype = torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
        if dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {DTYPES}; got {dtype!r}.")
        if compile is not None and compile not in COMPILE_MODES:
            raise ValueError(f"`compile` must be None or one of {COMPILE_MODES}; got {compile!r}.")
        if channels_last is None:
            channels_last = on_cuda
        if cuda_graph is None:
            cuda_graph = on_cuda and compile not in _GRAPHED_COMPILE_MODES
        if cuda_graph and not on_cuda:
            raise ValueError(f"`cuda_graph=True` needs a CUDA device; the pipeline runs on {self.device}.")
        if cuda_graph and compile in _GRAPHED_COMPILE_MODES:
            raise ValueError(
                f"`cuda_graph=True` with compile={compile!r}: that mode captures CUDA graphs itself; "
                "pass cuda_graph=False, or a compile mode without graphs ('default')."
            )
        self.dtype, self.channels_last, self.cuda_graph, self.compile = dtype, channels_last, cuda_graph, compile
        self.scheduler = DDPMPlusScheduler.from_config(pipe.scheduler.config)
        unet = getattr(pipe, "denoiser", None) or pipe.unet  # a latent pipeline's unet or transformer
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # nn.Module.to: ModelMixin.to only adds a warning about _keep_in_fp32_modules (empty for UNet2DModel).
        if getattr(unet, "_keep_in_fp32_modules", None):
            raise ValueError(f"{type(unet).__name__} keeps modules in float32; FastSampler supports UNet2DModel.")
        self.unet = torch.nn.Module.to(copy.deepcopy(unet), self.device, dtype, memory_format=memory_format).eval()
        self.unet.requires_grad_(False)
        self._call_unet = DenoiserCall(self.unet)  # one timestep per sample, as a DiT needs
        self.unet_config = denoiser_config(unet)
        self.conditioning = pipe.conditioning  # classes, names and null class, for labels and guidance
        self._decode = getattr(pipe, "decode_latents", None)  # a latent pipeline's VAE decoder
        self._step_fn = torch.compile(self._step, mode=compile) if compile is not None else self._step
        T = self.scheduler.config.num_train_timesteps
        # A device table with room for every step count: row i = step i of the current schedule, one
        # column per StepCoefficients field.
        self._table = torch.zeros(T, len(StepCoefficients._fields), device=self.device, dtype=torch.float32)
        self._timesteps = torch.zeros(T, device=self.device, dtype=torch.long)
        self._schedule = None  # num_inference_steps the tables hold
        self._graphs = {}  # (batch_size, guided) -> (graph, static buffers)

    # ------------------------------------------------------------------ tables
    def _load_schedule(self, num_inference_steps: int) -> None:
        """The scheduler's ``step_coefficients()`` (float64) as one float32 device table."""
        if self._schedule == num_inference_steps:
            return
        s = self.scheduler
        s.set_timesteps(num_inference_steps)
        c = s.step_coefficients()
        n = len(c.timestep)
        self._table[:n].copy_(torch.stack([v.to(torch.float64) for v in c], dim=1).to(torch.float32))
        self._timesteps[:n].copy_(c.timestep)
        self._schedule = num_inference_steps

    # ------------------------------------------------------------------ one step
    def _step(self, x, noise, index, class_labels, null_labels=None, scale=None):
        """x_t -> x_prev for step ``index`` (a 1-element device tensor): the scheduler's own step formula
        (``ancestral_step``) with that step's coefficients gathered on the device (0-d tensors); guided
        with the 0-d tensor ``scale`` when ``null_labels`` are given."""
        c = StepCoefficients(*self._table.index_select(0, index)[0].unbind())
        t = self._timesteps.index_select(0, index)
        model_output = guided_unet_output(
            self._call_unet, x.to(self.dtype), t, class_labels, null_labels, scale, self.unet_config.in_channels
        )
        prev_sample, _ = self.scheduler.ancestral_step(model_output, x, c, noise)  # σ = 0 at the final step
        return prev_sample

    def _graph(self, batch_size, shape, class_labels, null_labels):
        """The captured step for this batch size (guided or not): static x, noise, step index, labels, null
        labels and guidance scale, and the graph."""
        key = (batch_size, null_labels is not None)
        if key not in self._graphs:
            static = self._buffers(shape, class_labels, null_labels)
            x, noise, index, labels, nulls, scale = static

            def body():
                x.copy_(self._step_fn(x, noise, index, labels, nulls, scale))

            x.normal_()  # finite warm-up data
            noise.normal_()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up: cuDNN/cuBLAS autotuning and compilation happen here
                    body()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                body()
            self._graphs[key] = (graph, static)
        return self._graphs[key]

    def _buffers(self, shape, class_labels, null_labels=None):
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        x = torch.empty(shape, device=self.device, dtype=torch.float32, memory_format=memory_format)
        noise = torch.zeros_like(x)
        index = torch.zeros(1, device=self.device, dtype=torch.long)
        labels = None if class_labels is None else torch.zeros_like(class_labels)
        nulls = None if null_labels is None else null_labels.clone()
        scale = None if null_labels is None else torch.ones((), device=self.device, dtype=torch.float32)
        return x, noise, index, labels, nulls, scale

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        num_inference_steps: int = 1000,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        class_labels: torch.Tensor | list[int] | list[str] | int | str | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_scale: float = 1.0,
    ) -> ImagePipelineOutput | tuple:
        """As ``DDPMPlusPipeline.__call__``; ``output_type="latent"`` returns the final float32 x_0
        unclamped (for a latent pipeline: the latents, undecoded). Pass a generator on the sampling device to
        keep noise drawing on the device."""
        shape = check_sampling_inputs(
            self.unet_config, batch_size, generator, output_type, latents, class_labels, OUTPUT_TYPES
        )
        batch_size = shape[0]
        class_labels, null_labels = guidance_labels(
            self.conditioning, class_labels, batch_size, guidance_scale, self.device
        )
        self._load_schedule(num_inference_steps)  # validates num_inference_steps
        n = self.scheduler.num_inference_steps

        if latents is None:  # the same draws, in the same order, as DDPMPlusPipeline
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        if self.cuda_graph:
            graph, (x, noise, index, labels, nulls, scale) = self._graph(batch_size, shape, class_labels, null_labels)
            if labels is not None:
                labels.copy_(class_labels)
        else:
            graph = None
            x, noise, index, labels, nulls, scale = self._buffers(shape, class_labels, null_labels)
            labels = class_labels
        if scale is not None:
            scale.fill_(guidance_scale)
        x.copy_(latents.to(self.device, torch.float32) * self.scheduler.init_noise_sigma)
        for i in range(n):
            index.fill_(i)
            if i < n - 1:  # the last step adds no noise and draws none
                noise.copy_(randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32))
            if graph is not None:
                graph.replay()
            else:
                if self.compile in _GRAPHED_COMPILE_MODES:
                    torch.compiler.cudagraph_mark_step_begin()
                x.copy_(self._step_fn(x, noise, index, labels, nulls, scale))

        if output_type == "latent":
            image = x.clone(memory_format=torch.contiguous_format)
        else:
            image = postprocess(x if self._decode is None else self._decode(x), output_type)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


def fast_sample(pipe, batch_size: int | None = None, num_inference_steps: int = 1000, generator=None, **options):
    """One-off ``FastSampler(pipe, **sampler_options)(batch_size, num_inference_steps, generator, ...)``.

    ``options`` may hold FastSampler's (dtype, channels_last, cuda_graph, compile) and its call's
    (latents, class_labels, output_type, return_dict, guidance_scale) keywords. Build a FastSampler to sample
    repeatedly: the UNet copy, CUDA graph and compilation are then made once."""
    keys = ("dtype", "channels_last", "cuda_graph", "compile")
    sampler = FastSampler(pipe, **{k: options.pop(k) for k in keys if k in options})
    return sampler(batch_size, num_inference_steps, generator, **options)
