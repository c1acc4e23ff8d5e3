"""The independent oracle: random RWKV-7 weights in the official .pth layout, run by BlinkDL's `rwkv` package.

Also a float64 transcription of the official one-token math (rwkv/model.py, RWKV_x070_TMix_one / CMix_one),
written against the official layout, so float64 runs of our model have something exact to be compared with.
"""

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

os.environ["RWKV_V7_ON"] = "1"  # read by rwkv.model at import time
os.environ.setdefault("RWKV_JIT_ON", "1")

from hub_tools import convert, files  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CODE_FILES = files.CODE_FILES  # the package's code files: the one list, in hub_tools/files.py


def random_official_weights(
    hidden=128, layers=1, head_dim=64, vocab=97, ffn=None, ranks=(16, 16, 8, 32), seed=0, norm_bias=True
):
    """Random weights in the official .pth layout, scaled like a trained model (finite, non-degenerate logits)."""
    g = torch.Generator().manual_seed(seed)
    C, H, N, I = hidden, hidden // head_dim, head_dim, ffn or 4 * hidden
    d_w, d_a, d_v, d_g = ranks

    def randn(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    def linear(out_dim, in_dim):  # [out, in], as nn.Linear stores it
        return randn(out_dim, in_dim, std=in_dim**-0.5)

    def norm(prefix, sd):
        sd[f"{prefix}.weight"] = randn(C, std=0.1, mean=1.0)
        if norm_bias:
            sd[f"{prefix}.bias"] = randn(C, std=0.1)

    sd = {"emb.weight": randn(vocab, C)}
    for i in range(layers):
        b = f"blocks.{i}."
        if i == 0:
            norm(b + "ln0", sd)
        norm(b + "ln1", sd)
        norm(b + "ln2", sd)
        for mix in "rwkvag":
            sd[f"{b}att.x_{mix}"] = rand(1, 1, C)
        sd[b + "att.w0"] = randn(1, 1, C, std=1.0, mean=-0.5)
        sd[b + "att.w1"] = randn(C, d_w, std=0.1)
        sd[b + "att.w2"] = randn(d_w, C, std=0.1)
        sd[b + "att.a0"] = randn(1, 1, C, std=0.5)
        sd[b + "att.a1"] = randn(C, d_a, std=0.1)
        sd[b + "att.a2"] = randn(d_a, C, std=0.1)
        sd[b + "att.v0"] = randn(1, 1, C, std=0.5, mean=0.5)
        sd[b + "att.v1"] = randn(C, d_v, std=0.1)
        sd[b + "att.v2"] = randn(d_v, C, std=0.1)
        sd[b + "att.g1"] = randn(C, d_g, std=0.1)
        sd[b + "att.g2"] = randn(d_g, C, std=0.1)
        sd[b + "att.k_k"] = randn(1, 1, C, std=0.1, mean=0.85)
        sd[b + "att.k_a"] = randn(1, 1, C, std=0.1, mean=1.0)
        sd[b + "att.r_k"] = randn(H, N, std=0.1)
        for proj in ("receptance", "key", "value", "output"):
            sd[f"{b}att.{proj}.weight"] = linear(C, C)
        sd[b + "att.ln_x.weight"] = randn(C, std=0.1, mean=1.0)
        sd[b + "att.ln_x.bias"] = randn(C, std=0.1)
        sd[b + "ffn.x_k"] = rand(1, 1, C)
        sd[b + "ffn.key.weight"] = linear(I, C)
        sd[b + "ffn.value.weight"] = linear(C, I)
    norm("ln_out", sd)
    sd["head.weight"] = linear(vocab, C)
    return sd


def to_fla(official: dict):
    """(config dict, fla-hub state dict) of an official state dict."""
    config = convert.config_from_official({k: v.shape for k, v in official.items()})
    state = {}
    for key, tensor in official.items():
        mapped = convert.official_to_fla(key, tensor)
        if mapped is not None:
            state[mapped[0]] = mapped[1].contiguous().clone()
    return config, state


def fla_to_official(state: dict) -> dict:
    """The official .pth state dict of a fla-hub (this package's) state dict: the inverse of to_fla."""
    import re

    lora_part = {"0": ("1", True), "2": ("2", True)}
    names = {"pre_norm": "ln0", "attn_norm": "ln1", "ffn_norm": "ln2"}
    projections = {"r_proj": "receptance", "k_proj": "key", "v_proj": "value", "o_proj": "output"}
    official = {}
    for key, tensor in state.items():
        if key == "model.embeddings.weight":
            official["emb.weight"] = tensor
        elif key == "lm_head.weight":
            official["head.weight"] = tensor
        elif m := re.fullmatch(r"model\.norm\.(weight|bias)", key):
            official[f"ln_out.{m[1]}"] = tensor
        elif m := re.fullmatch(r"model\.layers\.(\d+)\.(\w+)\.(.+)", key):
            b, part, rest = f"blocks.{m[1]}.", m[2], m[3]
            if part in names:
                official[b + names[part] + "." + rest] = tensor
            elif part == "ffn":
                official[b + "ffn." + rest] = tensor.reshape(1, 1, -1) if rest == "x_k" else tensor
            elif rest in ("k_k", "k_a"):
                official[b + "att." + rest] = tensor.reshape(1, 1, -1)
            elif re.fullmatch(r"x_[rwkvag]|r_k", rest):
                official[b + "att." + rest] = tensor
            elif rest.split(".")[0] in projections:
                official[b + "att." + projections[rest.split(".")[0]] + ".weight"] = tensor
            elif rest.startswith("g_norm."):
                official[b + "att.ln_x." + rest.split(".")[1]] = tensor
            elif lora := re.fullmatch(r"([wavg])_lora\.lora\.([02])\.(weight|bias)", rest):
                name = b + "att." + lora[1]
                if lora[3] == "bias":
                    official[name + "0"] = tensor.reshape(1, 1, -1)
                else:
                    official[name + lora_part[lora[2]][0]] = tensor.t()
            else:
                raise KeyError(key)
        else:
            raise KeyError(key)
    return official


def write_model_dir(folder, official: dict, dtype=torch.float32, pack_x_x=False, with_code=True, **config_extra):
    """A model folder as it sits on the Hub: config.json with auto_map, model.safetensors, the code files.

    pack_x_x: store the six token-shift mixes as one attn.x_x [6, C] tensor per layer, like older fla-hub uploads.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config, state = to_fla(official)
    if pack_x_x:
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}.attn."
            state[p + "x_x"] = torch.cat([state.pop(p + f"x_{m}").reshape(1, -1) for m in "rwkvag"])
    config.update(
        {
            "model_type": "rwkv7",
            "architectures": ["RWKV7ForCausalLM"],
            "auto_map": {
                "AutoConfig": "configuration_rwkv7.RWKV7Config",
                "AutoModel": "modeling_rwkv7.RWKV7Model",
                "AutoModelForCausalLM": "modeling_rwkv7.RWKV7ForCausalLM",
            },
            "torch_dtype": str(dtype).removeprefix("torch."),
            "bos_token_id": 0,
            "eos_token_id": 0,
        }
    )
    config.update(config_extra)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    if with_code:
        copy_code(folder)
    return folder


def copy_code(folder):
    files.copy_files(REPO, folder, CODE_FILES)


def official_model(official: dict, tmp_path):
    """BlinkDL's RWKV-7 (rwkv package, strategy 'cpu fp32') on these weights."""
    from rwkv.model import RWKV

    path = Path(tmp_path) / "official"
    torch.save(official, str(path) + ".pth")
    return RWKV(model=str(path), strategy="cpu fp32")


def official_math_fp64(official: dict, tokens: list[int]):
    """Logits [T, V] and final WKV states ([H, V, K] per layer) of the official one-token math, in float64.

    A line-by-line transcription of RWKV_x070_TMix_one / CMix_one, with exp(-0.5) exact.
    """
    z = {k: v.double().squeeze() if not k.endswith("r_k") else v.double() for k, v in official.items()}
    C = z["emb.weight"].shape[1]
    H, N = official["blocks.0.att.r_k"].shape
    L = 1 + max(int(k.split(".")[1]) for k in z if k.startswith("blocks."))
    has_bias = "ln_out.bias" in z

    def ln(x, name):
        return F.layer_norm(x, (C,), z[name + ".weight"], z[name + ".bias"] if has_bias else None, eps=1e-5)

    att_prev = [torch.zeros(C, dtype=torch.float64) for _ in range(L)]
    ffn_prev = [torch.zeros(C, dtype=torch.float64) for _ in range(L)]
    S = [torch.zeros(H, N, N, dtype=torch.float64) for _ in range(L)]
    logits = []
    for token in tokens:
        x = ln(z["emb.weight"][token], "blocks.0.ln0")
        v_first = None
        for i in range(L):
            p = f"blocks.{i}.att."
            xa = ln(x, f"blocks.{i}.ln1")
            xx = att_prev[i] - xa
            att_prev[i] = xa
            xr, xw, xk, xv, xa_, xg = (xa + xx * z[p + f"x_{m}"] for m in "rwkvag")
            r = z[p + "receptance.weight"] @ xr
            w = torch.tanh(xw @ z[p + "w1"]) @ z[p + "w2"]
            k = z[p + "key.weight"] @ xk
            v = z[p + "value.weight"] @ xv
            a = torch.sigmoid(z[p + "a0"] + (xa_ @ z[p + "a1"]) @ z[p + "a2"])
            g = torch.sigmoid(xg @ z[p + "g1"]) @ z[p + "g2"]
            kk = F.normalize((k * z[p + "k_k"]).view(H, N), dim=-1, p=2.0).view(C)
            k = k * (1 + (a - 1) * z[p + "k_a"])
            if i == 0:
                v_first = v
            else:
                v = v + (v_first - v) * torch.sigmoid(z[p + "v0"] + (xv @ z[p + "v1"]) @ z[p + "v2"])
            decay = torch.exp(-math.exp(-0.5) * torch.sigmoid(z[p + "w0"] + w))
            vk = v.view(H, N, 1) @ k.view(H, 1, N)
            ab = (-kk).view(H, N, 1) @ (kk * a).view(H, 1, N)
            S[i] = S[i] * decay.view(H, 1, N) + S[i] @ ab + vk
            y = (S[i] @ r.view(H, N, 1)).view(1, C)
            y = F.group_norm(y, H, z[p + "ln_x.weight"], z[p + "ln_x.bias"], eps=N * 1e-5).view(C)
            y = y + ((r * k * z[p + "r_k"].view(C)).view(H, N).sum(-1, keepdim=True) * v.view(H, N)).view(C)
            x = x + z[p + "output.weight"] @ (y * g)

            f = f"blocks.{i}.ffn."
            c = ln(x, f"blocks.{i}.ln2")
            cx = c + (ffn_prev[i] - c) * z[f + "x_k"]
            ffn_prev[i] = c
            x = x + z[f + "value.weight"] @ torch.relu(z[f + "key.weight"] @ cx) ** 2
        logits.append(z["head.weight"] @ ln(x, "ln_out"))
    return torch.stack(logits), S
