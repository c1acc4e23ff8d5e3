"""Converting an official RWKV-7 checkpoint (BlinkDL's x070 .pth) into a Hub model folder, verified against the
official `rwkv` package: `upload_to_hub.py convert`.

The key mapping (official .pth -> fla-hub safetensors):
    emb.weight                          -> model.embeddings.weight
    blocks.0.ln0.*                      -> model.layers.0.pre_norm.*
    blocks.i.ln1.* / ln2.*              -> model.layers.i.attn_norm.* / ffn_norm.*
    blocks.i.att.x_{r,w,k,v,a,g}        -> model.layers.i.attn.x_{r,w,k,v,a,g}          [1, 1, C]
    blocks.i.att.k_k, k_a [1, 1, C]     -> attn.k_k, attn.k_a                           [C]
    blocks.i.att.r_k [H, N]             -> attn.r_k
    blocks.i.att.receptance/key/value/output.weight -> attn.r_proj/k_proj/v_proj/o_proj.weight
    blocks.i.att.{w,a,v,g}1 [C, D]      -> attn.{w,a,v,g}_lora.lora.0.weight            [D, C] (transposed)
    blocks.i.att.{w,a,v,g}2 [D, C]      -> attn.{w,a,v,g}_lora.lora.2.weight            [C, D] (transposed)
    blocks.i.att.{w,a,v}0 [1, 1, C]     -> attn.{w,a,v}_lora.lora.2.bias                [C]
    blocks.0.att.v0, v1, v2             -> dropped (layer 0 has no v LoRA)
    blocks.i.att.ln_x.*                 -> attn.g_norm.*
    blocks.i.ffn.x_k [1, 1, C]          -> ffn.x_k                                      [C]
    blocks.i.ffn.key/value.weight       -> ffn.key/value.weight
    ln_out.* / head.weight              -> model.norm.* / lm_head.weight
"""

import contextlib
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from configuration_rwkv7 import RWKV7Config
from modeling_rwkv7 import DEEP_EMBED_KEY

from .files import (
    AUTO_MAP,
    CODE_FILES,
    END_OF_DOCUMENT_ID,
    GENERATION_CONFIG_FILE,
    MODEL_CODE_FILES,
    REPO,
    SINGLE_WEIGHTS_FILE,
    TOKENIZER_FILES,
    WEIGHTS_INDEX_FILE,
    WORLD_VOCAB_IDS,
    copy_files,
    first_few,
    weight_files,
)

DEFAULT_MAX_SHARD_SIZE = "2GB"
VERIFY_LAYERS = 2  # the blocks the official package runs at the end of `convert`
VERIFY_VOCAB_ROWS = 4096  # vocabulary rows kept for that run (enough for the test tokens, small for a 7B head)
VERIFY_TOKENS = 8
VERIFY_TOLERANCE = 5e-5  # max |logits diff| / std(official logits), float32


_LORA = {"w": "w_lora", "a": "a_lora", "v": "v_lora", "g": "g_lora"}
_PROJ = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj"}


class UnsupportedCheckpoint(ValueError):
    """The .pth is not a plain RWKV-7 x070 checkpoint this package implements."""


