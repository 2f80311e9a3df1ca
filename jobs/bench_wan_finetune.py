"""Wan finetuning at scale on this machine (random weights, fp32, CPU), on the one training loop:

    python jobs/bench_wan_finetune.py lora            # (a) Wan2.1-T2V-1.3B's transformer, one mixed LoRA step each kind
    python jobs/bench_wan_finetune.py zero3 --layers 11 --workers 2   # (b) ZeRO-3 full finetune over gloo ranks

(a) trains a LoRA adapter (attention + FFN, rank 4) on a WanDenoiser with the 1.3B config: a video step and a frame
step (paper Sec. 4.2; steps 0 and 1 of a mixed run at alpha 0.5 and seed 3), peak RSS and seconds per step.
(b) runs the loop's DeepSpeed engine (ZeRO-3) as torch.distributed ranks on gloo, the way the loop runs under
torchrun or a Ray Train worker task (cluster/train_worker.py calls the same `train`), on the 1.3B config cut to
--layers blocks, and prints each rank's parameter, gradient and optimizer bytes (engines.memory_bytes, after the
last step) beside what one process holds for the same model (4 + 4 + 12 bytes per fp32 parameter with AdamW),
and each rank's peak RSS while training and overall (the overall peak includes building the whole model before
ZeRO partitions it, and the export, which gathers the full weights on rank 0).

The latent clip is tiny (--latent F H W; default 3 x 8 x 8 = 9 frames of 64x64 through a small random
AutoencoderKLWan with Wan's 8x spatial / 4x temporal factors) and the text is random 512 x 4096 embeddings in
place of UMT5-XXL's: the benchmark is about the transformer's weights, gradients and optimizer, not the VAE or the
text encoder. Results: BENCHMARKS.md, "Wan finetuning at scale".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler  # noqa: E402

from dreamix_ray.config import StageConfig  # noqa: E402
from dreamix_ray.finetune import _StageData, finetune_preset, finetune_specs  # noqa: E402
from dreamix_ray.models.cascade import Stage  # noqa: E402
from dreamix_ray.models.wan import WanDenoiser, WanVAE  # noqa: E402
from dreamix_ray.objective import is_frame_step  # noqa: E402
from dreamix_ray.training.checkpoint import LocalCheckpoints  # noqa: E402
from dreamix_ray.training.engines import EngineConfig  # noqa: E402
from dreamix_ray.training.loop import train  # noqa: E402
from dreamix_ray.video import Video  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_wan_step import WAN21_1_3B  # noqa: E402

GB = 2**30


def rss_gb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak so far) of this process, in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / GB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def wan_stage(layers: int, latent: tuple[int, int, int], seed: int = 0) -> Stage:
    """A Wan base stage: the 1.3B transformer config (cut to `layers` blocks), a small random Wan VAE, the flow
    scheduler at Wan2.1's shift 3; every rank builds the same weights from `seed`."""
    f, h, w = latent
    torch.manual_seed(seed)
    denoiser = WanDenoiser(**{**WAN21_1_3B, "num_layers": layers}).eval()
    vae = WanVAE(AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                  temperal_downsample=[False, True, True]))
    sc = StageConfig("base", "base", frames=4 * (f - 1) + 1, height=8 * h, width=8 * w, fps=16.0, steps=50,
                     finetune=True)
    return Stage(sc, denoiser, FlowMatchEulerDiscreteScheduler(shift=3.0), vae)


def inputs(stage: Stage, cfg) -> tuple[_StageData, tuple[torch.Tensor, torch.Tensor]]:
    sc = stage.config
    frames = (np.random.default_rng(0).random((2 * sc.frames, sc.height, sc.width, 3)) * 255).astype(np.uint8)
    gen = torch.Generator().manual_seed(1)
    text = (torch.randn(1, 512, WAN21_1_3B["text_dim"], generator=gen) * 0.1, torch.zeros(1, 1))
    return _StageData(Video(frames, sc.fps), stage, cfg), text


