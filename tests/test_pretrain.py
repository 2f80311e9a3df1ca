"""Pretraining pieces: the world batch (held-out combos, reversed twins), the lr schedule, resume."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dreamix_ray.pretrain import (
    OPPOSITE, PretrainConfig, export_cascade, held_out, learning_rate, pretrain_spec, reversed_twin, train_stage,
    training_scenes,
)
from dreamix_ray.training.checkpoint import LocalCheckpoints, TrainState
from dreamix_ray.training.engines import EngineConfig
from dreamix_ray.training.loop import train
from dreamix_ray.world.analyze import analyze, compare
from dreamix_ray.world.render import render
from dreamix_ray.world.scene import sample_scene


def test_reversed_twin_is_the_same_scene_moving_back():
    rng = np.random.default_rng(3)
    checked = 0
    while checked < 8:
        scene = sample_scene(rng, n_objects=1)
        obj = scene.objects[0]
        if obj.motion not in OPPOSITE:
            continue
        twin = reversed_twin(scene)
        t_obj = twin.objects[0]
        assert t_obj.motion == OPPOSITE[obj.motion]
        assert (t_obj.shape, t_obj.colour, t_obj.size, t_obj.style) == (obj.shape, obj.colour, obj.size, obj.style)
        assert twin.background == scene.background
        # the analyzer (pixels only) sees a valid scene with the opposite motion, ending where the pair began
        verdict = compare(twin, analyze(render(twin, 16, 64, 8.0)))
        assert all(verdict.values()), verdict
        end = render(twin, 16, 64, 8.0)[-1].astype(float)
        start = render(scene, 16, 64, 8.0)[0].astype(float)
        assert np.abs(end - start).mean() < 12  # one frame interval apart, so close but not identical
        checked += 1


def _twin_pairs(batches) -> int:
    """Adjacent scenes where the second is the first's reversed twin."""
    return sum(1 for b in batches for a, c in zip(b, b[1:])
               if len(a.objects) == 1 and a.objects[0].motion in OPPOSITE and c == reversed_twin(a))


def test_training_scenes_hold_out_combos_and_pair_twins():
    batches = [training_scenes(np.random.default_rng([0, i]), 8, reversed_twins=1.0) for i in range(60)]
    assert all(len(b) == 8 for b in batches)
    assert not any(held_out(s) for b in batches for s in b)  # a twin of a trained combo may be held out: skipped
    assert _twin_pairs(batches) > 60  # about 2 per batch of 8 at reversed_twins=1
    assert _twin_pairs([training_scenes(np.random.default_rng([0, i]), 8) for i in range(60)]) == 0


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = PretrainConfig(lr=1e-3, warmup_steps=100, max_steps=1000, final_lr_fraction=0.1)
    rates = [learning_rate(cfg, s) for s in range(0, 1200, 10)]
    warm, decay = rates[:10], rates[10:100]
    assert warm == sorted(warm) and warm[-1] < 1e-3
    assert learning_rate(cfg, 100) == pytest.approx(1e-3)
    assert decay == sorted(decay, reverse=True)
    assert learning_rate(cfg, 1000) == pytest.approx(1e-4) == learning_rate(cfg, 5000)


def test_train_stage_resumes_from_its_checkpoint(tmp_path, text_encoder):
    logs = []
    cfg = PretrainConfig(stage="base", max_steps=2, batch_size=2, warmup_steps=1)
    train_stage(cfg, tmp_path, text_encoder, log=logs.append)
    ema = train_stage(PretrainConfig(**{**cfg.to_dict(), "max_steps": 3}), tmp_path, text_encoder, log=logs.append)
    assert "[base] resumed at step 2" in logs  # a rerun with more steps trains on
    with LocalCheckpoints(tmp_path / "base" / "checkpoints").latest() as last:
        state = TrainState.read(last)
    assert state.step == 3 and state.starts == [["base", 0], ["base", 2]] and len(state.losses["base"]) == 3
    assert ema == tmp_path / "base" / "ema" and (ema / "config.json").is_file()
    with pytest.raises(FileNotFoundError, match="'tsr' has no trained weights"):
        export_cascade(tmp_path, tmp_path / "out", text_encoder)
    assert json.loads((ema / "config.json").read_text())["position_frames"] == 8


