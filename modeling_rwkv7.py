"""RWKV-7 ("Goose") for transformers, as remote code next to the fla-hub checkpoints.

The math is the official RWKV-7 x070 forward (BlinkDL's `rwkv` package, `rwkv/model.py`); the weight names are
flash-linear-attention's, so fla-hub safetensors load as they are. Per layer, in order:

    x = pre_norm(embeddings)                         layer 0 only (the official ln0)
    x = x + attn(attn_norm(x))                       time mix: token shift, WKV-7 recurrence, GroupNorm, gate
    x = x + ffn(ffn_norm(x))                         channel mix: token shift, relu(.)^2
    logits = lm_head(norm(x))                        head not tied to the embeddings

The recurrence and the elementwise ops live in the `rwkv7_kernels/` folder beside this file: Triton on CUDA, plain
PyTorch elsewhere (see `load_kernels` for how this file finds that folder).
"""

import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

try:  # as remote code, transformers imports this file inside a package
    from .configuration_rwkv7 import RWKV7Config
except ImportError:  # imported straight from a source checkout, whose folder is on sys.path
    # not an import statement: transformers 4.48's scanner of remote code would count one here as a required package
    RWKV7Config = importlib.import_module("configuration_rwkv7").RWKV7Config


logger = logging.get_logger(__name__)

# Weights of the official DeepEmbed variant (rwkv7a), which this package does not implement: refused by name.
DEEP_EMBED_KEY = re.compile(r"\.ffn\.(s_emb|s_emb_x|s0|s1|s2)(\.|$)")

# transformers 5.24 renamed the cache's keyword argument and output field from `past_key_values` to `cache` and
# warns about the old name. The model takes the cache under either name on every version and returns it under the
# installed version's name; RWKV7ModelOutput and RWKV7CausalLMOutput also read it as `.cache` before 5.24.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _check_not_empty(inputs):
    """A clear error for input_ids [B, 0] (or inputs_embeds [B, 0, C]): there is no token to compute logits for."""
    if inputs.dim() >= 2 and inputs.shape[1] == 0:
        raise ValueError(f"the input is empty (shape {tuple(inputs.shape[:2])}): pass at least one token per row")


def _one_cache(cache, past_key_values):
    """The cache given under either of its names (see CACHE_NAME), checked; None if none was given."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("two different caches were given, as `cache` and as `past_key_values`: pass one")
    cache = past_key_values if cache is None else cache
    if cache is not None and not isinstance(cache, RWKV7Cache):
        raise TypeError(f"the cache must be an RWKV7Cache (returned by this model), got {type(cache).__name__}")
    return cache


@dataclass
class RWKV7ModelOutput(BaseModelOutputWithPast):
    """transformers' BaseModelOutputWithPast, whose cache reads as `.cache` on every transformers version."""

    if CACHE_NAME != "cache":
        cache = property(lambda self: self.past_key_values)


@dataclass
class RWKV7CausalLMOutput(CausalLMOutputWithPast):
    """transformers' CausalLMOutputWithPast, whose cache reads as `.cache` on every transformers version."""

    if CACHE_NAME != "cache":
        cache = property(lambda self: self.past_key_values)

# The bundled rwkv7_kernels/ package, imported by load_kernels() when the first model is built.
kernels = None


def _repo_folder(name_or_path, revision, allow_patterns, cache_dir=None):
    """The folder holding `name_or_path`'s files: the folder itself, or the Hub snapshot at `revision`.

    For a Hub repo the files matching `allow_patterns` are fetched if they are not in the cache yet (offline, the
    cache must have them).
    """
    if os.path.isdir(name_or_path):
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(repo_id=name_or_path, revision=revision, allow_patterns=allow_patterns, cache_dir=cache_dir)
    )


def _commit_of_this_file():
    """The Hub commit this file came from: transformers copies a Hub repo's code into a folder named after the
    commit it was downloaded at (in every version from 4.x to 5.x). None for a file that is not such a copy."""
    name = Path(__file__).resolve().parent.name
    return name if re.fullmatch(r"[0-9a-f]{40}", name) else None


