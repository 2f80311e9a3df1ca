"""The Dreamix edit path (paper Sec. 4.1) on a tiny real cascade."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from conftest import sample_clip
from dreamix_ray.config import ConfigError, EditConfig, StageConfig
from dreamix_ray.degrade import downsample_to_stage, noise_at_strength
from dreamix_ray.edit import StageRun, edit, generate, run_cascade, run_stage
from dreamix_ray.models.cascade import Cascade
from dreamix_ray.request import chunk_bounds
from dreamix_ray.sampling import (ddim_sample, draw_noise, sampling_scheduler, scheduler_family, seed_generators,
                                  signal_noise_scales, strength_timesteps)
from dreamix_ray.video import Video, read_video


def test_shapes_and_fps_through_the_cascade(tiny, moving_video):
    out = edit(moving_video, "a green square moving right", EditConfig(strength=0.6), tiny)
    last = tiny.stages[-1].config
    assert out.frames.shape == (last.frames, last.height, last.width, 3)
    assert out.frames.dtype == np.uint8 and out.fps == last.fps
    longer = edit(moving_video, "x", EditConfig(strength=0.6, num_frames=6), tiny)
    assert longer.num_frames == 12  # base frames x TSR factor


def test_strength_one_equals_text_to_video(tiny, moving_video):
    cfg = EditConfig(strength=1.0, seed=7)
    edited = edit(moving_video, "a blue triangle", cfg, tiny)
    assert np.array_equal(edited.frames, generate("a blue triangle", cfg, tiny).frames)
    other = Video(255 - moving_video.frames, moving_video.fps)
    assert np.array_equal(edited.frames, edit(other, "a blue triangle", cfg, tiny).frames)


def test_strength_zero_starts_from_the_degraded_video(tiny, moving_video):
    x0 = downsample_to_stage(moving_video, tiny.base.config)
    out = run_stage(StageRun.of(tiny, EditConfig(strength=0.0), ["anything"], [0]), 0, x0)
    assert torch.equal(out, x0)
    partly = run_stage(StageRun.of(tiny, EditConfig(strength=0.5), ["anything"], [0]), 0, x0)
    assert not torch.equal(partly, x0)


def test_noise_follows_q_of_x_s(tiny):
    x0 = torch.full((64, 3, 4, 8, 8), 0.5)
    sched = tiny.base.scheduler
    x_s, ts = noise_at_strength(x0, 0.5, sched, 10, seed_generators(list(range(64)), 0))
    abar = sched.alphas_cumprod[ts[0]].item()
    assert 450 <= ts[0] <= 550
    assert abs(x_s.mean().item() - math.sqrt(abar) * 0.5) < 0.02
    assert abs(x_s.std().item() - math.sqrt(1 - abar)) < 0.02


def test_same_seed_same_video_and_batch_equals_rows(tiny, moving_video):
    x0 = downsample_to_stage(moving_video, tiny.base.config)
    x0b = torch.cat([x0, torch.flip(x0, dims=[2])])
    cfg = EditConfig(strength=0.8, ssr_chunk_frames=4)
    prompts, seeds = ["a red circle moving left", "a yellow square"], [11, 12]
    batch = run_cascade(StageRun.of(tiny, cfg, prompts, seeds), x0b)
    rows = [run_cascade(StageRun.of(tiny, cfg, [prompts[i]], [seeds[i]]), x0b[i:i + 1])[0] for i in range(2)]
    reversed_batch = run_cascade(StageRun.of(tiny, cfg, prompts[::-1], seeds[::-1]), x0b.flip(0))
    for i in range(2):
        assert np.abs(batch[i].astype(int) - rows[i].astype(int)).max() <= 1
        assert np.abs(reversed_batch[1 - i].astype(int) - rows[i].astype(int)).max() <= 1
    again = run_cascade(StageRun.of(tiny, cfg, prompts[:1], seeds[:1]), x0b[:1])[0]
    assert np.array_equal(again, rows[0])
    assert not np.array_equal(run_cascade(StageRun.of(tiny, cfg, prompts[:1], [99]), x0b[:1])[0], rows[0])


def test_chunked_last_ssr_frames_and_chunk_independence(tiny):
    cfg = EditConfig(strength=1.0, num_frames=5, ssr_chunk_frames=4)
    assert chunk_bounds(10, 4) == ((0, 4), (4, 8), (8, 10))
    prev = torch.rand(1, 3, 10, 8, 8) * 2 - 1
    ssr = tiny.last_ssr_index()
    whole = run_cascade_from_ssr(tiny, prev, cfg)
    assert whole.shape == (10, 16, 16, 3)
    # Chunk 1 alone, computed directly, is exactly frames 4..8 of the whole output.
    part = run_stage(StageRun.of(tiny, cfg, ["p"], [5]), ssr, prev[:, :, 4:8], 1)
    from dreamix_ray.degrade import tensor_to_frames
    assert np.array_equal(tensor_to_frames(part)[0], whole[4:8])
    # Changing chunk 0's input frames leaves the other chunks untouched.
    prev2 = prev.clone()
    prev2[:, :, 0:4] = -prev2[:, :, 0:4]
    whole2 = run_cascade_from_ssr(tiny, prev2, cfg)
    assert not np.array_equal(whole[:4], whole2[:4])
    assert np.array_equal(whole[4:], whole2[4:])


def run_cascade_from_ssr(cascade, prev, cfg):
    """Only the last SSR, chunked as run_cascade does it."""
    from dreamix_ray.degrade import tensor_to_frames

    ssr = cascade.last_ssr_index()
    parts = [tensor_to_frames(run_stage(StageRun.of(cascade, cfg, ["p"], [5]), ssr, prev[:, :, lo:hi], c))[0]
             for c, (lo, hi) in enumerate(chunk_bounds(prev.shape[2], cfg.ssr_chunk_frames))]
    return np.concatenate(parts)


def test_chunking_matches_run_cascade(tiny, moving_video):
    x0 = downsample_to_stage(moving_video, tiny.base.config, num_frames=6)
    cfg = EditConfig(strength=0.7, num_frames=6, ssr_chunk_frames=5, seed=1)
    full = run_cascade(StageRun.of(tiny, cfg, ["p"], [1]), x0)[0]
    assert full.shape[0] == 12
    prev = run_stage(StageRun.of(tiny, cfg, ["p"], [1]), 1, run_stage(StageRun.of(tiny, cfg, ["p"], [1]), 0, x0))
    assert np.array_equal(full, run_cascade_from_ssr_seed(tiny, prev, cfg, 1))


def run_cascade_from_ssr_seed(cascade, prev, cfg, seed):
    from dreamix_ray.degrade import tensor_to_frames

    ssr = cascade.last_ssr_index()
    return np.concatenate([
        tensor_to_frames(run_stage(StageRun.of(cascade, cfg, ["p"], [seed]), ssr, prev[:, :, lo:hi], c))[0]
        for c, (lo, hi) in enumerate(chunk_bounds(prev.shape[2], cfg.ssr_chunk_frames))])


def test_sr_strength_starts_the_sr_stages_from_the_upsampled_output(tiny):
    """1 = from pure noise (bit for bit the paper's path); lower = SDEdit from the upsampled previous
    output, so a low SR strength keeps what the base drew; the cascade's value is the default."""
    import dataclasses

    from dreamix_ray.config import CascadeConfig
    from dreamix_ray.degrade import upsample_condition

    prev = torch.rand(1, 3, 8, 8, 8) * 2 - 1
    ssr = tiny.last_ssr_index()
    cond = upsample_condition(prev, tiny.stages[ssr].config)
    runs = {sr: run_stage(StageRun.of(tiny, EditConfig(sr_strength=sr, steps=(10, 10, 10)), ["p"], [5]), ssr, prev)
            for sr in (None, 1.0, 0.3)}
    assert torch.equal(runs[None], runs[1.0])
    err = {sr: (runs[sr] - cond).abs().mean().item() for sr in (1.0, 0.3)}
    # (random weights: what is kept comes from the start, not the net; 3 of 10 steps still run)
    assert 0 < err[0.3] < 0.6 * err[1.0], err
    tuned = dataclasses.replace(tiny.config, sr_strength=0.3)
    assert CascadeConfig.from_dict(tuned.to_dict()).sr_strength == 0.3 and "sr_strength" not in tiny.config.to_dict()
    assert EditConfig().stage_sr_strength(tuned) == 0.3 and EditConfig(sr_strength=1.0).stage_sr_strength(tuned) == 1
    with pytest.raises(ConfigError, match="SR strength must be in"):
        EditConfig(sr_strength=0.0)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "abc", 5])
