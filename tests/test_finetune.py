"""Mixed video-image finetuning (paper Sec. 4.2), the artifact cache, animation and subjects."""

import numpy as np
import pytest
import torch

from dreamix_ray.animate import CAMERAS, camera_path, image_to_video
from dreamix_ray.config import ConfigError, EditConfig
from dreamix_ray.edit import edit
from dreamix_ray.finetune import (
    ARTIFACT_FILE, FinetuneConfig, _StageData, copy_for_finetuning, finetune, finetune_or_load, finetune_preset,
    finetuned_prompt, load_finetuned,
)
from dreamix_ray.models.frame_mode import temporal_parameter_names
from dreamix_ray.objective import diffusion_loss, is_frame_step, sr_condition
from dreamix_ray.storage import ArtifactStore
from dreamix_ray.subject import finetune_subject


def _grads_after_one_step(tiny, video, frames_step: bool):
    tuned = copy_for_finetuning(tiny, ["base"])
    stage = tuned.base
    data = _StageData(video, stage, FinetuneConfig())
    x0 = data.frame_batch(np.random.default_rng(0)) if frames_step else data.clip_bcfhw
    tokens, pooled = tiny.text_encoder(["naia"])
    stage.denoiser.train().requires_grad_(True)
    loss = diffusion_loss(stage, x0, sr_condition(stage, x0, frames_step), tokens, pooled,
                          torch.Generator().manual_seed(0), frame_mode_on=frames_step)
    loss.backward()
    return {n: p.grad for n, p in stage.denoiser.named_parameters()}, temporal_parameter_names(stage.denoiser)


def test_frame_mode_gives_temporal_layers_no_gradient(tiny, moving_video):
    grads, temporal = _grads_after_one_step(tiny, moving_video, frames_step=True)
    assert temporal
    assert all(grads[n] is None or not grads[n].any() for n in temporal)
    assert any(grads[n] is not None and grads[n].any() for n in grads if n not in temporal)
    grads, _ = _grads_after_one_step(tiny, moving_video, frames_step=False)
    assert any(grads[n] is not None and grads[n].any() for n in temporal)


def test_alpha_zero_trains_no_temporal_parameter(tiny, moving_video):
    cfg = finetune_preset("frames", steps=4, lr=1e-3, stages=("base",))
    tuned = finetune(moving_video, cfg, tiny)
    before, after = tiny.base.denoiser.state_dict(), tuned.base.denoiser.state_dict()
    temporal = {n for n in temporal_parameter_names(tiny.base.denoiser)}
    assert all(torch.equal(before[n], after[n]) for n in temporal)
    assert any(not torch.equal(before[n], after[n]) for n in before if n not in temporal)
    # the original cascade is untouched
    assert tiny.base.denoiser is not tuned.base.denoiser


def _fixed_loss(stage, data, text):
    """The objective at fixed timesteps and noise, so the comparison is not drowned in sampling noise."""
    with torch.no_grad():
        x0 = data.clip_bcfhw.repeat(16, 1, 1, 1, 1)
        tokens, pooled = (t.repeat(16, *[1] * (t.dim() - 1)) for t in text)
        return diffusion_loss(stage, x0, None, tokens, pooled, torch.Generator().manual_seed(123), False).item()


def test_loss_goes_down(tiny, moving_video):
    cfg = FinetuneConfig(alpha=1.0, steps=30, lr=3e-3, stages=("base",))
    data, text = _StageData(moving_video, tiny.base, cfg), tiny.text_encoder([cfg.prompt])
    losses = []
    tuned = finetune(moving_video, cfg, tiny, on_step=lambda s, i, n, loss: losses.append(loss))
    assert len(losses) == 30
    assert _fixed_loss(tuned.base, data, text) < 0.7 * _fixed_loss(tiny.base, data, text)


class _Killed(Exception):
    """Stands in for the process dying: nothing of the run survives but its checkpoints."""


def test_a_killed_finetune_resumes_to_the_uninterrupted_result(tiny, moving_video, tmp_path):
    # seed 35, alpha 0.35: step 0 is a video step (dropout on the temporal convs), steps 1-3 frame steps
    cfg = finetune_preset("mixed", steps=4, lr=1e-3, checkpoint_every=2, seed=35)
    whole = finetune(moving_video, cfg, tiny)

    def kill(stage, step, total, loss):
        if (stage, step) == ("ssr", 3):
            raise _Killed

    with pytest.raises(_Killed):  # after the base finished and the SSR's checkpoint at step 2
        finetune(moving_video, cfg, tiny, tmp_path, on_step=kill)
    steps = []
    resumed = finetune(moving_video, cfg, tiny, tmp_path, on_step=lambda stage, step, *_: steps.append((stage, step)))
    assert steps == [("ssr", 3), ("ssr", 4)]  # the base is done, the SSR carries on from its checkpoint
    for index in (0, 2):  # weights, Adam moments and the dropout draws came back: bit for bit
        want, got = whole.stages[index].denoiser.state_dict(), resumed.stages[index].denoiser.state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want)
    assert not torch.equal(whole.base.denoiser.state_dict()["unet.conv_in.weight"],
                           tiny.base.denoiser.state_dict()["unet.conv_in.weight"])