def load_kernels(config=None):
    """Imports the `rwkv7_kernels/` package that ships with this file and binds it to this module's `kernels` name.

    transformers' remote-code loader copies only the flat .py files of a model repo into its module cache, so a
    package import would fail there. The folder is found on disk instead, in this order:
      1. next to this file (a source checkout, or a copy that kept the folder);
      2. in the local folder the model was loaded from (`config.name_or_path`);
      3. in the Hub repo the config came from, at the commit this file came from, so modeling file and kernels
         always match; with HF_HUB_OFFLINE=1 it comes from the cache.
    It is imported under a name unique to its path, so two model revisions in one process keep their own kernels.
    """
    global kernels
    if kernels is not None:
        return kernels
    folder = Path(__file__).resolve().parent / "rwkv7_kernels"
    if not (folder / "__init__.py").is_file():
        name_or_path = getattr(config, "name_or_path", "") or ""
        if not name_or_path:
            raise ImportError(
                "modeling_rwkv7.py cannot find its rwkv7_kernels/ folder: it is not next to this file and the config does "
                "not say where the model came from. Load the model with from_pretrained(path_or_repo_id, "
                "trust_remote_code=True), or keep rwkv7_kernels/ next to modeling_rwkv7.py."
            )
        folder = _repo_folder(name_or_path, _commit_of_this_file(), ["rwkv7_kernels/*.py"]) / "rwkv7_kernels"
        if not (folder / "__init__.py").is_file():
            raise ImportError(
                f"{name_or_path} has no rwkv7_kernels/ folder next to modeling_rwkv7.py (looked in {folder.parent}). "
                "Upload the whole RWKV-7 code package (upload_to_hub.py update-code) to that repo."
            )
    module_name = "rwkv7_kernels_" + hashlib.sha1(str(folder).encode()).hexdigest()[:16]
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            module_name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    kernels = sys.modules[module_name]
    return kernels


class RWKV7Cache(Cache):
    """The recurrent state of every layer: what RWKV-7 carries from one call to the next.

    Per layer: `wkv` [B, H, K, V] float32 (the WKV state, fla's layout: the transpose of the official [H, V, K]),
    `attn_shift` and `ffn_shift` [B, C] (the last token's normalised input to the time and channel mix).

    The state stands for every token seen so far, so a call with a cache passes only the tokens that follow
    (in `generate` too: pass the new tokens and the cache). Copy a cache with `copy.deepcopy` to branch from it;
    a forward updates the cache it is given in place.
    """

    is_compileable = False

    def __init__(self):
        if isinstance(self, nn.Module):  # transformers < 4.53: Cache is an nn.Module
            nn.Module.__init__(self)
        self.wkv: list[torch.Tensor] = []
        self.attn_shift: list[torch.Tensor] = []
        self.ffn_shift: list[torch.Tensor] = []
        self.num_seen_tokens = 0  # tokens the state has consumed (padding included)

    def __len__(self):
        return len(self.wkv)

    def __repr__(self):
        return f"RWKV7Cache(layers={len(self)}, batch_size={self.batch_size}, num_seen_tokens={self.num_seen_tokens})"

    @property
    def batch_size(self):
        return self.wkv[0].shape[0] if self.wkv else 0

    @property
    def is_linear(self) -> list[bool]:
        """Every layer's state is a linear-attention state (transformers 5.24's generate asks: it then does not
        look for already cached positions of the input)."""
        return [True] * len(self)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Always 0. `generate` asks how many of the given tokens the cache already holds, to skip them; an RWKV
        cache holds none of the tokens it is given (see the class docstring). `num_seen_tokens` counts what it holds."""
        return 0

    def layer_states(self, layer_idx, batch_size, config, device, dtype):
        """(wkv, attn_shift, ffn_shift) of one layer; zeros before the layer's first update."""
        if layer_idx == len(self.wkv):
            H, N, C = config.num_heads, config.head_dim, config.hidden_size
            return (
                torch.zeros(batch_size, H, N, N, dtype=torch.float32, device=device),
                torch.zeros(batch_size, C, dtype=dtype, device=device),
                torch.zeros(batch_size, C, dtype=dtype, device=device),
            )
        if self.wkv[layer_idx].shape[0] != batch_size:
            raise ValueError(
                f"the cache holds {self.wkv[layer_idx].shape[0]} sequences but the input has {batch_size}; "
                "pass a cache of the same batch size, or one whose batch size divides the input's"
            )
        return self.wkv[layer_idx], self.attn_shift[layer_idx], self.ffn_shift[layer_idx]

    def update_layer(self, layer_idx, wkv, attn_shift, ffn_shift):
        if layer_idx == len(self.wkv):
            self.wkv.append(wkv)
            self.attn_shift.append(attn_shift)
            self.ffn_shift.append(ffn_shift)
        else:
            self.wkv[layer_idx], self.attn_shift[layer_idx], self.ffn_shift[layer_idx] = wkv, attn_shift, ffn_shift

    def _apply_to_all(self, fn):
        for states in (self.wkv, self.attn_shift, self.ffn_shift):
            states[:] = [fn(s) for s in states]

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Beam search: row i of the new cache is row beam_idx[i] of the old one (in place: a decoding CUDA graph
        keeps using the same tensors)."""
        for states in (self.wkv, self.attn_shift, self.ffn_shift):
            for s in states:
                s.copy_(s.index_select(0, beam_idx.to(s.device)))

    def batch_repeat_interleave(self, repeats: int):
        self._apply_to_all(lambda s: s.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        self._apply_to_all(lambda s: s[indices.to(s.device)])

    def crop(self, max_length: int):
        raise NotImplementedError(
            "An RWKV-7 state cannot be rewound to an earlier token; keep a copy.deepcopy of the cache instead."
        )

    def reset(self):
        self._apply_to_all(torch.zeros_like)
        self.num_seen_tokens = 0


def _plain_linear(module):
    """An nn.Linear whose weight the kernels may read directly: not a PEFT or quantised layer, and not hooked by
    accelerate (which moves or offloads its weight around each call, and keeps its hook in the instance __dict__:
    looked up there, not with a hasattr that would fail through nn.Module's slow __getattr__)."""
    return type(module) is nn.Linear and "_hf_hook" not in module.__dict__


def linear(module, x, activation=None, residual=None):
    """residual + activation(module(x)). A plain nn.Linear goes through kernels.linear, which fuses the three on
    CUDA for batch-1 decoding; any other layer (PEFT, quantised, or hooked by accelerate to move or offload its
    weights) runs itself, then the activation and residual."""
    if _plain_linear(module):
        # read straight from _parameters: this runs for every projection of a decoding step, and on CPython 3.11
        # `module.weight` first fails a plain lookup, formatting an AttributeError, before Module.__getattr__
        # answers (about 1 us each, a good part of a CPU decoding step's Python time)
        params = module._parameters
        return kernels.linear(x, params["weight"], params["bias"], activation, residual)
    return kernels.apply_activation(module(x), activation, residual)


def norm_mix_project(x, norm, shift_state, projections, attention_mask, decoding):
    """The input side of a time or channel mix: x normalised by `norm`, token-shifted, one lerp per projection, and
    the projections: [activation(module(xn + (xn_prev - xn) * mix))] for (mix, module, activation) in projections.

    Returns (the outputs in order, the new shift state). A decoding step on CUDA with plain nn.Linear modules runs
    the fused kernels (kernels.fused_norm_mix_linear); otherwise norm/shift/lerps, then each module.
    """
    if decoding and kernels.fused_decoding(x) and all(_plain_linear(m) for _, m, _ in projections):
        outputs = kernels.fused_norm_mix_linear(
            x, norm.weight, norm.bias, norm.eps, shift_state, [(mix, m.weight, act) for mix, m, act in projections],
            attention_mask,
        )
        return outputs, shift_state
    mixes = [mix for mix, _, _ in projections]
    mixed, last_x = kernels.norm_shift_mix(
        x, norm.weight, norm.bias, norm.eps, shift_state, mixes, attention_mask, in_place=decoding
    )
    return [linear(m, xm, act) for xm, (_, m, act) in zip(mixed, projections)], last_x


class LoRA(nn.Module):
    """x -> act(x A) B (+ bias): the low-rank projections of the time mix (fla's `lora.0`, `lora.2`). The time mix
    applies the two halves itself (`down`, `up`): the down-projection is fused with the other input projections."""

    ACTIVATIONS = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Identity: None}

    def __init__(self, dim: int, rank: int, activation: nn.Module, bias: bool):
        super().__init__()
        self.lora = nn.Sequential(nn.Linear(dim, rank, bias=False), activation, nn.Linear(rank, dim, bias=bias))
        self.activation = self.ACTIVATIONS[type(activation)]

    @property
    def down(self):
        return self.lora[0]

    @property
    def up(self):
        return self.lora[2]


