"""Fast paths: batched guidance on the UNet stages, SDPA attention, no per-step host reads, the temporal
convolutions as 2D convolutions on CPU, freed host memory reused without page faults."""

import os
import platform
import subprocess
import sys

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from dreamix_ray.config import EditConfig
from dreamix_ray.degrade import downsample_to_stage
from dreamix_ray.edit import StageRun, run_stage
from dreamix_ray.models.temporal_conv import FrameAxisConv3d

from host_syncs import HostReads


def test_batched_guidance_on_a_unet_stage_equals_sequential(tiny, moving_video):
    """cfg_mode batched (cond + uncond as one forward at batch 2) is the same guidance as two forwards."""
    x0 = downsample_to_stage(moving_video, tiny.base.config)
    outs = [run_stage(StageRun.of(tiny, EditConfig(strength=0.8, guidance_scale=3.0, cfg_mode=mode),
                                  ["a red circle"], [5]), 0, x0) for mode in ("sequential", "batched")]
    assert torch.allclose(outs[0], outs[1], atol=1e-4)
    unguided = run_stage(StageRun.of(tiny, EditConfig(strength=0.8), ["a red circle"], [5]), 0, x0)
    assert (unguided - outs[0]).abs().max() > 1e-2  # guidance did something, so the comparison means something


def test_temporal_convs_run_as_2d_convolutions_with_the_same_result_and_weights(tiny):
    """Every UNet3D temporal Conv3d of every stage is a FrameAxisConv3d: the same parameters under the same names
    (a plain Conv3d loads its state dict), and the same output and gradients as the Conv3d it replaces."""
    for stage in tiny.stages:
        convs = [m for m in stage.denoiser.modules() if isinstance(m, torch.nn.Conv3d)]
        assert convs and all(type(m) is FrameAxisConv3d for m in convs), stage.config.name
    conv = next(m for m in tiny.base.denoiser.modules() if type(m) is FrameAxisConv3d)
    plain = torch.nn.Conv3d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, 5, conv.in_channels, 6, 7).permute(0, 2, 1, 3, 4)  # as TemporalConvLayer passes it
    x_fast, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    fast_out, plain_out = conv(x_fast), plain(x_plain)
    assert fast_out.shape == plain_out.shape and torch.allclose(fast_out, plain_out, atol=1e-5)
    fast_out.square().sum().backward()
    plain_out.square().sum().backward()
    assert torch.allclose(x_fast.grad, x_plain.grad, atol=1e-4)
    assert torch.allclose(conv.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-4)
    conv.weight.grad = None


def test_stage_attention_is_sdpa(tiny):
    """Every attention layer of every stage uses torch's scaled_dot_product_attention (flash / memory-efficient
    kernels on a GPU), diffusers' default; nothing in the product swaps in the classic processor."""
    for stage in tiny.stages:
        processors = stage.denoiser.unet.attn_processors
        assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())


def _stage_reads(cascade, index: int, x, steps: int, **settings):
    """(output, HostReads) of stage `index` run for `steps` steps, the text encoded beforehand."""
    stage_steps = tuple(steps for _ in cascade.stages)
    run = StageRun.of(cascade, EditConfig(steps=stage_steps, seed=3, **settings), ["a red circle moving left"], [3])
    run.text()
    if index == len(cascade.stages) - 1:  # the last stage runs chunk by chunk: its first chunk
        lo, hi = run.plan.stages[index].chunk_input(0)
        x = x[:, :, lo:hi]
    with HostReads() as reads:
        out = run_stage(run, index, x)
    return out, reads


def test_no_stage_of_the_default_edit_reads_the_device_back_per_step(moving_video):
    """Per-step host syncs (GPU item 3): a sampling step of the embedded cascade's stages, with its default
    guidance, motion guidance on the base and the TSR's kept keyframes, reads no tensor back to the host; what
    is read is read once per stage (the timestep list), so doubling the steps adds no reads."""
    from dreamix_ray.models.cascade import load_cascade

    cascade = load_cascade()
    assert cascade.config.motion_prior  # so the base's run below includes motion guidance
    settings = dict(strength=1.0, motion_guidance=1.0, guidance_scale=2.0)
    x = downsample_to_stage(moving_video, cascade.base.config)
    for index in range(len(cascade.stages)):
        (out, few), (_, more) = (_stage_reads(cascade, index, x, n, **settings) for n in (2, 4))
        assert few.total == more.total, (cascade.stages[index].config.name, few.calls, more.calls)
        x = out


_REALLOCATE = """
import resource, torch
from dreamix_ray.host_memory import keep_freed_memory
tuned = keep_freed_memory()
x = torch.randn(4, 32, 16, 64, 64)  # 32 MiB: an SSR activation at batch 4, above glibc's largest mmap threshold
faults = []
for _ in range(6):  # steps of a sampler: the same temporaries allocated and freed each time
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.nn.functional.gelu(x) * 2 + 1
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(tuned, sum(faults[2:]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the malloc tuning is glibc's")
def test_a_freed_large_tensor_is_reused_without_faulting_its_pages_in_again():
    def page_faults(keep: str) -> tuple[str, int]:
        env = {**os.environ, "DREAMIX_KEEP_FREED_MEMORY": keep}
        out = subprocess.run([sys.executable, "-c", _REALLOCATE], env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        return out[0], int(out[1])

    untuned, tuned = page_faults("0"), page_faults("1")
    assert untuned[0] == "False" and untuned[1] > 4 * 8192  # every 32 MiB temporary faulted in afresh
    # Steady state: reused, already mapped (a round now and then still maps one block afresh).
    assert tuned[0] == "True" and tuned[1] < untuned[1] / 4


_POOL_THREAD_HEAP = """
import ctypes
from concurrent.futures import ThreadPoolExecutor
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.sbrk.restype, libc.free.argtypes = ctypes.c_void_p, ctypes.c_void_p, [ctypes.c_void_p]
def in_main_heap():  # the main arena grows with brk; a thread's own arena is an mmap'd heap above it
    block = libc.malloc(4096)
    top = libc.sbrk(0)
    libc.free(block)
    return block < top
print(ThreadPoolExecutor(1).submit(in_main_heap).result())  # a thread like the one Ray calls a step on
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the malloc tuning is glibc's")
def test_a_ray_workers_environment_puts_its_pool_threads_on_the_tuned_main_heap():
    from dreamix_ray.host_memory import worker_env

    def on_main_heap(env: dict[str, str]) -> str:
        clean = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
        return subprocess.run([sys.executable, "-c", _POOL_THREAD_HEAP], env={**clean, **env}, capture_output=True,
                              text=True, check=True).stdout.strip()

    assert on_main_heap({}) == "False"  # glibc's default: an arena of its own, which keep_freed_memory keeps less of
    assert worker_env() and on_main_heap(worker_env()) == "True"
