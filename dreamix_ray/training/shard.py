"""How one step's global batch is split over data-parallel ranks and micro-steps.

A unit of work is a row (a clip) on video steps, and a single frame of a row on frame steps: in frame
mode every frame is an independent image, so a frame pack can be split over ranks exactly. Each rank
sums the squared errors of its units and weights them so that the engine's gradient average over ranks
equals the gradient of the global batch mean: the result does not depend on the worker count.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..objective import TrainBatch


def units(batch: TrainBatch) -> list[tuple[int, int | None]]:
    """(row, frame) pairs on frame steps, (row, None) on video steps."""
    b, _, f = batch.x0_bcfhw.shape[:3]
    if batch.frames_step:
        return [(r, j) for r in range(b) for j in range(f)]
    return [(r, None) for r in range(b)]


def shard(n_units: int, world: int, micro_steps: int) -> list[list[list[int]]]:
    """[rank][micro-step] -> unit indices: contiguous, balanced to one unit, possibly empty."""
    parts = world * micro_steps
    bounds = [n_units * p // parts for p in range(parts + 1)]
    flat = [list(range(bounds[p], bounds[p + 1])) for p in range(parts)]
    return [flat[r * micro_steps:(r + 1) * micro_steps] for r in range(world)]


def select(batch: TrainBatch, picked: list[tuple[int, int | None]], device: torch.device | str = "cpu"
           ) -> TrainBatch:
    """The sub-batch of `picked` units; frame units become one-frame clips (exact in frame mode)."""
    rows = torch.tensor([r for r, _ in picked])
    if batch.frames_step:
        frames = torch.tensor([j for _, j in picked])

        def take(x_bcfhw):  # advanced indices around a slice put the unit axis first: [n, C, H, W]
            return None if x_bcfhw is None else x_bcfhw[rows, :, frames].unsqueeze(2).to(device)
    else:
        def take(x_bcfhw):
            return None if x_bcfhw is None else x_bcfhw[rows].to(device)
    return TrainBatch(batch.frames_step, take(batch.x0_bcfhw), take(batch.cond_bcfhw),
                      batch.tokens[rows].to(device), batch.pooled[rows].to(device), batch.t_b[rows].to(device),
                      take(batch.noise_bcfhw))


def rank_parts(batch: TrainBatch, rank: int, world: int, micro_steps: int, device="cpu"
               ) -> Iterator[tuple[TrainBatch, float]]:
    """Yield (sub-batch, scale) per micro-step of `rank`: backpropagate scale * its sum of squared errors.

    scale = world / numel(global batch): the engine divides the summed gradients by `world`, leaving the
    gradient of the global mean; scale / world * the sum is the part's share of the mean loss. An empty
    part still runs one unit at scale 0, so every rank takes part in every collective (ZeRO-3 gathers
    parameters in forward). One part in all is the batch as it is.
    """
    total = batch.x0_bcfhw.numel()
    if world * micro_steps == 1:
        yield batch, 1.0 / total
        return
    all_units = units(batch)
    for idx in shard(len(all_units), world, micro_steps)[rank]:
        scale = world / total if idx else 0.0
        yield select(batch, [all_units[i] for i in (idx or [0])], device), scale