class RWKV7TimeMix(nn.Module):
    """The attention replacement: six token-shift lerps, the LoRAs, the WKV-7 recurrence, GroupNorm, the gate."""

    def __init__(self, config: RWKV7Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        C, H, N = config.hidden_size, config.num_heads, config.head_dim
        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (
            nn.Parameter(torch.empty(1, 1, C)) for _ in range(6)
        )
        self.k_k = nn.Parameter(torch.empty(C))
        self.k_a = nn.Parameter(torch.empty(C))
        self.r_k = nn.Parameter(torch.empty(H, N))
        self.r_proj = nn.Linear(C, C, bias=False)
        self.k_proj = nn.Linear(C, C, bias=False)
        self.v_proj = nn.Linear(C, C, bias=False)
        self.o_proj = nn.Linear(C, C, bias=False)
        self.w_lora = LoRA(C, config.decay_low_rank_dim, nn.Tanh(), bias=True)
        self.a_lora = LoRA(C, config.a_low_rank_dim, nn.Identity(), bias=True)
        if layer_idx > 0:  # layer 0 produces v_first; the others mix it in
            self.v_lora = LoRA(C, config.v_low_rank_dim, nn.Identity(), bias=True)
        self.g_lora = LoRA(C, config.gate_low_rank_dim, nn.Sigmoid(), bias=False)
        self.g_norm = nn.GroupNorm(H, C, eps=N * config.norm_eps)

    def forward(self, x, norm, v_first, wkv_state, shift_state, attention_mask, decoding):
        """x [B, T, C] (the residual stream, normalised here by `norm`, the block's attn_norm); wkv_state
        [B, H, K, V] float32 or None (no cache); shift_state [B, C].

        Returns (x + the time mix's output, v_first, new wkv_state, new shift_state). When `decoding` (one token, a
        cache, no autograd) the states are updated in place and returned, so a CUDA graph of the step can own them;
        otherwise the new states are new tensors (wkv_state None without a cache).
        """
        # r, k, v and the LoRA down-projections, all reading lerps of the normalised x
        loras = {"w": (self.x_w, self.w_lora), "a": (self.x_a, self.a_lora), "g": (self.x_g, self.g_lora)}
        if self.layer_idx > 0:
            loras["v"] = (self.x_v, self.v_lora)
        projections = [(self.x_r, self.r_proj, None), (self.x_k, self.k_proj, None), (self.x_v, self.v_proj, None)]
        projections += [(mix, lora.down, lora.activation) for mix, lora in loras.values()]
        (r, k, v, *hidden), last_x = norm_mix_project(x, norm, shift_state, projections, attention_mask, decoding)
        hidden = dict(zip(loras, hidden))  # "w" -> tanh(x_w W1), ...

        # the LoRA up-projections, the decay, kk, the k update, the v_first mix, WKV-7, GroupNorm, the bonus and
        # the gate: see rwkv7_kernels/ops_reference.py (time_mix_reference)
        params = (self.k_k, self.k_a, self.r_k, self.g_norm.weight, self.g_norm.bias, self.g_norm.eps)
        ups = {name: lora.up for name, (_, lora) in loras.items()}
        if (
            decoding
            and kernels.fused_decoding(x, head_dim=self.r_k.shape[1])
            and all(_plain_linear(up) for up in ups.values())
        ):
            def lora(name):  # (hidden activations, up weight, bias) for the fused kernel
                return (hidden[name], ups[name].weight, ups[name].bias) if name in hidden else None

            y, v_first, wkv_state = kernels.fused_time_mix(
                r, k, v, lora("w"), lora("a"), lora("v"), lora("g"), v_first, *params, attention_mask, wkv_state
            )
        else:
            def lora(name):  # the LoRA's output
                return linear(ups[name], hidden[name]) if name in hidden else None

            y, v_first, wkv_state = kernels.time_mix(
                r, lora("w"), k, v, lora("a"), lora("v"), v_first, lora("g"), *params, attention_mask, wkv_state,
                in_place=decoding,
            )
        return linear(self.o_proj, y, residual=x), v_first, wkv_state, last_x


class RWKV7ChannelMix(nn.Module):
    """The feed-forward: a token-shift lerp, then relu(x W_key)^2 W_value."""

    def __init__(self, config: RWKV7Config):
        super().__init__()
        self.x_k = nn.Parameter(torch.empty(config.hidden_size))
        self.key = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.value = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x, norm, shift_state, attention_mask, decoding):
        """x [B, T, C] (the residual stream, normalised here by `norm`, the block's ffn_norm), shift_state [B, C].
        Returns (x + the channel mix's output, new shift_state); in place when decoding."""
        (k,), last_x = norm_mix_project(x, norm, shift_state, [(self.x_k, self.key, "relu2")], attention_mask, decoding)
        return linear(self.value, k, residual=x), last_x


