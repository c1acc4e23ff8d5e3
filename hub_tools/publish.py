"""Publishing to the Hub: uploading a converted folder (`upload_to_hub.py push`) and bringing existing repos to this
checkout's code (`upload_to_hub.py update-code`). Both authenticate as huggingface_hub is configured."""

import fnmatch
import json
import sys
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

from .files import (
    AUTO_MAP,
    CODE_FILES,
    GENERATION_CONFIG_FILE,
    KERNEL_FOLDERS,
    LEGACY_TOKENIZER_CODE_FILES,
    MODEL_CARD_FILE,
    MODEL_CODE_FILES,
    REPO,
    TOKENIZER_CODE_FILES,
    TOKENIZER_FILES,
    WEIGHT_PATTERNS,
    WEIGHTS_INDEX_FILE,
    WORLD_VOCAB_FILE,
    first_few,
    weight_files,
)


def model_folder_files(folder) -> list:
    """The files of a model folder that `push` uploads: config.json, the weights its index names (or
    model.safetensors), generation_config.json, the tokenizer and code files of this package, README.md.

    An allow-list: caches, notes, .git, tokens or stray weights in the folder are never uploaded.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; create the folder with `convert`")
    weights = sorted(set(weight_files(folder).values()))
    if (folder / WEIGHTS_INDEX_FILE).is_file():
        weights.insert(0, WEIGHTS_INDEX_FILE)
    missing = [name for name in (*weights, *MODEL_CODE_FILES) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is incomplete, it has no {first_few(missing)}; re-run `convert`")
    optional = (GENERATION_CONFIG_FILE, *TOKENIZER_FILES, *TOKENIZER_CODE_FILES, MODEL_CARD_FILE)
    return ["config.json", *weights, *MODEL_CODE_FILES, *(name for name in optional if (folder / name).is_file())]


def plan_push(folder, remote_files) -> list:
    """Commit operations that make a repo holding `remote_files` serve the model of `folder`: every allow-listed
    file, and the deletion of weight files of an earlier upload that the new weights do not include."""
    folder = Path(folder)
    files = model_folder_files(folder)
    stale = sorted(
        name
        for name in remote_files
        if "/" not in name and any(fnmatch.fnmatch(name, p) for p in WEIGHT_PATTERNS) and name not in files
    )
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    return operations + [CommitOperationDelete(path_in_repo=name) for name in stale]


def plan_update(folder) -> list:
    """Commit operations that bring a repo, given as a local snapshot of its non-weight files, to this checkout's
    code. Pure: reads `folder`, writes nothing. Empty when the repo is up to date.

    - the model code (configuration_rwkv7.py, modeling_rwkv7.py, rwkv7_kernels/*.py) becomes this checkout's, which
      also replaces the fla shims of older uploads (a modeling_rwkv7.py that imports `fla`);
    - config.json gets this package's auto_map (and architectures when it has none); every other key stays, as
      the configuration reads fla's keys as they are. Weights are not touched: packed `attn.x_x` tensors of older
      uploads are unpacked by the model at load time;
    - World-tokenizer repos (those with rwkv_vocab_v20230424.txt) get this package's tokenizer: its code,
      tokenizer_config.json (auto_map included) and special_tokens_map.json replace the old ones wholesale, since
      an older tokenizer_config's special tokens and options were written for another tokenizer class; so does
      generation_config.json, whose eos ids (id 0 and every token carrying the turn separator "\n\n") make
      `generate` stop at the end of a chat turn, where older uploads stopped at id 2 (a byte token);
    - code this package no longer has is deleted: kernel files not in the checkout (older uploads' kernels/ folder
      too), modules the replaced auto_map entries pointed at, and older uploads' tokenizer code (hf_rwkv_tokenizer.py).
    Files are compared by content, JSON files by their parsed value, so a second run plans nothing.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a model repo")
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "rwkv7":
        raise ValueError(f"config.json has model_type {config.get('model_type')!r}, not 'rwkv7'")
    operations = []

    def put(name, data: bytes):
        if not (folder / name).is_file() or (folder / name).read_bytes() != data:
            operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=data))

    for name in MODEL_CODE_FILES:
        put(name, (REPO / name).read_bytes())
    new_config = {**config, "auto_map": dict(AUTO_MAP)}
    new_config.setdefault("architectures", ["RWKV7ForCausalLM"])
    if new_config != config:
        put("config.json", (json.dumps(new_config, indent=2, sort_keys=True) + "\n").encode())
    retired = _auto_map_modules(config)

    if (folder / WORLD_VOCAB_FILE).is_file():
        tokenizer_config = folder / "tokenizer_config.json"
        if tokenizer_config.is_file():
            retired |= _auto_map_modules(json.loads(tokenizer_config.read_text()))
        retired |= set(LEGACY_TOKENIZER_CODE_FILES)
        for name in (*TOKENIZER_CODE_FILES, *TOKENIZER_FILES, GENERATION_CONFIG_FILE):
            if name.endswith(".json") and (folder / name).is_file():
                if json.loads((folder / name).read_text()) == json.loads((REPO / name).read_text()):
                    continue
            put(name, (REPO / name).read_bytes())

    present = {path.relative_to(folder).as_posix() for path in folder.rglob("*.py")}
    owned_before = retired | {name for name in present if name.startswith(KERNEL_FOLDERS)}
    for name in sorted((present & owned_before) - set(CODE_FILES)):
        operations.append(CommitOperationDelete(path_in_repo=name))
    return operations


def _auto_map_modules(config: dict) -> set:
    """The repo files an auto_map's entries point at ("module.Class" -> "module.py"; code in other repos,
    "org/repo--module.Class", is not this repo's)."""
    modules = set()
    for value in (config.get("auto_map") or {}).values():
        for reference in value if isinstance(value, list) else [value]:
            if reference and "--" not in reference:
                modules.add(reference.rsplit(".", 1)[0].replace(".", "/") + ".py")
    return modules


def describe(repo_id, operations, existing) -> str:
    """What a commit would do, one file a line: add (new), change (replaces a file of the same name), delete."""
    lines = []
    for op in operations:
        if isinstance(op, CommitOperationDelete):
            lines.append(f"  delete  {op.path_in_repo}")
        else:
            lines.append(f"  {'change' if op.path_in_repo in existing else 'add':<6}  {op.path_in_repo}")
    counts = {verb: sum(line.split()[0] == verb for line in lines) for verb in ("add", "change", "delete")}
    header = f"{repo_id}: " + ", ".join(f"{n} to {verb}" for verb, n in counts.items())
    return "\n".join([header, *lines])


def remote_files(api: HfApi, repo_id: str, revision=None) -> set:
    """The files of `repo_id` at `revision` (a branch that does not exist yet starts from the default one);
    empty for a repo that does not exist yet."""
    try:
        return set(api.list_repo_files(repo_id, revision=revision))
    except RepositoryNotFoundError:
        return set()
    except RevisionNotFoundError:
        return set(api.list_repo_files(repo_id))


def push(folder, repo_id, revision=None, create_pr=False, private=False, dry_run=False, api=None):
    """Uploads the allow-listed files of `folder` to `repo_id` in one commit (see plan_push); returns the
    operations. Without create_pr the repo, and the branch `revision`, are created when missing."""
    api = api or HfApi()
    existing = remote_files(api, repo_id, revision)
    operations = plan_push(folder, existing)
    skipped = sorted(
        p.relative_to(folder).as_posix()
        for p in Path(folder).rglob("*")
        if p.is_file() and p.relative_to(folder).as_posix() not in {op.path_in_repo for op in operations}
    )
    if skipped:
        print(f"not uploaded (not part of a model folder): {first_few(skipped)}", file=sys.stderr)
    print(describe(repo_id, operations, existing))
    if dry_run:
        return operations
    if not create_pr:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
    _commit(api, repo_id, operations, "Upload RWKV-7 model (converted with upload_to_hub.py)", revision, create_pr)
    return operations


def _commit(api, repo_id, operations, message, revision, create_pr):
    """One commit (or pull request) with `operations`; prints where it landed."""
    commit = api.create_commit(
        repo_id, operations=operations, commit_message=message, revision=revision, create_pr=create_pr
    )
    print(getattr(commit, "pr_url", None) or getattr(commit, "commit_url", commit))


# What update-code fetches of a repo: everything plan_update reads, and no weights.
UPDATE_SNAPSHOT_PATTERNS = ["*.py", "*.json", WORLD_VOCAB_FILE]


def update_code(repo_ids, revision=None, create_pr=False, dry_run=False, api=None) -> dict:
    """For each repo, one commit with plan_update's operations (none when it is up to date). Returns
    {repo_id: operations}."""
    api = api or HfApi()
    plans = {}
    for repo_id in repo_ids:
        snapshot = Path(
            api.snapshot_download(repo_id, revision=revision, allow_patterns=UPDATE_SNAPSHOT_PATTERNS)
        )
        operations = plans[repo_id] = plan_update(snapshot)
        if not operations:
            print(f"{repo_id}: up to date, nothing to commit")
            continue
        existing = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
        print(describe(repo_id, operations, existing))
        if not dry_run:
            _commit(api, repo_id, operations, "Update the RWKV-7 code package (upload_to_hub.py update-code)",
                    revision, create_pr)
    return plans


