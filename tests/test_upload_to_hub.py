"""upload_to_hub.py: conversion checked against the official `rwkv` package, refusals, and the commits that push and
update-code would send (the network boundary is replaced at the HfApi methods only; nothing reaches the Hub)."""

import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from helpers import max_error_over_std, run_python
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from official import REPO, copy_code, official_model, random_official_weights, write_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

import official
import upload_to_hub
from hub_tools import convert, files, publish

SHAPES = {
    "128x1": dict(hidden=128, layers=1, ranks=(16, 16, 8, 32)),
    "256x3-ranks-4heads": dict(hidden=256, layers=3, ranks=(24, 40, 12, 56), ffn=640),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENS = [5, 17, 3, 90, 42, 42, 7, 0, 61, 12]


def full_model_error(folder, official_sd, dtype, tmp_path, tokens=TOKENS):
    """The whole converted model (every layer, the whole vocabulary) against the official package run on the
    official weights rounded to the stored dtype; both in float32."""
    rounded = {k: v.to(dtype).float() for k, v in official_sd.items()}
    reference, _ = official_model(rounded, tmp_path).forward(tokens, None, full_output=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0]
    return max_error_over_std(logits, reference)


def run_cli(*args):
    """The command line as maintainers run it: a new process, started outside the checkout."""
    return run_python(script=REPO / "upload_to_hub.py", args=args, cwd="/", env={"HF_HUB_OFFLINE": "1"})


def cli_error(*args):
    """The message `upload_to_hub.py ARGS` exits with (run in this process)."""
    with pytest.raises(SystemExit) as exit_info:
        upload_to_hub.main([str(a) for a in args])
    assert isinstance(exit_info.value.code, str), exit_info.value.code
    return exit_info.value.code


def leftovers(parent, name):
    return sorted(p.name for p in Path(parent).iterdir() if p.name == name or p.name.startswith(f".{name}.partial-"))


# ---------------------------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_convert_matches_official(tmp_path, shape, dtype):
    sd = random_official_weights(**SHAPES[shape], seed=len(shape))
    torch.save(sd, tmp_path / "model.pth")
    out = tmp_path / "out"
    verified = convert.convert(tmp_path / "model.pth", out, DTYPES[dtype], tokenizer="none")

    config = json.loads((out / "config.json").read_text())
    expected = convert.config_from_official({k: v.shape for k, v in sd.items()})
    assert {k: config[k] for k in expected} == expected
    assert config["auto_map"] == files.AUTO_MAP and config["dtype"] == config["torch_dtype"] == dtype
    assert config["bos_token_id"] == config["eos_token_id"] == config["pad_token_id"] == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", *files.MODEL_CODE_FILES]
    )
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert {p.dtype for p in model.parameters()} == {DTYPES[dtype]}

    whole = full_model_error(out, sd, DTYPES[dtype], tmp_path)
    print(f"\n{shape} {dtype}: max|diff|/std vs official: convert's check {verified:.2e}, whole model {whole:.2e}")
    assert verified <= 5e-5 and whole <= 5e-5


@pytest.mark.slow
def test_cli_convert_world_model_sharded_with_tokenizer(tmp_path):
    """The command line end to end on a World-vocabulary model, sharded, with the tokenizer files."""
    sd = random_official_weights(hidden=128, layers=2, vocab=65536, seed=11)
    torch.save(sd, tmp_path / "world.pth")
    result = run_cli("convert", tmp_path / "world.pth", tmp_path / "out", "--dtype", "bfloat16", "--max-shard-size", "10MB")
    assert result.returncode == 0, result.stderr
    assert "max|diff|/std" in result.stdout and "writing" in result.stderr  # result line; progress on stderr
    out = tmp_path / "out"

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 3 and shards[0] == "model-00001-of-00003.safetensors"  # embedding, blocks, head
    for name in ("generation_config.json", *files.TOKENIZER_FILES, *files.CODE_FILES):
        assert (out / name).read_bytes() == (REPO / name).read_bytes(), name

    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == tokenizer.bos_token_id == config["eos_token_id"] == 0
    assert generation["pad_token_id"] == generation["bos_token_id"] == config["pad_token_id"] == 0
    assert 0 in generation["eos_token_id"]
    tokens = tokenizer("Hello, world!\n\n")["input_ids"]
    assert tokens and max(tokens) < config["vocab_size"]

    error = full_model_error(out, sd, torch.bfloat16, tmp_path, tokens + TOKENS)
    print(f"\nworld-vocab bfloat16, 3 shards: whole model max|diff|/std vs official {error:.2e}")
    assert error <= 5e-5


