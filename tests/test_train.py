"""Distributed finetuning and pretraining: the Ray Train worker task running the one training loop with
the DeepSpeed ZeRO and DDP engines (CPU, 1-2 workers, tiny cascade).

Every run here is real: a local Ray instance of this test module's own, Ray Train workers over gloo,
DeepSpeed ZeRO-2 / ZeRO-3 on the CPU accelerator. The same loop in one process is the reference.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("deepspeed")
ray = pytest.importorskip("ray")
import ray.train  # noqa: E402,F811  (TrainingFailedError, before any run has imported it)

from wan_repo import tiny_wan_cascade  # noqa: E402

from dreamix_ray.cluster.train import (  # noqa: E402
    TrainSettings, TrainSetupError, finetune_on_ray, load_deepspeed_config, read_state,
)
from dreamix_ray.config import EditConfig  # noqa: E402
from dreamix_ray.edit import edit  # noqa: E402
from dreamix_ray.finetune import (  # noqa: E402
    ARTIFACT_FILE, _StageData, artifact_key, copy_for_finetuning, finetune, finetune_batch, finetune_preset,
    finetune_specs, load_finetuned, video_bytes,
)
from dreamix_ray.models import adapters  # noqa: E402
from dreamix_ray.models.cascade import Cascade  # noqa: E402
from dreamix_ray.models.frame_mode import temporal_parameter_names  # noqa: E402
from dreamix_ray.models.wan import WanExperts  # noqa: E402
from dreamix_ray.storage import ArtifactStore  # noqa: E402
from dreamix_ray.training.checkpoint import ResumeError  # noqa: E402
from dreamix_ray.training.shard import rank_parts  # noqa: E402
from dreamix_ray.video import Video  # noqa: E402

# Global batch of 2 samples. Seed 35, alpha 0.35: steps 0 and 5 are video steps, 1-4 frame steps, so the
# temporal layers' Adam moments from step 0 must neither move them on steps 1-4 (single-process AdamW
# skips them: no gradient) nor be lost across the kill after step 3 (step 5 uses them).
MIXED = finetune_preset("mixed", steps=6, lr=1e-3, stages=("base",), batch_size=2, checkpoint_every=2, seed=35)
FRAMES = finetune_preset("frames", steps=3, lr=1e-3, stages=("base", "ssr"), checkpoint_every=10)
SETTINGS = dict(workers=2, threads=1)


@pytest.fixture(scope="module")
def ray_local():
    """A Ray instance of this module's own (other Ray instances may share the machine)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ray.init(num_cpus=4, _temp_dir=temp, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture()