def test_bad_strength_is_a_clear_error(bad):
    with pytest.raises(ConfigError, match="strength"):
        EditConfig(strength=bad)


def test_classifier_free_guidance_is_optional(tiny, moving_video):
    plain = edit(moving_video, "a red circle", EditConfig(strength=0.8), tiny)
    guided = edit(moving_video, "a red circle", EditConfig(strength=0.8, guidance_scale=3.0), tiny)
    assert not np.array_equal(plain.frames, guided.frames)


def test_edits_a_real_clip_end_to_end(tiny):
    clip = read_video(sample_clip("wolf.mp4"))
    assert clip.num_frames == 40 and clip.height == 512
    out = edit(clip, "a shiny silver robotic wolf", EditConfig(strength=0.7), tiny)
    assert out.frames.shape == (8, 16, 16, 3) and out.frames.std() > 0


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_dpm_solver_lands_on_x0_from_pure_noise(tiny, eta):
    """DPM-Solver++ on a DDIM-family stage's schedule (zero terminal SNR, v-prediction): with the exact
    velocity of a point mass x0, the ODE (eta 0) and its SDE variant (eta > 0) both end on x0 in 6 steps."""
    scheduler = sampling_scheduler(tiny.stages[-1].scheduler, "dpm++", eta)
    assert scheduler_family(scheduler) == "dpm"
    timesteps = strength_timesteps(scheduler, 6, 1.0)
    target = torch.linspace(-1, 1, 32 * 32).view(1, 1, 1, 32, 32)

    def velocity(x, t):  # v = alpha eps - sigma x0, with eps = (x - alpha x0) / sigma
        alpha, sigma = signal_noise_scales(scheduler, t, x)
        return alpha * (x - alpha * target) / sigma - sigma * target

    gens = seed_generators([0], 0)
    out = ddim_sample(velocity, draw_noise(tuple(target.shape), gens), scheduler, timesteps, eta, gens)
    torch.testing.assert_close(out, target, atol=1e-3, rtol=1e-3)