def test_convert_streams_one_shard_at_a_time(tmp_path, monkeypatch):
    """convert materialises one shard at a time: when a shard is written, the tensors of the previous shard
    are already freed, and no shard holds more than max_shard_size (unless one tensor alone is larger).

    float32 -> bfloat16, so that every written tensor is a new one (a tensor kept in its dtype and layout is
    the memory-mapped source itself, which costs page cache only)."""
    sd = random_official_weights(hidden=256, layers=3, seed=2)
    torch.save(sd, tmp_path / "model.pth")
    written = []  # (file name, bytes, weak references to its tensors)
    save_file = convert.save_file

    def recording_save_file(tensors, filename, metadata=None):
        if Path(filename).name.startswith("model-"):
            for _, _, refs in written:
                assert all(ref() is None for ref in refs), "a previous shard's tensors are still alive"
            sizes = [t.numel() * t.element_size() for t in tensors.values()]
            written.append((Path(filename).name, sizes, [weakref.ref(t) for t in tensors.values()]))
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(convert, "save_file", recording_save_file)
    limit = 200_000
    convert.convert(tmp_path / "model.pth", tmp_path / "out", torch.bfloat16, max_shard_size=limit, tokenizer="none")

    assert len(written) >= 8
    for name, sizes, _ in written:
        assert sum(sizes) <= limit or len(sizes) == 1, (name, sizes)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(name for name, _, _ in written)
    assert index["metadata"]["total_size"] == sum(sum(sizes) for _, sizes, _ in written)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert full_model_error(tmp_path / "out", sd, torch.bfloat16, tmp_path) <= 5e-5


class Payload:
    """Unpickling this runs `print` in the unpickling process: what weights_only=True must never do."""

    def __reduce__(self):
        return (print, ("PAYLOAD RAN",))


def bad_checkpoint(kind, path):
    sd = random_official_weights(hidden=128, layers=2, seed=7)
    if kind == "deep-embed":
        sd["blocks.0.ffn.s_emb.weight"] = torch.zeros(97, 32)
    elif kind == "unknown-key":
        sd["blocks.1.att.extra"] = torch.zeros(1, 1, 128)
    elif kind == "inconsistent-rank":
        sd["blocks.1.att.a1"], sd["blocks.1.att.a2"] = torch.zeros(128, 24), torch.zeros(24, 128)
    elif kind == "missing-tensor":
        del sd["blocks.1.ffn.value.weight"]
    elif kind == "non-tensor-pickle":
        sd["args"] = Payload()
    torch.save(sd, path)
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


REFUSALS = {
    "deep-embed": "DeepEmbed",
    "unknown-key": "blocks.1.att.extra: not an RWKV-7 x070 weight",
    "inconsistent-rank": "blocks.1.att.a1 [128, 24] (expected [128, 16])",
    "missing-tensor": "missing tensors: blocks.1.ffn.value.weight",
    "non-tensor-pickle": "holds Python objects other than tensors",
    "truncated": "cannot be read as a PyTorch checkpoint",
}


@pytest.mark.parametrize("kind", REFUSALS)
def test_convert_refuses_and_leaves_nothing(tmp_path, kind, capsys):
    bad_checkpoint(kind, tmp_path / "bad.pth")
    message = cli_error("convert", tmp_path / "bad.pth", tmp_path / "out", "--tokenizer", "none")
    assert message.startswith("error: ") and REFUSALS[kind] in message, message
    assert "PAYLOAD RAN" not in "".join(capsys.readouterr())
    assert leftovers(tmp_path, "out") == []


def test_failed_verification_leaves_nothing(tmp_path, monkeypatch):
    """A conversion whose logits disagree with the official package is an error, and its folder is removed."""
    sd = random_official_weights(hidden=128, layers=2, seed=8)
    torch.save(sd, tmp_path / "model.pth")
    real = convert.official_to_fla

    def swapped_projections(key, tensor):  # a mapping bug: r and k projections exchanged
        name, tensor = real(key, tensor) or (None, None)
        if name is None:
            return None
        return name.replace("r_proj", "@").replace("k_proj", "r_proj").replace("@", "k_proj"), tensor

    monkeypatch.setattr(convert, "official_to_fla", swapped_projections)
    with pytest.raises(convert.VerificationError, match="differ from the official"):
        convert.convert(tmp_path / "model.pth", tmp_path / "out", tokenizer="none")
    assert leftovers(tmp_path, "out") == []