class RWKV7Block(nn.Module):
    def __init__(self, config: RWKV7Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        # layer 0 normalises the embeddings; elsewhere None, a plain attribute (a missing one would make every
        # forward fail a lookup through nn.Module.__getattr__, which costs a CPU decoding step measurable time)
        self.pre_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
            if config.norm_first and layer_idx == 0
            else None
        )
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.attn = RWKV7TimeMix(config, layer_idx)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.ffn = RWKV7ChannelMix(config)

    def forward(self, x, v_first, wkv_state, attn_shift, ffn_shift, attention_mask):
        """Returns (x, v_first, new wkv_state, new attn_shift, new ffn_shift).

        Decoding (one token with a cache, no autograd) updates the states in place; see RWKV7TimeMix.forward."""
        decoding = wkv_state is not None and x.shape[1] == 1 and not torch.is_grad_enabled()
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        x, v_first, wkv_state, attn_shift = self.attn(
            x, self.attn_norm, v_first, wkv_state, attn_shift, attention_mask, decoding
        )
        x, ffn_shift = self.ffn(x, self.ffn_norm, ffn_shift, attention_mask, decoding)
        return x, v_first, wkv_state, attn_shift, ffn_shift


class RWKV7PreTrainedModel(PreTrainedModel):
    config_class = RWKV7Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RWKV7Block"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # generate refuses assisted decoding, which would need the state rewound to drop rejected tokens: transformers
    # before 5.25 for a model that is stateful, from 5.25 on for a mode this list does not name
    _is_stateful = True
    _supported_generation_modes = ["greedy_search", "sample", "beam_search", "beam_sample"]
    _supports_cache_class = True  # transformers 4.4x: generate accepts an RWKV7Cache as its cache

    @classmethod
    def _supports_default_dynamic_cache(cls):
        """generate must not make a DynamicCache for this model: its forward makes an RWKV7Cache."""
        return False

    def __init__(self, config: RWKV7Config, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        load_kernels(config)

    @torch.no_grad()
    def _init_weights(self, module):
        """Initialisation for training from scratch, after the official RWKV-7 recipe (RWKV-LM, RWKV-v7/train_temp).
        Loading a checkpoint never relies on it: a missing weight is an error (see from_pretrained)."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            module.weight.fill_(1.0)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, (RWKV7TimeMix, RWKV7ChannelMix)):
            L = self.config.num_hidden_layers
            layer_idx = getattr(module, "layer_idx", 0)
            ratio_1_to_almost0 = 1.0 - layer_idx / L
            channel = torch.arange(self.config.hidden_size, dtype=torch.float32) / self.config.hidden_size
            if isinstance(module, RWKV7ChannelMix):
                module.x_k.copy_(1.0 - channel ** (ratio_1_to_almost0**4))
                return
            ratio_0_to_1 = layer_idx / max(L - 1, 1)
            for mix, power in [("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)]:
                getattr(module, mix).copy_((1.0 - channel ** (power * ratio_1_to_almost0)).view(1, 1, -1))
            C = self.config.hidden_size
            decay_speed = -7 + 5 * (torch.arange(C) / max(C - 1, 1)) ** (0.85 + ratio_0_to_1**0.5)
            module.w_lora.lora[2].bias.copy_(decay_speed + 0.5)
            module.k_k.fill_(0.85)
            module.k_a.fill_(1.0)
            module.r_k.fill_(-0.04)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' from_pretrained, made strict: every weight the model needs must be in the checkpoint.

        Older fla-hub uploads pack the six token-shift mixes of each layer into one `attn.x_x` [6, C] tensor (rows
        r, w, k, v, a, g); they are unpacked here, after loading, because no loading hook of transformers runs
        for remote code in every version. Official variants this package does not implement are refused.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        # transformers' own report of missing and unexpected weights would call unpacked x_x mixes "newly
        # initialized"; it is dropped, since every real mismatch raises below
        loading_logger = logging.get_logger("transformers.modeling_utils")
        loading_logger.addFilter(_drop_loading_report)
        try:
            # weights of the wrong shape are reported in `info` (and raise below) rather than by transformers, whose
            # message points at the report dropped here
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
        finally:
            loading_logger.removeFilter(_drop_loading_report)
        missing, unexpected = set(info["missing_keys"]), set(info["unexpected_keys"])
        # transformers' entries are names (4.57) or (name, checkpoint shape, model shape) (4.48, 5.x)
        mismatched = sorted(entry if isinstance(entry, str) else entry[0] for entry in info.get("mismatched_keys", ()))
        folder = None

        def checkpoint_folder():
            return _repo_folder(
                pretrained_model_name_or_path, kwargs.get("revision"), ["*.safetensors", "*.bin"], kwargs.get("cache_dir")
            )

        if mismatched and not ignore_mismatched_sizes:
            folder = checkpoint_folder()
            stored, expected = _checkpoint_shapes(folder), model.state_dict()
            prefix = model.base_model_prefix + "."
            shapes = [
                f"{name} is {stored.get(name) or stored.get(prefix + name) or stored.get(name.removeprefix(prefix))} "
                f"in the checkpoint and {list(expected[name].shape)} in the model"
                for name in mismatched
            ]
            raise ValueError(
                f"{pretrained_model_name_or_path}: weights of the wrong shape for its config.json: {'; '.join(shapes)}. "
                "Check that config.json describes the checkpoint (vocab_size, hidden_size, head_dim, the LoRA ranks)."
            )
        if model.base_model is model:  # a base model from a checkpoint with a head: the head is not loaded
            unexpected = {k for k in unexpected if not k.startswith("lm_head.")}

        deep_embed = sorted(k for k in unexpected if DEEP_EMBED_KEY.search(k))
        if deep_embed:
            raise ValueError(
                f"{pretrained_model_name_or_path} is an RWKV-7 DeepEmbed variant ({', '.join(deep_embed[:4])}, ...), "
                "which this package does not implement."
            )
        packed = {k for k in unexpected if k.endswith("attn.x_x")}
        if packed:
            # transformers initialised the modules whose x_* it could not find (overwriting some loaded neighbours),
            # so load the whole checkpoint again, unpacked
            result = model.load_state_dict(_read_unpacked_checkpoint(model, folder or checkpoint_folder()), strict=False)
            missing, unexpected = set(result.missing_keys), set(result.unexpected_keys)
        if missing or unexpected:
            raise ValueError(
                f"{pretrained_model_name_or_path} does not match the RWKV-7 layout this code expects. "
                f"Missing weights: {sorted(missing) or 'none'}. Unexpected weights: {sorted(unexpected) or 'none'}. "
                "Check that config.json describes the checkpoint (hidden_size, num_hidden_layers, the LoRA ranks)."
            )
        info["missing_keys"], info["unexpected_keys"] = [], []
        return (model, info) if output_loading_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves as transformers does, with this code: the .py files, `auto_map` and the rwkv7_kernels/ folder, so the saved
        folder loads with `trust_remote_code=True` (also for a model built from this source checkout)."""
        if self._auto_class is None:  # transformers registers remote-code classes itself only from 4.50 on
            self.register_for_auto_class("AutoModelForCausalLM" if isinstance(self, GenerationMixin) else "AutoModel")
            self.config.register_for_auto_class()
        super().save_pretrained(save_directory, *args, **kwargs)
        shutil.copytree(
            Path(kernels.__file__).parent,
            Path(save_directory) / "rwkv7_kernels",
            ignore=shutil.ignore_patterns("__pycache__"),
            dirs_exist_ok=True,
        )


def _drop_loading_report(record):
    """A logging filter: False for transformers' report of missing / unexpected weights (4.x and 5.x wording)."""
    message = record.getMessage()
    return not any(m in message for m in ("LOAD REPORT", "newly initialized", "were not used when initializing"))


def _checkpoint_shapes(folder):
    """{name: [shape]} of the weights stored in `folder` (safetensors or PyTorch .bin files), read without loading
    the safetensors data."""
    shapes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            shapes.update({k: list(f.get_slice(k).get_shape()) for k in f.keys()})
    for path in sorted(folder.glob("*.bin")):
        shapes.update({k: list(v.shape) for k, v in torch.load(path, map_location="meta", weights_only=True).items()})
    return shapes


def _read_unpacked_checkpoint(model, folder):
    """The state dict of the checkpoint in `folder` (safetensors or PyTorch .bin files), with each packed
    `attn.x_x` [6, C] split into attn.x_r, x_w, x_k, x_v, x_a, x_g [1, 1, C], named for `model`."""
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    for path in sorted(folder.glob("*.bin")):
        state.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    for key in [k for k in state if k.endswith("attn.x_x")]:
        for row, name in zip(state.pop(key).reshape(6, 1, 1, -1), ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")):
            state[key.removesuffix("x_x") + name] = row
    if model.base_model is model:  # RWKV7Model: the files name its weights with the "model." prefix, and no head
        prefix = model.base_model_prefix + "."
        state = {k.removeprefix(prefix): v for k, v in state.items() if not k.startswith("lm_head.")}
    return state


class RWKV7Model(RWKV7PreTrainedModel):
    def __init__(self, config: RWKV7Config):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([RWKV7Block(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: RWKV7Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: RWKV7Cache | None = None,
        **kwargs,
    ):
        """input_ids [B, T] (or inputs_embeds [B, T, C]); attention_mask [B, T] or [B, S >= T] (generate passes the
        mask of the whole sequence so far: its last T columns belong to this call), 1 = token, 0 = padding.
        cache (or past_key_values, its name before transformers 5.24): an RWKV7Cache, updated in place."""
        if output_attentions:
            raise ValueError("RWKV-7 has no attention weights to output; call it with output_attentions=False")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if self.gradient_checkpointing and self.training and use_cache:
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing; using use_cache=False")
            use_cache = False
        cache = _one_cache(cache, past_key_values)

        x = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        _check_not_empty(x)
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
                raise ValueError(f"attention_mask must be [batch, >= {T}] (1 = token, 0 = padding), got {tuple(attention_mask.shape)}")
            attention_mask = attention_mask[:, -T:]
            if T > 1 and bool(attention_mask.all()):
                # no padding (generate passes a mask even for one prompt): the mask-free sequence path runs fused
                # kernels. One host sync per prompt; decoding steps (T = 1) keep their mask and need none.
                attention_mask = None
        if cache is None and use_cache:
            cache = RWKV7Cache()
        if cache is not None and len(cache) and B != cache.batch_size and B % cache.batch_size == 0:
            # one state per n rows: branch it, as generate expands the rows (num_return_sequences, beams)
            cache.batch_repeat_interleave(B // cache.batch_size)

        all_hidden_states = () if output_hidden_states else None
        v_first = None
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (x,)
            if cache is not None:
                wkv, attn_shift, ffn_shift = cache.layer_states(i, B, self.config, x.device, x.dtype)
            else:
                wkv, attn_shift, ffn_shift = None, x.new_zeros(B, x.shape[-1]), x.new_zeros(B, x.shape[-1])
            if self.gradient_checkpointing and self.training:
                outputs = self._gradient_checkpointing_func(
                    layer.__call__, x, v_first, wkv, attn_shift, ffn_shift, attention_mask
                )
            else:
                outputs = layer(x, v_first, wkv, attn_shift, ffn_shift, attention_mask)
            x, v_first, wkv, attn_shift, ffn_shift = outputs
            if cache is not None:
                cache.update_layer(i, wkv, attn_shift, ffn_shift)
        x = self.norm(x)
        if output_hidden_states:
            all_hidden_states += (x,)
        if cache is not None:
            cache.num_seen_tokens += T

        output = RWKV7ModelOutput(
            last_hidden_state=x, **{CACHE_NAME: cache if use_cache else None}, hidden_states=all_hidden_states
        )
        return output if return_dict else output.to_tuple()


_WARMUP_STREAMS = {}


def _warmup_stream(device):
    """One side stream per device for graph warm-ups: cuBLAS keeps a workspace for every stream it has run on,
    so a new stream per graph would leave a workspace behind each time."""
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[device]


class RWKV7DecodeGraph:
    """A CUDA graph of one decoding step of RWKV7ForCausalLM (one token per row, a fixed batch size), replayed
    instead of launching the step's few hundred kernels one by one from Python.

    The graph reads and updates static state tensors in place. Rather than copying states in and out at every
    step, it lends those tensors to the cache being decoded: the cache's entries become the static tensors (one
    copy, on its first graphed step), and stay so while that cache keeps decoding. When another cache comes, the
    previous one first gets copies of its states back, so no two caches ever share a tensor.
    """

    def __init__(self, model, batch_size):
        p = model.lm_head.weight
        self.input_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=p.device)
        self.attention_mask = torch.ones(batch_size, 1, dtype=torch.long, device=p.device)
        self.mask_is_ones = True  # whether attention_mask holds ones: a step without a mask then needs no fill
        self.cache = RWKV7Cache()
        for i in range(model.config.num_hidden_layers):
            self.cache.update_layer(i, *self.cache.layer_states(i, batch_size, model.config, p.device, p.dtype))
        self.owner = None  # weak reference to the cache the static states are lent to

        def step():
            return model._forward_eager(
                input_ids=self.input_ids, attention_mask=self.attention_mask, cache=self.cache,
                use_cache=True, return_dict=True,
            ).logits

        with torch.no_grad():
            side = _warmup_stream(p.device)  # warm up (compile kernels, set up cuBLAS) off the capturing stream
            side.wait_stream(torch.cuda.current_stream(p.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            torch.cuda.current_stream(p.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = step()

    def _states(self, cache):
        return cache.wkv + cache.attn_shift + cache.ffn_shift

    def _holds(self, cache):
        return all(mine is theirs for mine, theirs in zip(self._states(self.cache), self._states(cache)))

    def _lend_to(self, cache):
        owner = self.owner() if self.owner is not None else None
        if owner is not None and owner is not cache and self._holds(owner):
            owner.wkv, owner.attn_shift, owner.ffn_shift = (
                [t.clone() for t in states] for states in (owner.wkv, owner.attn_shift, owner.ffn_shift)
            )
        torch._foreach_copy_(self._states(self.cache), self._states(cache))
        cache.wkv, cache.attn_shift, cache.ffn_shift = (
            list(states) for states in (self.cache.wkv, self.cache.attn_shift, self.cache.ffn_shift)
        )
        self.owner = weakref.ref(cache)

    def __call__(self, input_ids, attention_mask, cache):
        if not self._holds(cache):
            self._lend_to(cache)
        self.input_ids.copy_(input_ids)
        if attention_mask is not None:
            self.attention_mask.copy_(attention_mask[:, -1:])
            self.mask_is_ones = False
        elif not self.mask_is_ones:  # a step without a mask after one with it: no padding from here on
            self.attention_mask.fill_(1)
            self.mask_is_ones = True
        self.graph.replay()
        cache.num_seen_tokens += 1
        return self.logits.clone()  # the next replay overwrites the static output


class RWKV7ForCausalLM(RWKV7PreTrainedModel, GenerationMixin):
    def __init__(self, config: RWKV7Config):
        super().__init__(config)
        self.model = RWKV7Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._decode_graphs = None  # batch size -> RWKV7DecodeGraph; False where graphs cannot be used
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embeddings

    def set_input_embeddings(self, value):
        self.model.embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: RWKV7Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: RWKV7Cache | None = None,
        **kwargs,
    ):
        """labels [B, T]: the loss is next-token cross entropy, shifted inside; label -100 is ignored.
        logits_to_keep: compute logits for the last n positions only (0: all).
        cache (or past_key_values, its name before transformers 5.24): an RWKV7Cache, updated in place.

        On CUDA, a decoding step (one token per row, a cache that has seen the prompt, no autograd, nothing but
        logits asked for) replays a CUDA graph of the step (RWKV7DecodeGraph): same results, far fewer launches.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        cache = _one_cache(cache, past_key_values)
        if (
            input_ids is not None
            and input_ids.shape[1] == 1
            and input_ids.is_cuda
            and cache is not None
            and len(cache) == self.config.num_hidden_layers
            and cache.batch_size == input_ids.shape[0]
            and use_cache is not False
            and labels is None
            and not output_hidden_states
            and not torch.is_grad_enabled()
            and not torch.cuda.is_current_stream_capturing()
            and self._decode_graphs_enabled()
        ):
            logits = self._decode_graph(input_ids.shape[0])(input_ids, attention_mask, cache)
            output = RWKV7CausalLMOutput(logits=logits, **{CACHE_NAME: cache})
            return output if return_dict else output.to_tuple()
        return self._forward_eager(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache,
            labels=labels,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=return_dict,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def _forward_eager(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        cache=None,
        labels=None,
        use_cache=None,
        output_hidden_states=None,
        output_attentions=None,
        return_dict=None,
        logits_to_keep=0,
        **kwargs,
    ):
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        hidden = outputs.last_hidden_state
        logits = linear(self.lm_head, hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = RWKV7CausalLMOutput(
            loss=loss, logits=logits, **{CACHE_NAME: outputs.cache}, hidden_states=outputs.hidden_states
        )
        return output if return_dict else output.to_tuple()

    def _decode_graphs_enabled(self):
        """Graphs need the whole model on one CUDA device (not split with device_map) and in eval mode."""
        if self._decode_graphs is None:
            devices = {p.device for p in self.parameters()}
            self._decode_graphs = {} if len(devices) == 1 and next(iter(devices)).type == "cuda" else False
        return self._decode_graphs is not False and not self.training

    def _decode_graph(self, batch_size):
        if batch_size not in self._decode_graphs:
            self._decode_graphs[batch_size] = RWKV7DecodeGraph(self, batch_size)
        return self._decode_graphs[batch_size]

    def release_decode_graphs(self):
        """Frees the CUDA graphs of decoding steps (and their memory); the next decoding step captures anew."""
        self._decode_graphs = None

    def _apply(self, fn, *args, **kwargs):
        self.release_decode_graphs()  # .to(), .cuda(), .half() ... move the weights a graph was captured on
        return super()._apply(fn, *args, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids,
        cache=None,
        attention_mask=None,
        inputs_embeds=None,
        cache_position=None,
        next_sequence_length=None,
        is_first_iteration=None,
        past_key_values=None,
        **kwargs,
    ):
        """What each step of `generate` feeds the model: the whole prompt first, then only the new token(s).

        The prompt is everything generate was given (with a cache: the tokens that follow the cached state).
        transformers 5 marks the first step with `is_first_iteration` and later ones with `next_sequence_length`;
        4.x passes `cache_position`, which starts at 0 on the first step. The cache comes as `cache` from 5.24 on,
        as `past_key_values` before, and goes to the model under the same name.
        """
        cache = _one_cache(cache, past_key_values)
        if cache_position is not None:
            first_step = int(cache_position[0]) == 0
        else:
            first_step = bool(is_first_iteration) or next_sequence_length is None
        model_inputs = {CACHE_NAME: cache, "attention_mask": attention_mask}
        if inputs_embeds is not None and first_step:
            model_inputs["inputs_embeds"] = inputs_embeds
        elif cache is None or first_step:
            model_inputs["input_ids"] = input_ids
        else:
            model_inputs["input_ids"] = input_ids[:, -(next_sequence_length or 1) :]
        kwargs.pop("position_ids", None)
        model_inputs.update(kwargs)
        return model_inputs

    def generate(self, *args, **kwargs):
        """transformers' `generate`. A cache to continue from may be passed as `cache` or as `past_key_values` with
        every transformers version (see CACHE_NAME); it is handed on under the installed version's name."""
        inputs = args[0] if args else next((kwargs[k] for k in ("inputs", "input_ids", "inputs_embeds") if k in kwargs), None)
        if isinstance(inputs, torch.Tensor):
            _check_not_empty(inputs)
        other_name = "past_key_values" if CACHE_NAME == "cache" else "cache"
        if other_name in kwargs:
            kwargs[CACHE_NAME] = _one_cache(kwargs.get(CACHE_NAME), kwargs.pop(other_name))
        return super().generate(*args, **kwargs)
