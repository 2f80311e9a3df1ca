"""Tests for dreamix_ray.video on real PyAV-encoded files made in tmp_path and on the clips in tests/data."""

import io
import os
import time
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import sample_clip
from PIL import Image

from dreamix_ray import video as vid
from dreamix_ray.video import Video, VideoError, VideoLimits


def pattern(n=6, h=48, w=64) -> np.ndarray:
    """Smooth frames that differ per frame: a horizontal gradient, a per-frame brightness, a red block."""
    x = np.linspace(0, 200, w, dtype=np.float32)[None, :, None]
    frames = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        f = np.broadcast_to(x + 8 * i, (h, w, 3)).copy()
        f[: h // 2, : w // 4] = (220, 30, 30)
        frames[i] = np.clip(f, 0, 255)
    return frames


def encode(path, codec, pix_fmt="yuv420p", frames=None, fps=8, fmt=None, rotation=None, options=None):
    """Encode frames with PyAV, the way a real producer of such a file would."""
    frames = pattern() if frames is None else frames
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps, options=options or {})
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if rotation is not None:
            s.set_display_rotation(rotation)
        for a in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        c.mux(s.encode(None))
    return frames


def streams(path):
    with av.open(str(path)) as c:
        return {s.type: s.codec_context.name for s in c.streams}


# ---------------------------------------------------------------- reading formats


def test_mp4_roundtrip(tmp_path):
    src = Video(pattern(12), 12.0)
    out = vid.write_video(tmp_path / "a.mp4", src)
    back = vid.read_video(out)
    assert back.frames.shape == src.frames.shape and back.fps == pytest.approx(12.0)
    assert np.abs(back.frames.astype(int) - src.frames).mean() < 8
    assert streams(out) == {"video": "h264"}
    with av.open(str(out)) as c:
        assert c.streams.video[0].codec_context.pix_fmt == "yuv420p"
    assert sorted(os.listdir(tmp_path)) == ["a.mp4"]  # no temp file left behind


@pytest.mark.parametrize("name,codec,pix_fmt,tol", [
    ("vp8.webm", "libvpx", "yuv420p", 12),
    ("vp9.webm", "libvpx-vp9", "yuv420p", 12),
    ("h264.mov", "libx264", "yuv420p", 8),
    ("mpeg4.avi", "mpeg4", "yuv420p", 12),
    ("mjpeg.avi", "mjpeg", "yuvj420p", 8),
    ("yuvj.mp4", "libx264", "yuvj420p", 8),
    ("yuv444.mp4", "libx264", "yuv444p", 8),
    ("anim.gif", "gif", "rgb8", 40),
])
def test_reads_containers_and_pixel_formats(tmp_path, name, codec, pix_fmt, tol):
    frames = encode(tmp_path / name, codec, pix_fmt)
    v = vid.read_video(tmp_path / name)
    assert v.frames.dtype == np.uint8 and v.frames.shape == frames.shape
    assert v.fps == pytest.approx(8.0, rel=0.05)  # gif stores 1/100 s delays
    assert np.abs(v.frames.astype(int) - frames).mean() < tol
    info = vid.probe_video(tmp_path / name)
    assert (info["width"], info["height"], info["has_audio"]) == (64, 48, False)
    assert info["duration"] == pytest.approx(0.75, abs=0.05)


def test_folder_of_frames_natural_order_and_fps(tmp_path):
    for i in (1, 2, 10):  # name order 1, 10, 2 would be wrong
        Image.fromarray(np.full((20, 30, 3), i * 20, np.uint8)).save(tmp_path / f"f{i}.png")
    (tmp_path / "notes.md").write_text("ignored")
    v = vid.read_video(tmp_path)
    assert v.frames.shape == (3, 20, 30, 3) and v.fps == 8.0
    assert [int(f[0, 0, 0]) for f in v.frames] == [20, 40, 200]
    (tmp_path / "fps.txt").write_text("5\n")
    assert vid.read_video(tmp_path).fps == 5.0
    assert vid.read_video(tmp_path, max_frames=2).num_frames == 2
    assert vid.probe_video(tmp_path)["duration"] == pytest.approx(0.6)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "f11.png")
    with pytest.raises(VideoError, match="same size"):
        vid.read_video(tmp_path)


