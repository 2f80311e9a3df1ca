"""LTX-Video cascades: base -> latent TSR -> latent SSR (LTXLatentUpsamplerModel + a refine pass), latents between
stages, the chunked last stage, parity with diffusers' LTXPipeline + LTXLatentUpsamplePipeline, bad inputs.

The repositories are tiny random LTX models in the hub's diffusers layout, built offline (tests/ltx_repo.py). The
tiny VAE has 16 pixels per latent and 4 frames per latent frame (LTX's has 32 and 8), so clips are 4k + 1 frames.
"""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LTXConditionPipeline, LTXLatentUpsamplePipeline, LTXPipeline
from ltx_repo import Z, write_ltx_repo, write_upsampler
from transformers import AutoTokenizer, T5EncoderModel

from dreamix_ray.cli import main
from dreamix_ray.config import EditConfig
from dreamix_ray.edit import StageRun, edit, run_cascade, run_stage
from dreamix_ray.models.cascade import Cascade
from dreamix_ray.models.ltx import LTXStageNet, LTXVAE
from dreamix_ray.models.weights import load_denoiser, save_denoiser
from dreamix_ray.request import EditPlan
from dreamix_ray.sampling import draw_noise, fresh_scheduler, kept_steps, seed_generators

@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("ltx")
    base = write_ltx_repo(root / "tiny-ltx")
    return dict(base=base, tsr=write_upsampler(root / "temporal", base, temporal=True),
                ssr=write_upsampler(root / "spatial", base, temporal=False, seed=2), root=root)


def _convert(repos, out, *flags, steps=("3", "2", "2")) -> int:
    return main(["convert", str(repos["base"]), "-o", str(out), "--size", "32x32", "--frames", "9", "--fps", "8",
                 "--steps", *steps, *flags])


@pytest.fixture(scope="module")
def cascade_dir(repos):
    out = repos["root"] / "cascade"
    assert _convert(repos, out, "--tsr", str(repos["tsr"]), "--ssr", str(repos["ssr"])) == 0
    return out


@pytest.fixture(scope="module")
def cascade(cascade_dir):
    return Cascade.from_pretrained(cascade_dir)


def test_convert_writes_base_tsr_ssr_sharing_one_transformer_and_info_lists_them(cascade_dir, cascade, capsys):
    spec = json.loads((cascade_dir / "cascade.json").read_text())
    shapes = [(s["name"], s["kind"], s["frames"], s["width"], s["fps"]) for s in spec["stages"]]
    assert shapes == [("base", "base", 9, 32, 8.0), ("tsr", "tsr", 17, 32, 16.0), ("ssr", "ssr", 17, 64, 16.0)]
    assert [s["latent"].get("strength") for s in spec["stages"]] == [None, 0.4, 0.4]
    assert spec["text_encoder"]["pooled"] == "mask" and spec["guidance_scale"] == 3.0
    base, tsr, ssr = cascade.stages
    assert isinstance(base.denoiser, LTXStageNet) and isinstance(base.vae, LTXVAE)
    assert tsr.denoiser.transformer is base.denoiser.transformer is ssr.denoiser.transformer  # one set of weights
    assert tsr.vae.vae is base.vae.vae and base.upsampler is None
    assert tsr.upsampler.model.config.temporal_upsample and ssr.upsampler.model.config.spatial_upsample
    assert main(["info", "--model", str(cascade_dir)]) == 0
    out = capsys.readouterr().out
    for line in (f"latent {Z}x3x2x2", f"latent {Z}x5x2x2", f"latent {Z}x5x4x4", "upsampler"):
        assert line in out, out


def test_plan_counts_latent_frames_and_chunks_the_last_stage_with_a_halo(cascade):
    plan = EditPlan.of(EditConfig(ssr_chunk_frames=8), cascade.config)
    assert [p.frames for p in plan.stages] == [9, 3, 5]  # pixels into the base, then latent frames
    ssr = plan.stages[-1]
    assert ssr.chunks == ((0, 2), (2, 4), (4, 5)) and ssr.halo == 1
    assert [ssr.chunk_input(k) for k in range(3)] == [(0, 3), (1, 5), (3, 5)]
    assert [ssr.chunk_halo(k) for k in range(3)] == [(0, 1), (1, 1), (1, 0)]


