"""Mixed video-image finetuning (paper Sec. 4.2), the artifact cache (LoRA and full artifacts), animation
and subjects."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamix_ray.animate import CAMERAS, camera_path, image_to_video
from dreamix_ray.config import ConfigError, EditConfig
from dreamix_ray.edit import edit
from dreamix_ray.finetune import (
    ARTIFACT_FILE, LORA_LR, FinetuneConfig, _StageData, artifact_key, cascade_id, copy_for_finetuning, finetune,
    finetune_lr, finetune_or_load, finetune_preset, finetune_specs, finetuned_prompt, load_finetuned, video_bytes,
)
from dreamix_ray.finetuned_cache import FinetunedCascades
from dreamix_ray.models import adapters
from dreamix_ray.models.cascade import load_cascade
from dreamix_ray.models.frame_mode import temporal_parameter_names
from dreamix_ray.objective import diffusion_loss, is_frame_step, sr_condition
from dreamix_ray.storage import ArtifactStore
from dreamix_ray.subject import finetune_subject
from dreamix_ray.training.checkpoint import LocalCheckpoints
from dreamix_ray.training.loop import train


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


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_alpha_zero_trains_no_temporal_parameter(tiny, moving_video, adapter):
    cfg = finetune_preset("frames", steps=4, lr=1e-2 if adapter == "lora" else 1e-3, stages=("base",), adapter=adapter)
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


# the tiny base's attention is a small part of it: a rank-4 adapter there reaches ~0.81 of the loss at any lr
@pytest.mark.parametrize("adapter, lr, ratio", [("full", 3e-3, 0.7), ("lora", 1e-2, 0.9)])
def test_loss_goes_down(tiny, moving_video, adapter, lr, ratio):
    cfg = FinetuneConfig(alpha=1.0, steps=30, lr=lr, stages=("base",), adapter=adapter)
    data, text = _StageData(moving_video, tiny.base, cfg), tiny.text_encoder([cfg.prompt])
    losses = []
    tuned = finetune(moving_video, cfg, tiny, on_step=lambda s, i, n, loss: losses.append(loss))
    assert len(losses) == 30
    assert _fixed_loss(tuned.base, data, text) < ratio * _fixed_loss(tiny.base, data, text)


def test_the_loop_trains_only_the_lora_adapter(tiny, moving_video, tmp_path):
    cfg = finetune_preset("mixed", steps=3, lr=1e-2, seed=35)  # step 0 a video step, 1-2 frame steps
    tuned = copy_for_finetuning(tiny, ["base", "ssr"])
    stages = [(i, s, _StageData(moving_video, s, cfg)) for i, s in enumerate(tuned.stages) if s.config.finetune]
    specs = finetune_specs(stages, tiny.text_encoder([cfg.prompt]), cfg, finetune_lr(cfg, tiny))
    train(specs, LocalCheckpoints(tmp_path))
    for index, stage, _ in stages:
        base = dict(tiny.stages[index].denoiser.named_parameters())
        trained = dict(stage.denoiser.named_parameters())
        lora = [n for n in trained if adapters.is_adapter_parameter(n)]
        assert lora and all(trained[n].abs().sum() > 0 for n in lora if "lora_B" in n)  # B starts at 0
        frozen = {n.replace(".base_layer", ""): p for n, p in trained.items() if n not in lora}
        assert frozen.keys() == base.keys() and all(torch.equal(frozen[n], base[n]) for n in base)
    exported = sorted(p.name for p in (sorted(tmp_path.glob("checkpoint-*"))[-1] / "exports" / "base").iterdir())
    assert exported == ["adapter_config.json", adapters.WEIGHTS_FILE]


def test_lora_targets_split_attention_into_spatial_and_temporal(tiny):
    den = tiny.base.denoiser
    every, spatial, temporal = (set(adapters.target_modules(den, t)) for t in adapters.LORA_TARGETS)
    assert spatial and temporal and not spatial & temporal and spatial | temporal == every
    inside = {n.rsplit(".", 1)[0] for n in temporal_parameter_names(den)}
    assert all(any(m.startswith(t) for t in inside) for m in temporal)
    assert not any(any(m.startswith(t) for t in inside) for m in spatial)


class _Killed(Exception):
    """Stands in for the process dying: nothing of the run survives but its checkpoints."""


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_a_killed_finetune_resumes_to_the_uninterrupted_result(tiny, moving_video, tmp_path, adapter):
    # seed 35, alpha 0.35: step 0 is a video step (dropout on the temporal convs), steps 1-3 frame steps
    cfg = finetune_preset("mixed", steps=4, lr=1e-3, checkpoint_every=2, seed=35, adapter=adapter)
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
    trained, base = whole.base.denoiser.state_dict(), tiny.base.denoiser.state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in base)


def test_frame_step_choice_is_shared_and_follows_alpha():
    picks = [is_frame_step(3, s, 0.35) for s in range(2000)]
    assert abs(np.mean(picks) - 0.65) < 0.04
    assert picks == [is_frame_step(3, s, 0.35) for s in range(2000)]
    assert not any(is_frame_step(3, s, 1.0) for s in range(100))
    assert all(is_frame_step(3, s, 0.0) for s in range(100))


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_artifact_round_trip_and_cache_hit(tiny, moving_video, tmp_path, adapter):
    store = ArtifactStore(str(tmp_path / "store"))
    cfg = finetune_preset("mixed", steps=3, lr=1e-2 if adapter == "lora" else 1e-3, adapter=adapter)
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


def test_artifact_keys_tell_lora_and_full_apart(tiny, moving_video):
    data, lora = video_bytes(moving_video), finetune_preset("mixed")
    full = finetune_preset("mixed", adapter="full")
    keys = {artifact_key(data, c, tiny) for c in (lora, full, finetune_preset("mixed", lora_rank=8),
                                                   finetune_preset("mixed", lora_targets="spatial"))}
    assert len(keys) == 4
    assert artifact_key(data, finetune_preset("mixed", lr=LORA_LR), tiny) == artifact_key(data, lora, tiny)
    assert artifact_key(data, finetune_preset("mixed", lr=2 * LORA_LR), tiny) != artifact_key(data, lora, tiny)
    # a full run ignores the LoRA settings, and keeps the key it had before they existed
    assert artifact_key(data, finetune_preset("mixed", adapter="full", lora_rank=8), tiny) == \
        artifact_key(data, full, tiny)
    old = {k: v for k, v in full.to_dict().items() if k not in ("adapter", "lora_rank", "lora_alpha", "lora_targets")}
    h = hashlib.sha256(data)
    h.update(json.dumps(old, sort_keys=True).encode())
    h.update(cascade_id(tiny).encode())
    assert artifact_key(data, full, tiny) == "ft-" + h.hexdigest()[:20]


def test_an_artifact_written_before_lora_loads_as_full(tiny, moving_video, tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    cfg = finetune_preset("video", steps=2, lr=1e-3, stages=("base",), adapter="full")
    tuned, key = finetune_or_load(moving_video, cfg, tiny, store)
    meta_file = Path(store.root, key, ARTIFACT_FILE)
    meta = json.loads(meta_file.read_text())
    meta["config"] = {k: v for k, v in meta["config"].items() if not k.startswith(("adapter", "lora_"))}
    meta_file.write_text(json.dumps(meta))
    loaded, loaded_cfg = load_finetuned(tiny, key, store)
    assert loaded_cfg == cfg
    want, got = tuned.base.denoiser.state_dict(), loaded.base.denoiser.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_lora_artifact_is_under_5_percent_of_the_embedded_stages(moving_video, tmp_path):
    cascade = load_cascade()
    store = ArtifactStore(str(tmp_path / "store"))
    cfg = finetune_preset("mixed", steps=1)  # the shipped defaults: LoRA, its rank and targets
    tuned, key = finetune_or_load(moving_video, cfg, cascade, store)
    stored = sum(f.stat().st_size for f in Path(store.root, key).rglob("*") if f.is_file())
    weights = sum(p.numel() * p.element_size() for s in cascade.stages if s.config.finetune
                  for p in s.denoiser.parameters())
    assert stored <= 0.05 * weights, (stored, weights)
    assert not any(Path(store.root, key).rglob("diffusion_pytorch_model*"))


def _edits(models: FinetunedCascades, video, order: list[str | None]) -> list[np.ndarray]:
    out = []
    for artifact in order:
        cascade, rewrite = models.get(artifact)
        out.append(edit(video, rewrite("a green square"), EditConfig(strength=0.9, seed=5), cascade).frames)
    return out


def test_one_base_serves_interleaved_artifacts_as_each_alone(tiny, moving_video, tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    a = finetune_or_load(moving_video, finetune_preset("video", steps=3, lr=3e-2), tiny, store)[1]
    b = finetune_or_load(moving_video, finetune_preset("video", steps=3, lr=3e-2, seed=1), tiny, store)[1]
    before = [{k: v.clone() for k, v in s.denoiser.state_dict().items()} for s in tiny.stages]
    alone = {x: _edits(FinetunedCascades(lambda: tiny, store), moving_video, [x])[0] for x in (None, a, b)}
    assert not np.array_equal(alone[a], alone[b]) and not np.array_equal(alone[a], alone[None])
    # size 1: A is merged again after B replaced it
    models = FinetunedCascades(lambda: tiny, store, size=1)
    order = [None, a, b, a, None]
    for artifact, frames in zip(order, _edits(models, moving_video, order)):
        assert np.array_equal(frames, alone[artifact]), artifact
    assert models.get(None)[0] is tiny  # one base, unchanged by the artifacts merged over it
    for want, stage in zip(before, tiny.stages):
        got = stage.denoiser.state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want)


def test_finetuning_is_deterministic(tiny, moving_video):
    cfg = finetune_preset("mixed", steps=3, lr=1e-3, stages=("base",))
    a, b = finetune(moving_video, cfg, tiny), finetune(moving_video, cfg, tiny)
    sa, sb = a.base.denoiser.state_dict(), b.base.denoiser.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=1.5), "alpha"), (dict(alpha=-0.1), "alpha"), (dict(steps=0), "at least 1 step"),
    (dict(lr=0.0), "learning rate"), (dict(token="two words"), "one word"),
    (dict(adapter="half"), "unknown finetuning adapter"), (dict(lora_rank=0), "LoRA rank"),
    (dict(lora_alpha=-1.0), "LoRA alpha"), (dict(lora_targets="ffn"), "unknown LoRA targets"),
    (dict(lora_targets="temporal"), "temporal-only LoRA learns nothing on frame steps"),
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
