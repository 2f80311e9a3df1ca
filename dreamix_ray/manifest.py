"""Batch manifests in (JSONL / CSV / Parquet, local or s3://) and results Parquet out, on pyarrow."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import posixpath
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from .config import EDIT_TYPES, CascadeConfig, ConfigError, EditConfig, validate_strength
from .errors import UserError
from .request import EditRequest, resolve
from .storage import S3Settings, StorageError, filesystem, join, read_bytes, write_bytes

KNOWN_COLUMNS = ("id", "video", "prompts", "prompt", "strength", "seed", "finetune", "steps", "output", "edit_type",
                 "guidance", "negative_prompt")
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet",
           ".pq": "parquet"}
STATUSES = ("ok", "error", "skipped")


class ManifestError(UserError):
    """A manifest cannot be used; the message names the file, row and column and what to do."""


class _RowError(Exception):
    def __init__(self, column: str, message: str):
        super().__init__(message)
        self.column = column


@dataclass(frozen=True)
class ManifestRow:
    """One validated manifest row; `error` is set (and the rest partly empty) when it failed validation."""

    row: int  # 1-based data row (JSONL: non-blank line) in the manifest
    id: str
    video: str = ""
    prompts: tuple[str, ...] = ()
    strength: float | None = None  # None: the job's default
    seed: int = 0
    finetune: str | None = None  # a preset name, or FinetuneConfig fields as a JSON object
    steps: tuple[int, ...] = ()  # int in the manifest = every stage; a list = one per stage
    output: str | None = None
    extra: dict = field(default_factory=dict)
    error: str | None = None
    edit_type: str | None = None  # motion | style | object | background: the tuned strength, motion from the input
    guidance: float | None = None  # classifier-free guidance; None: the job's, else the cascade's
    negative_prompt: str | None = None  # guidance's unconditional text; None: the job's


def manifest_format(uri: str) -> str:
    for suffix, fmt in FORMATS.items():
        if str(uri).lower().endswith(suffix):
            return fmt
    raise ManifestError(f"{uri}: unknown manifest format; name it .jsonl, .csv or .parquet")


def _raw_rows(uri: str, s3: S3Settings | None) -> list[dict | str]:
    """The manifest's rows as dicts (a JSONL line that is not an object comes back as its error text)."""
    fmt = manifest_format(uri)
    try:
        data = read_bytes(uri, s3)
    except StorageError as exc:
        raise ManifestError(f"cannot read manifest: {exc}") from None
    try:
        if fmt == "parquet":
            return pq.read_table(pa.BufferReader(data)).to_pylist()
        if fmt == "csv":
            return pacsv.read_csv(pa.BufferReader(data)).to_pylist()
    except pa.ArrowException as exc:
        raise ManifestError(f"{uri} is not a readable {fmt.upper()} file: {exc}") from None
    text = data.decode("utf-8", errors="replace")
    if text.lstrip().startswith("["):  # a .json file holding one array of row objects
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{uri} is not valid JSON: {exc}") from None
        return [r if isinstance(r, dict) else f"not a JSON object: {r!r:.60}" for r in rows]
    out: list[dict | str] = []
    for line in filter(str.strip, text.splitlines()):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            obj = f"not valid JSON ({exc.msg}): {line.strip()[:60]!r}"
        out.append(obj if isinstance(obj, (dict, str)) else f"not a JSON object: {line.strip()[:60]!r}")
    return out


def _null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and not value.strip())


def _text(value: Any, column: str, required: bool = False) -> str | None:
    if _null(value):
        if required:
            raise _RowError(column, "is empty; every row needs one")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _RowError(column, f"must be a string, got {value!r:.60}")
    return str(value).strip()


def _int(value: Any, column: str) -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _RowError(column, f"must be an integer, got {value!r:.60}")
    return value


