"""Batch editing: the plain stages without Ray, then the Ray Data pipeline on a real `ray start` cluster
and a real S3 server (moto) over HTTP, reruns, a crashed actor, and `ray job submit`."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.register_assert_rewrite("conftest_batch")  # it is also a plugin (below); import it rewritten once
from conftest_batch import BIN, REPO, shapes_clip  # noqa: E402

pytest_plugins = ["conftest_batch"]
from dreamix_ray.config import EditConfig  # noqa: E402
from dreamix_ray.request import EditRequest  # noqa: E402

CHUNK = 3  # 8 output frames -> last-SSR chunks of 3, 3, 2, inside the SSR step
JOB = EditRequest(prompt="", ssr_chunk_frames=CHUNK)  # the job's defaults, as `dreamix batch` flags give them
TEST_CPUS = {"decode": 0.25, "base": 0.5, "tsr": 0.5, "ssr": 0.5, "encode": 0.25}
TEST_ACTORS = {"decode": (1, 1), "base": (1, 1), "tsr": (1, 1), "ssr": (1, 1), "encode": (1, 1)}
FUSED_CPUS = {"decode": 0.25, "cascade": 0.5, "encode": 0.25}  # --layout fused: one step runs every stage


def _reference_mp4(tmp: Path, video_path: Path, prompt: str, seed: int, model_dir) -> bytes:
    """The same edit by the single-process editor, encoded the same way."""
    from dreamix_ray.edit import edit
    from dreamix_ray.models.cascade import Cascade
    from dreamix_ray.video import read_video, write_video

    cascade = Cascade.from_pretrained(model_dir)
    out = edit(read_video(video_path), prompt, EditConfig(seed=seed, ssr_chunk_frames=CHUNK), cascade)
    return write_video(tmp / f"ref-{seed}.mp4", out).read_bytes()


# ---------------------------------------------------------------- without Ray


def test_core_and_stage_modules_do_not_import_ray():
    code = ("import sys, dreamix_ray.manifest, dreamix_ray.cluster.steps, dreamix_ray.cluster.pipeline; "
            "sys.exit(1 if 'ray' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=300).returncode == 0


def test_decode_and_encode_actors_load_no_model_libraries():
    """The file steps' module imports no diffusers, transformers or peft: their actors start without them; an
    Encode actor without torch too, which only Decode's downsampling needs."""
    heavy = "{'diffusers', 'transformers', 'peft', 'ray', 'torch'}"
    code = ("import sys; from dreamix_ray.cluster.io_steps import Decode, Encode; "
            f"loaded = lambda: sorted({{m.split('.')[0] for m in sys.modules}} & {heavy}); "
            "Encode(fps=8.0); print(loaded()); Decode(); print(loaded())")
    done = subprocess.run([sys.executable, "-c", code], timeout=300, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.split("\n")[:2] == ["[]", "['torch']"], done.stdout + done.stderr


def test_stages_in_one_process_equal_single_edits_at_any_batch_size(tmp_path, tiny_dir):
    """The plain stage classes, no Ray: outputs equal edit()'s and each other's across batch sizes."""
    from dreamix_ray.cluster.pipeline import pipeline_steps, run_in_process
    from dreamix_ray.cluster.io_steps import cascade_config
    from dreamix_ray.manifest import read_manifest, work_items

    clips = [shapes_clip(tmp_path / f"in{i}.mp4", seed=i) for i in range(3)]
    rows = [{"id": f"v{i}", "video": str(c), "prompt": "a green circle", "seed": 10 + i} for i, c in enumerate(clips)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    outputs = {}
    for batch_size in (1, 3):
        items = work_items(read_manifest(str(tmp_path / "m.jsonl")), str(tmp_path / f"out{batch_size}"),
                           JOB, "tiny", cascade_config(str(tiny_dir)))
        specs = pipeline_steps(cascade_config(str(tiny_dir)), str(tiny_dir), None, None, False)
        done = run_in_process(items, specs, batch_size=batch_size)
        assert [r["status"] for r in done] == ["ok"] * 3
        outputs[batch_size] = [Path(r["output"]).read_bytes() for r in sorted(done, key=lambda r: r["id"])]
        assert all(Path(r["preview"]).is_file() and Path(r["preview"][:-4] + ".png").is_file() for r in done)
    for one, three in zip(outputs[1], outputs[3]):
        assert_same_edit(one, three, tmp_path)
    assert_same_edit(outputs[1][2], _reference_mp4(tmp_path, clips[2], "a green circle", 12, tiny_dir), tmp_path)


def test_finetune_rows_finetune_once_then_edit_with_the_artifact(tmp_path, tiny_dir):
    """Plain stages with the Finetune stage: one artifact per video, its token in the prompt, s = 0.95."""
    from dreamix_ray.cluster.pipeline import pipeline_steps, run_in_process
    from dreamix_ray.cluster.io_steps import cascade_config
    from dreamix_ray.edit import edit
    from dreamix_ray.finetune import finetuned_prompt, load_finetuned
    from dreamix_ray.manifest import read_manifest, work_items
    from dreamix_ray.models.cascade import Cascade
    from dreamix_ray.storage import ArtifactStore
    from dreamix_ray.video import read_video, write_video

    clip = shapes_clip(tmp_path / "in.mp4", seed=1)
    rows = [{"id": "ft", "video": str(clip), "prompts": ["a green circle", "a red square"], "seed": 4,
             "finetune": {"preset": "video", "steps": 2}},
            {"id": "nopreset", "video": str(clip), "prompt": "x", "finetune": "nope"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    items = work_items(read_manifest(str(tmp_path / "m.jsonl")), str(tmp_path / "out"), JOB, "tiny",
                       cascade_config(str(tiny_dir)))
    store = str(tmp_path / "store")
    specs = pipeline_steps(cascade_config(str(tiny_dir)), str(tiny_dir), None, store, finetune=True)
    assert [s.name for s in specs][:3] == ["decode", "finetune", "base"]
    done = {(r["id"], r["prompt"]): r for r in run_in_process(items, specs)}
    green, red = done[("ft", "a green circle")], done[("ft", "a red square")]
    assert green["status"] == red["status"] == "ok" and green["artifact"] == red["artifact"] != ""
    stored = sorted(p.name for p in Path(store).iterdir())
    assert stored == [green["artifact"]], stored  # finetuned once for both prompts
    assert "unknown finetune preset 'nope'" in done[("nopreset", "x")]["error"]
    tuned, ft_cfg = load_finetuned(Cascade.from_pretrained(tiny_dir), red["artifact"], ArtifactStore(store))
    cfg = EditConfig(strength=0.95, seed=4, ssr_chunk_frames=CHUNK)
    edited = edit(read_video(clip), finetuned_prompt("a red square", ft_cfg), cfg, tuned)
    ref = write_video(tmp_path / "ref.mp4", edited)
    assert_same_edit(Path(red["output"]).read_bytes(), ref.read_bytes(), tmp_path)


def test_flag_and_manifest_errors_are_one_line(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "jobs"))
    from edit_batch import main

    from dreamix_ray.cluster.batch_cli import FlagError, parse_table

    assert parse_table("base=1,ssr=0.5", "--stage-cpus") == {"base": 1.0, "ssr": 0.5}
    assert parse_table("base=1:4,ssr=2", "--stage-actors", pair=True) == {"base": (1, 4), "ssr": (2, 2)}
    with pytest.raises(FlagError, match="--stage-cpus: cannot read 'base'"):
        parse_table("base", "--stage-cpus")
    assert main([str(tmp_path / "missing.jsonl"), "--output-prefix", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot read manifest") and "does not exist" in err and "\n" not in err
    assert main([str(tmp_path / "m.jsonl"), "--output-prefix", "o", "--stage-actors", "ssr=3:1"]) == 2
    assert "--stage-actors" in capsys.readouterr().err
    assert main([str(tmp_path / "m.jsonl"), "--output-prefix", "o", "--node-wait", "0"]) == 2
    assert "--node-wait must be > 0 seconds, got 0" in capsys.readouterr().err


def test_layout_is_fused_unless_stages_get_nodes_or_resources_of_their_own(tmp_path, capsys, tiny_dir):
    sys.path.insert(0, str(REPO / "jobs"))
    from edit_batch import main

    from dreamix_ray.cluster.batch import BatchError, BatchOptions, resolve_layout
    from dreamix_ray.cluster.io_steps import cascade_config

    config = cascade_config(str(tiny_dir))

    def layout(**kw):
        return resolve_layout(BatchOptions(manifest="m.jsonl", output_prefix="o", **kw), config)

    assert layout() == "fused" and layout(cpus={"decode": 1, "cascade": 2}, actors={"cascade": (2, 2)}) == "fused"
    assert layout(actors={"ssr": (2, 2)}) == "staged" and layout(pin_stages=True) == "staged"
    assert layout(layout="staged") == "staged"
    with pytest.raises(BatchError, match="--layout fused runs every stage in one step, so resources for ssr"):
        layout(layout="fused", gpus={"ssr": 1})
    with pytest.raises(BatchError, match="resources for 'cascade' apply to --layout fused"):
        layout(layout="staged", cpus={"cascade": 1})
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "video": "a.mp4", "prompt": "a red circle"}))
    assert main([str(tmp_path / "m.jsonl"), "--output-prefix", str(tmp_path / "out"), "--model", str(tiny_dir),
                 "--layout", "fused", "--pin-stages"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--layout fused runs every stage in one step, so --pin-stages cannot apply" in err and "\n" not in err


def _infra_docs(pattern: str) -> list[dict]:
    import yaml

    return [d for f in sorted((REPO / "infra").glob(pattern)) for d in yaml.safe_load_all(f.read_text()) if d]


def _check_stage_groups(cluster: dict, kinds=("base", "tsr", "ssr")) -> dict:
    """A KubeRay cluster spec gives each stage kind a GPU worker group marked stage_<kind> (--pin-stages), plus a
    CPU group; every pod mounts a memory-backed /dev/shm for the object store. Returns the groups by name."""
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert {*kinds, "cpu"} <= set(groups), groups.keys()
    for name, group in groups.items():
        pod = group["template"]["spec"]
        shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert shm and shm[0]["emptyDir"]["sizeLimit"]
        mounts = pod["containers"][0]["volumeMounts"]
        assert any(m["mountPath"] == "/dev/shm" and m["name"] == shm[0]["name"] for m in mounts)
        if name == "cpu":
            continue
        assert int(pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        resources = json.loads(group["rayStartParams"]["resources"])
        resources = json.loads(resources) if isinstance(resources, str) else resources  # KubeRay's quoting
        assert resources[f"stage_{name}"] >= 1
    return groups


def test_infra_manifests_parse_and_their_entrypoints_exist():
    for job in (d for d in _infra_docs("*.yaml") if d["kind"] == "RayJob"):  # every RayJob here, not only ours
        script = next(a for a in shlex.split(job["spec"]["entrypoint"]) if a.endswith(".py"))
        assert (REPO / script).is_file(), script
    batch = {d["kind"]: d["spec"] for d in _infra_docs("*-batch.yaml") if d["kind"] in ("RayJob", "RayCluster")}
    assert set(batch) == {"RayJob", "RayCluster"}
    assert "--pin-stages" in batch["RayJob"]["entrypoint"]
    for cluster in (batch["RayJob"]["rayClusterSpec"], batch["RayCluster"]):
        _check_stage_groups(cluster)
    dockerfile = (REPO / "infra" / "Dockerfile").read_text()
    assert "COPY --chown=ray:users jobs ./jobs" in dockerfile and "rayproject/ray:2.60.0" in dockerfile


def test_the_ltx_rayjob_gives_each_stage_of_an_ltx_cascade_a_gpu_group(tmp_path):
    """infra/rayjob-ltx.yaml: its entrypoint parses as `dreamix batch` flags (pinned stages, a GPU per stage), and
    an LTX cascade as `dreamix convert --tsr --ssr` writes it has exactly the stage kinds its worker groups serve."""
    import argparse

    from ltx_repo import tiny_ltx_cascade

    from dreamix_ray.cluster.batch_cli import add_arguments, options_from_args
    from dreamix_ray.cluster.pipeline import pipeline_steps
    from dreamix_ray.cluster.io_steps import cascade_config

    (job,) = [d["spec"] for d in _infra_docs("rayjob-ltx.yaml") if d["kind"] == "RayJob"]
    argv = shlex.split(job["entrypoint"])
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    opts = options_from_args(parser.parse_args(argv[argv.index("jobs/edit_batch.py") + 1:]))
    config = cascade_config(str(tiny_ltx_cascade(tmp_path, frames=9, tsr=True)))
    kinds = [s.kind for s in config.stages]
    assert kinds == ["base", "tsr", "ssr"] and opts.pin_stages and opts.gpus == {k: 1.0 for k in kinds}
    steps = [s.name for s in pipeline_steps(config, None, None, None, False)]  # with the latent base's degrade step
    assert steps == ["decode", "degrade", *kinds, "encode"] and set(steps) == set(opts.cpus) == set(opts.actors)
    assert opts.model.startswith("s3://") and opts.request.ssr_chunk_frames == 32
    groups = _check_stage_groups(job["rayClusterSpec"], kinds)
    for kind in kinds:  # bf16 weights: each stage actor holds the 13B transformer and T5 (edit-only workers)
        env = {e["name"]: e.get("value") for e in groups[kind]["template"]["spec"]["containers"][0]["env"]}
        assert env["DREAMIX_DTYPE"] == "bfloat16"

# ---------------------------------------------------------------- Ray Data on a real cluster


def crash_once_stage(marker: str):
    """A TSR stage whose process dies on its first batch, as an OOM kill would; it runs normally after."""
    from dreamix_ray.cluster.steps import CascadeStep

    class CrashOnce(CascadeStep):
        def __call__(self, batch):
            if not os.path.exists(marker):
                Path(marker).touch()
                os._exit(1)
            return super().__call__(batch)

    return CrashOnce


@pytest.fixture(scope="module")
def s3_job(s3_client, s3_server, tmp_path_factory):
    """Inputs on S3: 8 good rows (10 outputs), a missing object, a corrupt file, a bad strength."""
    tmp = tmp_path_factory.mktemp("batch")
    s3_client.create_bucket(Bucket="batch")
    rows = []
    for i in range(8):
        key = f"inputs/clip{i}.mp4"
        s3_client.upload_file(str(shapes_clip(tmp / f"clip{i}.mp4", seed=i)), "batch", key)
        prompts = ["a green circle", "a yellow square"] if i < 2 else ["a green circle"]
        rows.append({"id": f"good{i}", "video": f"s3://batch/{key}", "prompts": prompts, "seed": i, "team": "t"})
    s3_client.put_object(Bucket="batch", Key="inputs/corrupt.mp4", Body=b"\x00\x00\x00 not a video")
    rows += [{"id": "missing", "video": "s3://batch/inputs/nope.mp4", "prompt": "a red circle"},
             {"id": "corrupt", "video": "s3://batch/inputs/corrupt.mp4", "prompt": "a red circle"},
             {"id": "badstrength", "video": "s3://batch/inputs/clip0.mp4", "prompt": "x", "strength": 3}]
    s3_client.put_object(Bucket="batch", Key="manifest.jsonl", Body="\n".join(json.dumps(r) for r in rows).encode())
    return dict(tmp=tmp, manifest="s3://batch/manifest.jsonl", prefix="s3://batch/out")


def _options(s3_job, s3_server, tiny_dir, **kw):
    from dreamix_ray.cluster.batch import BatchOptions

    return BatchOptions(**{**dict(manifest=s3_job["manifest"], output_prefix=s3_job["prefix"], model=str(tiny_dir),
                                  s3=s3_server[1], request=JOB, cpus=TEST_CPUS, actors=TEST_ACTORS, batch_size=2,
                                  progress=False), **kw})


@pytest.fixture(scope="module")
def first_run(ray_driver, s3_job, s3_server, tiny_dir):
    from dreamix_ray.cluster.batch import run_batch
    from dreamix_ray.manifest import read_results

    marker = str(s3_job["tmp"] / "crashed")
    # A small Ray Data memory budget: reading may run only a little ahead of the model stages.
    summary = run_batch(_options(s3_job, s3_server, tiny_dir, object_store_mb=0.05, run_id="first"),
                        stage_classes={"tsr": crash_once_stage(marker)})
    table = read_results(s3_job["prefix"], s3_server[1], run_id="first").to_pylist()
    return dict(summary=summary, rows={(r["id"], r["prompt"]): r for r in table}, marker=marker)


@pytest.mark.slow
def test_good_rows_are_edited_and_bad_rows_recorded(first_run, s3_client):
    summary, rows = first_run["summary"], first_run["rows"]
    assert (summary.total, summary.ok, summary.failed, summary.skipped) == (13, 10, 3, 0), summary.text()
    for (row_id, prompt), r in rows.items():
        if row_id.startswith("good"):
            assert r["status"] == "ok" and r["error"] == "" and r["team"] == "t" and r["t_base"] > 0
            for uri in (r["output"], r["preview"], r["preview"][:-4] + ".png"):
                bucket, key = uri[5:].split("/", 1)
                assert s3_client.head_object(Bucket=bucket, Key=key)["ContentLength"] > 0
    assert "s3://batch/inputs/nope.mp4 does not exist" in rows[("missing", "a red circle")]["error"]
    assert "not a video file" in rows[("corrupt", "a red circle")]["error"]
    assert "row 11 (id 'badstrength'), column 'strength'" in rows[("badstrength", "")]["error"]
    assert {r["status"] for k, r in rows.items() if not k[0].startswith("good")} == {"error"}


@pytest.mark.slow
def test_outputs_stream_before_all_inputs_are_read(first_run):
    ok = [r for r in first_run["rows"].values() if r["status"] == "ok"]
    first_upload = min(r["finished_at"] for r in ok)
    last_read = max(r["decoded_at"] for r in ok)
    assert first_upload < last_read, (first_upload, last_read)


@pytest.mark.slow
def test_a_crashed_actor_is_restarted_and_its_rows_retried(first_run):
    assert os.path.exists(first_run["marker"])  # the TSR actor did die once
    assert all(r["status"] == "ok" for k, r in first_run["rows"].items() if k[0].startswith("good"))


def _mean_abs_diff(a: bytes, b: bytes, tmp: Path) -> float:
    from dreamix_ray.video import read_video

    (tmp / "a.mp4").write_bytes(a)
    (tmp / "b.mp4").write_bytes(b)
    fa, fb = (read_video(tmp / n).frames.astype(float) for n in ("a.mp4", "b.mp4"))
    assert fa.shape == fb.shape
    return float(abs(fa - fb).mean())


def assert_same_edit(a: bytes, b: bytes, tmp: Path) -> None:
    """Byte-identical MP4s. (Earlier runs differed by a level or two now and then: that was x264's AVX-512
    mbtree kernel reading uninitialised memory, fixed in video.write_video; tests/test_determinism.py.)"""
    assert a == b


@pytest.mark.slow
def test_batched_pipeline_equals_single_process_edits(first_run, s3_job, s3_client, tiny_dir):
    """Ray actors (other processes, 1 thread each, rows batched 2 at a time) against edit() here (CI once
    saw P-frames differ by a few pixel levels: assert_same_edit). A deliberately wrong seed must fail
    that bound."""
    rows, tmp = first_run["rows"], s3_job["tmp"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the actors run
    try:
        for row_id, prompt, seed in [("good0", "a yellow square", 0), ("good5", "a green circle", 5)]:
            key = rows[(row_id, prompt)]["output"][len("s3://batch/"):]
            got = s3_client.get_object(Bucket="batch", Key=key)["Body"].read()
            ref = _reference_mp4(tmp, tmp / f"clip{seed}.mp4", prompt, seed, tiny_dir)
            assert_same_edit(got, ref, tmp)
        wrong_seed = _reference_mp4(tmp, tmp / "clip5.mp4", "a green circle", 6, tiny_dir)
        assert _mean_abs_diff(got, wrong_seed, tmp) > 3.0
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_rerun_skips_finished_rows_and_redoes_missing_ones(first_run, s3_job, s3_server, s3_client, tiny_dir):
    from dreamix_ray.cluster.batch import run_batch
    from dreamix_ray.manifest import read_results

    redo = first_run["rows"][("good3", "a green circle")]["output"]
    staged = s3_client.get_object(Bucket="batch", Key=redo[len("s3://batch/"):])["Body"].read()
    s3_client.delete_object(Bucket="batch", Key=redo[len("s3://batch/"):])
    # The rerun takes the default layout, fused (the first run was staged: per-stage resources): the same bytes.
    summary = run_batch(_options(s3_job, s3_server, tiny_dir, run_id="second", cpus=FUSED_CPUS, actors={}))
    assert (summary.ok, summary.failed, summary.skipped) == (1, 3, 9) and summary.layout == "fused", summary.text()
    rows = read_results(s3_job["prefix"], s3_server[1], run_id="second").to_pylist()
    done = [r for r in rows if r["status"] == "ok"]
    assert [r["output"] for r in done] == [redo]
    assert s3_client.get_object(Bucket="batch", Key=redo[len("s3://batch/"):])["Body"].read() == staged
    assert all(done[0][f"t_{stage}"] > 0 and done[0][f"{stage}_node"] for stage in ("base", "tsr", "ssr"))
    assert all(r["t_base"] == 0 for r in rows if r["status"] == "skipped")
    assert len(read_results(s3_job["prefix"], s3_server[1]).to_pylist()) == 26  # both runs are kept


@pytest.mark.slow
def test_ray_job_submit_runs_the_batch_job(ray_cluster, s3_job, s3_server, s3_client, tiny_dir):
    from dreamix_ray.manifest import read_results

    rows = [{"id": f"job{i}", "video": f"s3://batch/inputs/clip{i}.mp4", "prompt": "a blue circle", "seed": i}
            for i in range(2)]
    s3_client.put_object(Bucket="batch", Key="job.jsonl", Body="\n".join(json.dumps(r) for r in rows).encode())
    runtime_env = {"working_dir": str(REPO), "excludes": [".venv", ".git", "runs", "out", "tests", ".pytest_cache"]}
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_cluster[1], "--runtime-env-json",
           json.dumps(runtime_env), "--", "python", "jobs/edit_batch.py", "s3://batch/job.jsonl",
           "--output-prefix", "s3://batch/jobout", "--model", str(tiny_dir), "--endpoint-url", s3_server[0],
           "--ssr-chunk-frames", str(CHUNK), "--run-id", "job", "--quiet",
           "--stage-cpus", ",".join(f"{k}={v}" for k, v in FUSED_CPUS.items()),  # fused: 3 actors start, not 5
           "--stage-actors", "decode=1,cascade=1,encode=1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "(fused): 2 outputs: 2 done, 0 failed, 0 skipped" in done.stdout, done.stdout
    table = read_results("s3://batch/jobout", s3_server[1], run_id="job").to_pylist()
    assert sorted((r["id"], r["status"]) for r in table) == [("job0", "ok"), ("job1", "ok")]


@pytest.mark.slow
def test_error_rate_stops_the_job_and_missing_rows_are_reported_lost(ray_driver, tmp_path):
    """The driver loop on a real Ray dataset of finished rows (the stages are tested above)."""
    import ray

    from dreamix_ray.cluster.batch import LOST, BatchOptions, BatchSummary, _execute, _ResultsWriter
    from dreamix_ray.manifest import read_results

    items = [dict(key=f"{i}:0", row=i, id=f"r{i}", prompt="p", prompt_index=0, video="v", output="o", preview="pv",
                  finetune="", artifact="", cfg="{}", extra="{}", status="ok" if i % 2 else "error",
                  error="" if i % 2 else "bad input") for i in range(10)]
    opts = BatchOptions(manifest="m", output_prefix=str(tmp_path), max_error_rate=0.2, progress=False, flush_every=2)
    summary = BatchSummary("stop", len(items))
    ds = ray.data.from_items(items, override_num_blocks=10)
    _execute(ds, items, opts, summary, _ResultsWriter(opts, "stop", "m", None))
    assert summary.stopped.startswith("3 of 10 outputs failed, over --max-error-rate 0.2; first error: bad input")
    assert read_results(str(tmp_path), run_id="stop").num_rows == summary.ok + summary.failed < 10

    opts = BatchOptions(manifest="m", output_prefix=str(tmp_path), progress=False)
    summary = BatchSummary("lost", len(items))
    _execute(ray.data.from_items(items[:7]), items, opts, summary, _ResultsWriter(opts, "lost", "m", None))
    rows = read_results(str(tmp_path), run_id="lost").to_pylist()
    assert [r["error"] for r in rows if r["id"] in ("r7", "r8", "r9")] == [LOST] * 3 and not summary.stopped


@pytest.mark.slow
def test_a_step_that_gets_no_actor_stops_the_job_naming_it(ray_driver, s3_job, s3_server, tiny_dir, capsys):
    """Every step's actor pool starts at once (no pool waits for the one before it to be up), so a step that
    cannot get an actor is the watch's to catch. Encode at 4 CPUs on the test cluster's 4: it fits a node, but
    only once decode and cascade have finished every row and freed theirs, and --actor-start-timeout 3 is over
    by then: the job stops with a line naming a step that got no actor in time."""
    import re

    from dreamix_ray.cluster.batch import run_batch

    summary = run_batch(_options(s3_job, s3_server, tiny_dir, output_prefix="s3://batch/toosmall", run_id="small",
                                 cpus={"decode": 0.5, "cascade": 0.5, "encode": 4}, actors={},
                                 actor_start_timeout_s=3))
    assert "warning: one actor per stage needs 5 CPU (the cluster has 4)" in capsys.readouterr().err
    assert re.match(r"the (decode|cascade|encode) step has had no running actor for 3 s: the cluster \(CPU: 4",
                    summary.stopped or ""), summary.text()
    assert "lower --stage-cpus / --stage-gpus or add nodes" in summary.stopped
    assert summary.ok == 0
    # Stopped before any row came out, the job leaves no actor behind on the shared cluster (its executor is
    # shut down although Ray Data had not handed it out yet).
    import time

    import ray
    from ray._private import state

    def left() -> list:
        actors = state.actors(job_id=ray.JobID.from_hex(ray.get_runtime_context().get_job_id())).values()
        return [a["ActorClassName"] for a in actors if a["ActorClassName"].startswith("MapWorker")
                and a["State"] != "DEAD"]

    deadline = time.monotonic() + 20
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left()


@pytest.mark.slow
def test_a_wan_cascade_runs_the_same_pipeline(ray_driver, s3_client, s3_server, tmp_path):
    """The tiny Wan cascade (one flow-matching base, 5 frames of 32x32) through the same Ray Data steps, manifest
    and results on S3, its VAE encode in a degrade step of its own: each row equals the single-process edit
    byte for byte. (Wan finetune rows take the same
    Finetune step as above; the Serve test finetunes a Wan stage through its deployment.)"""
    from wan_repo import tiny_wan_cascade

    from dreamix_ray.cluster.batch import BatchOptions, run_batch
    from dreamix_ray.edit import edit
    from dreamix_ray.manifest import read_results
    from dreamix_ray.models.cascade import Cascade
    from dreamix_ray.video import read_video, write_video

    model = tiny_wan_cascade(tmp_path)
    clip = shapes_clip(tmp_path / "clip.mp4", seed=3)
    s3_client.create_bucket(Bucket="wan")
    s3_client.upload_file(str(clip), "wan", "clip.mp4")
    rows = [{"id": "plain", "video": "s3://wan/clip.mp4", "prompt": "a blue dog", "seed": 1, "strength": 0.6,
             "guidance": 3},
            {"id": "other", "video": "s3://wan/clip.mp4", "prompt": "a red cat", "seed": 2, "strength": 0.8}]
    s3_client.put_object(Bucket="wan", Key="m.jsonl", Body="\n".join(json.dumps(r) for r in rows).encode())
    cpus = {"decode": 0.25, "degrade": 0.25, "base": 0.5, "encode": 0.25}
    summary = run_batch(BatchOptions(manifest="s3://wan/m.jsonl", output_prefix="s3://wan/out", model=str(model),
                                     s3=s3_server[1], request=EditRequest(prompt=""), cpus=cpus,
                                     actors={k: (1, 1) for k in cpus}, batch_size=2, progress=False, run_id="wan"))
    assert (summary.ok, summary.failed) == (2, 0), summary.text()
    done = {r["id"]: r for r in read_results("s3://wan/out", s3_server[1], run_id="wan").to_pylist()}
    assert all(r["t_degrade"] > 0 for r in done.values())  # a latent base: its VAE encode is a step of its own

    def output(row_id: str) -> bytes:
        return s3_client.get_object(Bucket="wan", Key=done[row_id]["output"][len("s3://wan/"):])["Body"].read()

    cascade, video = Cascade.from_pretrained(model), read_video(clip)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the actors run
    try:
        plain = edit(video, "a blue dog", EditConfig(strength=0.6, seed=1, guidance_scale=3.0), cascade)
        assert_same_edit(output("plain"), write_video(tmp_path / "plain.mp4", plain).read_bytes(), tmp_path)
        # no guidance given: the cascade's (convert writes 5 for Wan), as the rule says
        other = edit(video, "a red cat", EditConfig(strength=0.8, seed=2, guidance_scale=5.0), cascade)
        assert_same_edit(output("other"), write_video(tmp_path / "other.mp4", other).read_bytes(), tmp_path)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_an_ltx_cascade_runs_the_same_pipeline(ray_driver, s3_client, s3_server, tmp_path):
    """The tiny LTX cascade (base 9 frames of 32x32 -> latent SSR to 64x64 in chunks of one latent frame with a halo)
    through the same Ray Data steps, manifest and results on S3, the base's latents passed to the SSR's actor in the
    rows (tests/test_ltx.py checks what they carry): each row equals the single-process edit byte for byte (a row
    without guidance takes the cascade's 3)."""
    from ltx_repo import tiny_ltx_cascade

    from dreamix_ray.cluster.batch import BatchOptions, run_batch
    from dreamix_ray.edit import edit
    from dreamix_ray.manifest import read_results
    from dreamix_ray.models.cascade import Cascade
    from dreamix_ray.request import resolve
    from dreamix_ray.video import read_video, write_video

    model = tiny_ltx_cascade(tmp_path, frames=9)
    clip = shapes_clip(tmp_path / "clip.mp4", seed=4)
    s3_client.create_bucket(Bucket="ltx")
    s3_client.upload_file(str(clip), "ltx", "clip.mp4")
    rows = [{"id": "plain", "video": "s3://ltx/clip.mp4", "prompt": "a blue dog", "seed": 1, "strength": 0.6},
            {"id": "guided", "video": "s3://ltx/clip.mp4", "prompt": "a red cat moving left", "seed": 2,
             "strength": 0.8, "guidance": 2, "negative_prompt": "blurry"}]
    s3_client.put_object(Bucket="ltx", Key="m.jsonl", Body="\n".join(json.dumps(r) for r in rows).encode())
    job = EditRequest(prompt="", ssr_chunk_frames=4)  # 4 pixel frames = 1 latent frame: the SSR runs 3 chunks
    cpus = {"decode": 0.25, "degrade": 0.25, "base": 0.5, "ssr": 0.5, "encode": 0.25}
    summary = run_batch(BatchOptions(manifest="s3://ltx/m.jsonl", output_prefix="s3://ltx/out", model=str(model),
                                     s3=s3_server[1], request=job, cpus=cpus, actors={k: (1, 1) for k in cpus},
                                     batch_size=2, progress=False, run_id="ltx"))
    assert (summary.ok, summary.failed) == (2, 0), summary.text()
    done = {r["id"]: r for r in read_results("s3://ltx/out", s3_server[1], run_id="ltx").to_pylist()}

    def output(row_id: str) -> bytes:
        return s3_client.get_object(Bucket="ltx", Key=done[row_id]["output"][len("s3://ltx/"):])["Body"].read()

    cascade, video = Cascade.from_pretrained(model), read_video(clip)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the actors run
    try:
        for row, guidance in zip(rows, (None, 2.0)):
            request = EditRequest(prompt=row["prompt"], strength=row["strength"], seed=row["seed"],
                                  guidance_scale=guidance, negative_prompt=row.get("negative_prompt", ""),
                                  ssr_chunk_frames=4)
            plan = resolve(request, cascade.config)
            assert len(plan.stages[-1].chunks) == 3 and plan.config.guidance_scale == (guidance or 3.0)
            expected = write_video(tmp_path / f"{row['id']}.mp4", edit(video, row["prompt"], plan, cascade))
            assert read_video(expected).frames.shape == (9, 64, 64, 3)
            assert_same_edit(output(row["id"]), expected.read_bytes(), tmp_path)
    finally:
        torch.set_num_threads(threads)