def official_to_fla(key: str, tensor: torch.Tensor):
    """Maps one official tensor to its fla-hub name and layout; returns None for tensors fla-hub drops."""
    if DEEP_EMBED_KEY.search(key):
        raise UnsupportedCheckpoint(f"{key}: DeepEmbed RWKV-7 variants are not implemented by this package")
    if key == "emb.weight":
        return "model.embeddings.weight", tensor
    if key == "head.weight":
        return "lm_head.weight", tensor
    if m := re.fullmatch(r"ln_out\.(weight|bias)", key):
        return f"model.norm.{m[1]}", tensor
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m is None:
        raise UnsupportedCheckpoint(f"{key}: not an RWKV-7 x070 weight")
    i, name = int(m[1]), m[2]
    layer = f"model.layers.{i}"
    if m := re.fullmatch(r"(ln0|ln1|ln2)\.(weight|bias)", name):
        if m[1] == "ln0" and i != 0:
            raise UnsupportedCheckpoint(f"{key}: ln0 belongs to block 0 only")
        return f"{layer}.{ {'ln0': 'pre_norm', 'ln1': 'attn_norm', 'ln2': 'ffn_norm'}[m[1]] }.{m[2]}", tensor
    if m := re.fullmatch(r"att\.(x_[rwkvag])", name):
        return f"{layer}.attn.{m[1]}", tensor.reshape(1, 1, -1)
    if m := re.fullmatch(r"att\.(k_k|k_a)", name):
        return f"{layer}.attn.{m[1]}", tensor.reshape(-1)
    if name == "att.r_k":
        return f"{layer}.attn.r_k", tensor
    if m := re.fullmatch(r"att\.(receptance|key|value|output)\.weight", name):
        return f"{layer}.attn.{_PROJ[m[1]]}.weight", tensor
    if m := re.fullmatch(r"att\.([wavg])([012])", name):
        lora, part = _LORA[m[1]], m[2]
        if m[1] == "v" and i == 0:
            return None  # layer 0 makes v_first and mixes nothing in
        if part == "0":
            if m[1] == "g":
                raise UnsupportedCheckpoint(f"{key}: the g LoRA has no bias in RWKV-7")
            return f"{layer}.attn.{lora}.lora.2.bias", tensor.reshape(-1)
        return f"{layer}.attn.{lora}.lora.{0 if part == '1' else 2}.weight", tensor.t()
    if m := re.fullmatch(r"att\.ln_x\.(weight|bias)", name):
        return f"{layer}.attn.g_norm.{m[1]}", tensor
    if name == "ffn.x_k":
        return f"{layer}.ffn.x_k", tensor.reshape(-1)
    if m := re.fullmatch(r"ffn\.(key|value)\.weight", name):
        return f"{layer}.ffn.{m[1]}.weight", tensor
    raise UnsupportedCheckpoint(f"{key}: not an RWKV-7 x070 weight")


def config_from_official(shapes: dict) -> dict:
    """The RWKV7Config fields of an official checkpoint, from its tensor shapes ({key: torch.Size})."""
    try:
        vocab_size, hidden_size = shapes["emb.weight"]
        num_heads, head_dim = shapes["blocks.0.att.r_k"]
        num_layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
        v_rank_key = "blocks.1.att.v1" if num_layers > 1 else "blocks.0.att.v1"
        config = {
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "num_hidden_layers": num_layers,
            "head_dim": head_dim,
            "decay_low_rank_dim": shapes["blocks.0.att.w1"][1],
            "a_low_rank_dim": shapes["blocks.0.att.a1"][1],
            "v_low_rank_dim": shapes[v_rank_key][1],
            "gate_low_rank_dim": shapes["blocks.0.att.g1"][1],
            "intermediate_size": shapes["blocks.0.ffn.key.weight"][0],
            "norm_bias": "blocks.0.ln0.bias" in shapes,
        }
    except KeyError as missing:
        raise UnsupportedCheckpoint(f"not an RWKV-7 x070 checkpoint: it has no {missing} tensor") from None
    if num_heads * head_dim != hidden_size:
        raise UnsupportedCheckpoint(f"r_k is [{num_heads}, {head_dim}] but the hidden size is {hidden_size}")
    return config


class VerificationError(RuntimeError):
    """The converted folder does not reproduce the official package's logits."""

# ---------------------------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------------------------


