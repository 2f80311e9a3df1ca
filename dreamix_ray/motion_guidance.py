"""Motion guidance: the caption's direction of travel imposed on the base at high noise.

Why: the embedded base learns colours, shapes, and that an object travels, but not which way the
direction word says (BENCHMARKS.md, sessions 4-7): the noise picks left or right. Like LLM-grounded
Video Diffusion (Lian et al., 2023), which plans a layout per frame from the text and guides the video
model towards it, we split the job: a *motion prior* (a linear classifier from the pooled text embedding
to the clip's direction of travel, fitted on training captions) plans the motion, and while the noise
is high (t >= from_t) the base's estimate of the clean clip is replaced, with weight w, by its own
temporal mean translated along that direction. The later steps refine that coarse moving layout
into the clip. A motion edit (EditConfig.motion_from_input) moves the input's middle frame instead,
so the object keeps its look and place and only its motion changes: the paper's image animation (a
coarse video of one frame moving, then edited) done at high noise. Prompts without a clear translation
(the classifier's most likely class is "none", or a translation below `gate` probability) are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .errors import UserError

if TYPE_CHECKING:
    from .sampling import Denoise


class MotionPriorError(UserError):
    """A cascade's motion_prior entry is malformed."""


@dataclass(frozen=True)
class MotionPrior:
    """pooled text [D] -> which way the clip travels: a linear classifier over motion classes, each with
    its direction (x right, y down; (0, 0) for "no translation"). Saved in cascade.json."""

    weight: tuple[tuple[float, ...], ...]  # [K][D]
    bias: tuple[float, ...]  # [K]
    vectors: tuple[tuple[float, float], ...]  # [K] direction of each class
    travel: float  # fraction of the frame a translation crosses over the clip
    gate: float = 0.5  # guide only when the most likely class is a translation with at least this probability
    from_t: int = 800  # guide at timesteps >= from_t (of the scheduler's 0..999)

    def to_dict(self) -> dict:
        return {"weight": [[round(v, 7) for v in r] for r in self.weight], "bias": [round(v, 7) for v in self.bias],
                "vectors": [list(v) for v in self.vectors], "travel": self.travel, "gate": self.gate,
                "from_t": self.from_t}

    @classmethod
    def from_dict(cls, data: dict) -> "MotionPrior":
        try:
            prior = cls(weight=tuple(tuple(float(v) for v in row) for row in data["weight"]),
                        bias=tuple(float(v) for v in data["bias"]),
                        vectors=tuple((float(x), float(y)) for x, y in data["vectors"]),
                        travel=float(data["travel"]), gate=float(data.get("gate", 0.5)),
                        from_t=int(data.get("from_t", 800)))
        except (KeyError, TypeError, ValueError) as exc:
            raise MotionPriorError(f"motion_prior in cascade.json is malformed ({exc!r}); refit it with "
                                   "`python jobs/fit_motion_prior.py --cascade DIR`") from None
        if not len(prior.weight) == len(prior.bias) == len(prior.vectors):
            raise MotionPriorError("motion_prior needs one weight row, bias and vector per class; refit it with "
                                   "`python jobs/fit_motion_prior.py --cascade DIR`")
        return prior

    def directions(self, pooled_bd: torch.Tensor) -> torch.Tensor:
        """[B, 2] unit direction per prompt, or (0, 0) where the prompt names no clear translation."""
        w = torch.tensor(self.weight, dtype=pooled_bd.dtype, device=pooled_bd.device)
        if w.shape[1] != pooled_bd.shape[1]:
            raise MotionPriorError(f"motion_prior expects {w.shape[1]}-d text embeddings, the text encoder gives "
                                   f"{pooled_bd.shape[1]}; refit it for this text encoder")
        logits = pooled_bd @ w.T + torch.tensor(self.bias, dtype=pooled_bd.dtype, device=pooled_bd.device)
        prob, best = logits.softmax(1).max(1)
        vectors = torch.tensor(self.vectors, dtype=pooled_bd.dtype, device=pooled_bd.device)[best]
        norm = vectors.norm(dim=1, keepdim=True)
        sure = (prob >= self.gate).unsqueeze(1) & (norm > 0)
        return torch.where(sure, vectors / norm.clamp(min=1e-6), torch.zeros_like(vectors))


