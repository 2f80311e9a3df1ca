"""Make the small test clips in this folder from the team's originals (../shared/data/videos, SOURCES.md).

python tests/data/make_clips.py [ORIGINALS_DIR] [OUT_DIR]; wolf.mp4 is the original file, copied as is.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dreamix_ray.video import read_video, resample, write_video

HERE = Path(__file__).resolve().parent


def main(src: Path, out: Path) -> None:
    # car-turn: every frame at its own size and rate (the limit and truncation tests read its header);
    # crf 32 instead of 18 takes it from 942 kB to a few hundred.
    write_video(out / "car-turn.mp4", read_video(src / "car-turn.mp4"), crf=32)
    # man-skiing: its AAC audio and NTSC rate are what the tests need; 1 s at 360x360 keeps both.
    ski = read_video(src / "man-skiing.mp4", max_frames=30)
    write_video(out / "man-skiing.mp4", resample(ski, ski.fps, None, 360, 360), crf=30,
                audio_from=src / "man-skiing.mp4")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[2] / "shared" / "data" / "videos",
         Path(sys.argv[2]) if len(sys.argv) > 2 else HERE)
