"""Latent cascades in the ModelScope / zeroscope layout: convert, load, edit, finetune, frame mode.

The repositories are tiny random models saved exactly as those on the hub are laid out
(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), built offline.
"""

import copy
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from dreamix_ray.cli import main
from dreamix_ray.config import EditConfig
from dreamix_ray.edit import StageRun, edit, run_stage
from dreamix_ray.finetune import finetune, finetune_or_load, finetune_preset
from dreamix_ray.models.cascade import Cascade
from dreamix_ray.models.frame_mode import temporal_parameter_names
from dreamix_ray.models.latent import LatentModelError, LatentRuntime, LatentVideoDenoiser, VideoVAE, place
from dreamix_ray.models.refs import hf_ref, parse_hf_ref
from dreamix_ray.objective import is_frame_step, prediction_target
from dreamix_ray.sampling import ddim_sample, fresh_scheduler, guided, make_scheduler
from dreamix_ray.storage import ArtifactStore

TEXT_DIM = 32
# The ModelScope / zeroscope scheduler_config.json and model_index.json, as published.
MODELSCOPE_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                            num_train_timesteps=1000, prediction_type="epsilon", set_alpha_to_one=False,
                            steps_offset=1)
MODEL_INDEX = {"_class_name": "TextToVideoSDPipeline", "_diffusers_version": "0.42.1",
               "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet3DConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"]}