class _Killed(Exception):
    """Stands in for the process dying: nothing of the run survives but its checkpoints."""


def _kill_at(when: int):
    def on_step(name, step, total, loss):
        if step == when:
            raise _Killed
    return on_step


def test_a_killed_pretraining_run_resumes_to_the_uninterrupted_result(tmp_path, text_encoder):
    """Weights, Adam moments, the EMA, the learning-rate schedule and the dropout draws all come back:
    the resumed run's losses and exported EMA are the uninterrupted run's, bit for bit."""
    cfg = PretrainConfig(stage="base", max_steps=3, batch_size=1, warmup_steps=2, checkpoint_every=2,
                         image_fraction=0.5)
    whole = LocalCheckpoints(tmp_path / "whole")
    want = train([pretrain_spec(cfg, text_encoder)], whole)
    killed = LocalCheckpoints(tmp_path / "killed")
    with pytest.raises(_Killed):  # after the last step, before its checkpoint: the newest is step 2's
        train([pretrain_spec(cfg, text_encoder)], killed, on_step=_kill_at(3))
    got = train([pretrain_spec(cfg, text_encoder)], killed)
    assert got.starts == [["base", 0], ["base", 2]] and got.losses == want.losses
    with whole.latest() as a, killed.latest() as b:
        ema_a = load_file(str(a / "exports" / "base" / "diffusion_pytorch_model.safetensors"))
        ema_b = load_file(str(b / "exports" / "base" / "diffusion_pytorch_model.safetensors"))
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_export_writes_a_cascade_with_its_fitted_motion_prior(tmp_path, text_encoder):
    from dreamix_ray.models.cascade import Cascade
    from dreamix_ray.motion_guidance import MotionPrior

    for stage in ("base", "tsr", "ssr"):
        train_stage(PretrainConfig(stage=stage, max_steps=1, batch_size=1, warmup_steps=1), tmp_path, text_encoder,
                    log=lambda _: None)
    export_cascade(tmp_path, tmp_path / "out", text_encoder)
    cascade = Cascade.from_pretrained(tmp_path / "out", text_encoder)
    prior = MotionPrior.from_dict(cascade.config.motion_prior)
    pooled = text_encoder(["a red circle moving left on a blue background", "a red circle bouncing on blue"])[1]
    assert prior.directions(pooled).tolist() == [[-1.0, 0.0], [0.0, 0.0]]


def test_motion_planes_carry_text_times_position_and_vanish_in_frame_mode():
    from dreamix_ray.models.stage import StageDenoiser

    net = StageDenoiser(block_out_channels=(16, 16), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), norm_num_groups=8, motion_planes=2)
    x, pooled = torch.zeros(2, 3, 8, 4, 4), torch.randn(2, 384)
    planes = net._position_planes(x, pooled, frame_mode_on=False)
    assert planes.shape == (2, 4, 8, 4, 4)
    gain = net.motion_gain(pooled)
    assert torch.allclose(planes[:, 2:, -1], gain.view(2, 2, 1, 1) * planes[0, 0, -1])  # ramp x text gain
    assert torch.allclose(planes[:, 2:, 0], -planes[:, 2:, -1])  # the ramp runs -1 .. 1 over the clip
    assert not net._position_planes(x, pooled, frame_mode_on=True).any()
    with pytest.raises(ValueError, match="motion_planes need frame_position"):
        StageDenoiser(frame_position=False, motion_planes=2)


