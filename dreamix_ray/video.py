"""Video I/O for Dreamix: safe decoding with limits, resampling, mp4 writing and previews."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import re
import secrets
import threading
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .errors import UserError

log = logging.getLogger(__name__)

FIT_MODES = ("crop", "pad")
FIT_HELP = "crop: scale to cover the target size and center-crop; pad: scale to fit inside it and pad with black"
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg")
_GIVE = "give an mp4, webm, mov, avi, gif or a folder of png/jpg frames"
# Demuxers that open stills or text as a one-"frame" video; ffmpeg probes by content, so a PNG
# renamed .mp4 or a .txt file would otherwise read as a tiny video.
_NOT_VIDEO_FORMATS = ("image2", "image2pipe", "tty")
# Audio codecs the mp4 muxer stores as-is, so they can be remuxed without re-encoding.
_MP4_AUDIO = ("aac", "mp3", "ac3", "eac3", "alac")
_WHITE_GAP = 8
_LABEL_PX = 12  # contact-sheet label text height: legible under 64 px thumbnails, small next to 256 px ones


class VideoError(UserError):  # UserError is a ValueError: the CLI prints it in one line
    """A problem with a user's video or image, with what to do about it."""


@dataclass(frozen=True)
class VideoLimits:
    """Upper bounds that a video must meet before it is decoded."""

    max_width: int = 4096
    max_height: int = 4096
    max_duration_s: float = 300.0
    max_frames: int = 10000
    max_bytes: int = 2_000_000_000

    def to_dict(self) -> dict:
        """Plain dict of the limits."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VideoLimits":
        """Build limits from a dict, refusing unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise VideoError(f"unknown video limits {unknown}: use only {sorted(known)}")
        return cls(**{k: (float(v) if k == "max_duration_s" else int(v)) for k, v in d.items()})


# eq=False: ndarray equality is elementwise, so dataclass __eq__ would be meaningless.
@dataclass(frozen=True, eq=False)
class Video:
    """Decoded RGB frames [T, H, W, 3] uint8 at a constant frame rate."""

    frames: np.ndarray
    fps: float

    def __post_init__(self):
        f = self.frames
        if not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 4 or f.shape[-1] != 3:
            raise VideoError("Video.frames must be a uint8 array [T, H, W, 3]: convert the frames first")
        if f.shape[0] < 1 or not (math.isfinite(self.fps) and self.fps > 0):
            raise VideoError(f"Video needs >= 1 frame and fps > 0 (got {f.shape[0]} frames, fps {self.fps})")
        object.__setattr__(self, "fps", float(self.fps))

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


# ---------------------------------------------------------------- reading


def _check_limits(path, limits: VideoLimits, width=None, height=None, duration=None, frames=None, size=None):
    """Raise VideoError if any known property exceeds the limits."""
    if size is not None and size > limits.max_bytes:
        raise VideoError(f"{path} is {size / 1e6:.1f} MB, over the {limits.max_bytes / 1e6:.0f} MB limit: "
                         "compress or trim it")
    if width and height and (width > limits.max_width or height > limits.max_height):
        raise VideoError(f"{path} is {width}x{height}, over the {limits.max_width}x{limits.max_height} "
                         "resolution limit: downscale it")
    if duration is not None and duration > limits.max_duration_s:
        raise VideoError(f"{path} lasts {duration:.2f} s, over the {limits.max_duration_s:g} s limit: "
                         f"trim it to at most {limits.max_duration_s:g} s")
    if frames is not None and frames > limits.max_frames:
        raise VideoError(f"{path} has {frames} frames, over the {limits.max_frames} frame limit: "
                         "trim it or lower its frame rate")


def _existing(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise VideoError(f"{p} does not exist: check the path ({_GIVE})")
    return p


def _open(p: Path, limits: VideoLimits):
    """Open a media file and its first video stream, checking header limits before any decoding."""
    size = p.stat().st_size
    _check_limits(p, limits, size=size)
    if size == 0:
        raise VideoError(f"{p} is an empty file: {_GIVE}")
    try:
        container = av.open(str(p))
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"{p} is not a video file PyAV can decode, or it is truncated/corrupt ({e}): {_GIVE}")
    try:
        fmt = container.format.name
        if fmt in _NOT_VIDEO_FORMATS or fmt.endswith("_pipe"):
            raise VideoError(f"{p} is a still image or text ({fmt}), not a video: {_GIVE}")
        # Cover art in music files is a one-picture "video" stream; skip it.
        videos = [v for v in container.streams.video if not v.disposition & av.stream.Disposition.attached_pic]
        if not videos:
            raise VideoError(f"{p} has no video stream: {_GIVE}")
        stream = videos[0]
        cc = stream.codec_context
        _check_limits(p, limits, cc.width, cc.height, _header_duration(container, stream), stream.frames or None)
        # An mp4/mov cut after its moov atom opens fine; its sample table then points past the end.
        if "mov" in fmt and max((e.pos + e.size for e in stream.index_entries), default=0) > size:
            raise VideoError(f"{p} is truncated: its index points past the end of the file ({size} bytes): "
                             "re-export or re-download the file")
    except VideoError:
        container.close()
        raise
    return container, stream


