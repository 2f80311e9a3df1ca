"""Image animation (paper Sec. 5): one image -> a coarse video (static or camera path), then edit."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError
from .video import Video

CAMERAS = ("static", "pan-left", "pan-right", "pan-up", "pan-down", "zoom-in", "zoom-out")
PAN_TRAVEL = 0.25  # fraction of the frame the view moves over the clip
ZOOM_RANGE = 0.35  # zoom-in ends at 1 + ZOOM_RANGE magnification


def _ease(p: float) -> float:
    """Smoothstep: the camera starts and stops gently instead of jerking."""
    return p * p * (3 - 2 * p)


def camera_path(camera: str, num_frames: int) -> np.ndarray:
    """[F, 3, 3] homographies mapping output coords to image coords, both in [-1, 1]."""
    if camera not in CAMERAS:
        raise ConfigError(f"unknown camera {camera!r}: choose one of {', '.join(CAMERAS)}")
    mats = []
    for k in range(num_frames):
        p = _ease(k / max(num_frames - 1, 1))
        h = np.eye(3)
        if camera.startswith("pan-"):
            # The view window moves toward the named side, so content slides the other way.
            dx, dy = {"pan-left": (-1, 0), "pan-right": (1, 0), "pan-up": (0, -1), "pan-down": (0, 1)}[camera]
            h[0, 2], h[1, 2] = 2 * PAN_TRAVEL * p * dx, 2 * PAN_TRAVEL * p * dy
        elif camera.startswith("zoom-"):
            z = 1 + ZOOM_RANGE * (p if camera == "zoom-in" else 1 - p)
            h[0, 0] = h[1, 1] = 1 / z
        mats.append(h)
    return np.stack(mats)


def warp_image(image_hwc: np.ndarray, homographies: np.ndarray, fps: float) -> Video:
    """Apply each homography to the image; pixels from outside it come from reflection padding."""
    h, w = image_hwc.shape[:2]
    img = torch.from_numpy(np.ascontiguousarray(image_hwc)).float().permute(2, 0, 1).unsqueeze(0)
    ys, xs = torch.meshgrid(torch.linspace(-1 + 1 / h, 1 - 1 / h, h), torch.linspace(-1 + 1 / w, 1 - 1 / w, w),
                            indexing="ij")
    coords_3n = torch.stack([xs.flatten(), ys.flatten(), torch.ones(h * w)])
    frames = []
    for mat in torch.from_numpy(np.asarray(homographies, dtype=np.float32)):
        src = mat @ coords_3n
        grid = (src[:2] / src[2:]).T.reshape(1, h, w, 2)
        out = F.grid_sample(img, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        frames.append(out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())
    return Video(np.stack(frames), fps)


def image_to_video(image_hwc: np.ndarray, camera: str, num_frames: int, fps: float,
                   homographies: np.ndarray | None = None) -> Video:
    """The coarse video Dreamix animates: the image replicated, or moved along a camera path."""
    if image_hwc.ndim != 3 or image_hwc.shape[2] != 3:
        raise ConfigError(f"expected an RGB image [H, W, 3], got shape {image_hwc.shape}")
    if homographies is not None:
        return warp_image(image_hwc, homographies, fps)
    if camera == "static":
        return Video(np.repeat(image_hwc[None], num_frames, axis=0), fps)
    return warp_image(image_hwc, camera_path(camera, num_frames), fps)


def clip_shape(cascade) -> tuple[int, float]:
    """(frames, fps) of a coarse video covering the base clip at the output frame rate."""
    frames = cascade.base.config.frames
    for stage in cascade.stages[1:]:
        if stage.config.kind == "tsr":
            frames *= stage.config.factor
    return frames, cascade.stages[-1].config.fps