def fit_motion_prior(pooled_nd: torch.Tensor, labels_n: torch.Tensor, vectors: list[tuple[float, float]],
                     travel: float, l2: float = 1e-3, **kwargs) -> MotionPrior:
    """Multinomial logistic regression of captions' motion classes on their pooled embeddings (L-BFGS)."""
    x, y = pooled_nd.double(), labels_n.long()
    w = torch.zeros(len(vectors), x.shape[1], dtype=torch.double, requires_grad=True)
    b = torch.zeros(len(vectors), dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return MotionPrior(weight=tuple(tuple(float(v) for v in row) for row in w.detach()),
                       bias=tuple(float(v) for v in b.detach()), vectors=tuple(tuple(v) for v in vectors),
                       travel=travel, **kwargs)


def translate(images_bchw: torch.Tensor, shift_b2: torch.Tensor) -> torch.Tensor:
    """Shift each image by shift (fractions of its width / height; +x right, +y down), edges replicated."""
    b = images_bchw.shape[0]
    theta = torch.zeros(b, 2, 3, dtype=images_bchw.dtype, device=images_bchw.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = -2.0 * shift_b2.to(images_bchw.dtype)  # the grid spans [-1, 1]: a shift s moves it by 2s
    grid = F.affine_grid(theta, list(images_bchw.shape), align_corners=False)
    return F.grid_sample(images_bchw, grid, padding_mode="border", align_corners=False)


def moving_layout(x0_bcfhw: torch.Tensor, directions_b2: torch.Tensor, travel: float,
                  still_bchw: torch.Tensor | None = None) -> torch.Tensor:
    """A still image (default: the clip's temporal mean) translated frame by frame along each row's
    direction, centred in time (the image is where the clip is half way through)."""
    still_bchw = x0_bcfhw.mean(2) if still_bchw is None else still_bchw
    frames = x0_bcfhw.shape[2]
    span = max(frames - 1, 1)
    return torch.stack([translate(still_bchw, directions_b2 * travel * (f / span - 0.5)) for f in range(frames)], 2)


def motion_guided(denoise: Denoise, scheduler, prior: MotionPrior, pooled_bd: torch.Tensor,
                  weight: float, input_bcfhw: torch.Tensor | None = None) -> Denoise:
    """`denoise` with its clean-clip estimate pulled towards the moving layout at t >= prior.from_t.
    With `input_bcfhw` (a motion edit) the layout moves the input's middle frame, not the base's estimate."""
    # Here, not at the top: sampling imports diffusers' schedulers, and reading a cascade.json with a motion
    # prior (config.CascadeConfig checks it) must not wait for them (the batch's Decode actors, the driver).
    from .sampling import signal_noise_scales

    directions = prior.directions(pooled_bd)
    rows = directions.abs().sum(1) > 0
    # (our stages predict v; an epsilon stage from elsewhere has no fitted prior to guide it)
    if weight == 0 or not rows.any() or scheduler.config.prediction_type != "v_prediction":
        return denoise
    still = None if input_bcfhw is None else input_bcfhw[:, :, input_bcfhw.shape[2] // 2]

    def fn(x, t):
        out = denoise(x, t)
        # Guided only at t >= from_t, chosen per row on the device: a Python `if` on t would read it back to
        # the host every step. Below from_t the rows get `out` itself, as if unguided.
        early = (t >= prior.from_t).view(-1, 1, 1, 1, 1)
        a, s = signal_noise_scales(scheduler, t, x)
        x0, eps = a * x - s * out, s * x + a * out  # from v = a * eps - s * x0 and x = a * x0 + s * eps
        layout = moving_layout(x0, directions.to(x.device, x.dtype), prior.travel,
                               None if still is None else still.to(x.device, x.dtype))
        keep = rows.to(x.device).view(-1, 1, 1, 1, 1)
        x0 = torch.where(keep, (1 - weight) * x0 + weight * layout, x0)
        # v from the base's noise estimate and the guided x0: DDIM then steps from a^2 * x0_base + s^2 * x0,
        # which is nearly all guided x0 at this noise (s^2 >= 0.9 for t >= 800) and fades as a grows
        return torch.where(early, a * eps - s * x0, out)

    return fn