def _header_duration(container, stream) -> float | None:
    """Duration in seconds from stream or container metadata, None if the header has none."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration and container.duration > 0:
        return container.duration / av.time_base
    return None


def _header_fps(container, stream) -> float | None:
    """Average rate when timestamps exist (keeps VFR clips at true speed), else the codec's guess."""
    timed = _header_duration(container, stream) is not None
    rate = (stream.average_rate if timed else None) or stream.guessed_rate or stream.average_rate
    return float(rate) if rate and rate > 0 else None


def _rotation(frame, stream) -> int:
    """Counter-clockwise quarter turns that make the frame upright."""
    deg, tag = frame.rotation, stream.metadata.get("rotate", "")  # display matrix: counter-clockwise
    if not deg and tag.lstrip("-").isdigit():
        deg = -int(tag)  # the legacy tag is clockwise
    return int(round(deg / 90.0)) % 4


def read_video(path: str | os.PathLike, limits: VideoLimits = VideoLimits(), max_frames: int | None = None,
               folder_fps: float = 8.0) -> Video:
    """Decode a video file or a folder of frames to RGB, refusing inputs over `limits`."""
    p = _existing(path)
    if max_frames is not None and max_frames < 1:
        raise VideoError(f"max_frames must be >= 1 or None, not {max_frames}: pass a positive frame count")
    if p.is_dir():
        return _read_folder(p, limits, max_frames, folder_fps)
    container, stream = _open(p, limits)
    with container:
        stream.thread_type = "AUTO"
        fps = _header_fps(container, stream)
        frames, times, rot, size, stopped = [], [], 0, None, False
        try:
            for frame in container.decode(stream):
                if size is None:
                    rot, size = _rotation(frame, stream), (frame.width, frame.height)
                    _check_limits(p, limits, *size)  # the header may have lied
                t = frame.time if frame.time is not None else len(frames) / (fps or folder_fps)
                times.append(t)
                # Header limits cover honest files; these stop files without (or with wrong) metadata.
                if t - times[0] > limits.max_duration_s:
                    raise VideoError(f"{p} lasts over {limits.max_duration_s:g} s (still decoding at "
                                     f"{t - times[0]:.2f} s), over the limit: trim it")
                if len(frames) >= limits.max_frames:
                    raise VideoError(f"{p} has over {limits.max_frames} frames, over the frame limit: "
                                     "trim it or lower its frame rate")
                # Reformat to the first frame's size so a mid-stream resolution change still stacks.
                rgb = frame.to_ndarray(width=size[0], height=size[1], format="rgb24")
                frames.append(np.ascontiguousarray(np.rot90(rgb, rot)) if rot else rgb)
                if max_frames is not None and len(frames) >= max_frames:
                    stopped = True
                    break
        except av.FFmpegError as e:
            if not frames:
                raise VideoError(f"{p} has no decodable frames, it is truncated or corrupt ({e}): {_GIVE}")
            raise VideoError(f"{p} is truncated or corrupt: decoding failed after {len(frames)} frames ({e}): "
                             "re-export or re-download the file")
        if not frames:
            raise VideoError(f"{p} has zero frames: {_GIVE}")
        expected = _expected_frames(container, stream, fps)
        # Containers' frame counts are slightly off at times (edit lists, B-frames); a big gap is a cut file.
        if not stopped and expected and len(frames) < 0.9 * expected - 1:
            raise VideoError(f"{p} is truncated: its header promises {expected} frames but only {len(frames)} "
                             "decode: re-export or re-download the file")
    if fps is None:  # no rate in the header: measure it from the timestamps
        span = times[-1] - times[0]
        fps = (len(times) - 1) / span if span > 0 else folder_fps
    return Video(np.stack(frames), fps)


