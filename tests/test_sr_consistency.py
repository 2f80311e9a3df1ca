"""TSR consistency (dreamix_ray/sr_consistency.py): the TSR keeps the frames the base drew."""

import torch

from dreamix_ray.config import EditConfig
from dreamix_ray.edit import StageRun, run_stage
from dreamix_ray.sr_consistency import project_tsr


def test_projection_sets_the_keyframes_and_nothing_else():
    torch.manual_seed(0)
    x0, prev = torch.randn(2, 3, 8, 16, 16), torch.randn(2, 3, 4, 16, 16)
    out = project_tsr(x0, prev, 2)
    assert torch.equal(out[:, :, ::2], prev) and torch.equal(out[:, :, 1::2], x0[:, :, 1::2])
    assert torch.equal(project_tsr(out, prev, 2), out)  # a projection: twice = once


def test_the_tsr_of_a_real_cascade_keeps_its_input_frames_only_when_on(tiny):
    torch.manual_seed(1)
    prev = torch.rand(1, 3, 4, 8, 8) * 2 - 1  # the tiny base's output size
    on, off = EditConfig(steps=(2, 2, 2)), EditConfig(steps=(2, 2, 2), sr_consistency=False)
    tsr_on, tsr_off = (run_stage(StageRun.of(tiny, c, ["p"], [3]), 1, prev) for c in (on, off))
    torch.testing.assert_close(tsr_on[:, :, ::2], prev, atol=1e-4, rtol=0)
    assert (tsr_off[:, :, ::2] - prev).abs().mean() > 0.1
    assert (tsr_on[:, :, 1::2] - prev).abs().mean() > 0.01  # the new frames are the model's
    # the SSR is never constrained: the setting does not change it
    assert torch.equal(run_stage(StageRun.of(tiny, on, ["p"], [3]), 2, tsr_on), run_stage(StageRun.of(tiny, off, ["p"], [3]), 2, tsr_on))