def test_rotation_metadata_is_applied(tmp_path):
    frames = pattern(3, 32, 64)  # red block in the top-left quarter-width
    encode(tmp_path / "rot.mp4", "libx264", frames=frames, rotation=90)
    v = vid.read_video(tmp_path / "rot.mp4")
    assert v.frames.shape == (3, 64, 32, 3)
    # A 90 degree counter-clockwise turn moves the top-left block to the bottom-left.
    expected = np.rot90(frames, 1, axes=(1, 2))
    assert np.abs(v.frames.astype(int) - expected).mean() < 8
    info = vid.probe_video(tmp_path / "rot.mp4")
    assert (info["width"], info["height"], info["rotation"]) == (32, 64, 90)


def test_real_clips_and_max_frames():
    v = vid.read_video(sample_clip("wolf.mp4"))
    assert v.frames.shape == (40, 512, 512, 3) and v.fps == pytest.approx(20.0)
    part = vid.read_video(sample_clip("car-turn.mp4"), max_frames=5)
    assert part.frames.shape == (5, 480, 480, 3) and part.fps == pytest.approx(10.0)
    info = vid.probe_video(sample_clip("man-skiing.mp4"))
    assert info["has_audio"] and info["codec"] == "h264" and info["fps"] == pytest.approx(29.97, abs=0.01)
    assert (info["width"], info["height"], info["num_frames"]) == (360, 360, 30)


# ---------------------------------------------------------------- writing


def test_odd_size_is_padded_to_even(tmp_path):
    frames = pattern(3, 21, 33)
    vid.write_video(tmp_path / "odd.mp4", Video(frames, 8.0))
    back = vid.read_video(tmp_path / "odd.mp4")
    assert back.frames.shape == (3, 22, 34, 3)
    # The extra row/column repeats the edge rather than adding black.
    assert np.abs(back.frames[:, :, -1].astype(int) - back.frames[:, :, -2]).mean() < 8
    assert back.frames[:, -1].mean() > 40


def test_keep_audio_copies_the_stream(tmp_path):
    ski = sample_clip("man-skiing.mp4")
    v = vid.resample(vid.read_video(ski, max_frames=15), 29.97, None, 64, 64)
    out = vid.write_video(tmp_path / "a.mp4", v, audio_from=ski)
    assert streams(out) == {"video": "h264", "audio": "aac"}
    with av.open(str(out)) as c:
        a = c.streams.audio[0]
        assert float(a.duration * a.time_base) <= v.duration + 0.05  # trimmed to the 0.5 s video
    assert streams(vid.write_video(tmp_path / "b.mp4", v, audio_from=sample_clip("wolf.mp4"))) == {"video": "h264"}


def test_keep_audio_transcodes_non_mp4_audio(tmp_path):
    wav = tmp_path / "tone.wav"
    with av.open(str(wav), "w") as c:
        s = c.add_stream("pcm_s16le", rate=16000, layout="mono")
        sig = (np.sin(np.arange(32000) / 16000 * 2 * np.pi * 440) * 8000).astype(np.int16)
        for i in range(0, len(sig), 1600):
            f = av.AudioFrame.from_ndarray(sig[None, i:i + 1600], format="s16", layout="mono")
            f.sample_rate, f.pts = 16000, i
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    out = vid.write_video(tmp_path / "t.mp4", Video(pattern(8), 8.0), audio_from=wav)
    assert streams(out) == {"video": "h264", "audio": "aac"}


def test_failed_write_leaves_no_file(tmp_path):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"old")
    with pytest.raises(VideoError, match="missing.wav does not exist"):
        vid.write_video(target, Video(pattern(2), 8.0), audio_from=tmp_path / "missing.wav")
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["out.mp4"]


# ---------------------------------------------------------------- bad inputs