def _expected_frames(container, stream, fps) -> int | None:
    """Frames the header promises: the smaller of its frame count and duration * fps."""
    # A container's duration also covers audio, which may outlast the video; trust it only when alone.
    d = _header_duration(container, stream) if stream.duration or len(container.streams) == 1 else None
    counts = [c for c in (stream.frames, round(d * fps) if d and fps else 0) if c]
    return min(counts) if counts else None


def _natural_key(p: Path):
    return [int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", p.name)]


def _folder_header(p: Path, limits: VideoLimits, default_fps: float):
    """Frame files, fps and size of a frame folder, checked against limits without decoding pixels."""
    files = sorted((f for f in p.iterdir() if f.suffix.lower() in FRAME_EXTENSIONS and f.is_file()),
                   key=_natural_key)
    if not files:
        raise VideoError(f"{p} is a folder without png/jpg frames: put frames named in order (00000.png, ...) in it")
    fps, fps_file = float(default_fps), p / "fps.txt"
    if fps_file.exists():
        try:
            fps = float(Fraction(fps_file.read_text().strip()))  # "8", "29.97" or "30000/1001"
        except (ValueError, ZeroDivisionError):
            fps = 0.0
    if not (math.isfinite(fps) and fps > 0):
        raise VideoError(f"{fps_file} does not hold a positive frame rate: write one in it, e.g. 8")
    try:
        with Image.open(files[0]) as im:  # lazy: reads the header only
            w, h = im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise VideoError(f"{files[0]} is not an image PIL can read ({e}): use png or jpg frames")
    _check_limits(p, limits, w, h, len(files) / fps, len(files), sum(f.stat().st_size for f in files))
    return files, fps, w, h


def _read_folder(p: Path, limits: VideoLimits, max_frames, folder_fps) -> Video:
    files, fps, _, _ = _folder_header(p, limits, folder_fps)
    frames = [read_image(f) for f in files[:max_frames]]
    for f, a in zip(files, frames):
        if a.shape != frames[0].shape:
            raise VideoError(f"{f} is {a.shape[1]}x{a.shape[0]} but {files[0].name} is "
                             f"{frames[0].shape[1]}x{frames[0].shape[0]}: give all frames the same size")
    return Video(np.stack(frames), fps)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as uint8 RGB [H, W, 3], upright per its EXIF orientation."""
    p = _existing(path)
    try:
        with Image.open(p) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise VideoError(f"{p} is not an image PIL can read ({e}): give a png or jpg")


def probe_video(path: str | os.PathLike, limits: VideoLimits = VideoLimits(), folder_fps: float = 8.0) -> dict:
    """Header facts (width, height, fps, duration, has_audio, codec, ...) after checking limits."""
    p = _existing(path)
    if p.is_dir():
        files, fps, w, h = _folder_header(p, limits, folder_fps)
        return dict(width=w, height=h, fps=fps, duration=len(files) / fps, num_frames=len(files),
                    has_audio=False, codec="images", format="folder", rotation=0)
    container, stream = _open(p, limits)
    with container:
        cc = stream.codec_context
        # Only the first frame is decoded: it proves the file decodes and carries the rotation.
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as e:
            raise VideoError(f"{p} has no decodable frames, it is truncated or corrupt ({e}): {_GIVE}")
        if first is None:
            raise VideoError(f"{p} has zero frames: {_GIVE}")
        rot = _rotation(first, stream)
        w, h = (cc.height, cc.width) if rot % 2 else (cc.width, cc.height)
        return dict(width=w, height=h, fps=_header_fps(container, stream),
                    duration=_header_duration(container, stream), num_frames=stream.frames or None,
                    has_audio=bool(container.streams.audio), codec=cc.name, format=container.format.name,
                    rotation=rot * 90)


# ---------------------------------------------------------------- resampling


def _resize(frame: np.ndarray, height: int, width: int, fit: str) -> np.ndarray:
    h, w = frame.shape[:2]
    if (h, w) == (height, width):
        return frame
    scale = (max if fit == "crop" else min)(height / h, width / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if fit == "crop":  # rounding must never leave the scaled frame smaller than the target
        nh, nw = max(nh, height), max(nw, width)
    else:
        nh, nw = min(nh, height), min(nw, width)
    # LANCZOS antialiases when shrinking; BICUBIC avoids ringing-heavy upscales.
    flt = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    img = np.asarray(Image.fromarray(frame).resize((nw, nh), flt))
    if fit == "crop":
        top, left = (nh - height) // 2, (nw - width) // 2
        return img[top:top + height, left:left + width]
    out = np.zeros((height, width, 3), np.uint8)
    top, left = (height - nh) // 2, (width - nw) // 2
    out[top:top + nh, left:left + nw] = img
    return out


def _source_index(i: np.ndarray, fps: float, src: Video) -> np.ndarray:
    """Source frame shown at output times i / fps (nearest earlier frame, last frame held)."""
    # eps: exact hits such as 4 frames at 23.976 fps == 5 at 29.97 fps must not floor one frame early.
    return np.minimum(np.floor(i * (src.fps / fps) + 1e-6).astype(int), src.num_frames - 1)


def resample(video: Video, fps: float, num_frames: int | None, height: int, width: int, fit: str = "crop") -> Video:
    """Nearest-frame fps change, optional exact frame count (last frame held), aspect-kept resize."""
    if fit not in FIT_MODES:
        raise VideoError(f"fit must be one of {FIT_MODES}, not {fit!r}: {FIT_HELP}")
    if not (fps > 0 and height > 0 and width > 0) or (num_frames is not None and num_frames < 1):
        raise VideoError(f"cannot resample to fps={fps}, {num_frames} frames, {width}x{height}: "
                         "use positive values")
    n = num_frames if num_frames is not None else max(1, math.ceil(video.num_frames * fps / video.fps - 1e-6))
    idx = _source_index(np.arange(n), fps, video)
    cache = {i: _resize(video.frames[i], height, width, fit) for i in set(idx.tolist())}  # held frames once
    return Video(np.stack([cache[i] for i in idx.tolist()]), fps)


# ---------------------------------------------------------------- writing


@contextlib.contextmanager
def _atomic_path(path, suffix: str):
    """Yield a temp path next to `path`; move it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would survive os.replace and hide outputs from other readers.
    tmp = str(path.with_name(f".{path.stem}.{secrets.token_hex(6)}.tmp{suffix}"))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _add_audio(out, src_path):
    """Open `src_path` and add a matching audio stream to `out`; None if it has no audio."""
    try:
        src = av.open(str(_existing(src_path)))
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"cannot read audio from {src_path} ({e}): pass the original video or drop audio")
    if not src.streams.audio:
        log.warning("%s has no audio stream; writing the video without audio", src_path)
        src.close()
        return None
    a = src.streams.audio[0]
    if a.codec_context.name in _MP4_AUDIO:
        return src, a, out.add_stream_from_template(a), False
    return src, a, out.add_stream("aac", rate=a.codec_context.sample_rate or 44100, layout="stereo"), True


