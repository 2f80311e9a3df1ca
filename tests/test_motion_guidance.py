"""Motion guidance: the fitted prior reads directions from text, the layout moves the right way, and the
embedded base follows the direction word with it."""

from __future__ import annotations

import pytest
import torch

from dreamix_ray.config import CascadeConfig, ConfigError, EditConfig, StageConfig
from dreamix_ray.motion_guidance import MotionPrior, MotionPriorError, moving_layout, translate


def _blob(size: int = 16) -> torch.Tensor:
    img = torch.zeros(1, 1, size, size)
    img[..., 6:10, 6:10] = 1.0
    return img


def _centroid_x(img_hw: torch.Tensor) -> float:
    xs = torch.arange(img_hw.shape[-1], dtype=img_hw.dtype)
    return float((img_hw.sum(0) * xs).sum() / img_hw.sum())


def test_translate_moves_content_by_the_fraction_of_the_frame_and_replicates_edges():
    img = _blob() + 0.5  # a grey frame: the replicated edge keeps its value
    right = translate(img, torch.tensor([[0.25, 0.0]]))
    assert _centroid_x(right[0, 0] - 0.5) == pytest.approx(_centroid_x(img[0, 0] - 0.5) + 4, abs=0.05)
    down = translate(img, torch.tensor([[0.0, -0.125]]))  # up by 2 rows
    assert down[0, 0, 4:8, 6:10].mean() == pytest.approx(1.5)
    assert float(right.min()) == pytest.approx(0.5)


def test_moving_layout_runs_the_clip_mean_along_the_direction_centred_in_time():
    clip = _blob().unsqueeze(2).repeat(1, 1, 5, 1, 1)  # [1, 1, F=5, 16, 16], static
    layout = moving_layout(clip, torch.tensor([[-1.0, 0.0]]), travel=0.5)  # left, 8 pixels over the clip
    xs = [_centroid_x(layout[0, 0, f]) for f in range(5)]
    assert xs == pytest.approx([11.5, 9.5, 7.5, 5.5, 3.5], abs=0.05)


def test_moving_layout_of_a_still_image_puts_it_where_the_clip_is_half_way():
    clip = torch.zeros(1, 1, 5, 16, 16)  # the clip itself is ignored but for its length
    layout = moving_layout(clip, torch.tensor([[1.0, 0.0]]), travel=0.5, still_bchw=_blob())
    xs = [_centroid_x(layout[0, 0, f]) for f in range(5)]
    assert xs == pytest.approx([3.5, 5.5, 7.5, 9.5, 11.5], abs=0.05)


def test_motion_guided_replaces_the_clean_estimate_of_guided_rows_at_high_noise_only():
    from dreamix_ray.motion_guidance import motion_guided
    from dreamix_ray.sampling import make_scheduler

    scheduler = make_scheduler()
    prior = MotionPrior(weight=((0.0, 0.0), (4.0, 0.0)), bias=(0.0, 0.0), vectors=((0.0, 0.0), (1.0, 0.0)),
                        travel=0.5)
    pooled = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # row 0 moves right, row 1 names no translation
    x, v = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(2, 3, 4, 8, 8)
    guided = motion_guided(lambda x_, t_: v, scheduler, prior, pooled, weight=1.0)
    for t, guided_now in ((900, True), (500, False)):
        a2 = scheduler.alphas_cumprod[t]
        a, s = a2.sqrt(), (1 - a2).sqrt()
        out = guided(x, torch.full((2,), t))
        x0_before, x0_after = a * x - s * v, a * x - s * out  # the clean estimate the DDIM step will use
        torch.testing.assert_close(out[1], v[1])
        if guided_now:  # v = a * eps - s * layout: the step's estimate is a^2 x0 + s^2 layout, ~all layout here
            layout = moving_layout(x0_before[:1], torch.tensor([[1.0, 0.0]]), 0.5)[0]
            torch.testing.assert_close(x0_after[0], a2 * x0_before[0] + (1 - a2) * layout)
            assert float(1 - a2) > 0.9
        else:
            torch.testing.assert_close(out, v)


def test_a_motion_edit_moves_the_inputs_middle_frame_not_the_estimate():
    from dreamix_ray.motion_guidance import motion_guided
    from dreamix_ray.sampling import make_scheduler

    scheduler = make_scheduler()
    prior = MotionPrior(weight=((4.0,),), bias=(0.0,), vectors=((0.0, 1.0),), travel=0.5)  # always down
    source = torch.randn(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x, v = torch.randn(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(1, 3, 4, 8, 8)
    out = motion_guided(lambda x_, t_: v, scheduler, prior, torch.ones(1, 1), 1.0, input_bcfhw=source)(
        x, torch.full((1,), 900))
    a2 = scheduler.alphas_cumprod[900]
    x0_before, x0_after = a2.sqrt() * x - (1 - a2).sqrt() * v, a2.sqrt() * x - (1 - a2).sqrt() * out
    layout = moving_layout(x0_before, torch.tensor([[0.0, 1.0]]), 0.5, still_bchw=source[:, :, 2])
    torch.testing.assert_close(x0_after, a2 * x0_before + (1 - a2) * layout)


def test_prior_round_trips_and_malformed_entries_name_the_fix():
    # classes: none, left, up; the text's first feature votes "left", the second "up"
    prior = MotionPrior(weight=((0.0, 0.0), (4.0, 0.0), (0.0, 4.0)), bias=(0.0, 0.0, 0.0),
                        vectors=((0.0, 0.0), (-1.0, 0.0), (0.0, -1.0)), travel=0.5)
    assert MotionPrior.from_dict(prior.to_dict()) == prior
    with pytest.raises(MotionPriorError, match="fit_motion_prior"):
        MotionPrior.from_dict({"weight": [[1.0]]})
    config = CascadeConfig(stages=(StageConfig("base", "base", 4, 8, 8, 4.0),))
    with pytest.raises(MotionPriorError, match="refit"):
        CascadeConfig.from_dict(dict(config.to_dict(), motion_prior={"weight": [[1.0]], "bias": [0.0],
                                                                     "travel": 0.5}))
    with pytest.raises(ConfigError, match="motion guidance"):
        EditConfig(motion_guidance=1.5)
    directions = prior.directions(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 0.15], [-1.0, -1.0]]))
    # a weak vote (probability < gate) and a vote for "none" both leave the prompt unguided
    assert directions.tolist() == [[-1.0, 0.0], [0.0, -1.0], [0.0, 0.0], [0.0, 0.0]]


