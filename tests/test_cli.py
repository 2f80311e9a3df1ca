"""The `dreamix` command end to end on the tiny cascade: outputs, exit codes, one-line errors."""

import subprocess
import sys

import pytest

from conftest import sample_clip
from dreamix_ray.cli import main
from dreamix_ray.video import read_video


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_lists_stages(capsys, tiny_dir):
    code, out, _ = run_cli(capsys, "info", "--model", str(tiny_dir))
    assert code == 0
    for name in ("base", "tsr", "ssr"):
        assert name in out
    assert "16x16" in out and "params" in out


def test_edit_a_real_clip_with_preview(capsys, tiny_dir, tmp_path):
    out_mp4, preview = tmp_path / "edit.mp4", tmp_path / "prev.mp4"
    code, out, err = run_cli(capsys, "edit", str(sample_clip("wolf.mp4")), "-p", "a shiny silver robotic wolf",
                             "-o", str(out_mp4), "--model", str(tiny_dir), "--preview", str(preview),
                             "--strength", "0.6", "--quiet")
    assert code == 0, err
    video = read_video(out_mp4)
    assert (video.num_frames, video.height, video.width) == (8, 16, 16)
    assert read_video(preview).width > 16 and (tmp_path / "prev.png").is_file()


def test_the_embedded_model_says_once_what_it_cannot_draw(capsys, tiny_dir, tmp_path):
    clip, wolf = str(sample_clip("wolf.mp4")), "a shiny silver robotic wolf"
    code, _, err = run_cli(capsys, "edit", clip, "-p", wolf, "-o", str(tmp_path / "e.mp4"), "--steps", "1", "--quiet")
    assert code == 0, err
    assert err.count("knows only the shapes world") == 1 and repr(wolf) in err
    code, _, err = run_cli(capsys, "generate", "-p", "a red circle moving left", "-o", str(tmp_path / "g.mp4"),
                           "--steps", "1", "--quiet")
    assert code == 0 and "shapes world" not in err, err
    code, _, err = run_cli(capsys, "edit", clip, "-p", wolf, "-o", str(tmp_path / "t.mp4"), "--model", str(tiny_dir),
                           "--steps", "1", "--quiet")
    assert code == 0 and "shapes world" not in err, err  # another model: its own world


def test_generate(capsys, tiny_dir, tmp_path):
    code, _, err = run_cli(capsys, "generate", "-p", "a red circle", "-o", str(tmp_path / "g.mp4"),
                           "--model", str(tiny_dir), "--quiet", "--seed", "3")
    assert code == 0, err
    assert read_video(tmp_path / "g.mp4").num_frames == 8


