"""Component references in cascade.json: local paths (relative to the cascade dir) or hf:// hub repos.

`hf://owner/name[@revision]/subfolder` follows huggingface_hub's HfFileSystem spelling; a revision
holding slashes (`refs/pr/15`) is URL-quoted. Hub references are fetched into the Hugging Face cache
on first use and need network access (HF_HUB_OFFLINE=0); tests and offline machines use local dirs.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote, unquote

from huggingface_hub import snapshot_download

from ..errors import UserError

HF_PREFIX = "hf://"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ComponentRefError(UserError):
    """A component reference cannot be resolved; the message says where it looked and what to do."""


def is_hub_id(source: str) -> bool:
    """`owner/name` (optionally `@revision`) that is not an existing local path."""
    repo = source.split("@", 1)[0]
    return bool(_REPO_ID.match(repo)) and not Path(source).exists()


def hf_ref(repo_id: str, subfolder: str = "", revision: str | None = None) -> str:
    rev = f"@{quote(revision, safe='')}" if revision else ""
    return f"{HF_PREFIX}{repo_id}{rev}" + (f"/{subfolder}" if subfolder else "")


def parse_hf_ref(ref: str) -> tuple[str, str | None, str]:
    """hf://owner/name[@rev]/sub/folder -> (repo id, revision, subfolder)."""
    parts = ref[len(HF_PREFIX):].split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ComponentRefError(f"{ref!r} is not a hub reference: write hf://owner/name[@revision]/subfolder")
    name, _, rev = parts[1].partition("@")
    return f"{parts[0]}/{name}", unquote(rev) if rev else None, "/".join(parts[2:])


def resolve_ref(ref: str, root: Path | None = None) -> Path:
    """A local directory for `ref`: hub refs are downloaded (cached), relative paths join `root`."""
    if ref.startswith(HF_PREFIX):
        repo_id, revision, subfolder = parse_hf_ref(ref)
        return fetch_from_hub(repo_id, revision, [f"{subfolder}/*"] if subfolder else None) / subfolder
    path = Path(ref).expanduser()
    return path if path.is_absolute() or root is None else Path(root) / path


def fetch_from_hub(repo_id: str, revision: str | None = None, patterns: list[str] | None = None) -> Path:
    """Download (or find in the cache) the files of a hub repository matching `patterns` (None: all)."""
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # offline mode, no network, unknown repo or revision: one clear line
        raise ComponentRefError(
            f"cannot fetch {repo_id}{'@' + revision if revision else ''} from the Hugging Face hub "
            f"({type(exc).__name__}); with internet set HF_HUB_OFFLINE=0, otherwise download it elsewhere "
            f"(`hf download {repo_id} --local-dir DIR`) and use DIR") from None