def _float(value: Any, column: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _RowError(column, f"must be a number, got {value!r:.60}") from None
    if isinstance(value, bool) or math.isnan(number):
        raise _RowError(column, f"must be a number, got {value!r:.60}")
    return number


def _prompts(raw: dict) -> tuple[str, ...]:
    many, one = raw.get("prompts"), raw.get("prompt")
    if not _null(many) and not _null(one):
        raise _RowError("prompts", "and 'prompt' are both set; give one prompt or a list of prompts, not both")
    if _null(many):
        prompt = _text(one, "prompt")
        if prompt is None:
            raise _RowError("prompt", "is empty; give 'prompt' (a string) or 'prompts' (a list of strings)")
        return (prompt,)
    if isinstance(many, str):  # CSV cells hold the list as JSON text
        try:
            many = json.loads(many)
        except json.JSONDecodeError:
            raise _RowError("prompts", f'must be a list of strings (in CSV a JSON list, e.g. ["a", "b"]), '
                                       f"got {many!r:.60}") from None
    if not isinstance(many, (list, tuple)) or not many or not all(isinstance(p, str) and p.strip() for p in many):
        raise _RowError("prompts", f"must be a non-empty list of non-empty strings, got {many!r:.60}")
    return tuple(p.strip() for p in many)


def _steps(value: Any) -> tuple[int, ...]:
    if _null(value):
        return ()
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _RowError("steps", f"must be an integer or a list of integers, got {value!r:.60}") from None
    steps = tuple(_int(v, "steps") for v in value) if isinstance(value, (list, tuple)) else (_int(value, "steps"),)
    if not steps or min(steps) < 1:
        raise _RowError("steps", f"must all be >= 1, got {list(steps)}")
    return steps


def _finetune(value: Any) -> str | None:
    """A preset name, or a JSON object of FinetuneConfig fields ({"preset": "video", "steps": 32}), as text."""
    if _null(value):
        return None
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _RowError("finetune", f"is neither a preset name nor a JSON object: {value!r:.60}") from None
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return _text(value, "finetune")


def _validate(index: int, raw: dict) -> ManifestRow:
    row_id = _text(raw.get("id"), "id", required=True)
    video = _text(raw.get("video"), "video", required=True)
    prompts = _prompts(raw)
    strength = None
    if not _null(raw.get("strength")):
        try:
            strength = validate_strength(raw["strength"])
        except ConfigError as exc:
            raise _RowError("strength", str(exc)) from None
    seed = 0 if _null(raw.get("seed")) else _int(raw["seed"], "seed")
    if not 0 <= seed < 2**63:
        raise _RowError("seed", f"must be in [0, 2**63), got {seed}")
    output = _text(raw.get("output"), "output")
    if output is not None and not output.lower().endswith(".mp4"):
        raise _RowError("output", f"must be an .mp4 URI, got {output!r:.80}")
    edit_type = _text(raw.get("edit_type"), "edit_type")
    guidance = None if _null(raw.get("guidance")) else _float(raw["guidance"], "guidance")
    if guidance is not None and not guidance >= 1.0:
        raise _RowError("guidance", f"must be >= 1 (1 = off), got {guidance!r}")
    if edit_type is not None and edit_type not in EDIT_TYPES:
        raise _RowError("edit_type", f"must be one of {', '.join(EDIT_TYPES)} (or empty), got {edit_type!r:.40}")
    extra = {k: v for k, v in raw.items() if k not in KNOWN_COLUMNS}
    return ManifestRow(index, row_id, video, prompts, strength, seed, _finetune(raw.get("finetune")),
                       _steps(raw.get("steps")), output, extra, edit_type=edit_type, guidance=guidance,
                       negative_prompt=_text(raw.get("negative_prompt"), "negative_prompt"))


def read_manifest(uri: str, s3: S3Settings | None = None, on_error: str = "raise") -> list[ManifestRow]:
    """Validated rows of a JSONL / CSV / Parquet manifest; on_error='keep' returns bad rows with `error` set."""
    raws = _raw_rows(str(uri), s3)
    if not raws:
        raise ManifestError(f"{uri} has no rows; give one row per video (columns id, video, prompt or prompts)")
    columns = set().union(*(r.keys() for r in raws if isinstance(r, dict)))
    missing = [c for c in ("id", "video") if c not in columns]
    if missing or not columns & {"prompt", "prompts"}:
        need = missing + ([] if columns & {"prompt", "prompts"} else ["prompt or prompts"])
        raise ManifestError(f"{uri} has no column {', '.join(repr(c) for c in need)}; "
                            f"it has {sorted(columns)} (needed: id, video, prompt or prompts)")
    rows, seen = [], {}
    for index, raw in enumerate(raws, start=1):
        row_id = str(raw.get("id")) if isinstance(raw, dict) and not _null(raw.get("id")) else ""
        where = f"{uri} row {index}" + (f" (id {row_id!r})" if row_id else "")
        try:
            if isinstance(raw, str):
                raise _RowError("", raw)
            row = _validate(index, raw)
            if row.id in seen:
                raise _RowError("id", f"{row.id!r} repeats row {seen[row.id]}; ids must be unique")
            seen[row.id] = index
            rows.append(row)
        except _RowError as exc:
            message = f"{where}, column {exc.column!r}: {exc}" if exc.column else f"{where}: {exc}"
            if on_error == "raise":
                raise ManifestError(message) from None
            rows.append(ManifestRow(index, row_id, error=message))
    return rows


# ---------------------------------------------------------------- work items and output keys


def _safe(text: str, limit: int) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:limit] or "x"


def output_uris(prefix: str, row: ManifestRow, index: int, prompt: str, cfg: EditConfig,
                model_tag: str) -> tuple[str, str]:
    """(video, preview) URIs: a pure function of the row's edit, so a rerun finds what is done."""
    if row.output:
        stem = row.output[:-4] if len(row.prompts) == 1 else f"{row.output[:-4]}-{index}"
    else:
        params = json.dumps([row.id, prompt, cfg.to_dict(), row.finetune, model_tag], sort_keys=True)
        digest = hashlib.sha256(params.encode()).hexdigest()[:10]
        # The id's own hash keeps ids that differ only in unsafe characters apart.
        folder = f"{_safe(row.id, 48)}-{hashlib.sha256(row.id.encode()).hexdigest()[:6]}"
        stem = join(prefix, "videos", folder, f"{index:02d}-{_safe(prompt, 40)}-{digest}")
    return f"{stem}.mp4", f"{stem}.preview.mp4"


