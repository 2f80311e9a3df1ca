"""Wan cascades (flow matching, full 3D attention): convert, load, edit, parity with diffusers, frame mode, CFG.

The repository is a tiny random Wan2.1-T2V model saved in the hub's diffusers layout (model_index.json,
transformer/, vae/, text_encoder/ UMT5, tokenizer/, scheduler/ UniPC with flow sigmas), built offline; its
tokenizer is made with the `tokenizers` library. A second one has Wan2.2-T2V-A14B's two experts (transformer_2/ and
boundary_ratio in model_index.json).
"""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel, WanVideoToVideoPipeline
from safetensors.torch import load_file
from transformers import AutoTokenizer, UMT5EncoderModel
from wan_repo import MODEL_INDEX, SHIFT, TEXT_DIM, Z_DIM, write_wan_repo

from dreamix_ray.cli import main
from dreamix_ray.config import EditConfig
from dreamix_ray.edit import StageRun, edit, generate, run_stage
from dreamix_ray.finetune import (_StageData, finetune, finetune_or_load, finetune_preset, finetuned_prompt,
                                  load_finetuned)
from dreamix_ray.models import adapters
from dreamix_ray.models.cascade import Cascade
from dreamix_ray.models.wan import WanDenoiser, WanExperts, WanVAE
from dreamix_ray.objective import diffusion_loss, is_frame_step, training_point
from dreamix_ray.sampling import draw_noise, flow_sample, seed_generators, strength_timesteps
from dreamix_ray.storage import ArtifactStore
from dreamix_ray.video import Video, read_video, write_video

@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return write_wan_repo(tmp_path_factory.mktemp("wan") / "tiny-wan2.1-t2v")