def test_warm_start_keeps_the_trained_model_exactly_and_grows_its_input(tmp_path):
    from dreamix_ray.models.stage import StageDenoiser
    from dreamix_ray.training.warm_start import warm_start

    small = dict(block_out_channels=(16, 16), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                 up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), norm_num_groups=8)
    torch.manual_seed(0)
    trained = StageDenoiser(**small).eval()
    trained.save_pretrained(tmp_path / "trained")
    grown = StageDenoiser(**small, motion_planes=2).eval()
    summary = warm_start(grown, tmp_path / "trained")
    assert "grown ['unet.conv_in.weight']" in summary and "motion_from_text.weight" in summary
    assert grown.unet.conv_in.weight[:, -2:].abs().sum() > 0  # the new input slice keeps its random init
    with torch.no_grad():
        grown.unet.conv_in.weight[:, -2:] = 0  # without it, the grown model is the trained one exactly
    x, t = torch.randn(2, 3, 8, 8, 8), torch.tensor([700.0, 90.0])
    tokens, pooled = torch.randn(2, 5, 384), torch.randn(2, 384)
    with torch.no_grad():
        assert torch.equal(grown(x, t, tokens, pooled), trained(x, t, tokens, pooled))
    # the new input channels train: one step moves them off zero
    grown.train()
    grown(x, t, tokens, pooled).square().mean().backward()
    assert grown.unet.conv_in.weight.grad[:, -2:].abs().sum() > 0
    with pytest.raises(ValueError, match="not the same architecture"):
        warm_start(StageDenoiser(**{**small, "block_out_channels": (16, 32)}), tmp_path / "trained")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        warm_start(grown, tmp_path)


def test_motion_targets_follow_the_captions_of_the_step():
    from dreamix_ray.models.embedded import EMBEDDED_STAGES
    from dreamix_ray.pretrain import motion_targets, step_scenes, world_batch

    cfg = PretrainConfig(caption_dropout=0.3)
    words = {"left": (-0.8, 0.0), "right": (0.8, 0.0), "up": (0.0, -0.8), "down": (0.0, 0.8)}
    seen = 0
    for step in range(20):
        scenes, captions, _ = step_scenes(cfg, step)
        target, counts = motion_targets(scenes, captions)
        assert world_batch(EMBEDDED_STAGES[0], cfg, step)[2] == captions
        for cap, (dx, dy), counted in zip(captions, target.tolist(), counts.tolist()):
            if cap == "":
                assert not counted  # a dropped caption says nothing about direction
            if not counted:
                continue
            named = [w for w in words if f" {w}" in cap or f"{w}wards" in cap]
            if named:  # paraphrases ("slides to the left", "drifting upwards") name the direction word
                assert words[named[0]] == pytest.approx((dx, dy)), cap
                seen += 1
    assert seen > 40


@pytest.mark.parametrize("argv, message", [
    (["--stages", "base", "--motion-planes", "2", "--motion-supervision", "1", "--workers", "2"],
     "runs in one process only"),
    (["--stages", "base", "--motion-supervision", "1"], "add --motion-planes 2"),
    (["--stages", "base", "tsr", "--motion-planes", "2"], "base-stage options"),
    (["--stages", "base", "tsr", "--init-from", "x"], "a single --stages value"),
    (["--stages", "tsr", "--coord-planes"], "base-stage options"),
])
def test_pretrain_cli_refuses_inconsistent_motion_options(argv, message, capsys):
    from dreamix_ray.cluster.pretrain_cli import main

    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_motion_planes_enter_the_pretrained_base_only():
    from dreamix_ray.pretrain import stage_denoisers

    assert stage_denoisers(PretrainConfig(stage="base", motion_planes=2))["base"]["motion_planes"] == 2
    assert "motion_planes" not in stage_denoisers(PretrainConfig(stage="base"))["base"]
    with pytest.raises(ValueError, match="base-stage option"):
        stage_denoisers(PretrainConfig(stage="ssr", motion_planes=2))
    assert stage_denoisers(PretrainConfig(stage="base", coord_planes=True))["base"]["coord_planes"] is True
    with pytest.raises(ValueError, match="base-stage option"):
        stage_denoisers(PretrainConfig(stage="ssr", coord_planes=True))