def test_frame_step_choice_is_shared_and_follows_alpha():
    picks = [is_frame_step(3, s, 0.35) for s in range(2000)]
    assert abs(np.mean(picks) - 0.65) < 0.04
    assert picks == [is_frame_step(3, s, 0.35) for s in range(2000)]
    assert not any(is_frame_step(3, s, 1.0) for s in range(100))
    assert all(is_frame_step(3, s, 0.0) for s in range(100))


def test_artifact_round_trip_and_cache_hit(tiny, moving_video, tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    cfg = finetune_preset("mixed", steps=3, lr=1e-3)
    steps = []
    tuned, key = finetune_or_load(moving_video, cfg, tiny, store, on_step=lambda *a: steps.append(a))
    assert len(steps) == 6 and store.has(key, ARTIFACT_FILE)  # base + ssr, 3 steps each
    steps.clear()
    again, key2 = finetune_or_load(moving_video, cfg, tiny, store, on_step=lambda *a: steps.append(a))
    assert key2 == key and steps == []  # cache hit: no training step ran
    loaded, loaded_cfg = load_finetuned(tiny, key, store)
    assert loaded_cfg == cfg
    prompt = finetuned_prompt("a red circle moving right", cfg)
    assert prompt.startswith(cfg.token)
    ecfg = EditConfig(strength=0.95, seed=2)
    a = edit(moving_video, prompt, ecfg, tuned)
    assert np.array_equal(a.frames, edit(moving_video, prompt, ecfg, loaded).frames)
    assert np.array_equal(a.frames, edit(moving_video, prompt, ecfg, again).frames)
    assert not np.array_equal(a.frames, edit(moving_video, prompt, ecfg, tiny).frames)
    other, key3 = finetune_or_load(moving_video, finetune_preset("mixed", steps=2, lr=1e-3), tiny, store)
    assert key3 != key


def test_finetuning_is_deterministic(tiny, moving_video):
    cfg = finetune_preset("mixed", steps=3, lr=1e-3, stages=("base",))
    a, b = finetune(moving_video, cfg, tiny), finetune(moving_video, cfg, tiny)
    sa, sb = a.base.denoiser.state_dict(), b.base.denoiser.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=1.5), "alpha"), (dict(alpha=-0.1), "alpha"), (dict(steps=0), "at least 1 step"),
    (dict(lr=0.0), "learning rate"), (dict(token="two words"), "one word"),
])
def test_bad_finetune_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        finetune_preset("mixed", **kwargs)


def test_unknown_preset_and_stage(tiny, moving_video):
    with pytest.raises(ConfigError, match="unknown finetune preset"):
        finetune_preset("fast")
    with pytest.raises(ConfigError, match="unknown stage"):
        finetune(moving_video, finetune_preset("video", steps=1, stages=("nope",)), tiny)


@pytest.mark.parametrize("camera", CAMERAS)
def test_camera_paths_are_smooth_and_never_leave_black_borders(camera):
    mats = camera_path(camera, 16)
    steps = np.abs(np.diff(mats, axis=0)).max(axis=(1, 2))
    assert steps.max() <= 0.06  # at most ~3% of the frame per frame
    rng = np.random.default_rng(0)
    image = rng.integers(60, 255, (40, 56, 3), dtype=np.uint8)
    video = image_to_video(image, camera, 16, 8.0)
    assert video.frames.shape == (16, 40, 56, 3)
    assert video.frames.min() >= 55  # reflection padding: no black pixel anywhere
    if camera == "static":
        assert np.array_equal(video.frames[0], video.frames[-1])
    else:
        assert not np.array_equal(video.frames[0], video.frames[-1])


def test_pan_left_moves_content_right():
    image = np.zeros((32, 32, 3), np.uint8) + 80
    image[:, 14:18] = 250
    video = image_to_video(image, "pan-left", 8, 8.0)
    col = lambda f: np.argmax(f[:, :, 0].mean(axis=0))  # noqa: E731
    assert col(video.frames[-1]) > col(video.frames[0])


def test_subject_needs_two_readable_images(tiny, tmp_path):
    from PIL import Image

    folder = tmp_path / "subject"
    folder.mkdir()
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(folder / "a.png")
    store = ArtifactStore(str(tmp_path / "store"))
    with pytest.raises(ConfigError, match="at least 2"):
        finetune_subject(folder, "naia", tiny, store)
    (folder / "b.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="b.png"):
        finetune_subject(folder, "naia", tiny, store)
    Image.fromarray(np.full((24, 30, 3), 90, np.uint8)).save(folder / "b.png")
    key = finetune_subject(folder, "naia", tiny, store, finetune_preset("frames", steps=2, lr=1e-3))
    assert store.has(key, ARTIFACT_FILE)
