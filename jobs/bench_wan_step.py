"""One guided flow step of a WanTransformer3DModel with Wan2.1-T2V-1.3B's config (random weights): parameters,
seconds per step (CFG batched and sequential, frame mode) and peak RSS. Results: BENCHMARKS.md, "Wan 2.1 1.3B"."""

from __future__ import annotations

import argparse
import resource
import time

import torch

from dreamix_ray.models.wan import WanDenoiser
from dreamix_ray.sampling import guided, guided_batched

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
WAN21_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--latent", type=int, nargs=3, default=(3, 8, 8), metavar=("F", "H", "W"),
                   help="latent frames, height, width (default 3 8 8: 9 frames of 64x64)")
    p.add_argument("--guidance", type=float, default=5.0)
    args = p.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    net = WanDenoiser(**WAN21_1_3B).eval()
    print(f"parameters {sum(q.numel() for q in net.parameters()):,}; built in {time.perf_counter() - start:.1f} s; "
          f"peak RSS {peak_rss_gb():.2f} GB", flush=True)
    x_bcfhw, t_b = torch.randn(1, 16, *args.latent), torch.tensor([900.0])
    text_bld, negative_bld = torch.randn(1, 512, 4096) * 0.1, torch.randn(1, 512, 4096) * 0.1

    def call(tokens_bld, frame_mode_on=False):
        return lambda x, t: net(x, t, tokens_bld, frame_mode_on=frame_mode_on)

    runs = {"cfg batched": guided_batched(call(torch.cat([text_bld, negative_bld])), args.guidance),
            "cfg sequential": guided(call(text_bld), call(negative_bld), args.guidance),
            "frame mode, no cfg": call(text_bld, frame_mode_on=True)}
    with torch.inference_mode():
        for name, denoise in runs.items():
            denoise(x_bcfhw, t_b)  # warm-up
            start = time.perf_counter()
            denoise(x_bcfhw, t_b)
            print(f"{name}: {time.perf_counter() - start:.2f} s per step; peak RSS {peak_rss_gb():.2f} GB", flush=True)


if __name__ == "__main__":
    main()