def test_edit_runs_the_cascade_on_latents_and_decodes_once(cascade, moving_video, monkeypatch):
    calls = []
    decode = LTXVAE.decode
    monkeypatch.setattr(LTXVAE, "decode", lambda self, z: calls.append(z.shape) or decode(self, z))
    out = edit(moving_video, "a red cat", EditConfig(strength=0.7, seed=1, ssr_chunk_frames=8), cascade)
    assert out.frames.shape == (17, 64, 64, 3) and out.fps == 16.0
    assert [tuple(s) for s in calls] == [(1, Z, 3, 4, 4), (1, Z, 4, 4, 4), (1, Z, 2, 4, 4)]  # the chunks only


def _unpack(latents_bsc, f, h, w):
    return LTXPipeline._unpack_latents(latents_bsc, f, h, w, 1, 1)


def _pipeline_parts(repos, cascade):
    return dict(tokenizer=AutoTokenizer.from_pretrained(repos["base"] / "tokenizer"),
                text_encoder=T5EncoderModel.from_pretrained(repos["base"] / "text_encoder"),
                vae=cascade.base.vae.vae, transformer=cascade.base.denoiser.transformer,
                scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(repos["base"] / "scheduler"))


def test_base_matches_ltx_pipeline_and_ssr_matches_ltx_latent_upsample_pipeline(repos, tmp_path):
    """Same noise in: our base at strength 1 = LTXPipeline's latents; our SSR at refine strength 0 on them =
    LTXLatentUpsamplePipeline (AdaIN on), decoded."""
    out = tmp_path / "base-ssr"
    assert _convert(repos, out, "--ssr", str(repos["ssr"]), "--strength", "0", steps=("3", "2")) == 0
    spec = json.loads((out / "cascade.json").read_text())
    spec["stages"][1]["latent"]["adain_factor"] = 1.0
    (out / "cascade.json").write_text(json.dumps(spec))
    cascade = Cascade.from_pretrained(out)
    seed, prompt, negative = 7, "a red cat moving left", "blurry"
    noise = draw_noise((1, Z, 3, 2, 2), seed_generators([seed], 0))
    pipe = LTXPipeline(**_pipeline_parts(repos, cascade))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt, negative_prompt=negative, height=32, width=32, num_frames=9, frame_rate=8,
               num_inference_steps=3, guidance_scale=3.0, latents=LTXPipeline._pack_latents(noise),
               output_type="latent").frames
    ref = _unpack(ref, 3, 2, 2)
    run = StageRun.of(cascade, EditConfig(strength=1.0, seed=seed, guidance_scale=3.0, negative_prompt=negative),
                      [prompt], [seed])
    ours = run_stage(run, 0, torch.zeros(1, 3, 9, 32, 32))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    up = LTXLatentUpsamplePipeline(vae=cascade.base.vae.vae, latent_upsampler=cascade.stages[1].upsampler.model)
    up.set_progress_bar_config(disable=True)
    ref = up(latents=ref, height=64, width=64, adain_factor=1.0, output_type="pt").frames
    video = run_stage(run, 1, ours)
    torch.testing.assert_close(((video + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4), ref, atol=1e-4, rtol=1e-4)


def test_refine_pass_matches_ltx_condition_pipeline_denoise_strength(repos, cascade, monkeypatch):
    """Our TSR's refine (SDEdit at start strength 0.4 from the upsampled latents, 10 steps) = LTXConditionPipeline's
    refine (`latents` + `denoise_strength`, no conditions) on the same noise, given our schedule and our two
    LTXPipeline conventions where LTXConditionPipeline has its own (docs/REAL_MODELS.md): T5 run without its mask,
    and rope frame coordinates i * 8 / fps without its causal shift (8 i - 7)^+ / fps. Without them it differs."""
    seed, prompt, negative = 5, "a red cat moving left", "blurry"
    plan = EditPlan.of(EditConfig(seed=seed, steps=(3, 10, 2), guidance_scale=3.0, negative_prompt=negative),
                       cascade.config)
    assert (plan.stages[1].start_strength, plan.stages[1].sampled_steps, plan.stages[1].eta) == (0.4, 4, 0.0)
    z = torch.randn(1, Z, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    ours = run_stage(StageRun.of(cascade, plan, [prompt], [seed]), 1, z)  # the TSR returns latents: SSR follows
    ours_schedule = fresh_scheduler(cascade.stages[1].scheduler)
    ours_schedule.set_timesteps(10)
    # our shifted sigmas given as timesteps, to a scheduler that shifts no further (shift_terminal keeps them)
    plain = FlowMatchEulerDiscreteScheduler.from_config({**ours_schedule.config, "shift": 1.0,
                                                         "use_dynamic_shifting": False})
    pipe = LTXConditionPipeline(**{**_pipeline_parts(repos, cascade), "scheduler": plain})
    pipe.set_progress_bar_config(disable=True)

    def refine():
        latents = pipe(prompt=prompt, negative_prompt=negative, height=32, width=32, num_frames=17, frame_rate=16.0,
                       num_inference_steps=10, timesteps=ours_schedule.timesteps.tolist(), guidance_scale=3.0,
                       latents=cascade.stages[1].upsampler(z), denoise_strength=0.4,
                       generator=seed_generators([seed], 1, 0)[0], max_sequence_length=128,
                       output_type="latent").frames
        return _unpack(latents, 5, 2, 2) if latents.dim() == 3 else latents

    assert (ours - refine()).abs().max() > 1e-2  # its own conventions
    scale_ids = pipe._scale_video_ids

    def no_causal_shift(video_ids, scale_factor, scale_factor_t, frame_index, device):
        scaled = scale_ids(video_ids, scale_factor, scale_factor_t, frame_index, device)
        scaled[:, 0] = video_ids[:, 0] * scale_factor_t
        return scaled

    monkeypatch.setattr(pipe, "_scale_video_ids", no_causal_shift)
    encode = pipe.text_encoder.forward
    monkeypatch.setattr(pipe.text_encoder, "forward",
                        lambda input_ids=None, attention_mask=None, **kw: encode(input_ids, **kw))
    torch.testing.assert_close(ours, refine(), atol=1e-4, rtol=1e-4)


def _with_refine(plan: EditPlan, index: int, strength: float) -> EditPlan:
    stage = plan.stages[index]
    stages = list(plan.stages)
    stages[index] = dataclasses.replace(stage, start_strength=strength,
                                        sampled_steps=kept_steps(stage.steps, strength))
    return dataclasses.replace(plan, stages=tuple(stages))


def test_refine_strength_zero_keeps_the_upsampled_latents_and_one_starts_from_noise(cascade):
    base, plan = torch.randn(1, Z, 3, 2, 2), EditPlan.of(EditConfig(seed=2), cascade.config)
    up = cascade.stages[1].upsampler(base)
    assert up.shape == (1, Z, 5, 2, 2)  # the temporal upsampler: 2L - 1 latent frames
    kept = run_stage(StageRun(cascade, _with_refine(plan, 1, 0.0), ["a dog"], [2]), 1, base)
    torch.testing.assert_close(kept, up)
    noise = draw_noise(tuple(up.shape), seed_generators([2], 1, 0))
    fresh = [run_stage(StageRun(cascade, _with_refine(plan, 1, 1.0), ["a dog"], [2]), 1, b) for b in (base, -base)]
    torch.testing.assert_close(fresh[0], fresh[1])  # from noise: the input does not reach the output
    assert not torch.allclose(fresh[0], up, atol=1e-2) and not torch.allclose(fresh[0], noise, atol=1e-2)


def _chunked(cascade, base_latents, chunk_frames: int, halo: int, strength: float = 0.0):
    """The last stage (SSR) of `cascade` chunk by chunk on the TSR's latents, at refine strength `strength`."""
    stages = list(cascade.config.stages)
    stages[-1] = dataclasses.replace(stages[-1], latent={**stages[-1].latent, "chunk_halo": halo})
    config = dataclasses.replace(cascade.config, stages=tuple(stages))
    plan = EditPlan.of(EditConfig(seed=4, ssr_chunk_frames=chunk_frames), config)
    plan = _with_refine(plan, 2, strength)
    run = StageRun(cascade, plan, ["a blue car"], [4])
    return run_cascade(run, base_latents, first=2), run


def test_chunks_with_a_halo_tile_the_clip_and_the_seam_is_measured(cascade):
    """Paper App. A.1 with the causal VAE: chunks of latent frames, each sampled and decoded with `halo` frames of
    context, make the clip's 4 (L - 1) + 1 frames; with the whole clip as context a chunk equals the unchunked
    stage; the seam statistic compares steps across chunk boundaries with steps inside chunks."""
    from dreamix_ray.edit import chunk_seams

    tsr_latents = torch.randn(1, Z, 5, 2, 2, generator=torch.Generator().manual_seed(0))
    whole, _ = _chunked(cascade, tsr_latents, 10 ** 6, 1)
    tiled, run = _chunked(cascade, tsr_latents, 8, 4)  # every chunk sees the clip: the same decode as whole
    assert whole.shape == tiled.shape == (1, 17, 64, 64, 3) and len(run.plan.stages[-1].chunks) == 3
    assert np.abs(whole.astype(int) - tiled).max() <= 1
    near, run = _chunked(cascade, tsr_latents, 8, 1)
    assert near.shape == whole.shape and np.abs(whole.astype(int) - near).mean() > 0.5  # less context
    across, inside = chunk_seams(near, run)
    assert np.isfinite(across) and inside > 0
    assert chunk_seams(whole, run)[1] > 0


def test_bad_ltx_inputs_get_one_line(repos, cascade, moving_video, tmp_path, capsys):
    def error_of(*argv) -> str:
        assert main(list(argv)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        return err

    other = write_upsampler(tmp_path / "other-vae", repos["base"], temporal=False)
    config = json.loads((other / "vae" / "config.json").read_text())
    (other / "vae" / "config.json").write_text(json.dumps({**config, "latent_channels": 16}))
    convert = ["convert", str(repos["base"]), "-o", str(tmp_path / "out"), "--size", "32x32"]
    assert "its VAE does not match the base's (latent_channels differ)" in error_of(*convert, "--frames", "9",
                                                                                   "--ssr", str(other))
    assert "is a temporal upsampler" in error_of(*convert, "--frames", "9", "--ssr", str(repos["tsr"]))
    assert "4k + 1 frames" in error_of(*convert, "--frames", "8")
    from dreamix_ray.video import write_video

    write_video(tmp_path / "in.mp4", moving_video)
    err = error_of("edit", str(tmp_path / "in.mp4"), "-p", "a dog", "-o", str(tmp_path / "o.mp4"), "--model",
                   str(repos["root"] / "cascade"), "--frames", "8", "--quiet")
    assert "LTX's VAE takes 4k + 1 frames" in err and "--frames 5" in err


def test_batch_steps_carry_latents_between_stages_and_equal_edit(cascade_dir, cascade, moving_video, tmp_path):
    """The Ray Data steps (run here in one process, as Ray runs each in its actor): rows carry the base's and the
    TSR's latents, not frames, and the output equals edit()'s; Serve's units read the same chunk inputs."""
    from dreamix_ray.cluster.pipeline import pipeline_steps
    from dreamix_ray.cluster.serving.runner import plan_units
    from dreamix_ray.cluster.io_steps import cascade_config, to_batch, to_rows
    from dreamix_ray.manifest import read_manifest, work_items
    from dreamix_ray.request import EditRequest
    from dreamix_ray.video import read_video, write_video

    write_video(tmp_path / "in.mp4", moving_video)
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "v", "video": str(tmp_path / "in.mp4"), "prompt": "a red cat",
                                                  "seed": 5, "strength": 0.6}))
    job = EditRequest(prompt="", ssr_chunk_frames=8)
    config = cascade_config(str(cascade_dir))
    rows = work_items(read_manifest(str(tmp_path / "m.jsonl")), str(tmp_path / "out"), job, "ltx", config)
    carried = {}
    for spec in pipeline_steps(config, str(cascade_dir), None, None, False):
        step = spec.fn(**spec.kwargs)
        rows = to_rows(step(to_batch(rows, list(rows[0]))))
        if "x" in rows[0]:
            carried[spec.name] = rows[0]["x"].shape
    assert rows[0]["status"] == "ok", rows[0].get("error")
    assert carried == {"decode": (3, 9, 32, 32), "degrade": (Z, 3, 2, 2), "base": (Z, 3, 2, 2),
                       "tsr": (Z, 5, 2, 2)}  # latents, not frames, from the degrade step's VAE encode on
    plan = EditPlan.from_dict(json.loads(to_rows(to_batch(work_items(read_manifest(str(tmp_path / "m.jsonl")),
                                                                     str(tmp_path / "o2"), job, "ltx", config),
                                                          ["cfg"]))[0]["cfg"]), cascade.config)
    expected = edit(read_video(tmp_path / "in.mp4"), "a red cat", plan, cascade)
    got = read_video(rows[0]["output"])
    assert got.frames.shape == expected.frames.shape == (17, 64, 64, 3)
    torch.testing.assert_close(torch.from_numpy(got.frames).float(), torch.from_numpy(
        read_video(write_video(tmp_path / "e.mp4", expected)).frames).float(), atol=2.0, rtol=0)
    chunks = [u["frames"] for u in plan_units(plan) if u.get("to_frames")]
    assert chunks == [plan.stages[-1].chunk_input(k) for k in range(3)] == [(0, 3), (1, 5), (3, 5)]