def run_lora(args) -> None:
    start = time.perf_counter()
    stage = wan_stage(args.layers, tuple(args.latent))
    params = sum(p.numel() for p in stage.denoiser.parameters())
    print(f"transformer {params:,} parameters, built in {time.perf_counter() - start:.1f} s; "
          f"RSS {rss_gb('VmRSS'):.2f} GB", flush=True)
    # seed 3: step 0 is a video step and step 1 a frame step at alpha 0.5
    cfg = finetune_preset("mixed", alpha=0.5, steps=2, seed=3, checkpoint_every=10**6)
    assert [is_frame_step(cfg.seed, s, cfg.alpha) for s in range(2)] == [False, True]
    data, text = inputs(stage, cfg)
    spec, = finetune_specs([(0, stage, data)], text, cfg, lr=1e-4, checkpoint_every=0)
    adapter = sum(p.numel() for n, p in stage.denoiser.named_parameters() if "lora_" in n)
    times, last = [], [time.perf_counter()]

    def on_step(name, step, total, loss):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        kind = "frame" if is_frame_step(cfg.seed, step - 1, cfg.alpha) else "video"
        print(f"step {step} ({kind}): {times[-1]:.2f} s, loss {loss:.4f}, peak RSS {rss_gb('VmHWM'):.2f} GB",
              flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-wan-lora-") as tmp:
        train([spec], LocalCheckpoints(tmp), on_step=on_step)
        stored = sum(f.stat().st_size for f in Path(tmp).rglob("exports/base/*"))
    print(json.dumps({"parameters": params, "adapter_parameters": adapter, "adapter_share": adapter / params,
                      "adapter_bytes_stored": stored, "seconds_per_step": times,
                      "peak_rss_gb": rss_gb("VmHWM")}), flush=True)


def _rank(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    stage = wan_stage(args.layers, tuple(args.latent))
    built = rss_gb("VmHWM")
    cfg = finetune_preset("mixed", alpha=0.5, steps=args.steps, seed=3, adapter="full", batch_size=world,
                          checkpoint_every=10**6)
    data, text = inputs(stage, cfg)
    spec, = finetune_specs([(0, stage, data)], text, cfg, lr=1e-5, checkpoint_every=0)
    steps = []

    def on_step(name, step, total, loss):
        steps.append({"step": step, "loss": loss, "seconds": time.perf_counter() - t0,
                      "peak_rss_gb": rss_gb("VmHWM")})

    ds = json.loads(Path(args.deepspeed_config).read_text())
    # at most this many gathered parameters live at once: infra's 1e9 keeps the whole model gathered
    ds["zero_optimization"].update(stage3_max_live_parameters=args.live_params,
                                   stage3_max_reuse_distance=args.live_params)
    t0 = time.perf_counter()
    # one checkpoint folder for all ranks, as under torchrun: each rank writes its ZeRO shards into it
    state = train([spec], LocalCheckpoints(out + "/ckpt"), EngineConfig(kind="deepspeed", zero=3, deepspeed=ds),
                  on_step=on_step)
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "memory": state.memory["base"][rank], "seconds_per_step": state.seconds_per_step.get("base"),
        "steps": steps, "peak_rss_built_gb": built, "peak_rss_gb": rss_gb("VmHWM")}))
    torch.distributed.destroy_process_group()


def run_zero3(args) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with torch.device("meta"):
        params = sum(p.numel() for p in WanDenoiser(**{**WAN21_1_3B, "num_layers": args.layers}).parameters())
    print(f"transformer: the 1.3B config with {args.layers} blocks, {params:,} parameters; {args.workers} gloo ranks, "
          f"ZeRO-3, fp32", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-wan-zero3-") as out:
        start = time.perf_counter()
        torch.multiprocessing.spawn(_rank, args=(args.workers, port, args, out), nprocs=args.workers, join=True)
        wall = time.perf_counter() - start
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(args.workers)]
    one = {"params": 4 * params, "grads": 4 * params, "optimizer": 12 * params}  # fp32 weights, grads, AdamW
    for r in ranks:
        m = r["memory"]
        shares = ", ".join(f"{k} {m[k] / GB:.2f} GiB ({m[k] / one[k]:.3f} of one process's)" for k in one)
        train_peak = max(s["peak_rss_gb"] for s in r["steps"])
        print(f"rank {r['rank']}: {shares}; peak RSS {r['peak_rss_built_gb']:.2f} GB after building the model, "
              f"{train_peak:.2f} GB through the last step, {r['peak_rss_gb']:.2f} GB overall (export included); "
              f"s/step {r['seconds_per_step']}; losses {[round(s['loss'], 4) for s in r['steps']]}", flush=True)
    print(json.dumps({"parameters": params, "one_process_bytes": one, "ranks": ranks, "wall_s": wall}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("lora", "zero3"))
    p.add_argument("--layers", type=int, default=None, help="transformer blocks (default: 30 for lora, 11 for zero3)")
    p.add_argument("--latent", type=int, nargs=3, default=(3, 8, 8), metavar=("F", "H", "W"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--deepspeed-config", default=str(Path(__file__).resolve().parents[1] / "infra" /
                                                     "deepspeed_zero3.json"),
                   help="DeepSpeed JSON over the loop's defaults (default: infra/deepspeed_zero3.json, 50M-element "
                        "buckets; DeepSpeed's own 500M would add a 2 GB gradient bucket per rank)")
    p.add_argument("--live-params", type=float, default=1e8,
                   help="ZeRO-3 stage3_max_live_parameters and max_reuse_distance (default 1e8: 400 MB gathered in "
                        "fp32; the infra file's 1e9 holds a 0.5B model gathered whole on every rank)")
    args = p.parse_args()
    args.layers = args.layers or (30 if args.mode == "lora" else 11)
    (run_lora if args.mode == "lora" else run_zero3)(args)


if __name__ == "__main__":
    main()