@pytest.fixture(scope="module")
def cascade_dir(repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "tiny-wan"
    assert main(["convert", str(repo), "-o", str(out), "--size", "32x32", "--frames", "5", "--fps", "8",
                 "--steps", "4"]) == 0
    return out


@pytest.fixture(scope="module")
def cascade(cascade_dir):
    return Cascade.from_pretrained(cascade_dir)


def test_convert_writes_a_flow_stage_and_info_shows_its_latents(cascade_dir, cascade, repo, capsys):
    spec = json.loads((cascade_dir / "cascade.json").read_text())
    (base,) = spec["stages"]
    assert (base["kind"], base["frames"], base["width"], base["height"], base["fps"]) == ("base", 5, 32, 32, 8.0)
    assert base["latent"] == {"layout": "wan", "transformer": str(repo / "transformer"), "vae": str(repo / "vae"),
                              "scheduler": str(repo / "scheduler")}
    assert spec["text_encoder"]["kind"] == "umt5" and spec["text_encoder"]["max_length"] == 512
    stage = cascade.base
    assert isinstance(stage.denoiser, WanDenoiser) and isinstance(stage.vae, WanVAE)
    assert isinstance(stage.scheduler, FlowMatchEulerDiscreteScheduler) and stage.scheduler.config.shift == SHIFT
    assert main(["info", "--model", str(cascade_dir)]) == 0
    out = capsys.readouterr().out
    assert f"latent {Z_DIM}x2x4x4" in out and f"{stage.num_parameters:,}" in out and "umt5" in out


def test_convert_copy_and_save_keep_the_stage_self_contained(repo, cascade, tmp_path):
    source = shutil.copytree(repo, tmp_path / "src")
    assert main(["convert", str(source), "-o", str(tmp_path / "copied"), "--size", "32x32", "--frames", "5",
                 "--copy"]) == 0
    shutil.rmtree(source)
    copied = Cascade.from_pretrained(tmp_path / "copied")  # the UniPC flow config in base/ becomes flow Euler
    loaded = Cascade.from_pretrained(copied.save_pretrained(tmp_path / "saved"), text_encoder=copied.text_encoder)
    assert isinstance(loaded.base.scheduler, FlowMatchEulerDiscreteScheduler)
    assert loaded.base.scheduler.config.shift == SHIFT
    for other in (copied, loaded):
        a, b = cascade.base.denoiser.state_dict(), other.base.denoiser.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_edit_command_runs_end_to_end(cascade_dir, moving_video, tmp_path):
    write_video(tmp_path / "in.mp4", moving_video)
    argv = ["edit", str(tmp_path / "in.mp4"), "-p", "a blue dog", "-o", str(tmp_path / "out.mp4"), "--model",
            str(cascade_dir), "--strength", "0.6", "--guidance", "3", "--negative-prompt", "blurry", "--eta", "0.5",
            "--quiet"]
    assert main(argv) == 0
    out = read_video(tmp_path / "out.mp4")
    assert out.frames.shape == (5, 32, 32, 3) and out.fps == 8.0


def test_flow_training_point_is_the_samplers_convention():
    """x_t = (1 - sigma) x0 + sigma eps at the scheduler's shifted training sigma, the network told
    sigma * 1000 (what the sampler passes): an oracle velocity from (x_t, t) has zero loss at every index."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    scheduler.set_timesteps(4)  # sampling rewrites a scheduler's sigmas; training must not read them
    x0, eps = torch.randn(3, Z_DIM, 2, 4, 4), torch.randn(3, Z_DIM, 2, 4, 4)
    index = torch.tensor([0, 500, 999])
    x_t, t_net, target = training_point(scheduler, x0, eps, index)
    unshifted = 1 - index / 1000
    sigma = SHIFT * unshifted / (1 + (SHIFT - 1) * unshifted)
    torch.testing.assert_close(t_net, sigma.float() * 1000, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(target, eps - x0)
    oracle = (x_t - x0) / (t_net / 1000).view(-1, 1, 1, 1, 1)  # eps - x0 recovered from x_t alone
    torch.testing.assert_close(oracle, target, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def random_video():
    frames = (np.random.default_rng(0).random((16, 32, 32, 3)) * 255).astype(np.uint8)
    return Video(frames, 8.0)


@pytest.fixture(scope="module")
def lora_run(cascade, random_video, tmp_path_factory):
    """A mixed LoRA finetune of the tiny Wan stage into a store: (config, artifact id, tuned cascade, store, losses)."""
    store = ArtifactStore(str(tmp_path_factory.mktemp("wan-store")))
    cfg = finetune_preset("mixed", steps=8, lr=2e-2, seed=35)
    losses = []
    tuned, key = finetune_or_load(random_video, cfg, cascade, store, on_step=lambda *a: losses.append(a[-1]))
    return cfg, key, tuned, store, losses


def test_frames_are_encoded_as_one_frame_clips(cascade, random_video):
    data = _StageData(random_video, cascade.base, finetune_preset("mixed"))
    assert data.clip_bcfhw.shape == (1, Z_DIM, 2, 4, 4) and data.frames_per_step == 2
    assert data.frames_cfhw.shape == (Z_DIM, 16, 4, 4)  # every frame of the video, one latent frame each
    frame = torch.from_numpy(random_video.frames[5]).float().div(127.5).sub(1).permute(2, 0, 1)
    torch.testing.assert_close(data.frames_cfhw[:, 5], cascade.base.encode(frame[None, :, None])[0, :, 0])


def test_lora_mixed_finetune_of_a_wan_stage_edits_differently(cascade, random_video, lora_run):
    cfg, key, tuned, store, losses = lora_run
    assert len(losses) == cfg.steps and {is_frame_step(cfg.seed, s, cfg.alpha) for s in range(cfg.steps)} == {0, 1}
    files = sorted(p.name for p in Path(store.root, key, "base").iterdir())
    assert files == ["adapter_config.json", adapters.WEIGHTS_FILE]
    targets = adapters.target_modules(cascade.base.denoiser, "attention")
    assert {t.split(".", 2)[2] for t in targets} == {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                                      "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                                                      "ffn.net.0.proj", "ffn.net.2"}
    stored = (Path(store.root, key, "base") / adapters.WEIGHTS_FILE).stat().st_size
    modules = dict(cascade.base.denoiser.named_modules())
    lora_params = sum(cfg.lora_rank * (modules[t].in_features + modules[t].out_features) for t in targets)
    assert stored < 4 * lora_params + 16_000  # the adapter alone (fp32) and its header
    # the objective at fixed draws goes down; the artifact edits differently and reloads to the same edit
    x0 = _StageData(random_video, cascade.base, cfg).clip_bcfhw.repeat(8, 1, 1, 1, 1)
    tokens, pooled = (e.expand(8, *e.shape[1:]) for e in cascade.text_encoder([cfg.prompt]))

    def fixed_loss(stage):
        with torch.no_grad():
            return diffusion_loss(stage, x0, None, tokens, pooled, torch.Generator().manual_seed(1), False).item()

    assert fixed_loss(tuned.base) < 0.9 * fixed_loss(cascade.base)
    ecfg, prompt = EditConfig(strength=0.8, seed=2), finetuned_prompt("a red cat", cfg)
    ours = edit(random_video, prompt, ecfg, tuned).frames
    assert not np.array_equal(ours, edit(random_video, prompt, ecfg, cascade).frames)
    loaded, loaded_cfg = load_finetuned(cascade, key, store)
    assert loaded_cfg == cfg and np.array_equal(ours, edit(random_video, prompt, ecfg, loaded).frames)
    steps = []
    again, key2 = finetune_or_load(random_video, cfg, cascade, store, on_step=lambda *a: steps.append(a))
    assert key2 == key and steps == []  # finetune once, edit many


def test_cli_finetune_then_edit_with_the_artifact(cascade_dir, moving_video, tmp_path, capsys):
    write_video(tmp_path / "in.mp4", moving_video)
    common = ["--model", str(cascade_dir), "--store", str(tmp_path / "store"), "--quiet"]
    assert main(["finetune", str(tmp_path / "in.mp4"), "--ft-steps", "2", "--lr", "1e-2", *common]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert key.startswith("ft-")
    outs = {}
    for name, extra in (("tuned", ["--finetuned", key]), ("base", [])):
        argv = ["edit", str(tmp_path / "in.mp4"), "-p", "a blue dog", "-o", str(tmp_path / f"{name}.mp4"),
                "--strength", "0.8", *extra, *common]
        assert main(argv) == 0
        outs[name] = read_video(tmp_path / f"{name}.mp4").frames
    assert outs["tuned"].shape == (5, 32, 32, 3) and not np.array_equal(outs["tuned"], outs["base"])


def _pixels01(x_bcfhw: torch.Tensor) -> torch.Tensor:
    """Our [-1, 1] (B, C, F, H, W) as diffusers' output_type="pt": (B, F, C, H, W) in [0, 1]."""
    return ((x_bcfhw + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)


def _pipeline(cls, repo, cascade, **kwargs):
    return cls(tokenizer=AutoTokenizer.from_pretrained(repo / "tokenizer"),
               text_encoder=UMT5EncoderModel.from_pretrained(repo / "text_encoder"), vae=cascade.base.vae.vae,
               transformer=WanTransformer3DModel.from_pretrained(repo / "transformer"),
               scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), **kwargs)


def test_text_to_video_and_edit_match_diffusers_wan_pipelines(repo, cascade):
    """Same noise in: our strength 1 = WanPipeline, our strength 0.5 = WanVideoToVideoPipeline (its cut)."""
    seed, prompt, negative = 7, "a red cat moving left", "blurry"
    cfg = dict(seed=seed, guidance_scale=3.0, negative_prompt=negative)
    x0 = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    noise = draw_noise((1, Z_DIM, 2, 4, 4), seed_generators([seed], 0))
    t2v = _pipeline(WanPipeline, repo, cascade)
    t2v.set_progress_bar_config(disable=True)
    ref = t2v(prompt, negative_prompt=negative, height=32, width=32, num_frames=5, num_inference_steps=4,
              guidance_scale=3.0, latents=noise, output_type="pt").frames
    ours = run_stage(StageRun.of(cascade, EditConfig(strength=1.0, **cfg), [prompt], [seed]), 0, x0)
    torch.testing.assert_close(_pixels01(ours), ref, atol=1e-4, rtol=1e-4)
    v2v = _pipeline(WanVideoToVideoPipeline, repo, cascade)
    v2v.set_progress_bar_config(disable=True)
    # WanPipeline's encoder: the video-to-video pipeline's own prompt cleaning needs ftfy, which is not installed
    embeds, negative_embeds = t2v.encode_prompt(prompt, negative, do_classifier_free_guidance=True,
                                                max_sequence_length=512)
    ref = v2v(video=((x0 + 1) / 2).permute(0, 2, 1, 3, 4), prompt_embeds=embeds,
              negative_prompt_embeds=negative_embeds, height=32,
              width=32, num_inference_steps=4, guidance_scale=3.0, strength=0.5,
              generator=seed_generators([seed], 0), output_type="pt").frames
    ours = run_stage(StageRun.of(cascade, EditConfig(strength=0.5, **cfg), [prompt], [seed]), 0, x0)
    torch.testing.assert_close(_pixels01(ours), ref, atol=1e-4, rtol=1e-4)


def test_wan22_ti2v_layout_converts_and_matches_wan_pipeline(tmp_path):
    """Wan2.2-TI2V-5B is the same classes: its text-to-video (per-token timesteps in WanPipeline) is our base."""
    repo = write_wan_repo(tmp_path / "tiny-wan2.2-ti2v", seed=1, ti2v=True)
    assert main(["convert", str(repo), "-o", str(tmp_path / "c"), "--size", "64x64", "--frames", "5",
                 "--steps", "3"]) == 0
    cascade = Cascade.from_pretrained(tmp_path / "c")
    assert cascade.info()[0]["latent"] == (2 * Z_DIM, 2, 4, 4)
    noise = draw_noise((1, 2 * Z_DIM, 2, 4, 4), seed_generators([5], 0))
    pipe = _pipeline(WanPipeline, repo, cascade, expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a dog", height=64, width=64, num_frames=5, num_inference_steps=3, guidance_scale=2.0,
               latents=noise, output_type="pt").frames
    ours = run_stage(StageRun.of(cascade, EditConfig(strength=1.0, seed=5, guidance_scale=2.0), ["a dog"], [5]), 0,
                     torch.zeros(1, 3, 5, 64, 64))
    torch.testing.assert_close(_pixels01(ours), ref, atol=1e-4, rtol=1e-4)


def test_strength_one_is_text_to_video(cascade, moving_video):
    cfg = EditConfig(strength=1.0, seed=3, guidance_scale=2.0, eta=0.5)
    edited = edit(moving_video, "a blue car", cfg, cascade).frames
    assert np.array_equal(edited, generate("a blue car", cfg, cascade).frames)
    assert not np.array_equal(edited, generate("a blue car", EditConfig(strength=1.0, seed=4), cascade).frames)


def test_strength_zero_is_the_vae_round_trip_and_batch_equals_rows(cascade):
    x0 = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    kept = run_stage(StageRun.of(cascade, EditConfig(strength=0.0), ["a", "b"], [0, 1]), 0, x0)
    torch.testing.assert_close(kept, cascade.base.decode(cascade.base.encode(x0)))
    cfg = EditConfig(strength=0.75, eta=0.5, guidance_scale=2.0)
    rows = [run_stage(StageRun.of(cascade, cfg, [p], [s]), 0, x0[i:i + 1])
            for i, (p, s) in enumerate([("a red cat", 0), ("a dog", 1)])]
    batch = run_stage(StageRun.of(cascade, cfg, ["a red cat", "a dog"], [0, 1]), 0, x0)
    torch.testing.assert_close(batch, torch.cat(rows), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rows[0], kept[:1], atol=1e-3)


def test_cfg_batched_equals_sequential(cascade):
    x0 = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    outs = [run_stage(StageRun.of(cascade, EditConfig(strength=0.8, guidance_scale=4.0, cfg_mode=mode,
                                                      negative_prompt="blurry"), ["a cat", "a car"], [0, 1]), 0, x0)
            for mode in ("batched", "sequential")]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    unguided = run_stage(StageRun.of(cascade, EditConfig(strength=0.8), ["a cat", "a car"], [0, 1]), 0, x0)
    assert not torch.allclose(outs[0], unguided, atol=1e-4)


def _change_per_frame(model, frame_mode_on: bool, j: int = 2, t: float = 500.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x, tokens = torch.randn(1, Z_DIM, 5, 4, 4, generator=gen), torch.randn(1, 512, TEXT_DIM, generator=gen)
    x2 = x.clone()
    x2[:, :, j] += 0.5
    with torch.no_grad():
        a, b = (model(v, torch.tensor([t]), tokens, frame_mode_on=frame_mode_on) for v in (x, x2))
    return (a - b).abs().amax(dim=(0, 1, 3, 4))


def test_frame_mode_makes_each_latent_frame_attend_only_to_itself(cascade):
    """Paper Sec. 4.2: in frame mode perturbing latent frame j changes no output frame i != j."""
    masked = _change_per_frame(cascade.base.denoiser, frame_mode_on=True)
    assert masked[2] > 1e-3 and torch.all(masked[[0, 1, 3, 4]] == 0), masked
    mixed = _change_per_frame(cascade.base.denoiser, frame_mode_on=False)
    assert torch.all(mixed[[0, 1, 3, 4]] > 1e-6), mixed


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_flow_eta_keeps_the_marginal_and_lands_on_x0(eta):
    """With the exact velocity of a point mass x0, every eta ends on x0, and x_sigma keeps std sigma around
    (1 - sigma) x0: eta only trades the carried noise for fresh noise (the DDIM eta on the flow schedule)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    timesteps = strength_timesteps(scheduler, 6, 1.0)
    target = torch.linspace(-1, 1, 64 * 64).view(1, 1, 1, 64, 64)
    sigma_of = {float(t): float(s) for t, s in zip(scheduler.timesteps, scheduler.sigmas)}
    seen = []

    def velocity(x, t):  # eps - x0, with eps = (x - (1 - sigma) x0) / sigma
        sigma = sigma_of[float(t[0])]
        seen.append((sigma, x))
        return (x - (1 - sigma) * target) / sigma - target

    gens = seed_generators([0], 0)
    out = flow_sample(velocity, draw_noise(tuple(target.shape), gens), scheduler, timesteps, eta, gens)
    torch.testing.assert_close(out, target, atol=1e-4, rtol=1e-4)
    for sigma, x in seen[1:]:
        assert abs(float((x - (1 - sigma) * target).std()) / sigma - 1) < 0.05


def test_bad_wan_repositories_get_one_line(repo, tmp_path, capsys):
    def error_of(src, *flags) -> str:
        assert main(["convert", str(src), "-o", str(tmp_path / "out"), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    missing = shutil.copytree(repo, tmp_path / "missing")
    shutil.rmtree(missing / "transformer")
    assert "no transformer/config.json" in error_of(missing)
    mismatched = shutil.copytree(repo, tmp_path / "mismatched")
    vae = json.loads((mismatched / "vae" / "config.json").read_text())
    (mismatched / "vae" / "config.json").write_text(json.dumps({**vae, "z_dim": 16}))
    assert "the VAE makes 16" in error_of(mismatched)
    pair = shutil.copytree(repo, tmp_path / "a14b")
    (pair / "model_index.json").write_text(json.dumps({**MODEL_INDEX, "boundary_ratio": 0.875,
                                                       "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    assert "boundary_ratio 0.875 in model_index.json but no transformer_2/config.json" in error_of(pair)
    assert "4k + 1" in error_of(repo, "--frames", "8")


# Wan2.2-T2V-A14B: two experts. The tiny schedule (4 steps, shift 3) is t = 1000, 857.7, 602.2, 8.9; at boundary 0.7
# the high-noise expert runs the first two steps and the low-noise one the last two, so an edit at 0.75 (the last
# three steps) runs both.
BOUNDARY = 0.7


@pytest.fixture(scope="module")
def pair_repo(tmp_path_factory):
    return write_wan_repo(tmp_path_factory.mktemp("wan-a14b") / "tiny-wan2.2-t2v-a14b", seed=2,
                          boundary_ratio=BOUNDARY)


@pytest.fixture(scope="module")
def pair_dir(pair_repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted-a14b") / "tiny-a14b"
    assert main(["convert", str(pair_repo), "-o", str(out), "--size", "32x32", "--frames", "5", "--fps", "8",
                 "--steps", "4", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def pair(pair_dir):
    return Cascade.from_pretrained(pair_dir)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a14b_converts_to_one_stage_holding_both_experts(pair_dir, pair, pair_repo, capsys):
    (base,) = json.loads((pair_dir / "cascade.json").read_text())["stages"]
    assert base["latent"] == {"layout": "wan", "transformer": str(pair_repo / "transformer"),
                              "vae": str(pair_repo / "vae"), "scheduler": str(pair_repo / "scheduler"),
                              "transformer_2": str(pair_repo / "transformer_2"), "boundary_ratio": BOUNDARY}
    experts = pair.base.denoiser
    assert isinstance(experts, WanExperts) and experts.boundary_timestep == pytest.approx(700.0)
    for net, folder in zip(experts.experts, ("transformer", "transformer_2")):
        assert isinstance(net, WanDenoiser)
        assert _same_weights(net, WanTransformer3DModel.from_pretrained(pair_repo / folder))
    assert not _same_weights(experts.transformer, experts.transformer_2)
    assert main(["info", "--model", str(pair_dir)]) == 0
    out = capsys.readouterr().out
    high, low = (sum(p.numel() for p in e.parameters()) for e in experts.experts)
    assert f"high noise (t >= 700) {high:,} params, low noise (t < 700) {low:,} params" in out
    assert f"{high + low:,}" in out and "two experts" in out


def test_a14b_copy_and_save_keep_both_experts(pair_repo, pair, tmp_path):
    source = shutil.copytree(pair_repo, tmp_path / "src")
    assert main(["convert", str(source), "-o", str(tmp_path / "copied"), "--size", "32x32", "--frames", "5",
                 "--quiet", "--copy"]) == 0
    shutil.rmtree(source)
    assert (tmp_path / "copied" / "base" / "transformer_2" / "config.json").is_file()
    copied = Cascade.from_pretrained(tmp_path / "copied")
    loaded = Cascade.from_pretrained(copied.save_pretrained(tmp_path / "saved"), text_encoder=copied.text_encoder)
    for other in (copied, loaded):
        assert isinstance(other.base.denoiser, WanExperts) and other.base.denoiser.boundary_ratio == BOUNDARY
        assert _same_weights(pair.base.denoiser, other.base.denoiser)


def _switching_to(low, boundary_timestep: float):
    """WanPipeline's expert rule carried into WanVideoToVideoPipeline's own loop (which takes no transformer_2): after
    each step, the low-noise expert becomes the pipeline's transformer once the next timestep is below the boundary."""
    def callback(pipe, i, t, tensors):
        s = pipe.scheduler
        if s.step_index < len(s.timesteps) and s.timesteps[s.step_index] < boundary_timestep:
            pipe.transformer = low
        return {}
    return callback


def test_a14b_text_to_video_and_edit_match_diffusers(pair_repo, pair):
    """Same noise in: our strength 1 = WanPipeline(transformer_2=, boundary_ratio=); our strength 0.75 =
    WanVideoToVideoPipeline switching to transformer_2 at the boundary, the rule WanPipeline applies."""
    seed, prompt, negative = 7, "a red cat moving left", "blurry"
    cfg = {"seed": seed, "guidance_scale": 3.0, "negative_prompt": negative}
    x0 = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    noise = draw_noise((1, Z_DIM, 2, 4, 4), seed_generators([seed], 0))
    low = WanTransformer3DModel.from_pretrained(pair_repo / "transformer_2")
    t2v = _pipeline(WanPipeline, pair_repo, pair, transformer_2=low, boundary_ratio=BOUNDARY)
    t2v.set_progress_bar_config(disable=True)
    ref = t2v(prompt, negative_prompt=negative, height=32, width=32, num_frames=5, num_inference_steps=4,
              guidance_scale=3.0, latents=noise, output_type="pt").frames
    ours = run_stage(StageRun.of(pair, EditConfig(strength=1.0, **cfg), [prompt], [seed]), 0, x0)
    torch.testing.assert_close(_pixels01(ours), ref, atol=1e-4, rtol=1e-4)
    v2v = _pipeline(WanVideoToVideoPipeline, pair_repo, pair)  # starts on `transformer`: the first kept t is 857.7
    v2v.set_progress_bar_config(disable=True)
    embeds, negative_embeds = t2v.encode_prompt(prompt, negative, do_classifier_free_guidance=True,
                                                max_sequence_length=512)
    ref = v2v(video=((x0 + 1) / 2).permute(0, 2, 1, 3, 4), prompt_embeds=embeds,
              negative_prompt_embeds=negative_embeds, height=32, width=32, num_inference_steps=4, guidance_scale=3.0,
              strength=0.75, generator=seed_generators([seed], 0), output_type="pt",
              callback_on_step_end=_switching_to(low, BOUNDARY * 1000)).frames
    assert v2v.transformer is low  # the reference did switch
    ours = run_stage(StageRun.of(pair, EditConfig(strength=0.75, **cfg), [prompt], [seed]), 0, x0)
    torch.testing.assert_close(_pixels01(ours), ref, atol=1e-4, rtol=1e-4)


def test_each_expert_runs_its_own_noise_range(pair):
    """The high-noise expert sees t >= 700 only, the low-noise one t < 700; the result is neither expert's alone."""
    experts, seen = pair.base.denoiser, {"high": [], "low": []}
    hooks = [net.register_forward_pre_hook(lambda m, args, key=key: seen[key].extend(args[1].tolist()))
             for key, net in (("high", experts.transformer), ("low", experts.transformer_2))]
    cfg = EditConfig(strength=0.75, seed=1, guidance_scale=2.0)
    x0 = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    try:
        both = run_stage(StageRun.of(pair, cfg, ["a dog"], [1]), 0, x0)
    finally:
        for hook in hooks:
            hook.remove()
    assert sorted(set(seen["high"])) == pytest.approx([857.6923]) and len(seen["high"]) == 2  # cond + uncond rows
    assert sorted(set(seen["low"])) == pytest.approx([8.9286, 602.1506], abs=1e-3) and len(seen["low"]) == 4
    for alone in experts.experts:
        single = Cascade(pair.config, pair.text_encoder, [dataclasses.replace(pair.base, denoiser=alone)])
        assert (run_stage(StageRun.of(single, cfg, ["a dog"], [1]), 0, x0) - both).abs().max() > 1e-3


def test_a_batch_straddling_the_boundary_equals_its_rows(pair):
    """Training draws a timestep per row: each expert takes its own rows, as one row at a time would."""
    gen = torch.Generator().manual_seed(3)
    x, tokens = torch.randn(3, Z_DIM, 2, 4, 4, generator=gen), torch.randn(3, 512, TEXT_DIM, generator=gen)
    t = torch.tensor([900.0, 300.0, 700.0])  # 700 is the boundary itself: t >= boundary is the high-noise expert's
    experts = pair.base.denoiser
    with torch.no_grad():
        batch = experts(x, t, tokens)
        rows = torch.cat([experts(x[i:i + 1], t[i:i + 1], tokens[i:i + 1]) for i in range(3)])
        by_hand = [net(x[i:i + 1], t[i:i + 1], tokens[i:i + 1])
                   for i, net in enumerate((experts.transformer, experts.transformer_2, experts.transformer))]
    torch.testing.assert_close(batch, rows, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows, torch.cat(by_hand))


@pytest.mark.parametrize("t", [900.0, 300.0])
def test_frame_mode_holds_on_both_experts(pair, t):
    masked = _change_per_frame(pair.base.denoiser, frame_mode_on=True, t=t)
    assert masked[2] > 1e-3 and torch.all(masked[[0, 1, 3, 4]] == 0), masked
    assert torch.all(_change_per_frame(pair.base.denoiser, frame_mode_on=False, t=t)[[0, 1, 3, 4]] > 1e-6)


def test_a14b_lora_finetune_adapts_both_experts_and_reloads(pair, random_video, tmp_path):
    """Both experts carry an adapter and each trains on the steps that land in its range; an edit at 0.75 runs both,
    differs from the plain edit, and the stored artifact reloads to the same edit."""
    store = ArtifactStore(str(tmp_path / "store"))
    cfg = finetune_preset("mixed", steps=8, lr=2e-2, seed=35)
    tuned, key = finetune_or_load(random_video, cfg, pair, store)
    stored = load_file(str(Path(store.root, key, "base") / adapters.WEIGHTS_FILE))
    trained = {k.split(".")[0] for k, v in stored.items() if "lora_B" in k and v.abs().sum() > 0}
    assert trained == {"transformer", "transformer_2"}, trained  # both experts moved off the base
    for base_net, tuned_net in zip(pair.base.denoiser.experts, tuned.base.denoiser.experts):
        assert not _same_weights(base_net, tuned_net)
    ecfg, prompt = EditConfig(strength=0.75, seed=2), finetuned_prompt("a red cat", cfg)
    ours = edit(random_video, prompt, ecfg, tuned).frames
    assert not np.array_equal(ours, edit(random_video, prompt, ecfg, pair).frames)
    loaded, _ = load_finetuned(pair, key, store)
    assert isinstance(loaded.base.denoiser, WanExperts)
    assert np.array_equal(ours, edit(random_video, prompt, ecfg, loaded).frames)


def test_a14b_full_finetune_reloads_both_experts(pair, random_video):
    tuned = finetune(random_video, finetune_preset("mixed", steps=2, lr=1e-3, seed=3, adapter="full"), pair)
    experts = tuned.base.denoiser
    assert isinstance(experts, WanExperts) and experts.boundary_ratio == BOUNDARY
    assert not _same_weights(experts, pair.base.denoiser)


def test_bad_a14b_repositories_get_one_line(pair_repo, tmp_path, capsys):
    def error_of(src) -> str:
        assert main(["convert", str(src), "-o", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    def variant(name: str, index: dict | None = None, transformer_2: dict | None = None) -> Path:
        repo = shutil.copytree(pair_repo, tmp_path / name)
        if index is not None:
            (repo / "model_index.json").write_text(json.dumps(index))
        if transformer_2 is not None:
            config = json.loads((repo / "transformer_2" / "config.json").read_text())
            (repo / "transformer_2" / "config.json").write_text(json.dumps({**config, **transformer_2}))
        return repo

    index = json.loads((pair_repo / "model_index.json").read_text())
    assert "transformer_2/ but no boundary_ratio" in error_of(variant("no-boundary", {**index, "boundary_ratio": None}))
    assert "boundary_ratio 1.5" in error_of(variant("bad-boundary", {**index, "boundary_ratio": 1.5}))
    assert "differ in text_dim (16 vs 32)" in error_of(variant("other-text", transformer_2={"text_dim": 32}))
    assert "differ in in_channels, out_channels" in error_of(variant("other-latents", transformer_2={
        "in_channels": 8, "out_channels": 8}))