def _truncated_pyav_mp4(tmp_path):
    encode(tmp_path / "full.mp4", "libx264", frames=pattern(30))  # PyAV writes the moov atom last
    data = (tmp_path / "full.mp4").read_bytes()
    (tmp_path / "cut_moov_last.mp4").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut_moov_last.mp4"


def _truncated_sample(tmp_path):
    data = sample_clip("car-turn.mp4").read_bytes()  # moov atom first
    (tmp_path / "cut_moov_first.mp4").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut_moov_first.mp4"


def _file(name, data):
    def make(d):
        (d / name).write_bytes(data)
        return d / name
    return make


def _png_renamed_mp4(d):
    buf = io.BytesIO()
    Image.new("RGB", (30, 20)).save(buf, format="PNG")
    return _file("photo.mp4", buf.getvalue())(d)


def _empty_folder(d):
    (d / "frames").mkdir()
    return d / "frames"


@pytest.mark.parametrize("make,words", [
    (lambda d: d / "missing.mp4", "does not exist"),
    # ffmpeg opens a .txt like this as a "tty" video; it must still be refused.
    (_file("notes.txt", b"hello world\n" * 50), "not a video"),
    (_file("notes.mp4", b"hello\n" * 40), "not a video file PyAV can decode"),
    (_png_renamed_mp4, "still image"),
    (_file("empty.mp4", b""), "empty file"),
    (_truncated_pyav_mp4, "truncated"),
    (_truncated_sample, "truncated"),
    (_empty_folder, "without png/jpg frames"),
], ids=["missing", "text", "text-as-mp4", "png-as-mp4", "empty", "cut-moov-last", "cut-moov-first", "empty-folder"])
def test_bad_inputs_raise_clear_video_error(tmp_path, make, words):
    path = make(tmp_path)
    for fn in (vid.read_video, vid.probe_video):
        with pytest.raises(VideoError) as e:
            fn(path)
        msg = str(e.value)
        assert words in msg and str(Path(path).name) in msg
        assert ": " in msg and not isinstance(e.value, av.FFmpegError)


def test_truncation_caught_by_frame_count_without_index_check(tmp_path, monkeypatch):
    path = _truncated_sample(tmp_path)
    monkeypatch.setattr(vid, "_open", _open_without_index_check)
    with pytest.raises(VideoError, match="header promises 80 frames but only"):
        vid.read_video(path)


def test_truncated_webm_is_caught_by_its_header_duration(tmp_path):
    encode(tmp_path / "full.webm", "libvpx", frames=pattern(30))
    data = (tmp_path / "full.webm").read_bytes()
    (tmp_path / "cut.webm").write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match="cut.webm is truncated: its header promises 30 frames"):
        vid.read_video(tmp_path / "cut.webm")


def test_corrupt_packets_mid_file(tmp_path):
    data = bytearray(sample_clip("car-turn.mp4").read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 20000, 7):
        data[i] ^= 0xFF
    (tmp_path / "bad.mp4").write_bytes(data)
    with pytest.raises(VideoError, match="truncated or corrupt: decoding failed after"):
        vid.read_video(tmp_path / "bad.mp4")


def _open_without_index_check(p, limits):
    c = av.open(str(p))
    return c, c.streams.video[0]


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "a.m4a"
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000, layout="mono")
        f = av.AudioFrame.from_ndarray(np.zeros((1, 4096), np.float32), format="fltp", layout="mono")
        f.sample_rate = 16000
        c.mux(s.encode(f))
        c.mux(s.encode(None))
    with pytest.raises(VideoError, match="no video stream"):
        vid.read_video(path)


def test_read_image(tmp_path):
    Image.new("RGB", (5, 4), (1, 2, 3)).save(tmp_path / "a.png")
    img = vid.read_image(tmp_path / "a.png")
    assert img.shape == (4, 5, 3) and img.dtype == np.uint8 and tuple(img[0, 0]) == (1, 2, 3)
    (tmp_path / "b.jpg").write_text("not an image")
    with pytest.raises(VideoError, match="not an image"):
        vid.read_image(tmp_path / "b.jpg")