def _mux_audio(out, audio, duration: float):
    """Copy (or transcode) audio packets up to `duration`, aligned to the source's first video frame."""
    src, a, dst, transcode = audio
    v = src.streams.video[0] if src.streams.video else a
    start = (v.start_time or 0) * v.time_base  # our frame 0 is the source's first video frame
    if not transcode:
        shift = int(start / a.time_base)
        for pkt in src.demux(a):
            if pkt.dts is None or pkt.pts is None or not 0 <= pkt.pts * a.time_base - start < duration:
                continue  # a demuxer flush packet, or outside the kept span
            pkt.pts, pkt.dts, pkt.stream = pkt.pts - shift, pkt.dts - shift, dst
            out.mux(pkt)
        return
    for frame in src.decode(a):
        if frame.time is None or not 0 <= frame.time - float(start) < duration:
            continue
        frame.pts = None  # let the encoder number samples from zero
        out.mux(dst.encode(frame))
    out.mux(dst.encode(None))


_X264_PROBE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _x264_params() -> str:
    """libx264 `x264-params` that make its output a function of the frames alone: x264's own CPU
    detection without AVX-512 ("" when x264 found no AVX-512).

    x264's AVX-512 mbtree_propagate_list (common/x86/mc-a2.asm) handles 8 macroblocks per iteration
    with no tail mask, so for frames whose width is not a multiple of 128 px (the 64x64 cascade output,
    the 136 px preview) the lanes past a row's end read memory x264 never wrote and can scatter it into
    the macroblock-tree costs of real macroblocks. The bitstream then depends on what the heap held
    before: the same frames gave a different mp4 in each CLI run (tests/test_determinism.py). Without
    AVX-512 x264 runs its AVX2 kernels: stable, as fast here, and on a clean heap the same bytes.
    """
    with _X264_PROBE_LOCK:
        level = av.logging.get_level()
        av.logging.set_level(av.logging.INFO)
        try:  # x264 reports the capabilities it detected only in its log
            with av.logging.Capture(local=False) as logs, av.open(io.BytesIO(), "w", format="mp4") as out:
                stream = out.add_stream("libx264", rate=1)
                stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
                out.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8))))
                out.mux(stream.encode(None))
        finally:
            av.logging.set_level(level)
    prefix = "using cpu capabilities:"
    names = next((m.split(prefix, 1)[1].split() for _, _, m in logs if prefix in m), [])
    if "AVX512" not in names:
        return ""
    # Each name x264 prints is a set of flags it accepts back in `asm`; AVX2 implies the older ones.
    return "asm=" + ",".join(n for n in names if n != "AVX512")