def test_fitted_prior_reads_direction_words_of_held_out_captions(text_encoder):
    from dreamix_ray.pretrain import PretrainConfig, fit_world_motion_prior

    prior = fit_world_motion_prior(text_encoder, PretrainConfig(stage="base"), steps=60)
    prompts = ["a purple triangle moving left on a green background",
               "a big orange square slides to the right over grey",
               "a small yellow circle moving up on a blue background", "a red triangle moving down on white",
               "a green square staying still on a red background", "a blue circle growing over grey",
               "a car driving to the left"]
    got = prior.directions(text_encoder(prompts)[1]).tolist()
    assert got == [[-1, 0], [1, 0], [0, -1], [0, 1], [0, 0], [0, 0], [-1, 0]]


@pytest.fixture(scope="module")
def embedded_base():
    from dreamix_ray.models.cascade import Cascade, load_cascade

    cascade = load_cascade()
    if not cascade.config.motion_prior:
        pytest.fail("the embedded cascade.json has no motion prior: run jobs/fit_motion_prior.py")
    return Cascade(cascade.config, cascade.text_encoder, cascade.stages[:1])


def _seen_motions(cascade, prompts, seeds, motion_guidance):
    from dreamix_ray.degrade import tensor_to_frames
    from dreamix_ray.edit import StageRun, run_stage
    from dreamix_ray.world.analyze import analyze

    sc = cascade.stages[0].config
    cfg = EditConfig(strength=1.0, motion_guidance=motion_guidance)
    out = run_stage(StageRun.of(cascade, cfg, prompts, seeds), 0, torch.zeros(len(prompts), 3, sc.frames, sc.height, sc.width))
    return out, [est.objects[0].motion if est.objects else "none" for est in map(analyze, tensor_to_frames(out))]


def test_embedded_base_follows_the_direction_word_with_guidance(embedded_base):
    words = ["left", "right", "up", "down"]
    prompts = [f"a red circle moving {w} on a blue background" for w in words]
    _, seen = _seen_motions(embedded_base, prompts * 2, [0] * 4 + [1] * 4, 1.0)
    assert seen == words * 2


def test_guidance_leaves_prompts_without_a_translation_untouched(embedded_base):
    prompts = ["a red circle staying still on a blue background", "a green square growing on grey"]
    on, _ = _seen_motions(embedded_base, prompts, [3, 4], 1.0)
    off, _ = _seen_motions(embedded_base, prompts, [3, 4], 0.0)
    assert torch.equal(on, off)


def test_embedded_motion_edit_changes_the_direction_and_keeps_the_object(embedded_base):
    """A motion edit at s = 1 with motion_from_input: the new direction (3 of 4 at least: the base gets
    88% of tuning edits), the source's colour and shape, and the object's track centred where the
    source's is, closer than when the layout comes from the base's own estimate."""
    import numpy as np

    from dreamix_ray.degrade import downsample_to_stage, tensor_to_frames
    from dreamix_ray.edit import StageRun, run_stage
    from dreamix_ray.video import Video
    from dreamix_ray.world.analyze import analyze
    from dreamix_ray.world.captions import canonical_caption
    from dreamix_ray.world.render import render
    from dreamix_ray.world.scene import sample_scene

    sc, edits = embedded_base.stages[0].config, [("left", "right"), ("right", "up"), ("up", "left"), ("down", "up")]
    sources, prompts = [], []
    for i, (before, after) in enumerate(edits):
        scene = sample_scene(np.random.default_rng(i), n_objects=1, texture="plain", style="solid", size="large",
                             motion=before)
        sources.append(downsample_to_stage(Video(render(scene, sc.frames, sc.height, sc.fps), sc.fps), sc))
        prompts.append(canonical_caption(scene.replace_object(0, motion=after)))
    x0 = torch.cat(sources)
    wants = [analyze(src).objects[0] for src in tensor_to_frames(x0)]
    errors = {}
    for from_input in (True, False):
        cfg = EditConfig(strength=1.0, motion_from_input=from_input)
        got = [analyze(out).objects[0] for out in tensor_to_frames(run_stage(StageRun.of(embedded_base, cfg, prompts, [0] * 4), 0, x0))]
        errors[from_input] = [float(np.linalg.norm(np.nanmean(g.centroids, 0) - w.centroids[len(w.centroids) // 2]))
                              for g, w in zip(got, wants)]
        if from_input:
            assert sum(g.motion == after for g, (_, after) in zip(got, edits)) >= 3, [g.motion for g in got]
            assert [(g.colour, g.shape) for g in got] == [(w.colour, w.shape) for w in wants]
    assert np.mean(errors[True]) < np.mean(errors[False]), errors