def finetune_name(spec: str | None) -> str | None:
    """The finetuning preset a row's `finetune` value names (a JSON object's "preset", default mixed)."""
    if not spec:
        return None
    return str(json.loads(spec).get("preset", "mixed")) if spec.startswith("{") else spec


def row_request(row: ManifestRow, job: EditRequest) -> EditRequest:
    """The row's request: the job's defaults (flags) with the row's own strength, seed, steps, edit type and
    finetuning; the prompt is not part of the plan, so one request serves all of a row's prompts."""
    return dataclasses.replace(job, strength=row.strength if row.strength is not None else job.strength,
                               seed=row.seed, steps=row.steps or job.steps, edit_type=row.edit_type,
                               guidance_scale=row.guidance if row.guidance is not None else job.guidance_scale,
                               negative_prompt=row.negative_prompt if row.negative_prompt is not None
                               else job.negative_prompt,
                               finetune=finetune_name(row.finetune))


def work_items(rows: Iterable[ManifestRow], prefix: str, job: EditRequest, model_tag: str,
               cascade: CascadeConfig) -> list[dict]:
    """One item per (row, prompt): what the pipeline carries, all plain columns (no tensors yet)."""
    items = []
    for row in rows:
        common = dict(row=row.row, id=row.id, video=row.video, finetune=row.finetune or "",
                      edit_type=row.edit_type or "", extra=json.dumps(row.extra, default=str, sort_keys=True),
                      artifact="")
        try:
            cfg = None if row.error else resolve(row_request(row, job), cascade).config
        except ConfigError as exc:  # e.g. more steps than stages: this row fails, the others run
            row = dataclasses.replace(row, error=f"row {row.row} (id {row.id!r}): {exc}")
        if row.error:
            items.append(dict(common, key=f"{row.row}:0", prompt="", prompt_index=0, cfg="{}", output="",
                              preview="", status="error", error=row.error))
            continue
        for index, prompt in enumerate(row.prompts):
            video_uri, preview_uri = output_uris(prefix, row, index, prompt, cfg, model_tag)
            items.append(dict(common, key=f"{row.row}:{index}", prompt=prompt, prompt_index=index,
                              cfg=json.dumps(cfg.to_dict()), output=video_uri, preview=preview_uri,
                              status="pending", error=""))
    return items


# ---------------------------------------------------------------- results


def results_dir(prefix: str) -> str:
    return join(prefix, "results")


def _when(seconds: float | None) -> datetime | None:
    ok = seconds is not None and not (isinstance(seconds, float) and math.isnan(seconds))
    return datetime.fromtimestamp(float(seconds), tz=timezone.utc) if ok else None


PLACED = ("_node", "_ip", "_device", "_gpus")


def results_table(records: list[dict]) -> pa.Table:
    """Result records -> a table: known columns first, the manifest's own columns kept after them."""
    out = []
    for rec in records:
        cfg = json.loads(rec.get("cfg") or "{}")
        extra = json.loads(rec.get("extra") or "{}")
        base = {k: rec.get(k) for k in ("run", "row", "id", "prompt", "prompt_index", "video", "output", "preview",
                                        "status", "error", "finetune", "edit_type", "artifact", "model")}
        base.update(strength=cfg.get("strength"), seed=cfg.get("seed"), steps=list(cfg.get("steps") or []),
                    decoded_at=_when(rec.get("decoded_at")), finished_at=_when(rec.get("finished_at")))
        base.update({k: float(v) for k, v in sorted(rec.items()) if k.startswith("t_")})
        # where and when each cascade stage ran the row (cluster.steps.placement_columns)
        base.update({k: v for k, v in rec.items() if k.endswith(PLACED)})
        base.update({k: _when(v) for k, v in rec.items() if k.endswith(("_started_at", "_ended_at"))})
        base.update({k: v for k, v in extra.items() if k not in base})
        out.append(base)
    return pa.Table.from_pylist(out)


def write_results(prefix: str, run_id: str, part: int, records: list[dict], s3: S3Settings | None = None) -> str:
    """One whole Parquet file per part, so a crash leaves only complete files behind."""
    uri = join(results_dir(prefix), f"run={run_id}", f"part-{part:05d}.parquet")
    sink = io.BytesIO()
    pq.write_table(results_table(records), sink)
    write_bytes(uri, sink.getvalue(), s3)
    return uri


def read_results(prefix: str, s3: S3Settings | None = None, run_id: str | None = None) -> pa.Table:
    """Every results row under `prefix` (or of one run), oldest run first; empty table if none."""
    fs, root = filesystem(results_dir(prefix), s3)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    tables = []
    for path in files:
        run = posixpath.basename(posixpath.dirname(path)).removeprefix("run=")
        if run_id is None or run == run_id:
            with fs.open_input_file(path) as f:
                tables.append(pq.read_table(f))
    if not tables:
        return pa.table({"id": pa.array([], pa.string()), "status": pa.array([], pa.string())})
    return pa.concat_tables(tables, promote_options="permissive")