def test_finetune_once_then_edit_many(capsys, tiny_dir, tmp_path):
    clip = str(sample_clip("wolf.mp4"))
    store = str(tmp_path / "store")
    args = ["finetune", clip, "--preset", "frames", "--ft-steps", "2", "--lr", "1e-4", "--model", str(tiny_dir),
            "--store", store, "--quiet"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    key = out.strip().splitlines()[-1]
    assert key.startswith("ft-")
    code, out2, _ = run_cli(capsys, *args)
    assert out2.strip().splitlines()[-1] == key
    code, out, err = run_cli(capsys, "edit", clip, "-p", "a wolf", "-o", str(tmp_path / "e.mp4"), "--model",
                             str(tiny_dir), "--finetuned", key, "--store", store, "--quiet")
    assert code == 0, err
    assert "naia a wolf" in out


@pytest.mark.parametrize("make_input, extra, message", [
    (lambda p: (p.write_text("hello"), p)[1], [], "not a video"),
    (lambda p: p, [], "does not exist|no such file"),
    (None, ["--strength", "5"], "strength must be in"),
    (None, ["--strength", "nan"], "strength must be in"),
    (None, ["--model", "/nonexistent/cascade"], "not a cascade directory"),
    (None, ["--finetuned", "ft-nope", "--store", "/tmp/dreamix-empty-store"], "no finetuned artifact"),
    (None, ["--device", "tpu"], "unknown device 'tpu'"),
    pytest.param(None, ["--device", "cuda"], "no CUDA GPU", marks=pytest.mark.skipif(
        __import__("torch").cuda.is_available(), reason="this machine has a GPU")),
])
def test_user_errors_exit_2_with_one_line(capsys, tiny_dir, tmp_path, make_input, extra, message):
    import re

    target = tmp_path / "input.mp4"
    source = make_input(target) if make_input else sample_clip("wolf.mp4")
    argv = ["edit", str(source), "-p", "x", "-o", str(tmp_path / "o.mp4"), "--quiet"]
    if "--model" not in extra:
        argv += ["--model", str(tiny_dir)]
    code, _, err = run_cli(capsys, *argv, *extra)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dreamix: error:"), err
    assert re.search(message, lines[0], re.I), lines[0]
    assert not (tmp_path / "o.mp4").exists()


def test_a_real_process_prints_no_traceback(tmp_path, tiny_dir):
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video at all")
    proc = subprocess.run([sys.executable, "-m", "dreamix_ray.cli", "edit", str(bad), "-p", "x", "-o",
                           str(tmp_path / "o.mp4"), "--model", str(tiny_dir), "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "dreamix: error:" in proc.stderr


def test_bad_finetune_arguments(capsys, tiny_dir, tmp_path):
    clip = str(sample_clip("wolf.mp4"))
    for extra, message in ((["--alpha", "2"], "alpha"), (["--ft-steps", "0"], "at least 1 step")):
        code, _, err = run_cli(capsys, "finetune", clip, "--model", str(tiny_dir), "--store", str(tmp_path), *extra)
        assert code == 2 and message in err


def test_device_flag_runs_the_same_edit(capsys, tiny_dir, tmp_path):
    """--device cpu and the default (auto: CPU here) give the same video; noise never depends on the device."""
    clip = str(sample_clip("wolf.mp4"))
    outs = []
    for name, extra in (("auto", []), ("cpu", ["--device", "cpu"])):
        out = tmp_path / f"{name}.mp4"
        code, _, err = run_cli(capsys, "edit", clip, "-p", "a wolf", "-o", str(out), "--model", str(tiny_dir),
                               "--quiet", "--seed", "4", *extra)
        assert code == 0, err
        outs.append(read_video(out).frames)
    assert (outs[0] == outs[1]).all()


def test_edit_type_picks_the_cascade_strength(capsys, tiny_dir, tmp_path):
    """--edit-type reads the cascade's tuned strength; --strength still wins; no table keeps the default."""
    import json
    import shutil

    model = tmp_path / "cascade"
    shutil.copytree(tiny_dir, model)
    spec = json.loads((model / "cascade.json").read_text())
    spec["edit_strengths"] = {"none": {"motion": 0.9, "style": 0.5}}
    (model / "cascade.json").write_text(json.dumps(spec))
    clip = str(sample_clip("wolf.mp4"))
    frames = {}
    for name, extra in (("motion", ["--edit-type", "motion"]), ("s09", ["--strength", "0.9"]),
                        ("override", ["--edit-type", "motion", "--strength", "0.5"]),
                        ("object", ["--edit-type", "object"])):
        code, out, err = run_cli(capsys, "edit", clip, "-p", "a wolf running left", "-o", str(tmp_path / f"{name}.mp4"),
                                 "--model", str(model), "--quiet", "--seed", "2", *extra)
        assert code == 0, err
        frames[name] = (out, read_video(tmp_path / f"{name}.mp4").frames)
    assert "at strength 0.9" in frames["motion"][0] and (frames["motion"][1] == frames["s09"][1]).all()
    assert "at strength 0.5" in frames["override"][0]
    assert "at strength 0.7" in frames["object"][0]  # no tuned strength for object edits: the default
    with pytest.raises(SystemExit):
        main(["edit", clip, "-p", "x", "-o", str(tmp_path / "x.mp4"), "--edit-type", "color"])
    assert "invalid choice: 'color'" in capsys.readouterr().err


def test_motion_edits_move_the_input_and_generate_never_does():
    from dreamix_ray.cli import build_parser
    from dreamix_ray.cli.common import edit_request
    from dreamix_ray.models.embedded import embedded_config
    from dreamix_ray.request import resolve

    parser, config = build_parser(), embedded_config({"kind": "minilm"})

    def _edit_config(args, _strength):
        return resolve(edit_request(args, args.command), config).config

    for argv, want in ((["edit", "in.mp4", "-p", "x", "-o", "o.mp4", "--edit-type", "motion"], True),
                       (["edit", "in.mp4", "-p", "x", "-o", "o.mp4", "--motion-from-input"], True),
                       (["edit", "in.mp4", "-p", "x", "-o", "o.mp4", "--edit-type", "style"], False),
                       (["generate", "-p", "x", "-o", "o.mp4"], False)):
        assert _edit_config(parser.parse_args(argv), 1.0).motion_from_input is want, argv
    edit = ["edit", "in.mp4", "-p", "x", "-o", "o.mp4"]
    default = _edit_config(parser.parse_args(edit), 1.0)
    assert default.sr_consistency and default.sr_strength is None
    chosen = _edit_config(parser.parse_args(edit + ["--no-sr-consistency", "--sr-strength", "0.8"]), 1.0)
    assert not chosen.sr_consistency and chosen.sr_strength == 0.8


def test_a_bad_sr_strength_is_one_clear_line(capsys):
    from dreamix_ray.cli import main

    assert main(["edit", "missing.mp4", "-p", "x", "-o", "o.mp4", "--sr-strength", "0"]) == 2
    err = capsys.readouterr().err
    assert "SR strength must be in (0, 1]" in err and "Traceback" not in err


def test_demo_writes_side_by_side_and_a_verdict(capsys, tiny_dir, tmp_path):
    """The README's main command, on the tiny cascade: both videos, the preview and one verdict line per
    attribute the prompt names."""
    code, out, err = run_cli(capsys, "demo", "-o", str(tmp_path), "--model", str(tiny_dir), "--quiet")
    assert code == 0, err
    for name in ("original.mp4", "edit.mp4", "side_by_side.mp4", "side_by_side.png"):
        assert (tmp_path / name).is_file()
    assert "(strength 0.7, seed 0)" in out  # no tuned strengths in the tiny cascade: the rule's default
    verdict = [line for line in out.splitlines() if line.strip().startswith(("background", "colour", "shape",
                                                                             "motion"))]
    assert len(verdict) == 4 and all(line.rstrip().endswith(("ok", "MISSED")) for line in verdict)
    assert "attributes of the prompt found" in out
    layout = [line for line in out.splitlines() if line.strip().startswith("layout")]
    assert len(layout) == 1 and ("kept     ok" in layout[0] or "moved    MISSED" in layout[0]), layout
