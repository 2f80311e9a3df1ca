"""Storage, manifests and results on a local disk and on a real S3 server (moto) over HTTP."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dreamix_ray.errors import UserError
from dreamix_ray.manifest import ManifestError, read_manifest, read_results, work_items, write_results
from dreamix_ray.request import EditRequest
from dreamix_ray.storage import S3Settings, StorageError, exists, filesystem, read_bytes, write_bytes

pytest_plugins = ["conftest_batch"]

ROWS = [
    {"id": "a", "video": "s3://in/a.mp4", "prompts": ["a red circle", "a blue square"], "seed": 3, "team": "x"},
    {"id": "b", "video": "s3://in/b.mp4", "prompt": "a green circle", "strength": 0.5, "steps": 4, "team": "y"},
    {"id": 7, "video": "s3://in/c.mp4", "prompt": "a circle", "finetune": "mixed", "output": "s3://out/c.mp4"},
]


def _jsonl(rows) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


def _csv(rows) -> bytes:
    """CSV as pyarrow writes it; a list of prompts is a JSON cell."""
    import pyarrow.csv as pacsv

    cols = ["id", "video", "prompts", "prompt", "strength", "seed", "steps", "finetune", "output", "team"]

    def cell(r, c):
        return json.dumps(r[c]) if c == "prompts" and c in r else (str(r[c]) if c in r else None)

    sink = io.BytesIO()
    pacsv.write_csv(pa.table({c: pa.array([cell(r, c) for r in rows], pa.string()) for c in cols}), sink)
    return sink.getvalue()


def _parquet(rows) -> bytes:
    sink = io.BytesIO()
    cols = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist would take the first row's keys only
    pq.write_table(pa.Table.from_pylist([{c: (str(r[c]) if c == "id" else r.get(c)) for c in cols} for r in rows]),
                   sink)
    return sink.getvalue()


@pytest.fixture(scope="module")
def bucket(s3_client):
    s3_client.create_bucket(Bucket="manifests")
    return "manifests"


@pytest.mark.parametrize("fmt,encode", [("jsonl", _jsonl), ("csv", _csv), ("parquet", _parquet)])
def test_manifest_formats_local_and_s3(tmp_path, s3_server, bucket, fmt, encode):
    local = tmp_path / f"m.{fmt}"
    local.write_bytes(encode(ROWS))
    write_bytes(f"s3://{bucket}/m.{fmt}", encode(ROWS), s3_server[1])
    for uri, s3 in ((str(local), None), (f"s3://{bucket}/m.{fmt}", s3_server[1])):
        rows = read_manifest(uri, s3)
        assert [r.id for r in rows] == ["a", "b", "7"]
        assert rows[0].prompts == ("a red circle", "a blue square") and rows[0].seed == 3
        assert rows[1].prompts == ("a green circle",) and rows[1].strength == 0.5 and rows[1].steps == (4,)
        assert rows[2].finetune == "mixed" and rows[2].output == "s3://out/c.mp4"
        assert rows[0].extra["team"] == "x"  # unknown columns are kept


@pytest.mark.parametrize("row,column,words", [
    ({"id": "a", "video": "v.mp4", "prompt": "p", "strength": 1.5}, "strength", "in [0, 1]"),
    ({"id": "a", "video": "v.mp4", "prompt": "p", "seed": "abc"}, "seed", "integer"),
    ({"id": "a", "video": "", "prompt": "p"}, "video", "empty"),
    ({"id": "a", "video": "v.mp4", "prompts": []}, "prompts", "non-empty list"),
    ({"id": "a", "video": "v.mp4", "prompt": "p", "prompts": ["q"]}, "prompts", "not both"),
    ({"id": "a", "video": "v.mp4", "prompt": "p", "steps": 0}, "steps", ">= 1"),
    ({"id": "a", "video": "v.mp4", "prompt": "p", "output": "s3://b/x.gif"}, "output", ".mp4"),
    ({"id": "a", "video": "v.mp4", "prompt": "p", "edit_type": "color"}, "edit_type", "one of motion, style"),
])
def test_row_errors_name_row_and_column(tmp_path, row, column, words):
    path = tmp_path / "m.jsonl"
    path.write_bytes(_jsonl([{"id": "ok", "video": "v.mp4", "prompt": "p"}, row]))
    with pytest.raises(ManifestError) as err:
        read_manifest(str(path))
    assert isinstance(err.value, UserError)
    assert f"row 2 (id 'a'), column '{column}'" in str(err.value) and words in str(err.value)
    kept = read_manifest(str(path), on_error="keep")
    assert kept[0].error is None and kept[1].error == str(err.value)


def test_manifest_level_errors(tmp_path):
    (tmp_path / "nocol.jsonl").write_bytes(_jsonl([{"id": "a", "prompt": "p"}]))
    with pytest.raises(ManifestError, match="no column 'video'"):
        read_manifest(str(tmp_path / "nocol.jsonl"))
    (tmp_path / "dup.jsonl").write_bytes(_jsonl([{"id": "a", "video": "v", "prompt": "p"}] * 2))
    with pytest.raises(ManifestError, match=r"row 2 \(id 'a'\), column 'id': 'a' repeats row 1"):
        read_manifest(str(tmp_path / "dup.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "video": "v", "prompt": "p"}\n{oops\n')
    assert "not valid JSON" in read_manifest(str(tmp_path / "bad.jsonl"), on_error="keep")[1].error
    with pytest.raises(ManifestError, match="unknown manifest format"):
        read_manifest(str(tmp_path / "m.txt"))
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(str(tmp_path / "missing.csv"))


def test_output_keys_are_idempotent_and_follow_the_edit(tiny):
    rows, job, config = read_manifest_from(ROWS), EditRequest(prompt=""), tiny.config
    one = work_items(rows, "s3://out/run", job, "tiny-1", config)
    again = work_items(rows, "s3://out/run", job, "tiny-1", config)
    assert [i["output"] for i in one] == [i["output"] for i in again]
    assert len({i["output"] for i in one}) == 4 and one[3]["output"] == "s3://out/c.mp4"
    other_model = work_items(rows, "s3://out/run", job, "tiny-2", config)
    other_strength = work_items(rows, "s3://out/run", EditRequest(prompt="", strength=0.4), "tiny-1", config)
    assert one[0]["output"] != other_model[0]["output"] != other_strength[0]["output"]
    assert json.loads(one[3]["cfg"])["strength"] == 0.95  # finetuned rows default to the paper's s
    flag = work_items(rows, "s3://out/run", EditRequest(prompt="", strength=0.6), "tiny-1", config)
    assert [json.loads(i["cfg"])["strength"] for i in flag] == [0.6, 0.6, 0.5, 0.6]  # a row's own s wins


def test_edit_type_rows_take_the_cascades_tuned_strength_and_motion_moves_the_input(tiny):
    import dataclasses

    tuned = dataclasses.replace(tiny.config, edit_strengths={"none": {"motion": 1.0, "style": 0.8},
                                                             "mixed": {"motion": 0.9}})
    rows = read_manifest_from([
        {"id": "m", "video": "v.mp4", "prompt": "p", "edit_type": "motion"},
        {"id": "s", "video": "v.mp4", "prompt": "p", "edit_type": "style"},
        {"id": "own", "video": "v.mp4", "prompt": "p", "edit_type": "motion", "strength": 0.3},
        {"id": "ft", "video": "v.mp4", "prompt": "p", "edit_type": "motion", "finetune": "mixed"},
        {"id": "untuned", "video": "v.mp4", "prompt": "p", "edit_type": "object"},
        {"id": "plain", "video": "v.mp4", "prompt": "p"}])
    cfgs = [json.loads(i["cfg"]) for i in work_items(rows, "s3://out/run", EditRequest(prompt=""), "t", tuned)]
    assert [c["strength"] for c in cfgs] == [1.0, 0.8, 0.3, 0.9, 0.7, 0.7]
    assert [c["motion_from_input"] for c in cfgs] == [True, False, True, True, False, False]


def read_manifest_from(rows):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "m.jsonl").write_bytes(_jsonl(rows))
        return read_manifest(str(Path(tmp, "m.jsonl")))


def test_results_round_trip_on_s3(s3_server, s3_client):
    s3_client.create_bucket(Bucket="results")
    prefix = "s3://results/job"
    base = dict(row=1, id="a", prompt="p", prompt_index=0, video="v", output="o", preview="pv", finetune="",
                artifact="", model="m", cfg=json.dumps({"strength": 0.7, "seed": 1, "steps": []}),
                extra=json.dumps({"team": "x"}), decoded_at=1.0e9, finished_at=1.0e9 + 5)
    write_results(prefix, "r1", 0, [dict(base, run="r1", status="ok", error="", t_base=1.5)], s3_server[1])
    write_results(prefix, "r2", 0, [dict(base, run="r2", status="skipped", error="")], s3_server[1])
    table = read_results(prefix, s3_server[1])
    assert table.column("status").to_pylist() == ["ok", "skipped"]
    assert table.column("t_base").to_pylist() == [1.5, None]  # parts with other columns still concatenate
    assert table.column("team").to_pylist() == ["x", "x"]
    assert read_results(prefix, s3_server[1], run_id="r2").num_rows == 1
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket="results")["Contents"]]
    assert "job/results/run=r1/part-00000.parquet" in keys  # written with pyarrow, listed by boto3


def test_s3_bytes_with_pyarrow_and_boto3(s3_server, s3_client):
    s3_client.create_bucket(Bucket="bytes")
    write_bytes("s3://bytes/a/b.bin", b"hello", s3_server[1])
    assert s3_client.get_object(Bucket="bytes", Key="a/b.bin")["Body"].read() == b"hello"
    s3_client.put_object(Bucket="bytes", Key="c.bin", Body=b"world")
    assert read_bytes("s3://bytes/c.bin", s3_server[1]) == b"world"
    assert exists("s3://bytes/c.bin", s3_server[1]) and not exists("s3://bytes/nope", s3_server[1])
    with pytest.raises(StorageError, match="does not exist"):
        read_bytes("s3://bytes/nope.bin", s3_server[1])


def test_s3_settings_fall_back_to_aws_environment(monkeypatch, s3_server, s3_client):
    s3_client.create_bucket(Bucket="envs")
    s3_client.put_object(Bucket="envs", Key="c.bin", Body=b"world")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server[0])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    resolved = S3Settings().resolved()
    assert resolved.endpoint_url == s3_server[0] and resolved.region == "us-east-1"
    fs, path = filesystem("s3://envs/c.bin")
    assert path == "envs/c.bin" and read_bytes("s3://envs/c.bin") == b"world"