def load_official(path) -> dict:
    """The official state dict, memory-mapped: tensors are read from disk when used, not at load.

    weights_only=True unpickles tensors and plain containers only, so a checkpoint cannot run code here; anything
    else in it (a custom class, training arguments) is refused rather than trusted.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise UnsupportedCheckpoint(
            f"{path} holds Python objects other than tensors, and this tool never unpickles those "
            f"(torch.load(weights_only=True) refused it: {str(error).strip().splitlines()[0]})"
        ) from None
    except Exception as error:  # a truncated zip, a legacy (non-zip) or non-PyTorch file
        raise UnsupportedCheckpoint(
            f"{path} cannot be read as a PyTorch checkpoint (truncated, or not a .pth file?): {error}"
        ) from None
    if not isinstance(state, dict):
        raise UnsupportedCheckpoint(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UnsupportedCheckpoint(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if not value.is_floating_point():
            raise UnsupportedCheckpoint(f"{path}: {key} is {value.dtype}, not a floating-point weight")
    return state


def official_shapes(config: dict) -> dict:
    """Every tensor an official x070 checkpoint of this configuration holds, with its shape.

    blocks.0.att.v0/v1/v2 are not listed: the official model ignores them and fla-hub drops them, so they may
    be present (as in released checkpoints) or not.
    """
    C, V, I, L = config["hidden_size"], config["vocab_size"], config["intermediate_size"], config["num_hidden_layers"]
    N = config["head_dim"]
    vector = (1, 1, C)
    ranks = {
        "w": config["decay_low_rank_dim"],
        "a": config["a_low_rank_dim"],
        "v": config["v_low_rank_dim"],
        "g": config["gate_low_rank_dim"],
    }
    shapes = {"emb.weight": (V, C), "head.weight": (V, C)}
    for norm in ("ln_out", "blocks.0.ln0"):
        shapes.update({f"{norm}.weight": (C,), f"{norm}.bias": (C,)})
    for i in range(L):
        b = f"blocks.{i}."
        for norm in ("ln1", "ln2", "att.ln_x"):
            shapes.update({f"{b}{norm}.weight": (C,), f"{b}{norm}.bias": (C,)})
        shapes.update({f"{b}att.x_{mix}": vector for mix in "rwkvag"})
        shapes.update({b + "att.k_k": vector, b + "att.k_a": vector, b + "att.r_k": (C // N, N)})
        shapes.update({f"{b}att.{proj}.weight": (C, C) for proj in _PROJ})
        for lora, rank in ranks.items():
            if lora == "v" and i == 0:
                continue
            shapes.update({f"{b}att.{lora}1": (C, rank), f"{b}att.{lora}2": (rank, C)})
            if lora != "g":
                shapes[f"{b}att.{lora}0"] = vector
        shapes.update({b + "ffn.x_k": vector, b + "ffn.key.weight": (I, C), b + "ffn.value.weight": (C, I)})
    return shapes


def check_checkpoint(state: dict) -> dict:
    """The RWKV7Config fields of `state`, after checking that it is a complete, consistent x070 checkpoint.

    Variants this package does not implement (DeepEmbed, unknown tensors) are refused by name; then every tensor
    of every layer must have the shape the inferred configuration gives it, so a layer with a different width or
    LoRA rank, or a missing tensor, stops the conversion instead of producing a folder that fails to load.
    """
    for key, tensor in state.items():
        official_to_fla(key, tensor)  # raises on DeepEmbed and unknown keys; views only, reads no data
    config = config_from_official({key: tensor.shape for key, tensor in state.items()})
    expected = official_shapes(config)
    ignored = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}
    missing = sorted(expected.keys() - state.keys(), key=_layer_order)
    unexpected = sorted(state.keys() - expected.keys() - ignored, key=_layer_order)
    wrong = [
        f"{key} {list(state[key].shape)} (expected {list(shape)})"
        for key, shape in expected.items()
        if key in state and tuple(state[key].shape) != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {first_few(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {first_few(unexpected)}")
    if wrong:
        problems.append(f"shapes that disagree with the rest of the checkpoint: {first_few(wrong)}")
    if problems:
        summary = ", ".join(f"{k}={v}" for k, v in config.items() if k != "norm_bias")
        raise UnsupportedCheckpoint(
            f"not a consistent RWKV-7 x070 checkpoint (inferred {summary}); " + "; ".join(problems)
        )
    return config


def _layer_order(key):
    m = re.match(r"blocks\.(\d+)\.", key)
    return (int(m[1]) if m else -1, key)


def parse_size(size: str) -> int:
    """Bytes in "2GB", "500MB", "64KB" (powers of 1000, as transformers counts) or a plain integer."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*", str(size).upper())
    if m is None:
        raise ValueError(f"not a size: {size!r} (use e.g. 2GB, 500MB or a number of bytes)")
    return int(float(m[1]) * {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m[2]])