def s3_bucket(monkeypatch):
    """A real S3 server (moto) on loopback with one bucket; the project's storage finds it through the
    standard AWS variables, and Ray Train's workers get the pickled pyarrow filesystem."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    keys = dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1",
                AWS_ENDPOINT_URL_S3=endpoint)
    for name, value in keys.items():
        monkeypatch.setenv(name, value)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="dreamix-train")
    yield "s3://dreamix-train"
    server.stop()


@pytest.fixture(scope="module")
def tiny(text_encoder):
    """The tiny cascade with its temporal convs' dropout (0.1 in diffusers' UNet3D blocks) off: dropout masks
    come from each process's global RNG and follow the batch layout, so only a deterministic model can
    match across worker counts (frame steps bypass those convs and never draw them)."""
    from dreamix_ray.models.cascade import tiny_cascade

    cascade = tiny_cascade(text_encoder, seed=0)
    for stage in cascade.stages:
        for m in stage.denoiser.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    return cascade


@pytest.fixture(scope="module")
def video():
    from dreamix_ray.video import Video
    from dreamix_ray.world import render, sample_scene

    scene = sample_scene(np.random.default_rng(0), colour="red", shape="circle", motion="left", background="blue")
    return Video(render(scene, num_frames=16, size=32, fps=8.0), 8.0)


def _single(tiny, video, cfg):
    """The single-process reference run of cfg: (losses, tuned cascade)."""
    losses = []
    tuned = finetune(video, cfg, tiny, on_step=lambda stage, step, total, loss: losses.append(loss))
    return losses, tuned


@pytest.fixture(scope="module")
def single_mixed(tiny, video):
    return _single(tiny, video, MIXED)


def _update_gap(got: torch.nn.Module, want: torch.nn.Module, start: torch.nn.Module, names=None) -> float:
    """||update(got) - update(want)|| / ||update(want)|| over `names` (default all): Adam turns float noise
    in near-zero gradients into lr-sized steps on single weights, so whole updates are compared."""
    s0, sg, sw = start.state_dict(), got.state_dict(), want.state_dict()
    keys = sorted(names) if names is not None else list(s0)
    dg = torch.cat([(sg[k] - s0[k]).flatten() for k in keys])
    dw = torch.cat([(sw[k] - s0[k]).flatten() for k in keys])
    return ((dg - dw).norm() / dw.norm()).item()


def _first_grad_norm(cascade, video, cfg) -> float:
    """The single-process gradient norm of step 0 of the base stage, over what the loop trains (the LoRA
    adapter, or every weight): checks the loss scale end to end (Adam alone would hide a constant factor)."""
    stage = copy_for_finetuning(cascade, ["base"]).base
    text = cascade.text_encoder([cfg.prompt])
    finetune_specs([(0, stage, _StageData(video, stage, cfg))], text, cfg, 1.0)  # adds the adapter, as the loop's
    adapters.mark_trainable(stage.denoiser.train())
    finetune_batch(stage, _StageData(video, stage, cfg), text, cfg, 0, 0).loss(stage).backward()
    return torch.nn.utils.clip_grad_norm_([p for p in stage.denoiser.parameters() if p.requires_grad],
                                          float("inf")).item()


def test_rank_shards_add_up_to_the_global_batch(tiny, video):
    """Any worker count / micro-step split gives the global batch's loss and gradient (frames split too)."""
    stage = tiny.base
    cfg = finetune_preset("mixed", steps=4, batch_size=3)
    data, text = _StageData(video, stage, cfg), tiny.text_encoder([cfg.prompt])
    model = stage.denoiser.train().requires_grad_(True)
    try:
        for step in (0, 4):  # step 0 is a frame step, step 4 a video step (seed 0, alpha 0.35)
            batch = finetune_batch(stage, data, text, cfg, 0, step)
            model.zero_grad()
            batch.loss(stage).backward()
            want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            for world, micro in ((2, 1), (3, 2)):
                model.zero_grad()
                shares = 0.0
                for rank in range(world):
                    for sub, scale in rank_parts(batch, rank, world, micro):
                        sse = sub.loss(stage, reduction="sum")
                        (sse * scale / world).backward()  # the engines average over ranks
                        shares += sse.item() * scale / world
                assert shares == pytest.approx(batch.loss(stage).item(), rel=1e-5)
                got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
                assert got.keys() == want.keys()
                assert max((got[n] - want[n]).abs().max().item() for n in want) < 1e-5
        assert not batch.frames_step and finetune_batch(stage, data, text, cfg, 0, 0).frames_step
    finally:
        model.eval().requires_grad_(False).zero_grad(set_to_none=True)


def test_zero3_frames_only_masks_the_same_layers(ray_local, tiny, video, s3_bucket):
    """alpha = 0 under ZeRO-3, checkpoints and artifact on S3: the temporal layers frame mode masks stay
    exactly as they were, and the rest moves as in the single-process run."""
    store = ArtifactStore(f"{s3_bucket}/artifacts")
    key, result = finetune_on_ray(video, FRAMES, tiny, store, TrainSettings(zero=3, **SETTINGS))
    assert result.checkpoint.path.startswith("dreamix-train/artifacts/_train/")  # on the S3 server
    state = read_state(result.checkpoint)
    assert state["zero"] == 3 and [s for s, _ in state["starts"]] == ["base", "ssr"]  # both stages, one run
    loaded, _ = load_finetuned(tiny, key, store)
    reference = finetune(video, FRAMES, tiny)
    for index in (0, 2):
        before = tiny.stages[index].denoiser.state_dict()
        after = loaded.stages[index].denoiser.state_dict()
        single = reference.stages[index].denoiser.state_dict()
        temporal = temporal_parameter_names(tiny.stages[index].denoiser)
        assert temporal and all(torch.equal(before[n], after[n]) for n in temporal)
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert changed == {n for n in before if not torch.equal(before[n], single[n])}
        assert _update_gap(loaded.stages[index].denoiser, reference.stages[index].denoiser,
                           tiny.stages[index].denoiser) < 1e-2