def test_an_ssr_sampling_with_dpm_solver_keeps_batch_equal_rows(tiny, moving_video):
    """A stage's `sampler: "dpm++"` changes how it samples, not what a row depends on: a batch gives each row's
    own video, the seed decides it, and the DDIM-sampled cascade gives another video."""
    stages = [dataclasses.replace(s, config=dataclasses.replace(s.config, sampler="dpm++", steps=3))
              if s.config.kind == "ssr" else s for s in tiny.stages]
    config = dataclasses.replace(tiny.config, stages=tuple(s.config for s in stages))
    dpm = Cascade(config, tiny.text_encoder, stages)
    assert dpm.cascade_id != tiny.cascade_id  # finetuned-artifact and result caches tell them apart
    x0 = downsample_to_stage(moving_video, tiny.base.config)
    x0b = torch.cat([x0, torch.flip(x0, dims=[2])])
    cfg = EditConfig(strength=0.8)
    prompts, seeds = ["a red circle moving left", "a yellow square"], [11, 12]
    batch = run_cascade(StageRun.of(dpm, cfg, prompts, seeds), x0b)
    rows = [run_cascade(StageRun.of(dpm, cfg, [prompts[i]], [seeds[i]]), x0b[i:i + 1])[0] for i in range(2)]
    for i in range(2):
        assert np.abs(batch[i].astype(int) - rows[i].astype(int)).max() <= 1
    assert np.array_equal(run_cascade(StageRun.of(dpm, cfg, prompts[:1], seeds[:1]), x0b[:1])[0], rows[0])
    assert not np.array_equal(run_cascade(StageRun.of(tiny, cfg, prompts[:1], seeds[:1]), x0b[:1])[0], rows[0])


def test_an_unknown_sampler_is_a_config_error():
    with pytest.raises(ConfigError, match=r"sampler must be one of \('ddim', 'dpm\+\+'\), got 'euler'"):
        StageConfig("ssr", "ssr", frames=8, height=16, width=16, fps=4.0, factor=2, sampler="euler")
