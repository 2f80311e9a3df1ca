"""Tests for the shapes world: sampling, rendering, captions and the pixel analyzer."""

import numpy as np
import pytest

from dreamix_ray.world import (
    agreement, analyze, canonical_caption, caption, compare, parse_caption, render, sample_scene,
)
from dreamix_ray.world.analyze import object_found_fraction, trajectory_smoothness
from dreamix_ray.world.captions import scene_attributes
from dreamix_ray.world.scene import COLOURS, MOTIONS, Scene


def _fg_centroids(frames: np.ndarray, background: str) -> np.ndarray:
    """Independent centroid estimate: pixels far from the (plain) background colour."""
    d = np.linalg.norm(frames.astype(float) - np.array(COLOURS[background]), axis=-1)
    out = []
    for m in d > 30:
        ys, xs = np.nonzero(m)
        out.append([xs.mean(), ys.mean()])
    return np.array(out) / frames.shape[1]


def test_render_is_deterministic_and_shaped():
    scene = sample_scene(np.random.default_rng(0), n_objects=2)
    a, b = render(scene), render(scene)
    assert a.shape == (16, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert render(scene, num_frames=8, size=16).shape == (8, 16, 16, 3)


def test_motion_is_defined_in_time():
    # Half the fps with half the frames samples the same instants of the same clip.
    scene = sample_scene(np.random.default_rng(1), motion="bouncing")
    assert np.array_equal(render(scene, 16, 32, 8.0)[::2], render(scene, 8, 32, 4.0))


def test_objects_stay_inside_frame_and_differ_from_background():
    rng = np.random.default_rng(2)
    for _ in range(60):
        scene = sample_scene(rng, n_objects=1 + int(rng.integers(2)), texture="plain")
        assert all(o.colour != scene.background for o in scene.objects)
        frames = render(scene, 16, 64)  # the 0.02 margin is > 1 pixel from 64 px up
        border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], 1)
        assert np.all(border == np.array(COLOURS[scene.background], dtype=np.uint8)), scene


@pytest.mark.parametrize("motion,axis,sign", [("left", 0, -1), ("right", 0, 1),
                                               ("up", 1, -1), ("down", 1, 1)])
def test_motion_direction_visible(motion, axis, sign):
    scene = sample_scene(np.random.default_rng(3), motion=motion, texture="plain", style="solid")
    c = _fg_centroids(render(scene), scene.background)
    travel = (c[-1] - c[0]) * sign
    assert travel[axis] > 0.4  # ~0.47 frame widths over 16 frames at 8 fps
    assert abs(c[-1, 1 - axis] - c[0, 1 - axis]) < 0.02


def test_sample_scene_respects_fixed_and_edits():
    rng = np.random.default_rng(4)
    scene = sample_scene(rng, motion="left", colour="red", background="blue", shape="square")
    o = scene.objects[0]
    assert (o.motion, o.colour, o.shape, scene.background) == ("left", "red", "square", "blue")
    edited = scene.replace_object(0, colour="green", motion="growing")
    assert edited.objects[0].colour == "green" and edited.objects[0].motion == "growing"
    assert edited.objects[0].shape == "square" and edited.background == "blue"
    assert scene.replace(background="black").background == "black"
    with pytest.raises(ValueError):
        sample_scene(rng, colour="blue", background="blue")
    with pytest.raises(ValueError):
        scene.replace_object(0, colour="blue")  # would vanish into the blue background


def test_canonical_caption_words():
    scene = sample_scene(np.random.default_rng(5), colour="red", shape="circle", motion="left",
                         background="blue", size="large", style="solid", texture="plain")
    assert canonical_caption(scene) == "a red circle moving left on a blue background"
    small = scene.replace_object(0, size="small", style="striped", shape="square", motion="up")
    assert canonical_caption(small.replace(background="gray")) == \
        "a small striped red square moving up on a gray background"
    static = scene.replace_object(0, motion="static")
    assert "standing still" in caption(static)


def test_parse_caption_round_trips_canonical_and_paraphrases():
    rng = np.random.default_rng(6)
    seen = set()
    for i in range(400):
        scene = sample_scene(rng, n_objects=1 + (i % 3 == 0))
        want = scene_attributes(scene)
        for text in (canonical_caption(scene), caption(scene, rng)):
            seen.add(text)
            got = parse_caption(text)
            assert got["background"] == want["background"], text
            assert got["texture"] == want["texture"], text
            assert got["objects"] == want["objects"], text
    assert len(seen) > 600  # paraphrases actually vary


def test_parse_caption_synonyms():
    got = parse_caption("on a blue backdrop, a small red disc drifting leftwards")
    assert (got["background"], got["colour"], got["shape"], got["motion"], got["size"]) == \
        ("blue", "red", "circle", "left", "small")
    got = parse_caption("a big orange box hopping over checked gray")
    assert (got["background"], got["texture"], got["shape"], got["motion"]) == \
        ("gray", "checkered", "square", "bouncing")


def test_analyzer_agreement_64():
    rng = np.random.default_rng(123)
    scenes = [sample_scene(rng) for _ in range(150)]
    results = [compare(s, analyze(render(s))) for s in scenes]
    assert agreement(results) >= 0.98
    for attr in results[0]:
        assert np.mean([r[attr] for r in results]) >= 0.95, attr
    # Every motion class occurs, so each branch of the motion classifier was exercised.
    assert {s.objects[0].motion for s in scenes} == set(MOTIONS)


def test_analyzer_detects_wrong_attributes():
    scene = sample_scene(np.random.default_rng(8), colour="red", motion="left", shape="circle",
                         background="blue")
    est = analyze(render(scene.replace_object(0, colour="green", motion="right")))
    res = compare(scene, est)
    assert not res["colour"] and not res["motion"] and res["shape"] and res["background"]


def test_two_object_scenes_found_as_two():
    rng = np.random.default_rng(9)
    for _ in range(15):
        scene = sample_scene(rng, n_objects=2)
        est = analyze(render(scene))
        assert len(est.objects) == 2, scene
        assert {o.colour for o in est.objects} == {o.colour for o in scene.objects}


def test_found_fraction_and_smoothness():
    empty = render(Scene("gray", "checkered", ()))
    assert object_found_fraction(empty) == 0.0
    scene = sample_scene(np.random.default_rng(10), motion="bouncing")
    assert object_found_fraction(render(scene)) == 1.0
    linear = trajectory_smoothness(render(scene.replace_object(0, motion="left")))
    assert linear < 0.005 < trajectory_smoothness(render(scene))
