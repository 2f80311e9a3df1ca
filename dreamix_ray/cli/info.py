"""`dreamix info`: the cascade's stages, with their size, frames, fps, steps and parameters."""

from __future__ import annotations

import argparse

from .common import add_common, cascade_of


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)


def run(args) -> int:
    cascade = cascade_of(args)
    text_params = sum(p.numel() for p in cascade.text_encoder.parameters())
    print(f"cascade {cascade.config.name} ({cascade.source}); text encoder {cascade.text_encoder.kind} "
          f"(hidden {cascade.text_encoder.hidden_size}, {text_params:,} parameters)")
    if cascade.config.description:
        print(cascade.config.description)
    print(f"{'stage':<8}{'kind':<6}{'factor':>7}{'frames':>8}{'size':>10}{'fps':>7}{'steps':>7}{'params':>11}")
    for row in cascade.info():
        print(f"{row['name']:<8}{row['kind']:<6}{row['factor']:>7}{row['frames']:>8}"
              f"{str(row['height']) + 'x' + str(row['width']):>10}{row['fps']:>7g}{row['steps']:>7}"
              f"{row['parameters']:>11,}" + _latent(row))
    return 0


def _latent(row: dict) -> str:
    """A latent stage's latent clip (channels x frames x height x width), its VAE's parameters, and a two-expert
    stage's experts with the boundary between them."""
    if "latent" not in row:
        return ""
    c, f, h, w = row["latent"]
    upsampler = f", upsampler {row['upsampler_parameters']:,} params" if "upsampler_parameters" in row else ""
    experts = ""
    if "expert_parameters" in row:
        (high, low), t = row["expert_parameters"], row["boundary_timestep"]
        experts = f", experts: high noise (t >= {t:g}) {high:,} params, low noise (t < {t:g}) {low:,} params"
    return f"  latent {c}x{f}x{h}x{w}, VAE {row['vae_parameters']:,} params{upsampler}{experts}"
