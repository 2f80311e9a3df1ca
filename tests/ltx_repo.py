"""Tiny random LTX-Video repositories in the hub's diffusers layout, built offline, and a converted cascade: shared by
tests/test_ltx.py, the batch test (tests/test_batch.py), the Serve test (tests/test_serve.py) and
jobs/bench_ltx_chunks.py.

The base repository holds model_index.json, transformer/, vae/, text_encoder/ T5, tokenizer/ (made with the
`tokenizers` library) and scheduler/ with dynamic shifting; an upsampler repository latent_upsampler/ and the base's
vae/. The tiny VAE has 16 pixels per latent and 4 frames per latent frame (LTX's has 32 and 8), so clips are 4k + 1
frames here.
"""

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel
from diffusers.pipelines.ltx.modeling_latent_upsampler import LTXLatentUpsamplerModel
from transformers import T5Config, T5EncoderModel
from wan_repo import write_tokenizer as wan_tokenizer

TEXT_DIM, Z = 16, 8
WORDS = "a an the red blue cat dog car moving left right blurry".split()
VAE = dict(in_channels=3, out_channels=3, latent_channels=Z, block_out_channels=(8, 8, 8, 8),
           decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
           decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
           decoder_spatio_temporal_scaling=(True, True, False, False), patch_size=4)
SCHEDULER = dict(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
                 max_image_seq_len=4096, shift_terminal=0.1)  # LTX-Video's scheduler_config


def write_tokenizer(folder) -> int:
    """wan_repo's T5-style word-level tokenizer over LTX's words, at LTX's 128 tokens."""
    return wan_tokenizer(folder, WORDS, max_length=128)


def write_vae(folder, seed: int, **overrides):
    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(**{**VAE, **overrides})
    vae.latents_mean.copy_(torch.randn(vae.config.latent_channels) * 0.1)
    vae.latents_std.copy_(torch.rand(vae.config.latent_channels) + 0.5)
    vae.save_pretrained(folder)


def write_ltx_repo(path, seed: int = 0, vae_channels: int = 8):
    """A tiny random LTX-Video (LTXPipeline) repository (jobs/bench_ltx_chunks.py builds wider VAEs with it)."""
    torch.manual_seed(seed)
    LTXVideoTransformer3DModel(in_channels=Z, out_channels=Z, num_attention_heads=2, attention_head_dim=8,
                               cross_attention_dim=16, num_layers=1, caption_channels=TEXT_DIM
                               ).save_pretrained(path / "transformer")
    write_vae(path / "vae", seed, block_out_channels=(vae_channels,) * 4, decoder_block_out_channels=(vae_channels,) * 4)
    vocab = write_tokenizer(path / "tokenizer")
    T5EncoderModel(T5Config(vocab_size=vocab, d_model=TEXT_DIM, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                            decoder_start_token_id=0)).save_pretrained(path / "text_encoder")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(path / "scheduler")
    index = {"_class_name": "LTXPipeline", "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "LTXVideoTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLLTXVideo"]}
    (path / "model_index.json").write_text(json.dumps(index))
    return path


def write_upsampler(path, base_repo, temporal: bool, seed: int = 1):
    """An LTXLatentUpsamplePipeline repository (latent_upsampler/ + the base's vae/), as Lightricks ships them."""
    torch.manual_seed(seed)
    LTXLatentUpsamplerModel(in_channels=Z, mid_channels=32, num_blocks_per_stage=1, spatial_upsample=not temporal,
                            temporal_upsample=temporal).save_pretrained(path / "latent_upsampler")
    shutil.copytree(base_repo / "vae", path / "vae")
    (path / "model_index.json").write_text(json.dumps({"_class_name": "LTXLatentUpsamplePipeline"}))
    return path


def tiny_ltx_cascade(folder: Path, frames: int = 9, tsr: bool = False) -> Path:
    """The tiny repositories under folder/, converted to folder/cascade: a base of `frames` frames of 32x32 @ 8 fps
    (3 steps) -> [a latent TSR (2 refine steps) ->] a latent SSR to 64x64 (2 refine steps, strength 0.4)."""
    from dreamix_ray.cli import main

    base, out = write_ltx_repo(folder / "repo"), folder / "cascade"
    flags = ["--ssr", str(write_upsampler(folder / "spatial", base, temporal=False, seed=2))]
    if tsr:
        flags = ["--tsr", str(write_upsampler(folder / "temporal", base, temporal=True)), *flags]
    steps = ["3", "2", "2"] if tsr else ["3", "2"]
    assert main(["convert", str(base), "-o", str(out), "--size", "32x32", "--frames", str(frames), "--fps", "8",
                 "--steps", *steps, *flags, "--quiet"]) == 0
    return out
