"""A Hugging Face Hub cache laid out on disk, so tests exercise the `from_pretrained("org/name")` path offline.

The layout is huggingface_hub's: <cache>/models--org--name/{blobs/<sha256>, snapshots/<commit>/<path>, refs/<ref>};
snapshot files are symlinks into blobs/, as huggingface_hub writes them.
"""

import hashlib
import os
import shutil
from pathlib import Path


def add_repo_to_cache(cache_dir, repo_id, folder, commit=None, ref="main"):
    """Copies every file under `folder` into the cache as `repo_id` at `commit` (default: a hash of the files).

    Returns the commit hash. Point HF_HUB_CACHE at `cache_dir` and set HF_HUB_OFFLINE=1 to load from it.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    if commit is None:
        digest = hashlib.sha1()
        for path in files:
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
        commit = digest.hexdigest()
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    blobs, snapshot = repo_dir / "blobs", repo_dir / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    for path in files:
        data = path.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        target = snapshot / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        os.symlink(os.path.relpath(blob, target.parent), target)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    return commit


def remove_repo_from_cache(cache_dir, repo_id):
    shutil.rmtree(Path(cache_dir) / ("models--" + repo_id.replace("/", "--")), ignore_errors=True)