def test_zero2_run_killed_after_a_checkpoint_resumes_and_matches_single_process(ray_local, tiny, video,
                                                                               single_mixed, tmp_path):
    losses, reference = single_mixed
    storage, store = str(tmp_path / "ray"), ArtifactStore(str(tmp_path / "store"))
    settings = TrainSettings(zero=2, **SETTINGS)
    key = artifact_key(video_bytes(video), MIXED, tiny)  # the single-process key
    with pytest.raises(ray.train.TrainingFailedError):  # every worker dies hard after step 3; checkpoint at 2
        finetune_on_ray(video, MIXED, tiny, store, settings, name="resume", storage=storage, fail_after_step=3)
    assert not store.has(key, ARTIFACT_FILE)
    resumed, result = finetune_on_ray(video, MIXED, tiny, store, settings, name="resume", storage=storage)
    assert resumed == key
    state = read_state(result.checkpoint)
    assert state["world"] == 2 and state["zero"] == 2
    assert state["starts"] == [["base", 0], ["base", 2]]  # the step counter carried on from the checkpoint
    # same seed and global batch: the 2-worker loss curve (steps 0-1 before the kill, 2-5 after) is the
    # single-process one, and so is the loss scale (gradient norm of step 0)
    np.testing.assert_allclose(state["losses"]["base"], losses, rtol=1e-3)
    assert state["grad_norms"]["base"][0] == pytest.approx(_first_grad_norm(tiny, video, MIXED), rel=1e-4)
    # weights and Adam moments came back too: the artifact matches the uninterrupted single-process run
    loaded, cfg = load_finetuned(tiny, key, store)
    assert cfg == MIXED
    assert _update_gap(loaded.base.denoiser, reference.base.denoiser, tiny.base.denoiser) < 1e-2
    temporal = temporal_parameter_names(tiny.base.denoiser)  # moved by steps 0 and 5 only
    assert _update_gap(loaded.base.denoiser, reference.base.denoiser, tiny.base.denoiser, temporal) < 1e-2
    assert loaded.stages[2].denoiser is tiny.stages[2].denoiser  # untouched stages are shared
    assert finetune_on_ray(video, MIXED, tiny, store, settings) == (key, None)  # finetune once, edit many
    with pytest.raises(ResumeError, match="--workers 2"):  # ZeRO cut the optimizer state for 2 workers
        finetune_on_ray(video, MIXED, tiny, ArtifactStore(str(tmp_path / "other")),
                        TrainSettings(zero=2, workers=1, threads=1), name="resume", storage=storage)


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_one_ddp_worker_runs_the_plain_loop(ray_local, tiny, video, single_mixed, tmp_path, adapter):
    """The worker task is the single-process loop with another engine: one DDP worker, its batch in two
    micro-steps (gradient accumulation without an all-reduce in between), gives the same losses and weights,
    training a LoRA adapter (the default) or every weight."""
    cfg = dataclasses.replace(MIXED, adapter=adapter)
    losses, reference = single_mixed if adapter == MIXED.adapter else _single(tiny, video, cfg)
    store = ArtifactStore(str(tmp_path / "store"))
    settings = TrainSettings(workers=1, engine="ddp", micro_batch=1, threads=1)
    key, result = finetune_on_ray(video, cfg, tiny, store, settings, storage=str(tmp_path / "ray"))
    state = read_state(result.checkpoint)
    assert state["layout"] == "full" and state["world"] == 1 and state["zero"] == 0
    np.testing.assert_allclose(state["losses"]["base"], losses, rtol=1e-5)
    loaded = load_finetuned(tiny, key, store)[0]
    assert _update_gap(loaded.base.denoiser, reference.base.denoiser, tiny.base.denoiser) < 1e-3


