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


def test_warm_start_keeps_the_trained_model_exactly_and_grows_its_input(tmp_path):
    from dreamix_ray.models.stage import StageDenoiser
    from dreamix_ray.training.warm_start import warm_start

    small = dict(block_out_channels=(16, 16), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                 up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), norm_num_groups=8)
    torch.manual_seed(0)
    trained = StageDenoiser(**small, frame_position=False).eval()
    trained.save_pretrained(tmp_path / "trained")
    grown = StageDenoiser(**small).eval()  # two more input channels: the frame-position planes, appended
    summary = warm_start(grown, tmp_path / "trained")
    assert "grown ['unet.conv_in.weight']" in summary
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


@pytest.mark.parametrize("argv, message", [
    (["--stages", "base", "tsr", "--init-from", "x"], "a single --stages value"),
])
def test_pretrain_cli_refuses_inconsistent_options(argv, message, capsys):
    from dreamix_ray.cluster.pretrain_cli import main

    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


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