def test_coord_planes_give_every_pixel_its_position_in_video_and_frame_mode(tmp_path):
    from dreamix_ray.models.stage import StageDenoiser

    small = dict(block_out_channels=(16, 16), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                 up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), norm_num_groups=8)
    torch.manual_seed(0)
    net = StageDenoiser(**small, coord_planes=True).eval()
    assert net.unet.conv_in.in_channels == StageDenoiser(**small).unet.conv_in.in_channels + 2
    x = torch.zeros(1, 3, 2, 4, 5)
    xy = net._coord_planes(x)
    assert torch.allclose(xy[0, 0, 1, 2], torch.linspace(-1, 1, 5))  # x runs along a row
    assert torch.allclose(xy[0, 1, 0, :, 3], torch.linspace(-1, 1, 4))  # y runs down a column
    # The planes reach the network: zeroing their conv_in slice changes the output, in both modes.
    args = (torch.randn(1, 3, 8, 8, 8), torch.tensor([500]), torch.randn(1, 4, 384), torch.randn(1, 384))
    with torch.no_grad():
        video, frames = net(*args), net(*args, frame_mode_on=True)
        net.unet.conv_in.weight[:, -2:] = 0
        assert not torch.allclose(net(*args), video) and not torch.allclose(net(*args, frame_mode_on=True), frames)
    net.save_pretrained(tmp_path)
    loaded = StageDenoiser.from_pretrained(tmp_path).eval()
    assert loaded.config.coord_planes
    with torch.no_grad():
        # (equal up to float rounding: the loaded copy may pick a different conv kernel)
        torch.testing.assert_close(loaded(*args), net(*args), rtol=0, atol=1e-4)


def test_fitted_motion_projection_reads_the_direction_off_new_captions(text_encoder):
    from dreamix_ray.models.stage import StageDenoiser
    from dreamix_ray.pretrain import fit_motion_projection

    net = StageDenoiser(block_out_channels=(16, 16), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), norm_num_groups=8, motion_planes=2)
    assert fit_motion_projection(net, text_encoder, PretrainConfig(), steps=60) < 0.1
    captions = {"a blue square moving left on a white background": (-1, 0),
                "on black, a small green disc slides to the right": (1, 0),
                "a red triangle drifting upwards over a gray backdrop": (0, -1),
                "a purple circle moving down on a blue background": (0, 1)}
    with torch.no_grad():
        gains = net.motion_gain(text_encoder(list(captions))[1])
    for (dx, dy), (gx, gy) in zip(captions.values(), gains.tolist()):
        assert (gx > 0.4 if dx > 0 else gx < -0.4 if dx < 0 else abs(gx) < 0.4), (dx, dy, gx, gy)
        assert (gy > 0.4 if dy > 0 else gy < -0.4 if dy < 0 else abs(gy) < 0.4), (dx, dy, gx, gy)


def test_distributed_engines_refuse_motion_supervision_they_would_ignore(tmp_path, text_encoder):
    spec = pretrain_spec(PretrainConfig(motion_planes=2, motion_supervision=1.0), text_encoder)
    with pytest.raises(ValueError, match="one process only"):
        train([spec], LocalCheckpoints(tmp_path), EngineConfig(kind="ddp"))


def test_the_training_layers_import_downwards_only():
    """The core (outside cluster/ and the CLI modules) imports nothing from cluster/, and the training
    modules form no import cycle (checked on the source, function bodies included)."""
    package = Path(__file__).resolve().parents[1] / "dreamix_ray"
    graph = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        base = name.split(".") if parts[-1] == "__init__" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = ".".join(base[:len(base) - node.level + 1] + [node.module or ""]) if node.level else node.module
                targets |= {mod.rstrip(".")} | {f"{mod.rstrip('.')}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t.startswith("dreamix_ray")}
    core = [m for m in graph if not m.startswith(("dreamix_ray.cluster", "dreamix_ray.cli"))]
    assert not [(m, t) for m in core for t in graph[m] if t.startswith("dreamix_ray.cluster")]

    def modules(targets):
        return {t if t in graph else t.rpartition(".")[0] for t in targets} & set(graph)

    training = [m for m in graph if m.startswith(("dreamix_ray.training", "dreamix_ray.pretrain",
                                                   "dreamix_ray.finetune", "dreamix_ray.cluster.train"))]
    for start in training:  # no path leads from a training module back to itself
        seen, todo = set(), list(modules(graph[start]))
        while todo:
            m = todo.pop()
            assert m != start, f"import cycle through {start}"
            if m not in seen:
                seen.add(m)
                todo += modules(graph[m])