def test_convert_refuses_world_tokenizer_for_a_small_vocabulary_and_existing_output(tmp_path):
    torch.save(random_official_weights(hidden=128, layers=1), tmp_path / "model.pth")
    with pytest.raises(ValueError, match="--tokenizer none"):
        convert.convert(tmp_path / "model.pth", tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("a maintainer's file")
    with pytest.raises(FileExistsError):
        convert.convert(tmp_path / "model.pth", tmp_path / "out", tokenizer="none")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert leftovers(tmp_path, "out") == ["out"]


# ---------------------------------------------------------------------------------------------------------------
# push
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A converted, sharded World-tokenizer folder with stray files a maintainer might leave in it."""
    tmp = tmp_path_factory.mktemp("converted")
    torch.save(random_official_weights(hidden=128, layers=1, vocab=65536, seed=9), tmp / "model.pth")
    folder = tmp / "out"
    convert.convert(tmp / "model.pth", folder, torch.bfloat16, max_shard_size="10MB")
    (folder / "notes.txt").write_text("todo")
    (folder / ".git").mkdir()
    (folder / ".git" / "config").write_text("[core]")
    (folder / "token").write_text("hf_secret")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "modeling_rwkv7.cpython-311.pyc").write_bytes(b"\0")
    (folder / "rwkv7_kernels" / "__pycache__").mkdir()
    (folder / "rwkv7_kernels" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (folder / "model-old.safetensors").write_bytes(b"stale")
    return folder


class FakeHub:
    """Stands in for the Hub at the HfApi methods push and update-code call, recording every call."""

    def __init__(self, monkeypatch, remote_files=(), snapshots=None):
        self.calls = []
        self.remote_files = set(remote_files)
        self.snapshots = snapshots or {}  # repo id -> folder acting as the repo's current content
        for name in ("create_repo", "create_branch", "create_commit", "list_repo_files", "snapshot_download"):
            monkeypatch.setattr(HfApi, name, getattr(self, name))

    def list_repo_files(self, repo_id, revision=None, **kwargs):
        return sorted(self.remote_files)

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, dict(kwargs, operations=list(operations))))
        if repo_id in self.snapshots:  # apply the commit to the fake repo
            folder = self.snapshots[repo_id]
            for op in operations:
                target = folder / op.path_in_repo
                if isinstance(op, CommitOperationDelete):
                    target.unlink()
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    content = op.path_or_fileobj
                    target.write_bytes(content if isinstance(content, bytes) else Path(content).read_bytes())

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None, **kwargs):
        """A fresh copy of the files matching allow_patterns, as huggingface_hub would download them."""
        import fnmatch
        import tempfile

        self.calls.append(("snapshot_download", repo_id, {"revision": revision, "allow_patterns": allow_patterns}))
        source, copy = self.snapshots[repo_id], Path(tempfile.mkdtemp())
        for path in source.rglob("*"):
            name = path.relative_to(source).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (copy / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, copy / name)
        return str(copy)

    def commits(self):
        return [call for call in self.calls if call[0] == "create_commit"]


def expected_upload(folder):
    shards = sorted(p.name for p in folder.glob("model-0*.safetensors"))
    return [
        "config.json",
        "model.safetensors.index.json",
        *shards,
        *files.MODEL_CODE_FILES,
        "generation_config.json",
        *files.TOKENIZER_FILES,
        *files.TOKENIZER_CODE_FILES,
    ]


def test_push_dry_run_lists_exactly_the_allow_listed_files(converted, monkeypatch, capsys):
    hub = FakeHub(monkeypatch, remote_files={"config.json", "pytorch_model.bin", "README.md", "rwkv7_kernels/old.py"})
    upload_to_hub.main(["push", str(converted), "--repo", "org/rwkv7-test", "--dry-run"])
    out, err = capsys.readouterr()
    files = expected_upload(converted)
    assert len(files) == len(set(files)) and len(list(converted.glob("model-0*.safetensors"))) == 3
    assert out.splitlines() == [
        f"org/rwkv7-test: {len(files) - 1} to add, 1 to change, 1 to delete",
        *(f"  {'change' if name == 'config.json' else 'add':<6}  {name}" for name in files),
        "  delete  pytorch_model.bin",
    ]
    for stray in ("notes.txt", ".git/config", "token", "model-old.safetensors", "__pycache__"):
        assert stray in err  # reported as not uploaded
    assert "hf_secret" not in out + err
    assert hub.commits() == [] and not any(call[0] == "create_repo" for call in hub.calls)


@pytest.mark.parametrize("pr", [False, True])
def test_push_sends_one_commit_of_the_allow_listed_files(converted, monkeypatch, pr):
    hub = FakeHub(monkeypatch, remote_files={"model-00001-of-00005.safetensors", "config.json"})
    args = ["push", str(converted), "--repo", "org/rwkv7-test", "--revision", "v2", "--private"]
    upload_to_hub.main(args + (["--pr"] if pr else []))
    (_, repo_id, commit), = hub.commits()
    assert repo_id == "org/rwkv7-test" and commit["revision"] == "v2" and commit["create_pr"] is pr
    adds = [op for op in commit["operations"] if isinstance(op, CommitOperationAdd)]
    deletes = [op.path_in_repo for op in commit["operations"] if isinstance(op, CommitOperationDelete)]
    assert [op.path_in_repo for op in adds] == expected_upload(converted)
    assert deletes == ["model-00001-of-00005.safetensors"]  # a shard of an earlier, differently sharded upload
    for op in adds:
        assert Path(op.path_or_fileobj).read_bytes() == (converted / op.path_in_repo).read_bytes()
    setup = [(call[0], call[2]) for call in hub.calls if call[0] in ("create_repo", "create_branch")]
    if pr:  # a pull request goes to an existing repo; nothing is created
        assert setup == []
    else:
        assert setup == [("create_repo", {"private": True, "exist_ok": True}), ("create_branch", {"branch": "v2", "exist_ok": True})]


def test_push_refuses_an_incomplete_folder(converted, tmp_path, monkeypatch):
    FakeHub(monkeypatch)
    folder = tmp_path / "incomplete"
    shutil.copytree(converted, folder)
    (folder / "rwkv7_kernels" / "__init__.py").unlink()
    with pytest.raises(FileNotFoundError, match="rwkv7_kernels/__init__.py"):
        publish.push(folder, "org/x", dry_run=True)


# ---------------------------------------------------------------------------------------------------------------
# update-code
# ---------------------------------------------------------------------------------------------------------------


def old_fla_hub_repo(folder, sd):
    """A repo as older fla-hub uploads look: fla shims for code, no auto_map, packed attn.x_x weights, the
    World vocab with an older tokenizer, a kernel file this package no longer has, and the kernels folder under its
    name before the rename (kernels/, which shadowed the `kernels` package transformers 5.25 imports)."""
    write_model_dir(folder, sd, pack_x_x=True, with_code=False)
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]
    config.update(bos_token_id=1, eos_token_id=2, attn_mode="chunk", fuse_norm=True, num_heads=None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "modeling_rwkv7.py").write_text("from fla.models.rwkv7.modeling_rwkv7 import RWKV7ForCausalLM, RWKV7Model\n")
    (folder / "configuration_rwkv7.py").write_text("from fla.models.rwkv7.configuration_rwkv7 import RWKV7Config\n")
    (folder / "hf_rwkv_tokenizer.py").write_text("class RwkvTokenizer: ...\n")
    (folder / "rwkv7_kernels").mkdir()
    (folder / "rwkv7_kernels" / "old_kernel.py").write_text("")
    (folder / "kernels").mkdir()
    (folder / "kernels" / "__init__.py").write_text("")
    tokenizer_config = {
        "tokenizer_class": "RwkvTokenizer",
        "auto_map": {"AutoTokenizer": ["hf_rwkv_tokenizer.RwkvTokenizer", None]},
        "bos_token": "<|rwkv_tokenizer_end_of_text|>",
        "eos_token": "\n\n",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    shutil.copyfile(REPO / files.WORLD_VOCAB_FILE, folder / files.WORLD_VOCAB_FILE)
    (folder / "README.md").write_text("model card")
    return folder


def test_update_code_migrates_an_old_fla_hub_repo_once(tmp_path, monkeypatch, capsys):
    sd = random_official_weights(hidden=128, layers=2, seed=12)
    remote = old_fla_hub_repo(tmp_path / "remote", sd)
    weights = (remote / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="model type `rwkv7`"):  # without auto_map transformers cannot load it
        AutoModelForCausalLM.from_pretrained(remote, trust_remote_code=True)
    hub = FakeHub(monkeypatch, snapshots={"org/old": remote})

    upload_to_hub.main(["update-code", "--repo", "org/old", "--dry-run"])
    plan = capsys.readouterr().out.splitlines()
    assert hub.commits() == []
    adds = sorted(set(files.MODEL_CODE_FILES) - {"configuration_rwkv7.py", "modeling_rwkv7.py"})
    adds += ["generation_config.json", "special_tokens_map.json", "tokenization_rwkv7.py"]
    changes = ["config.json", "configuration_rwkv7.py", "modeling_rwkv7.py", "tokenizer_config.json"]
    assert plan[0] == f"org/old: {len(adds)} to add, {len(changes)} to change, 3 to delete"
    assert sorted(plan[1:]) == sorted(
        [f"  add     {n}" for n in adds]
        + [f"  change  {n}" for n in changes]
        + ["  delete  hf_rwkv_tokenizer.py", "  delete  rwkv7_kernels/old_kernel.py", "  delete  kernels/__init__.py"]
    )

    upload_to_hub.main(["update-code", "--repo", "org/old", "--revision", "main", "--pr"])
    (_, repo_id, commit), = hub.commits()
    assert repo_id == "org/old" and commit["revision"] == "main" and commit["create_pr"] is True
    assert not any(op.path_in_repo.endswith(".safetensors") for op in commit["operations"])
    assert (remote / "model.safetensors").read_bytes() == weights and (remote / "README.md").read_text() == "model card"
    snapshot_patterns = [call[2]["allow_patterns"] for call in hub.calls if call[0] == "snapshot_download"]
    assert all(not any(p.endswith(".safetensors") for p in patterns) for patterns in snapshot_patterns)

    config = json.loads((remote / "config.json").read_text())
    assert config["auto_map"] == files.AUTO_MAP and config["fuse_norm"] is True
    model = AutoModelForCausalLM.from_pretrained(remote, trust_remote_code=True)
    reference, _ = official_model(sd, tmp_path).forward(TOKENS, None, full_output=True)
    with torch.no_grad():
        error = max_error_over_std(model(torch.tensor([TOKENS])).logits[0], reference)
    with capsys.disabled():
        print(f"\nupdated old repo (packed attn.x_x): max|diff|/std vs official {error:.2e}")
    assert error <= 5e-5
    assert AutoTokenizer.from_pretrained(remote, trust_remote_code=True).eos_token_id == 0

    capsys.readouterr()
    upload_to_hub.main(["update-code", "--repo", "org/old"])
    assert len(hub.commits()) == 1  # the second run commits nothing
    assert capsys.readouterr().out == "org/old: up to date, nothing to commit\n"


def test_plan_update_keeps_a_non_world_tokenizer(tmp_path):
    """A repo without the World vocabulary (a Pile model) keeps its tokenizer; only the model code changes."""
    folder = write_model_dir(tmp_path / "pile", random_official_weights(hidden=128, layers=1), with_code=False)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPTNeoXTokenizer"}))
    operations = publish.plan_update(folder)
    assert sorted(op.path_in_repo for op in operations) == sorted(files.MODEL_CODE_FILES)
    copy_code(folder)
    assert publish.plan_update(folder) == []


def test_code_file_list_is_the_one_list():
    kernels = sorted(f"rwkv7_kernels/{p.name}" for p in (REPO / "rwkv7_kernels").glob("*.py"))
    assert kernels and "rwkv7_kernels/__init__.py" in kernels
    assert files.CODE_FILES == ("configuration_rwkv7.py", "modeling_rwkv7.py", *kernels, "tokenization_rwkv7.py")
    assert official.CODE_FILES is files.CODE_FILES


def test_cli_help_documents_the_commands(capsys):
    def help_text(*command):
        with pytest.raises(SystemExit) as exit_info:
            upload_to_hub.main([*command, "--help"])
        assert exit_info.value.code == 0
        return capsys.readouterr().out

    main_help = help_text()
    for text in ("convert MODEL.pth OUT_DIR", "push OUT_DIR --repo", "update-code --repo", "pip install rwkv"):
        assert text in main_help, text
    for command in ("convert", "push", "update-code"):
        text = help_text(command)
        # written for users: what the command does, an example, and a help line for every argument
        assert f"python upload_to_hub.py {command} " in text.split("example")[1], command
        for internal in ("Pure:", "`folder`", "returns", "plan_", "\\n"):
            assert internal not in text, (command, internal)
        parser = upload_to_hub.build_parser()._subparsers._group_actions[0].choices[command]
        for action in parser._actions:
            assert action.help, (command, action.dest)