def test_convert_copy_is_self_contained_and_shares_the_transformer(tmp_path):
    base = write_ltx_repo(tmp_path / "b", seed=3)
    ssr = write_upsampler(tmp_path / "s", base, temporal=False)
    assert main(["convert", str(base), "-o", str(tmp_path / "c"), "--size", "32x32", "--frames", "5", "--steps", "2",
                 "--ssr", str(ssr), "--copy", "--quiet"]) == 0
    shutil.rmtree(base)
    shutil.rmtree(ssr)
    copied = Cascade.from_pretrained(tmp_path / "c")
    assert copied.stages[1].denoiser.transformer is copied.base.denoiser.transformer
    assert edit(write_video_clip(), "a dog", EditConfig(strength=0.5, seed=1), copied).frames.shape == (5, 64, 64, 3)


def write_video_clip():
    from dreamix_ray.video import Video

    return Video(np.random.default_rng(0).integers(0, 255, (8, 40, 40, 3), dtype=np.uint8), 8.0)


def test_finetune_the_base_and_optionally_a_refine_pass(repos, tmp_path):
    """LoRA finetuning on an LTX cascade: the base by default (the refine passes keep the shared, untuned transformer);
    `stages=("base", "ssr")` finetunes the SSR's refine pass too, on a transformer of its own. The base cascade is
    untouched, and the finetuned cascades keep their upsamplers, so they edit."""
    from dreamix_ray.finetune import finetune_or_load, finetune_preset
    from dreamix_ray.storage import ArtifactStore

    assert main(["convert", str(repos["base"]), "-o", str(tmp_path / "c"), "--size", "32x32", "--frames", "5",
                 "--steps", "2", "1", "--ssr", str(repos["ssr"]), "--quiet"]) == 0
    base = Cascade.from_pretrained(tmp_path / "c")  # base 5 frames -> SSR 64x64
    shared = base.base.denoiser.transformer
    video, store = write_video_clip(), ArtifactStore(str(tmp_path / "store"))
    x, t, tokens, mask = torch.randn(1, Z, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 128, 16), torch.ones(1, 128)

    def out(cascade, index: int) -> torch.Tensor:
        with torch.no_grad():
            return cascade.stages[index].denoiser(x, t, tokens, mask)

    def moved(tuned, index: int) -> float:
        return float((out(tuned, index) - out(base, index)).abs().max())

    before = out(base, 0)

    ft = finetune_preset("mixed", steps=2)
    tuned, _ = finetune_or_load(video, ft, base, store)
    assert tuned.base.denoiser.transformer is not shared and moved(tuned, 0) > 0
    assert tuned.stages[1].denoiser.transformer is shared
    refined, _ = finetune_or_load(video, dataclasses.replace(ft, stages=("base", "ssr")), base, store)
    ssr = refined.stages[1].denoiser.transformer
    assert ssr is not shared and ssr is not refined.base.denoiser.transformer and moved(refined, 1) > 0
    assert all(a.upsampler is b.upsampler for a, b in zip(refined.stages, base.stages))
    assert torch.equal(out(base, 0), before)  # the shared transformer trained nothing in place
    assert edit(video, "naia a red cat", EditConfig(strength=0.7, seed=1), refined).frames.shape == (5, 64, 64, 3)


def test_a_full_finetunes_weights_save_and_reload_as_the_stages_view(cascade, tmp_path):
    """The ZeRO-3 export's path without DeepSpeed: gathered weights (here the SSR's own, shifted) written by the one
    writer every stage family uses, and reloaded as this stage's view (its fps and VAE ratios), not the shared one."""
    net = cascade.stages[2].denoiser
    gathered = {k: v + 0.01 for k, v in net.state_dict().items()}
    save_denoiser(net, tmp_path / "ssr", gathered)
    again = load_denoiser(net, tmp_path / "ssr")
    assert isinstance(again, LTXStageNet) and (again.fps, again.ratios) == (net.fps, net.ratios)
    assert again.transformer is not net.transformer
    reloaded = again.state_dict()
    assert reloaded.keys() == gathered.keys() and all(torch.equal(reloaded[k], gathered[k]) for k in gathered)