def plan_shards(state: dict, dtype: torch.dtype, max_shard_bytes: int) -> list:
    """[(shard file name, [(fla name, official key), ...]), ...] in checkpoint order, each shard at most
    max_shard_bytes (a single tensor larger than that gets a shard of its own)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards, current, current_bytes = [], [], 0
    for key, tensor in state.items():
        mapped = official_to_fla(key, tensor)
        if mapped is None:
            continue
        nbytes = tensor.numel() * itemsize
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append((mapped[0], key))
        current_bytes += nbytes
    shards.append(current)
    if len(shards) == 1:
        return [(SINGLE_WEIGHTS_FILE, shards[0])]
    return [(f"model-{i:05d}-of-{len(shards):05d}.safetensors", shard) for i, shard in enumerate(shards, 1)]


def write_weights(state: dict, folder: Path, dtype: torch.dtype, max_shard_bytes: int) -> int:
    """Writes the fla-hub weights of `state` into `folder`, one shard at a time; returns the number of shards.

    Memory: the source is memory-mapped, so its pages are read on demand and belong to the page cache, which
    the OS reclaims. Only the tensors of the shard being written are materialised (converted to `dtype`,
    transposed) and they are released before the next shard starts, so the peak beyond the page cache is about
    one shard (max_shard_bytes, default 2 GB): a 7B checkpoint converts in far less RAM than twice its size.
    """
    shards = plan_shards(state, dtype, max_shard_bytes)
    weight_map, total_bytes = {}, 0
    with tqdm(total=sum(len(s) for _, s in shards), unit="tensor", desc="writing", file=sys.stderr) as progress:
        for filename, shard in shards:
            progress.set_postfix_str(filename)
            tensors = {}
            for name, key in shard:
                tensors[name] = official_to_fla(key, state[key])[1].to(dtype).contiguous()
                total_bytes += tensors[name].numel() * tensors[name].element_size()
                weight_map[name] = filename
                progress.update(1)
            save_file(tensors, str(folder / filename), metadata={"format": "pt"})
            del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (folder / WEIGHTS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return len(shards)


def model_config(shape_config: dict, dtype: torch.dtype) -> dict:
    """config.json of a converted model: the shape fields, the token ids of the tokenizer, the auto_map."""
    config = RWKV7Config(
        **shape_config,
        bos_token_id=END_OF_DOCUMENT_ID,
        eos_token_id=END_OF_DOCUMENT_ID,
        pad_token_id=END_OF_DOCUMENT_ID,
        dtype=dtype,
    )
    config.architectures = ["RWKV7ForCausalLM"]
    config.auto_map = dict(AUTO_MAP)
    config = config.to_diff_dict()  # what save_pretrained writes: no PretrainedConfig defaults
    config["torch_dtype"] = config["dtype"]  # the key transformers < 4.56 reads
    return config


def check_layout(folder: Path, dtype: torch.dtype):
    """Every weight the model built from the written config.json needs is in the written files, with its shape
    and `dtype`, and nothing else is. Covers all layers; the numerical check (verify) covers the first two."""
    from modeling_rwkv7 import RWKV7ForCausalLM

    config = RWKV7Config.from_pretrained(folder)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in RWKV7ForCausalLM(config).state_dict().items()}
    written = {}
    for filename in sorted(set(weight_files(folder).values())):
        with safe_open(folder / filename, framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                written[name] = (tuple(piece.get_shape()), piece.get_dtype())
    dtype_tag = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
    problems = [f"missing {k}" for k in sorted(expected.keys() - written.keys())]
    problems += [f"unexpected {k}" for k in sorted(written.keys() - expected.keys())]
    problems += [
        f"{k} is {list(written[k][0])} {written[k][1]}, expected {list(shape)} {dtype_tag}"
        for k, shape in expected.items()
        if k in written and written[k] != (shape, dtype_tag)
    ]
    if problems:
        raise VerificationError(f"the written weights do not match the model: {first_few(problems)}")


def verify(folder: Path, state: dict, dtype: torch.dtype) -> float:
    """max |logits - official| / std(official) of the written folder's first blocks on a few tokens.

    Both sides run in float32 on the same numbers: the official package gets the official weights rounded to
    `dtype` (what the folder stores), and the folder is loaded with dtype=float32, which upcasts them exactly.
    So the check measures the conversion (names, transposes, config, code), not the rounding, and the float32
    threshold applies to every dtype. What rounding to bfloat16/float16 costs is a property of the published
    weights, which the maintainer chooses with --dtype; it is not a conversion error.

    The truncated model (embedding, the first VERIFY_LAYERS blocks, final norm, head; VERIFY_VOCAB_ROWS rows
    of the embedding and the head) is read back from the written files into a temporary folder with the written
    config.json (layer count and vocab cut to match) and the written code, and loaded through transformers'
    remote code, as a user would. check_layout covers the layers it leaves out.
    """
    config = json.loads((folder / "config.json").read_text())
    layers = min(VERIFY_LAYERS, config["num_hidden_layers"])
    rows = min(VERIFY_VOCAB_ROWS, config["vocab_size"])
    sliced = {"emb.weight", "head.weight", "model.embeddings.weight", "lm_head.weight"}

    def kept(key):
        m = re.match(r"blocks\.(\d+)\.", key)
        return m is None or int(m[1]) < layers

    with tempfile.TemporaryDirectory(prefix="rwkv7-verify-") as tmp:
        tmp = Path(tmp)
        official, names = {}, []
        for key, tensor in state.items():
            if kept(key):
                tensor = tensor.to(dtype).float()
                official[key] = (tensor[:rows] if key in sliced else tensor).clone()
                mapped = official_to_fla(key, tensor)
                if mapped is not None:
                    names.append(mapped[0])
        torch.save(official, tmp / "official.pth")

        truncated = tmp / "converted"
        truncated.mkdir()
        files, tensors = weight_files(folder), {}
        for name in names:
            with safe_open(folder / files[name], framework="pt") as f:
                tensor = f.get_tensor(name)
            tensors[name] = (tensor[:rows] if name in sliced else tensor).clone()
        save_file(tensors, str(truncated / SINGLE_WEIGHTS_FILE), metadata={"format": "pt"})
        del tensors
        config.update(num_hidden_layers=layers, vocab_size=rows, value_dim=[config["hidden_size"]] * layers)
        (truncated / "config.json").write_text(json.dumps(config, indent=2))
        copy_files(folder, truncated, MODEL_CODE_FILES)

        tokens = torch.randint(0, rows, (VERIFY_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
        reference = official_logits(tmp / "official", tokens)
        del official
        ours = converted_logits(truncated, tokens)
    return ((ours.double() - reference.double()).abs().max() / reference.double().std()).item()


def official_logits(path_without_suffix: Path, tokens: list) -> torch.Tensor:
    """Logits [T, V] of BlinkDL's `rwkv` package (strategy "cpu fp32") on `path_without_suffix`.pth."""
    if "rwkv.model" not in sys.modules:
        os.environ["RWKV_V7_ON"] = "1"  # read by rwkv.model at import time
        os.environ.setdefault("RWKV_JIT_ON", "1")
        os.environ.setdefault("RWKV_CUDA_ON", "0")
    elif os.environ.get("RWKV_V7_ON") != "1":
        raise RuntimeError("rwkv.model was imported without RWKV_V7_ON=1; it cannot run RWKV-7 in this process")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the package prints its settings; keep stdout for results
            from rwkv.model import RWKV

            model = RWKV(model=str(path_without_suffix), strategy="cpu fp32")
    except ImportError:
        raise ImportError("convert checks every conversion against the official package: pip install rwkv") from None
    logits, _ = model.forward(tokens, None, full_output=True)
    return logits.float()


