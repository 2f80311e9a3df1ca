"""A tiny random Wan repository in the hub's diffusers layout, built offline, and its converted cascade: shared by
tests/test_wan.py, the batch test (tests/test_batch.py) and the Serve test (tests/test_serve.py)."""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

TEXT_DIM, Z_DIM, SHIFT = 16, 4, 3.0
WORDS = "a an the red blue cat dog car moving left right naia blurry".split()
MODEL_INDEX = {"_class_name": "WanPipeline", "_diffusers_version": "0.42.1", "boundary_ratio": None,
               "expand_timesteps": False, "scheduler": ["diffusers", "UniPCMultistepScheduler"],
               "text_encoder": ["transformers", "UMT5EncoderModel"],
               "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
               "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": [None, None],
               "vae": ["diffusers", "AutoencoderKLWan"]}


def write_tokenizer(folder, words: list[str] = WORDS, max_length: int = 512) -> int:
    """A word-level tokenizer ending every prompt with </s>, as T5's does; returns the vocabulary size."""
    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=max_length).save_pretrained(folder)
    return len(vocab)


def write_wan_repo(path, seed: int = 0, ti2v: bool = False, boundary_ratio: float | None = None):
    """A tiny random Wan2.1-T2V repository in the hub's diffusers layout; `ti2v`: Wan2.2-TI2V-5B's instead (the same
    classes; a residual VAE with 2x2 pixel patches, 16 pixels per latent, per-token timesteps in the pipeline);
    `boundary_ratio`: Wan2.2-T2V-A14B's two experts, a second random transformer in transformer_2/ taking over below
    boundary_ratio * 1000."""
    torch.manual_seed(seed)
    z_dim = 2 * Z_DIM if ti2v else Z_DIM
    for folder in ("transformer", "transformer_2")[:1 + (boundary_ratio is not None)]:
        WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=z_dim,
                              out_channels=z_dim, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=2,
                              rope_max_seq_len=32).save_pretrained(path / folder)
    gen = torch.Generator().manual_seed(seed)
    wan22 = dict(is_residual=True, patch_size=2, scale_factor_spatial=16, in_channels=12, out_channels=12,
                 decoder_base_dim=8) if ti2v else {}
    AutoencoderKLWan(base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     temperal_downsample=[False, True, True],
                     latents_mean=(torch.randn(z_dim, generator=gen) * 0.1).tolist(),
                     latents_std=(torch.rand(z_dim, generator=gen) + 0.5).tolist(),
                     **wan22).save_pretrained(path / "vae")
    vocab = write_tokenizer(path / "tokenizer")
    UMT5EncoderModel(UMT5Config(vocab_size=vocab, d_model=TEXT_DIM, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                                relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                decoder_start_token_id=0)).save_pretrained(path / "text_encoder")
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT,
                            num_train_timesteps=1000).save_pretrained(path / "scheduler")
    experts = {} if boundary_ratio is None else {"boundary_ratio": boundary_ratio,
                                                 "transformer_2": ["diffusers", "WanTransformer3DModel"]}
    (path / "model_index.json").write_text(json.dumps({**MODEL_INDEX, "expand_timesteps": ti2v, **experts}, indent=2))
    return path


def tiny_wan_cascade(folder: Path, boundary_ratio: float | None = None) -> Path:
    """The tiny repository under folder/repo, converted to folder/cascade: one base of 5 frames of 32x32 @ 8 fps,
    4 steps; `boundary_ratio`: two experts (Wan2.2-T2V-A14B's layout)."""
    from dreamix_ray.cli import main

    repo, out = write_wan_repo(folder / "repo", boundary_ratio=boundary_ratio), folder / "cascade"
    assert main(["convert", str(repo), "-o", str(out), "--size", "32x32", "--frames", "5", "--fps", "8",
                 "--steps", "4", "--quiet"]) == 0
    return out
