"""One request, three ways in: `dreamix edit` flags, a batch manifest row and a Serve JSON body resolve to the
same EditPlan (request.resolve), and the CLI and the batch steps write the same video bytes. The Serve
deployments' bytes are compared in test_serve.py (they need the running app)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest

pytest.register_assert_rewrite("conftest_batch")
from conftest_batch import shapes_clip  # noqa: E402

from dreamix_ray.cli import build_parser, main  # noqa: E402
from dreamix_ray.cli.common import edit_request  # noqa: E402
from dreamix_ray.manifest import read_manifest, work_items  # noqa: E402
from dreamix_ray.request import EditPlan, EditRequest, resolve  # noqa: E402

pydantic = pytest.importorskip("pydantic")
from dreamix_ray.cluster.serving.params import EditFields  # noqa: E402
from dreamix_ray.cluster.serving.settings import ServeSettings  # noqa: E402
from dreamix_ray.cluster.serving.submit import resolve as serve_resolve  # noqa: E402

# (CLI flags, manifest columns, Serve body fields): the same request in each format
REQUESTS = [
    ([], {}, {}),
    (["--finetune", "mixed"], {"finetune": "mixed"}, {"finetune": "mixed"}),
    (["--edit-type", "object", "--finetune", "frames"], {"edit_type": "object", "finetune": "frames"},
     {"edit_type": "object", "finetune": "frames"}),
    (["--edit-type", "motion"], {"edit_type": "motion"}, {"edit_type": "motion"}),
    (["--steps", "3", "--seed", "5"], {"steps": 3, "seed": 5}, {"steps": 3, "seed": 5}),
    (["--strength", "0.4", "--edit-type", "style"], {"strength": 0.4, "edit_type": "style"},
     {"strength": 0.4, "edit_type": "style"}),
    (["--guidance", "3", "--negative-prompt", "blurry"], {"guidance": 3, "negative_prompt": "blurry"},
     {"guidance": 3, "negative_prompt": "blurry"}),
]
PROMPT = "a green circle moving right"


@pytest.fixture(scope="module")
def tuned_config(tiny):
    """The tiny cascade with a strength table, as the embedded one has: object 0.6 after mixed finetuning."""
    return dataclasses.replace(tiny.config, edit_strengths={"none": {"motion": 0.9, "object": 0.5},
                                                           "mixed": {"object": 0.6}})


def cli_plan(flags: list[str], config) -> EditPlan:
    args = build_parser().parse_args(["edit", "in.mp4", "-p", PROMPT, "-o", "out.mp4"] + flags)
    return resolve(edit_request(args), config)


def manifest_plan(columns: dict, config, tmp_path: Path) -> EditPlan:
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"id": "a", "video": "in.mp4", "prompt": PROMPT, **columns}))
    item = work_items(read_manifest(str(path)), str(tmp_path / "out"), EditRequest(prompt=""), "tag", config)[0]
    assert item["status"] == "pending", item["error"]
    return EditPlan.from_dict(json.loads(item["cfg"]), config)


def serve_plan(body: dict, config) -> EditPlan:
    fields = EditFields.model_validate({"prompt": PROMPT, **body})
    params = asyncio.run(serve_resolve("edit", fields, "owner", ServeSettings(), None, config))
    return EditPlan.from_dict(params["edit"], config)


@pytest.mark.parametrize("flags,columns,body", REQUESTS)
def test_one_request_resolves_to_one_plan_from_every_entry_point(flags, columns, body, tuned_config, tmp_path):
    plans = [cli_plan(flags, tuned_config), manifest_plan(columns, tuned_config, tmp_path),
             serve_plan(body, tuned_config)]
    assert plans[0] == plans[1] == plans[2]


def test_the_rule(tuned_config, tmp_path):
    """The documented defaults (request.py, README): the values the three entry points used to disagree on."""
    strength = {tuple(f): cli_plan(f, tuned_config).config.strength for f, _, _ in REQUESTS}
    assert strength[()] == 0.7  # no edit type, no finetuning
    assert strength[("--finetune", "mixed")] == 0.95  # finetuned: the paper's s (Serve gave 0.7)
    assert strength[("--edit-type", "object", "--finetune", "frames")] == 0.6  # the mixed table (CLI gave 0.95)
    assert strength[("--edit-type", "motion")] == 0.9
    steps = cli_plan(["--steps", "3"], tuned_config)
    assert [s.steps for s in steps.stages] == [3, 3, 3]  # one value: every stage (CLI and batch: base only)
    assert cli_plan(["--edit-type", "motion"], tuned_config).config.motion_from_input
    off = EditRequest(prompt=PROMPT, edit_type="motion", motion_from_input=False)  # said: wins over the rule
    assert not resolve(off, tuned_config).config.motion_from_input
    assert resolve(off, tuned_config).config.strength == 0.9  # and the tuned motion strength still applies
    last = cli_plan(["--frames", "5"], tuned_config).stages[-1]
    assert last.frames == 10 and last.chunks == ((0, 10),)  # TSR x2; one chunk of up to 32 frames
    from dreamix_ray.config import ConfigError

    with pytest.raises(ConfigError, match="4 values for a cascade of 3 stages"):
        cli_plan(["--steps", "1", "2", "3", "4"], tuned_config)
    # guidance: the request's, else the cascade's (convert sets it for text-to-video models), else 1
    assert cli_plan([], tuned_config).config.guidance_scale == 1.0
    guided = dataclasses.replace(tuned_config, guidance_scale=4.0)
    assert cli_plan([], guided).config.guidance_scale == 4.0
    assert manifest_plan({}, guided, tmp_path).config.guidance_scale == 4.0
    assert serve_plan({}, guided).config.guidance_scale == 4.0
    assert cli_plan(["--guidance", "1"], guided).config.guidance_scale == 1.0


def test_cli_and_batch_write_the_same_bytes(tmp_path, tiny_dir, capsys):
    """The same request through `dreamix edit` and the batch steps (run in this process, staged and fused) -> the
    same mp4."""
    from dreamix_ray.cluster.pipeline import pipeline_steps, run_in_process
    from dreamix_ray.cluster.io_steps import cascade_config

    clip = shapes_clip(tmp_path / "in.mp4", seed=3)
    out = tmp_path / "cli.mp4"
    code = main(["edit", str(clip), "-p", PROMPT, "-o", str(out), "--steps", "4", "--seed", "5", "--edit-type",
                 "motion", "--model", str(tiny_dir), "--quiet"])
    assert code == 0, capsys.readouterr().err
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "video": str(clip), "prompt": PROMPT, "steps": 4,
                                                  "seed": 5, "edit_type": "motion"}))
    config = cascade_config(str(tiny_dir))
    items = work_items(read_manifest(str(tmp_path / "m.jsonl")), str(tmp_path / "batch"), EditRequest(prompt=""),
                       "tiny", config)
    for layout in ("staged", "fused"):  # a step per stage, or one for all of them: the same bytes
        done = run_in_process(items, pipeline_steps(config, str(tiny_dir), None, None, False, layout=layout))
        assert done[0]["status"] == "ok", done[0]["error"]
        assert Path(done[0]["output"]).read_bytes() == out.read_bytes(), layout
        assert all(done[0][f"t_{stage.name}"] > 0 and done[0][f"{stage.name}_node"] for stage in config.stages)
        Path(done[0]["output"]).unlink()  # else the next layout's decode skips the row as done