def converted_logits(folder: Path, tokens: list) -> torch.Tensor:
    """Logits [T, V] of `folder` loaded as a user would: AutoModelForCausalLM with its own (remote) code."""
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # transformers' loading notes about a throw-away folder are noise here
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    finally:
        logging.set_verbosity(verbosity)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def convert(pth, out_dir, dtype=None, max_shard_size=DEFAULT_MAX_SHARD_SIZE, tokenizer="world") -> float:
    """Converts an official RWKV-7 .pth into a Hub model folder at `out_dir`; returns the verification error.

    The folder holds config.json, generation_config.json, the safetensors weights, the code files and (with
    tokenizer="world") the World tokenizer. It is written into a temporary folder beside `out_dir` and renamed
    to `out_dir` only after check_layout and verify pass; on any error the temporary folder is removed, so a
    folder at `out_dir` is always a verified one.

    dtype: the stored precision (default: the checkpoint's own, when all its tensors share one).
    tokenizer: "world" ships this package's World tokenizer (vocab >= 65530); "none" ships no tokenizer, for
        models with another vocabulary (Pile models use GPT-NeoX's; add it by hand).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not empty; remove it or pick another output folder")
    state = load_official(pth)
    shape_config = check_checkpoint(state)
    if dtype is None:
        dtypes = {tensor.dtype for tensor in state.values()}
        if len(dtypes) != 1:
            raise ValueError(f"the checkpoint mixes {sorted(map(str, dtypes))}; choose one with --dtype")
        dtype = dtypes.pop()
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"cannot store weights as {dtype}; use bfloat16, float16 or float32")
    if tokenizer == "world" and shape_config["vocab_size"] < WORLD_VOCAB_IDS:
        raise ValueError(
            f"the World tokenizer has {WORLD_VOCAB_IDS} ids but the model has {shape_config['vocab_size']} "
            "vocabulary rows (a Pile model has 50304); convert with --tokenizer none and add its tokenizer by hand"
        )

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.absolute().parent))
    try:
        _make_readable(tmp)
        config = model_config(shape_config, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer == "world":
            copy_files(REPO, tmp, (GENERATION_CONFIG_FILE, *TOKENIZER_FILES, *CODE_FILES))
        else:
            generation = {f"{k}_token_id": END_OF_DOCUMENT_ID for k in ("bos", "eos", "pad")}
            (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
            copy_files(REPO, tmp, MODEL_CODE_FILES)
        shards = write_weights(state, tmp, dtype, parse_size(max_shard_size))
        check_layout(tmp, dtype)
        print("verifying against the official rwkv package ...", file=sys.stderr)
        error = verify(tmp, state, dtype)
        if not error <= VERIFY_TOLERANCE:
            raise VerificationError(
                f"the converted model's logits differ from the official package's: max|diff|/std = {error:.3g} "
                f"> {VERIFY_TOLERANCE:g}"
            )
        for path in tmp.iterdir():
            _make_readable(path)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(
        f"{out_dir}: {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, vocab "
        f"{config['vocab_size']}, {str(dtype).removeprefix('torch.')}, {shards} weight file(s); "
        f"logits vs the official package: max|diff|/std = {error:.2e}"
    )
    return error


def _make_readable(path: Path):
    """Gives what convert writes the permissions of a normal file or folder (mkdtemp and safetensors create
    them private to the user)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