def write_video(path: str | os.PathLike, video: Video, audio_from: str | os.PathLike | None = None,
                crf: int = 18) -> Path:
    """Write h264/yuv420p mp4 atomically; odd sizes get one edge-replicated pixel; optional audio copy."""
    frames = video.frames
    pad = ((0, 0), (0, video.height % 2), (0, video.width % 2), (0, 0))
    if any(p[1] for p in pad):  # yuv420p needs even sizes
        frames = np.pad(frames, pad, mode="edge")
    rate = Fraction(video.fps).limit_denominator(1001)
    with _atomic_path(path, ".mp4") as tmp:
        # faststart: the moov atom up front lets browsers start previews before the whole file arrives.
        with av.open(tmp, "w", format="mp4", options={"movflags": "+faststart"}) as out:
            options = {"crf": str(int(crf))}
            if _x264_params():  # same frames, same bytes (see _x264_params)
                options["x264-params"] = _x264_params()
            stream = out.add_stream("libx264", rate=rate, options=options)
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            audio = _add_audio(out, audio_from) if audio_from is not None else None
            try:
                for i, arr in enumerate(frames):
                    frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
                    frame.pts, frame.time_base = i, 1 / rate
                    out.mux(stream.encode(frame))
                out.mux(stream.encode(None))
                if audio:
                    _mux_audio(out, audio, video.duration)
            finally:
                if audio:
                    audio[0].close()
    return Path(path)


def side_by_side(original: Video, edited: Video) -> Video:
    """Original (resampled to the edit's timing and height) | white gap | edit."""
    w = max(1, round(original.width * edited.height / original.height))
    left = resample(original, edited.fps, edited.num_frames, edited.height, w).frames
    gap = np.full((edited.num_frames, edited.height, _WHITE_GAP, 3), 255, np.uint8)
    return Video(np.concatenate([left, gap, edited.frames], axis=2), edited.fps)


def _label(text: str, width: int, font) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    if measure(text, font=font) <= width:
        return text
    while text and measure(text + "...", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "..."


def contact_sheet(original: Video, edited: Video, path: str | os.PathLike, max_columns: int = 8,
                  prompt: str | None = None) -> Path:
    """PNG grid: evenly spaced original frames on top, the same moments of the edit below, each row under
    its label ("original"; "edit: PROMPT", or "edit" without a prompt)."""
    cols = max(1, min(max_columns, edited.num_frames))
    th = min(edited.height, 256)
    tw = max(1, round(edited.width * th / edited.height))
    idx = np.linspace(0, edited.num_frames - 1, cols).round().astype(int)
    # Pad the original into the edit's cell size so both rows line up even if aspects differ.
    rows = [[_resize(original.frames[i], th, tw, "pad") for i in _source_index(idx, edited.fps, original)],
            [_resize(edited.frames[i], th, tw, "crop") for i in idx]]
    g, lh = _WHITE_GAP, _LABEL_PX + _WHITE_GAP // 2
    width = cols * tw + (cols + 1) * g
    sheet = np.full((2 * (lh + th) + 3 * g, width, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            y, x = g + r * (lh + th + g) + lh, g + c * (tw + g)
            sheet[y:y + th, x:x + tw] = cell
    img = Image.fromarray(sheet)
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=_LABEL_PX)
    for r, text in enumerate(("original", f"edit: {prompt}" if prompt else "edit")):
        draw.text((g, g + r * (lh + th + g)), _label(text, width - 2 * g, font), fill=(0, 0, 0), font=font)
    with _atomic_path(path, ".png") as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def write_preview(original: Video, edited: Video, mp4_path: str | os.PathLike,
                  prompt: str | None = None) -> tuple[Path, Path]:
    """Side-by-side mp4 plus a contact-sheet PNG (rows labelled, the edit's with `prompt`) with the same
    stem; returns both paths."""
    mp4 = write_video(mp4_path, side_by_side(original, edited))
    return mp4, contact_sheet(original, edited, mp4.with_suffix(".png"), prompt=prompt)