# ---------------------------------------------------------------- limits


class _NoDecode:
    """Container proxy that fails the test if anything decodes."""

    def __init__(self, c):
        self._c = c

    def __getattr__(self, name):
        return getattr(self._c, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._c.close()

    def decode(self, *a, **k):
        raise AssertionError("decoded a video that its header already refuses")


def test_resolution_limit_refuses_before_decoding(monkeypatch):
    clip = sample_clip("car-turn.mp4")
    real_open = av.open
    monkeypatch.setattr(vid.av, "open", lambda *a, **k: _NoDecode(real_open(*a, **k)))
    for fn in (vid.read_video, vid.probe_video):
        t = time.perf_counter()
        with pytest.raises(VideoError) as e:
            fn(clip, VideoLimits(max_width=256))
        assert time.perf_counter() - t < 1.0
        assert "480x480" in str(e.value) and "256x4096" in str(e.value) and "downscale" in str(e.value)


@pytest.mark.parametrize("limits,words", [
    (VideoLimits(max_duration_s=1), ["8.00 s", "1 s limit", "trim"]),
    (VideoLimits(max_frames=50), ["80 frames", "50 frame limit"]),
    (VideoLimits(max_bytes=1000), ["0.2 MB", "MB limit"]),
])
def test_header_limits(limits, words):
    with pytest.raises(VideoError) as e:
        vid.read_video(sample_clip("car-turn.mp4"), limits)
    assert all(w in str(e.value) for w in words), str(e.value)
    with pytest.raises(VideoError):
        vid.probe_video(sample_clip("car-turn.mp4"), limits)


def test_limits_enforced_while_decoding_when_header_is_silent(tmp_path):
    raw = tmp_path / "raw.h264"  # an elementary stream has no duration or frame count
    encode(raw, "libx264", frames=pattern(30), fps=10, fmt="h264")
    assert vid.read_video(raw).num_frames == 30
    with pytest.raises(VideoError, match="still decoding"):
        vid.read_video(raw, VideoLimits(max_duration_s=1))
    encode(tmp_path / "a.webm", "libvpx", frames=pattern(6))  # webm headers carry no frame count
    with pytest.raises(VideoError, match="has over 3 frames"):
        vid.read_video(tmp_path / "a.webm", VideoLimits(max_frames=3))


def test_limits_dict_roundtrip():
    lim = VideoLimits(max_width=640, max_duration_s=12.5)
    assert VideoLimits.from_dict(lim.to_dict()) == lim
    with pytest.raises(VideoError, match="unknown video limits"):
        VideoLimits.from_dict({"max_widht": 3})
    assert issubclass(VideoError, ValueError)  # callers that catch ValueError keep working


# ---------------------------------------------------------------- resampling and previews


def numbered(n, fps, h=32, w=64):
    """Frames whose pixel value is their index, so selections can be read back."""
    return Video(np.repeat(np.arange(n, dtype=np.uint8)[:, None, None, None], h * w * 3).reshape(n, h, w, 3), fps)


def test_resample_fps_selection_and_hold_last():
    src = numbered(10, 10.0)
    down = vid.resample(src, 5.0, None, 32, 64)
    assert down.fps == 5.0 and [int(f[0, 0, 0]) for f in down.frames] == [0, 2, 4, 6, 8]
    up = vid.resample(src, 30.0, None, 32, 64)
    assert up.num_frames == 30 and [int(f[0, 0, 0]) for f in up.frames[:7]] == [0, 0, 0, 1, 1, 1, 2]
    held = vid.resample(src, 10.0, 14, 32, 64)
    assert [int(f[0, 0, 0]) for f in held.frames] == list(range(10)) + [9] * 4
    ntsc = vid.resample(numbered(91, 30000 / 1001), 8.0, 16, 32, 64)
    assert [int(f[0, 0, 0]) for f in ntsc.frames[:4]] == [0, 3, 7, 11]
    # 4 frames at 23.976 fps end exactly on source frame 5 at 29.97 fps; plain float math floors to 4.
    film = vid.resample(numbered(10, 30000 / 1001), 24000 / 1001, 5, 32, 64)
    assert [int(f[0, 0, 0]) for f in film.frames] == [0, 1, 2, 3, 5]


def test_resample_crop_vs_pad():
    frames = np.full((2, 32, 64, 3), 200, np.uint8)
    frames[:, :, :16] = 50  # left quarter dark: cropped away, kept when padding
    src = Video(frames, 8.0)
    crop = vid.resample(src, 8.0, None, 48, 48, fit="crop")
    pad = vid.resample(src, 8.0, None, 48, 48, fit="pad")
    assert crop.frames.shape == pad.frames.shape == (2, 48, 48, 3)
    assert crop.frames[:, :, :4].min() > 150  # the dark quarter of a 96-wide scaled frame lies outside
    assert pad.frames[:, :10].max() == 0 and pad.frames[:, -10:].max() == 0  # black bars top and bottom
    assert pad.frames[:, 24, 2].mean() < 80 and pad.frames[:, 24, -2].mean() > 150
    with pytest.raises(VideoError, match="fit must be one of"):
        vid.resample(src, 8.0, None, 48, 48, fit="stretch")
    assert "crop" in vid.FIT_HELP and vid.FIT_MODES == ("crop", "pad")


def test_side_by_side_and_previews(tmp_path):
    original = numbered(10, 10.0, h=32, w=64)
    edited = Video(np.full((8, 48, 48, 3), 100, np.uint8), 8.0)
    sbs = vid.side_by_side(original, edited)
    assert sbs.fps == 8.0 and sbs.frames.shape == (8, 48, 96 + 8 + 48, 3)
    assert sbs.frames[:, :, 96:104].min() == 255  # white gap
    assert [int(f[0, 0, 0]) for f in sbs.frames[:3]] == [0, 1, 2]  # 10 fps source at 8 fps
    sheet = vid.contact_sheet(original, edited, tmp_path / "s.png", max_columns=4)
    with Image.open(sheet) as im:
        assert im.size == (4 * 48 + 5 * 8, 2 * (16 + 48) + 3 * 8)  # a 16 px label band above each row
    mp4, png = vid.write_preview(original, edited, tmp_path / "prev" / "p.mp4", prompt="a red circle")
    assert mp4 == tmp_path / "prev" / "p.mp4" and png == tmp_path / "prev" / "p.png" and png.exists()
    back = vid.read_video(mp4)
    assert back.frames.shape == (8, 48, 152, 3) and back.fps == pytest.approx(8.0)


def test_contact_sheet_rows_are_labelled_with_the_prompt(tmp_path):
    """Text above each row ("original", "edit: PROMPT"); a prompt too long for the sheet is cut, not drawn
    past its edge; the frames sit below their labels."""
    original, edited = numbered(8, 8.0, h=48, w=48), Video(np.full((8, 48, 48, 3), 100, np.uint8), 8.0)

    def bands(prompt):
        with Image.open(vid.contact_sheet(original, edited, tmp_path / "s.png", 4, prompt=prompt)) as im:
            a = np.asarray(im.convert("L"))
        return a, a[8:24], a[8 + 64 + 8:8 + 64 + 8 + 16]  # gap, then each row's 16 px label band

    sheet, top, bottom = bands("a red circle")
    assert top.min() < 100 and bottom.min() < 100  # dark text on the white bands
    assert (sheet[8 + 64 + 8 + 16:-8, 8:56] == 100).all()  # the edit's first frame, untouched by its label
    _, top_plain, bottom_plain = bands(None)
    assert (top_plain == top).all() and (bottom_plain != bottom).any()  # only the edit row names the prompt
    _, _, long = bands("a shiny silver robotic wolf " * 5)
    inked = np.nonzero((long < 128).any(axis=0))[0]
    assert inked.max() < long.shape[1] - 8  # cut to fit inside the right margin
    assert inked.max() > (bottom < 128).any(axis=0).nonzero()[0].max()  # but longer than the short prompt
