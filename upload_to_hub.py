"""Maintainers' tool: convert official RWKV-7 checkpoints to the fla-hub layout and keep Hub repos' code current.

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

import re

import torch


_LORA = {"w": "w_lora", "a": "a_lora", "v": "v_lora", "g": "g_lora"}
_PROJ = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj"}
_DEEP_EMBED = re.compile(r"\.(s_emb|s_emb_x|s0|s1|s2)(\.|$)")


class UnsupportedCheckpoint(ValueError):
    """The .pth is not a plain RWKV-7 x070 checkpoint this package implements."""


def official_to_fla(key: str, tensor: torch.Tensor):
    """Maps one official tensor to its fla-hub name and layout; returns None for tensors fla-hub drops."""
    if _DEEP_EMBED.search(key):
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