def _byte_chars() -> list[str]:
    """CLIP's byte-to-unicode table: the 256 base symbols of its BPE vocabulary."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _write_tokenizer(folder) -> int:
    """vocab.json + merges.txt + configs, the files a CLIPTokenizer folder holds; returns the vocab size."""
    chars = _byte_chars()
    merges = ["r e", "re d</w>", "c a", "ca t</w>", "n a", "na i", "nai a</w>", "b l", "bl u", "blu e</w>"]
    vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "!"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True}))
    return len(vocab)


def write_repo(path, seed: int):
    """A tiny random text-to-video repository in the diffusers layout of text-to-video-ms-1.7b."""
    torch.manual_seed(seed)
    unet = UNet3DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), layers_per_block=1,
                                norm_num_groups=4, cross_attention_dim=TEXT_DIM, attention_head_dim=4)
    gen = torch.Generator().manual_seed(seed)
    for p in unet.parameters():  # identity-initialised temporal convs would hide any mixing of frames
        if not p.detach().abs().sum():
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    unet.save_pretrained(path / "unet")
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                  sample_size=32).save_pretrained(path / "vae")
    vocab_size = _write_tokenizer(path / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=37,
                                 num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                 bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=0,
                                 projection_dim=TEXT_DIM)).save_pretrained(path / "text_encoder")
    DDIMScheduler(**MODELSCOPE_SCHEDULER).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return path


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2v")
    return write_repo(root / "t2v-base", seed=0), write_repo(root / "t2v-xl", seed=1)


@pytest.fixture(scope="module")
def cascade_dir(repos, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "tiny-zeroscope"
    argv = ["convert", str(repos[0]), str(repos[1]), "-o", str(out), "--size", "32x32", "64x48", "--frames", "4",
            "--fps", "4", "--steps", "3", "2", "--vae-chunk-frames", "3"]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def cascade(cascade_dir):
    return Cascade.from_pretrained(cascade_dir)


def test_convert_refers_to_the_components_and_loads(cascade_dir, cascade, repos):
    spec = json.loads((cascade_dir / "cascade.json").read_text())
    base, ssr = spec["stages"]
    assert (base["kind"], ssr["kind"]) == ("base", "ssr")
    assert (ssr["width"], ssr["height"], ssr["factor"]) == (64, 48, 2)
    assert base["latent"]["unet"] == str(repos[0] / "unet") and ssr["latent"]["vae"] == str(repos[1] / "vae")
    assert spec["text_encoder"] == {"kind": "clip", "max_length": 77, "attention_mask": False,
                                    "path": str(repos[0] / "text_encoder"), "tokenizer": str(repos[0] / "tokenizer")}
    assert all(isinstance(s.denoiser, LatentVideoDenoiser) and isinstance(s.vae, VideoVAE) for s in cascade.stages)
    assert cascade.base.scheduler.config.prediction_type == "epsilon"
    assert cascade.text_encoder.hidden_size == TEXT_DIM


def test_base_stage_matches_diffusers_text_to_video_pipeline(cascade, repos):
    """Our loop on the converted stage = diffusers' own ModelScope pipeline on the same repository."""
    from diffusers import TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline.from_pretrained(repos[0])
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    ref = pipe("a red cat", num_inference_steps=3, height=32, width=32, num_frames=4, guidance_scale=3.0,
               latents=latents.clone(), output_type="pt").frames  # [B, F, C, H, W] in [0, 1]
    stage, text = cascade.base, cascade.text_encoder
    scheduler = fresh_scheduler(stage.scheduler)
    scheduler.set_timesteps(3)
    cond, uncond = text(["a red cat"]), text([""])
    with torch.no_grad():
        denoise = guided(lambda x, t: stage.denoiser(x, t, *cond), lambda x, t: stage.denoiser(x, t, *uncond), 3.0)
        z = ddim_sample(denoise, latents.clone(), scheduler, scheduler.timesteps, 0.0, [torch.Generator()])
        ours = ((stage.decode(z) + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_edit_degrades_in_latent_space_and_decodes_after_each_stage(cascade, moving_video):
    cfg = EditConfig(strength=0.7, seed=1, guidance_scale=2.0, ssr_chunk_frames=3)  # 4 frames: 2 SSR chunks
    out = edit(moving_video, "a blue cat", cfg, cascade)
    assert out.frames.shape == (4, 48, 64, 3) and out.fps == 4.0
    assert np.array_equal(out.frames, edit(moving_video, "a blue cat", cfg, cascade).frames)
    other_seed = EditConfig(**{**cfg.to_dict(), "seed": 2})
    assert not np.array_equal(out.frames, edit(moving_video, "a blue cat", other_seed, cascade).frames)
    # At strength 0 the base stage only round-trips its input through the VAE.
    x0 = torch.rand(2, 3, 4, 32, 32) * 2 - 1
    kept = run_stage(StageRun.of(cascade, EditConfig(strength=0.0), ["a", "b"], [0, 1]), 0, x0)
    torch.testing.assert_close(kept, cascade.base.decode(cascade.base.encode(x0)))
    rows = [run_stage(StageRun.of(cascade, EditConfig(strength=0.6), [p], [s]), 0, x0[i:i + 1]) for i, (p, s) in
            enumerate([("a", 0), ("b", 1)])]
    torch.testing.assert_close(run_stage(StageRun.of(cascade, EditConfig(strength=0.6), ["a", "b"], [0, 1]), 0, x0),
                               torch.cat(rows), atol=1e-5, rtol=1e-5)


def _change_per_frame(model, frame_mode_on: bool, j: int = 2) -> torch.Tensor:
    torch.manual_seed(0)
    x, tokens, t = torch.randn(1, 4, 5, 4, 4), torch.randn(1, 77, TEXT_DIM), torch.tensor([500])
    x2 = x.clone()
    x2[:, :, j] += 0.5
    with torch.no_grad():
        a = model(x, t, tokens, None, frame_mode_on=frame_mode_on)
        b = model(x2, t, tokens, None, frame_mode_on=frame_mode_on)
    return (a - b).abs().amax(dim=(0, 1, 3, 4))


def test_frame_mode_keeps_frames_independent_in_the_plain_unet3d(cascade):
    model = cascade.base.denoiser
    names = temporal_parameter_names(model)
    assert all(any(k in n for n in names) for k in ("temp_convs", "temp_attentions", "transformer_in"))
    masked = _change_per_frame(model, frame_mode_on=True)
    assert masked[2] > 1e-3 and torch.all(masked[[0, 1, 3, 4]] == 0), masked
    mixed = _change_per_frame(model, frame_mode_on=False)
    assert torch.all(mixed[[0, 1, 3, 4]] > 1e-6), mixed


def test_mixed_finetuning_trains_latent_stages(cascade, moving_video, tmp_path):
    mixed = finetune_preset("mixed", steps=2, lr=1e-3, stages=("base", "ssr"), seed=3)
    assert [is_frame_step(3, step, mixed.alpha) for step in range(2)] == [False, True]  # one step of each loss
    tuned = finetune(moving_video, mixed, cascade)
    for before, after in zip(cascade.stages, tuned.stages):
        a, b = before.denoiser.state_dict(), after.denoiser.state_dict()
        assert any(not torch.equal(a[k], b[k]) for k in a), before.config.name
        assert after.vae is before.vae  # the frozen VAE is shared, not copied
    frames_only = finetune(moving_video, finetune_preset("frames", steps=2, lr=1e-3, stages=("base",)), cascade)
    a, b = cascade.base.denoiser.state_dict(), frames_only.base.denoiser.state_dict()
    temporal = temporal_parameter_names(cascade.base.denoiser)
    assert all(torch.equal(a[n], b[n]) for n in temporal)
    assert any(not torch.equal(a[n], b[n]) for n in a if n not in temporal)
    # The artifact round trip rebuilds the adapter and keeps the stage's VAE.
    store = ArtifactStore(str(tmp_path / "store"))
    cfg = finetune_preset("video", steps=1, lr=1e-3, stages=("base",))
    first, key = finetune_or_load(moving_video, cfg, cascade, store)
    again, key2 = finetune_or_load(moving_video, cfg, cascade, store)
    assert key == key2 and isinstance(again.base.denoiser, LatentVideoDenoiser) and again.base.vae is cascade.base.vae
    sa, sb = first.base.denoiser.state_dict(), again.base.denoiser.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert edit(moving_video, "naia a red cat", EditConfig(seed=0), again).frames.shape == (4, 48, 64, 3)


def test_epsilon_stages_regress_the_noise(cascade):
    x0, noise, t = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4), torch.tensor([10, 900])
    assert torch.equal(prediction_target(cascade.base.scheduler, x0, noise, t), noise)
    v = make_scheduler()
    assert torch.equal(prediction_target(v, x0, noise, t), v.get_velocity(x0, noise, t))


def test_vae_chunks_bound_memory_without_changing_the_result(cascade):
    vae = cascade.base.vae.vae
    video = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    small, whole = VideoVAE(vae, chunk_frames=2), VideoVAE(vae, chunk_frames=100)
    z = small.encode(video)
    assert z.shape == (2, 4, 5, 4, 4)
    torch.testing.assert_close(z, whole.encode(video), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small.decode(z), whole.decode(z), atol=1e-5, rtol=1e-5)


def test_saved_latent_cascade_is_self_contained(cascade, tmp_path):
    saved = cascade.save_pretrained(tmp_path / "saved")
    assert (saved / "base" / "config.json").is_file() and (saved / "ssr" / "vae" / "config.json").is_file()
    spec = json.loads((saved / "cascade.json").read_text())
    for stage in spec["stages"]:  # the stage folders must win over references that no longer exist
        stage["latent"].update(unet="/nonexistent/unet", vae="/nonexistent/vae", scheduler="/nonexistent/s")
    (saved / "cascade.json").write_text(json.dumps(spec))
    loaded = Cascade.from_pretrained(saved, text_encoder=cascade.text_encoder)
    assert loaded.cascade_id() != "" and loaded.stages[1].config.latent["vae"] == "/nonexistent/vae"
    for a, b in zip(cascade.stages, loaded.stages):
        sa, sb = a.denoiser.state_dict(), b.denoiser.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_convert_copy_makes_the_cascade_self_contained(repos, tmp_path, cascade):
    sources = [shutil.copytree(r, tmp_path / "src" / r.name) for r in repos]
    out = tmp_path / "copied"
    assert main(["convert", *map(str, sources), "-o", str(out), "--size", "32x32", "64x48", "--copy"]) == 0
    shutil.rmtree(tmp_path / "src")
    loaded = Cascade.from_pretrained(out)
    assert loaded.config.text_encoder["path"] == "text_encoder" and "unet" not in loaded.stages[0].config.latent
    sa, sb = cascade.stages[1].denoiser.state_dict(), loaded.stages[1].denoiser.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_convert_errors_are_one_line(repos, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    def error_of(*argv) -> str:
        assert main(["convert", *argv, "-o", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "neither a directory nor a hub id" in error_of(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    assert "no model_index.json" in error_of(str(tmp_path / "empty"))
    other = shutil.copytree(repos[1], tmp_path / "other-text")
    unet_config = json.loads((other / "unet" / "config.json").read_text())
    (other / "unet" / "config.json").write_text(json.dumps({**unet_config, "cross_attention_dim": 16}))
    assert "16-dim text" in error_of(str(repos[0]), str(other))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the hub path, without network
    assert "HF_HUB_OFFLINE=0" in error_of("no-such-org/no-such-model")
    assert parse_hf_ref(hf_ref("cerspense/zeroscope_v2_XL", "unet", "refs/pr/15")) == \
        ("cerspense/zeroscope_v2_XL", "refs/pr/15", "unet")


def test_convert_command_stays_light():
    """`dreamix` builds the convert parser on every run: importing it must not pull in torch."""
    code = "import sys, dreamix_ray.convert; print('torch' in sys.modules or 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_gpu_runtime_settings_place_the_stage(cascade):
    runtime = LatentRuntime.from_env({"DREAMIX_DEVICE": "cpu", "DREAMIX_DTYPE": "bfloat16",
                                      "DREAMIX_ATTENTION": "sliced", "DREAMIX_VAE_TILING": "1"})
    assert (runtime.dtype, runtime.attention, runtime.vae_tiling) == ("bfloat16", "sliced", True)
    denoiser, vae = copy.deepcopy(cascade.base.denoiser), VideoVAE(copy.deepcopy(cascade.base.vae.vae))
    place(denoiser, vae, runtime)
    assert denoiser.dtype == torch.bfloat16 and denoiser.autocast_dtype is None  # no autocast on CPU
    with torch.no_grad():
        out = denoiser(torch.randn(1, 4, 2, 4, 4), torch.tensor([500]), torch.randn(1, 77, TEXT_DIM))
        pixels = vae.decode(torch.randn(1, 4, 2, 4, 4))
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and pixels.dtype == torch.float32
    with pytest.raises(LatentModelError, match="DREAMIX_DTYPE"):
        LatentRuntime.from_env({"DREAMIX_DTYPE": "float8"})
