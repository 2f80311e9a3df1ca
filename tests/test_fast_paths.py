"""GPU fast paths that can be checked on a CPU: batched guidance on the UNet stages, SDPA attention."""

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from dreamix_ray.config import EditConfig
from dreamix_ray.degrade import downsample_to_stage
from dreamix_ray.edit import StageRun, run_stage


def test_batched_guidance_on_a_unet_stage_equals_sequential(tiny, moving_video):
    """cfg_mode batched (cond + uncond as one forward at batch 2) is the same guidance as two forwards."""
    x0 = downsample_to_stage(moving_video, tiny.base.config)
    outs = [run_stage(StageRun.of(tiny, EditConfig(strength=0.8, guidance_scale=3.0, cfg_mode=mode),
                                  ["a red circle"], [5]), 0, x0) for mode in ("sequential", "batched")]
    assert torch.allclose(outs[0], outs[1], atol=1e-4)
    unguided = run_stage(StageRun.of(tiny, EditConfig(strength=0.8), ["a red circle"], [5]), 0, x0)
    assert (unguided - outs[0]).abs().max() > 1e-2  # guidance did something, so the comparison means something


def test_stage_attention_is_sdpa(tiny):
    """Every attention layer of every stage uses torch's scaled_dot_product_attention (flash / memory-efficient
    kernels on a GPU), diffusers' default; nothing in the product swaps in the classic processor."""
    for stage in tiny.stages:
        processors = stage.denoiser.unet.attn_processors
        assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())