def test_wan_two_expert_full_finetune_on_zero3_matches_one_process(ray_local, tmp_path):
    """A full finetune of a two-expert Wan stage (Wan2.2-T2V-A14B's layout, tiny and random) on 2 Ray Train workers
    with ZeRO-3. Seed 3's global batches of 2 straddle the boundary on both steps (a video step, then a frame
    step), so the ranks' rows need different experts: each rank must still run both (ZeRO-3 gathers weights in
    forward), and the artifact then matches the one-process run, loads as both experts and edits differently from
    the base."""
    cascade = Cascade.from_pretrained(tiny_wan_cascade(tmp_path, boundary_ratio=0.7))
    video = Video((np.random.default_rng(0).random((16, 32, 32, 3)) * 255).astype(np.uint8), 8.0)
    cfg = finetune_preset("mixed", steps=2, lr=1e-3, batch_size=2, adapter="full", seed=3, checkpoint_every=10)
    store = ArtifactStore(str(tmp_path / "store"))
    key, result = finetune_on_ray(video, cfg, cascade, store, TrainSettings(zero=3, **SETTINGS),
                                  storage=str(tmp_path / "ray"))
    state = read_state(result.checkpoint)
    assert (state["layout"], state["world"], state["zero"]) == ("zero3x2", 2, 3)
    losses, reference = _single(cascade, video, cfg)
    np.testing.assert_allclose(state["losses"]["base"], losses, rtol=1e-3)
    loaded, _ = load_finetuned(cascade, key, store)
    assert isinstance(loaded.base.denoiser, WanExperts) and loaded.base.denoiser.boundary_ratio == 0.7
    for got, want, start in zip(loaded.base.denoiser.experts, reference.base.denoiser.experts,
                                cascade.base.denoiser.experts):  # both experts moved, as in one process
        assert _update_gap(got, want, start) < 1e-2
    ecfg = EditConfig(strength=0.8, seed=2)
    ours = edit(video, "naia a red cat", ecfg, loaded).frames
    assert not np.array_equal(ours, edit(video, "naia a red cat", ecfg, cascade).frames)
    again, _ = load_finetuned(cascade, key, store)
    assert np.array_equal(ours, edit(video, "naia a red cat", ecfg, again).frames)


def test_dreamix_pretrain_workers_trains_on_ray_on_the_shared_world_batch(ray_local, text_encoder, tmp_path,
                                                                           capsys):
    from dreamix_ray.cluster.pretrain_cli import main
    from dreamix_ray.models.cascade import build_cascade
    from dreamix_ray.models.embedded import EMBEDDED_DENOISERS, embedded_config
    from dreamix_ray.models.stage import StageDenoiser
    from dreamix_ray.pretrain import PretrainConfig, pretrain_batch

    run = tmp_path / "run"
    assert main(["--stages", "base", "--workers", "2", "--threads", "1", "--max-steps", "2", "--batch-size", "2",
                 "--image-fraction", "1.0", "--run-dir", str(run)]) == 0
    assert "[base] 2 steps on 2 Ray Train workers" in capsys.readouterr().out
    states = sorted((run / "_ray").rglob("state.json"), key=lambda p: p.stat().st_mtime)  # the last checkpoint's
    state = json.loads(states[-1].read_text())
    cfg = PretrainConfig(stage="base", max_steps=2, batch_size=2, image_fraction=1.0)
    cascade = build_cascade(embedded_config(text_encoder.spec()), EMBEDDED_DENOISERS, text_encoder, cfg.seed)
    with torch.no_grad():  # every rank rendered the same world batch and the loss is its mean
        first = pretrain_batch(cascade.base, cfg, 0, text_encoder).loss(cascade.base).item()
    assert len(state["losses"]["base"]) == 2
    assert state["losses"]["base"][0] == pytest.approx(first, rel=1e-4)
    StageDenoiser.from_pretrained(run / "base" / "ema")  # where export_cascade reads it


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(TrainSetupError, match="--workers"):
        TrainSettings(workers=0)
    with pytest.raises(TrainSetupError, match="--zero"):
        TrainSettings(zero=1)
    with pytest.raises(TrainSetupError, match="--checkpoint-every must be >= 1"):
        TrainSettings(checkpoint_every=0)
    bad = tmp_path / "ds.json"
    bad.write_text('{"optimizer": {"type": "Adam"}}')
    with pytest.raises(TrainSetupError, match="optimizer"):
        load_deepspeed_config(TrainSettings(deepspeed_config=str(bad)))
    zero3 = Path(__file__).resolve().parents[1] / "infra" / "deepspeed_zero3.json"
    with pytest.raises(TrainSetupError, match="ZeRO-3 but --zero is 2"):
        load_deepspeed_config(TrainSettings(zero=2, deepspeed_config=str(zero3)))
    assert load_deepspeed_config(TrainSettings(zero=3, deepspeed_config=str(zero3)))["zero_optimization"]["stage"] == 3
    with pytest.raises(TrainSetupError, match="cannot read"):
        load_deepspeed_config(TrainSettings(deepspeed_config=str(tmp_path / "missing.json")))
