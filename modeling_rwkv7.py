"""RWKV-7 ("Goose") for transformers, as remote code next to the fla-hub checkpoints.

The math is the official RWKV-7 x070 forward (BlinkDL's `rwkv` package, `rwkv/model.py`); the weight names are
flash-linear-attention's, so fla-hub safetensors load as they are. Per layer, in order:

    x = pre_norm(embeddings)                         layer 0 only (the official ln0)
    x = x + attn(attn_norm(x))                       time mix: token shift, WKV-7 recurrence, GroupNorm, gate
    x = x + ffn(ffn_norm(x))                         channel mix: token shift, relu(.)^2
    logits = lm_head(norm(x))                        head not tied to the embeddings

Which code computes a forward is decided once per forward by `choose_path` (the paths: `ForwardPath`): the math above in
PyTorch, the same with Triton kernels for its non-linear ops, fused kernels for a decoding step, or the replay of a
CUDA graph of one. `model.set_implementation(...)` switches the choice ("pytorch": PyTorch everywhere). The
kernels, each beside the PyTorch reference it is tested against, are in the `rwkv7_kernels/` folder beside this
file (see `load_kernels` for how this file finds it).
"""

import enum
import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
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

if TYPE_CHECKING:  # for readers and static tools; at run time load_kernels() binds the package found on disk
    from . import rwkv7_kernels as kernels
else:
    kernels = None


logger = logging.get_logger(__name__)

# transformers 5.24 renamed the cache's keyword argument and output field from `past_key_values` to `cache` and
# warns about the old name. The model takes the cache under either name on every version and returns it under the
# installed version's name; RWKV7ModelOutput and RWKV7CausalLMOutput also read it as `.cache` before 5.24.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# Weights of the official DeepEmbed variant (rwkv7a), which this package does not implement: refused by name, in
# official (blocks.i.ffn.s_emb.weight) and fla-hub (model.layers.i.ffn.s_emb.weight) checkpoints alike.
DEEP_EMBED_KEY = re.compile(r"\.ffn\.(s_emb|s_emb_x|s0|s1|s2)(\.|$)")


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
    """Imports the `rwkv7_kernels/` package that ships with this file and binds it to this module's `kernels`.

    transformers' remote-code loader copies only the flat .py files of a model repo into its module cache, so a
    package import would fail there. The folder is found on disk instead, in this order:
      1. next to this file (a source checkout, or a copy that kept the folder): imported as `rwkv7_kernels` when
         that name leads to this folder (one module for the model and the tests), else by path;
      2. in the local folder the model was loaded from (`config.name_or_path`);
      3. in the Hub repo the config came from, at the commit this file came from, so modeling file and kernels
         always match; with HF_HUB_OFFLINE=1 it comes from the cache.
    By path, it is imported under a name unique to that path, so two model revisions in one process keep their own.
    """
    global kernels
    if kernels is not None:
        return kernels
    folder = Path(__file__).resolve().parent / "rwkv7_kernels"
    if (folder / "__init__.py").is_file():
        spec = importlib.util.find_spec("rwkv7_kernels")
        if spec is not None and spec.origin and Path(spec.origin).resolve().parent == folder:
            kernels = importlib.import_module("rwkv7_kernels")
            return kernels
    else:
        name_or_path = getattr(config, "name_or_path", "") or ""
        if not name_or_path:
            raise ImportError(
                "modeling_rwkv7.py cannot find its rwkv7_kernels/ folder: it is not next to this file and the config "
                "does not say where the model came from. Load the model with from_pretrained(path_or_repo_id, "
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


# ---------------------------------------------------------------------------------------------------------------
# The recurrent state
# ---------------------------------------------------------------------------------------------------------------


class LayerState(NamedTuple):
    """One layer's recurrent state: what RWKV-7 carries from one token to the next."""

    wkv: torch.Tensor  # [B, H, K, V] float32: the WKV state (fla's layout, the transpose of the official [H, V, K])
    attn_shift: torch.Tensor  # [B, C]: the last token's normalised input to the time mix (its token shift)
    ffn_shift: torch.Tensor  # [B, C]: the same for the channel mix


class RWKV7Cache(Cache):
    """The recurrent state of every layer (LayerState), and the number of tokens it has consumed.

    The state stands for every token seen so far, so a call with a cache passes only the tokens that follow
    (in `generate` too: pass the new tokens and the cache). Copy a cache with `copy.deepcopy` to branch from it;
    a forward updates the cache it is given in place. Every change to the states goes through the methods below.
    """

    is_compileable = False

    def __init__(self):
        if isinstance(self, nn.Module):  # transformers < 4.53: Cache is an nn.Module
            nn.Module.__init__(self)
        self.states: list[LayerState] = []
        self.num_seen_tokens = 0  # tokens the state has consumed (padding included)

    def __len__(self):
        return len(self.states)

    def __repr__(self):
        return f"RWKV7Cache(layers={len(self)}, batch_size={self.batch_size}, num_seen_tokens={self.num_seen_tokens})"

    # read-only views, one list per kind of state
    @property
    def wkv(self):
        return [state.wkv for state in self.states]

    @property
    def attn_shift(self):
        return [state.attn_shift for state in self.states]

    @property
    def ffn_shift(self):
        return [state.ffn_shift for state in self.states]

    @property
    def batch_size(self):
        return self.states[0].wkv.shape[0] if self.states else 0

    @property
    def is_linear(self) -> list[bool]:
        """Every layer's state is a linear-attention state (transformers 5.24's generate asks: it then does not
        look for already cached positions of the input)."""
        return [True] * len(self)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Always 0. `generate` asks how many of the given tokens the cache already holds, to skip them; an RWKV
        cache holds none of the tokens it is given (see the class docstring). `num_seen_tokens` counts what it holds."""
        return 0

    def layer(self, layer_idx, batch_size, config, device, dtype) -> LayerState:
        """The state of layer `layer_idx`; zeros before its first update."""
        if layer_idx == len(self.states):
            H, N, C = config.num_heads, config.head_dim, config.hidden_size
            return LayerState(
                torch.zeros(batch_size, H, N, N, dtype=torch.float32, device=device),
                torch.zeros(batch_size, C, dtype=dtype, device=device),
                torch.zeros(batch_size, C, dtype=dtype, device=device),
            )
        return self.states[layer_idx]

    def update(self, layer_idx, state: LayerState):
        """Stores layer `layer_idx`'s state after a forward (the same tensors after a decoding step, which updates
        them in place)."""
        if layer_idx == len(self.states):
            self.states.append(state)
        else:
            self.states[layer_idx] = state

    def advance(self, num_tokens):
        """Counts the tokens of a forward, once every layer has consumed them."""
        self.num_seen_tokens += num_tokens

    def fit_batch(self, batch_size):
        """Makes the cache serve `batch_size` rows: unchanged if it has that many; a cache of n rows serves k * n
        rows by repeating each of its rows k times, in place (as generate expands the rows of a prompt for
        num_return_sequences and beams). Any other batch size is an error."""
        if not self.states or self.batch_size == batch_size:
            return
        if batch_size % self.batch_size:
            raise ValueError(
                f"the cache holds {self.batch_size} sequences but the input has {batch_size}; pass a cache of the same "
                "batch size, or one whose batch size divides the input's (each of its rows then serves several)"
            )
        self.batch_repeat_interleave(batch_size // self.batch_size)

    def _map(self, fn):
        self.states = [LayerState(*map(fn, state)) for state in self.states]

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Beam search: row i of the new cache is row beam_idx[i] of the old one (in place: a decoding CUDA graph
        keeps using the same tensors)."""
        for state in self.states:
            for tensor in state:
                tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))

    def batch_repeat_interleave(self, repeats: int):
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        self._map(lambda t: t[indices.to(t.device)])

    def crop(self, max_length: int):
        raise NotImplementedError(
            "An RWKV-7 state cannot be rewound to an earlier token; keep a copy.deepcopy of the cache instead."
        )

    def reset(self):
        self._map(torch.zeros_like)
        self.num_seen_tokens = 0

    # A CUDA graph of a decoding step reads and writes fixed tensors. Rather than copying states in and out at every
    # step, a cache being decoded uses the graph's tensors as its own (borrow_tensors_of) until another cache comes,
    # when it gets copies back (own_copies): no two caches ever share a tensor.

    def borrow_tensors_of(self, other: "RWKV7Cache"):
        """Copies this cache's states into `other`'s tensors, then uses those tensors as its own."""
        for mine, theirs in zip(self.states, other.states):
            torch._foreach_copy_(list(theirs), list(mine))
        self.states = list(other.states)

    def shares_tensors_with(self, other: "RWKV7Cache"):
        return len(self) == len(other) and all(
            a is b for mine, theirs in zip(self.states, other.states) for a, b in zip(mine, theirs)
        )

    def own_copies(self):
        """Replaces every state tensor by a copy of it."""
        self._map(torch.clone)


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


# ---------------------------------------------------------------------------------------------------------------
# Which code runs a forward
# ---------------------------------------------------------------------------------------------------------------


class ForwardPath(enum.Enum):
    """The code that computes one forward: choose_path picks it once per forward, and every layer runs it."""

    DECODE_GRAPH = "replays a CUDA graph of a DECODE_TRITON or DECODE_PYTORCH step (RWKV7DecodeGraph)"
    DECODE_TRITON = "one token per row: the block in fused Triton kernels (decode_block_triton)"
    DECODE_PYTORCH = "one token per row: the block's modules, its time mix tuned for the CPU"
    SEQUENCE_TRITON = "no autograd, no padding: the block with Triton kernels (sequence_block_triton)"
    SEQUENCE_TRITON_TRAINING = ("autograd or packed sequences, no padding: the block's modules, but each token shift "
                                "with the projections reading it, the time mix and relu^2 with the value projection "
                                "in ops with their own backward that recompute their inputs (BlockOps)")
    SEQUENCE_TRITON_MODULES = ("the block's modules; the token shifts and the time mix between them in Triton kernels "
                               "with their backward")
    SEQUENCE_PYTORCH = "the block's modules in PyTorch"


# what set_implementation takes
IMPLEMENTATIONS = {
    "auto": "Triton kernels on CUDA where triton is usable, with CUDA graphs of decoding steps; PyTorch elsewhere",
    "triton": "the Triton kernels wherever a path has them, on any device (on the CPU under TRITON_INTERPRET=1), "
    "without CUDA graphs",
    "pytorch": "plain PyTorch everywhere: the references the kernels are tested against",
}


def choose_path(model, inputs, cache, attention_mask, graphable=False, packed=False) -> ForwardPath:
    """The path of one forward of `model` (an RWKV7PreTrainedModel) on `inputs` (input_ids [B, T] or inputs_embeds
    [B, T, C]) with `cache` (an RWKV7Cache or None) and `attention_mask` (this call's, None without padding).

    A decoding step (one token per row, a cache, no autograd) runs
        DECODE_GRAPH    if `graphable` (only token ids and a cache of every layer and of this batch size in, only
                        logits out), with implementation "auto", the model in eval mode on one CUDA device;
        DECODE_TRITON   if the kernels can run and every projection is a plain nn.Linear (the kernels read the
                        weights: not a PEFT or quantised layer, nor one accelerate moves or offloads around calls);
        DECODE_PYTORCH  otherwise.
    A sequence runs, where the kernels can run and read the projections (as above) and there is no padding,
        SEQUENCE_TRITON          without autograd or `packed` sequences,
        SEQUENCE_TRITON_TRAINING otherwise;
    SEQUENCE_TRITON_MODULES where the kernels can run; SEQUENCE_PYTORCH otherwise.
    The kernels can run with implementation "triton"; with "auto" where triton is usable (kernels.HAS_TRITON), the
    inputs are on CUDA and the heads 64 wide.
    """
    implementation = model.implementation
    head_size = model.config.head_dim
    if implementation == "triton":
        if not kernels.HAS_TRITON or head_size != kernels.KERNEL_HEAD_SIZE:
            raise ValueError(
                f"implementation 'triton' needs triton >= {'.'.join(map(str, kernels.MIN_TRITON))} and heads of "
                f"{kernels.KERNEL_HEAD_SIZE} (this model's: {head_size}); use 'auto' or 'pytorch'"
            )
        kernels_run = True
    else:
        kernels_run = (
            implementation == "auto" and kernels.HAS_TRITON and inputs.is_cuda
            and head_size == kernels.KERNEL_HEAD_SIZE
        )
    grad = torch.is_grad_enabled()
    if inputs.shape[1] == 1 and cache is not None and not grad and not packed:
        if (
            graphable
            and implementation == "auto"
            and inputs.is_cuda
            and len(cache) == model.config.num_hidden_layers
            and cache.batch_size == inputs.shape[0]
            and not model.training
            and not torch.cuda.is_current_stream_capturing()
            and model.on_one_cuda_device()
        ):
            return ForwardPath.DECODE_GRAPH
        return ForwardPath.DECODE_TRITON if kernels_run and _kernels_can_read_projections(model) else ForwardPath.DECODE_PYTORCH
    if kernels_run:
        if attention_mask is None and _kernels_can_read_projections(model):
            return ForwardPath.SEQUENCE_TRITON if not grad and not packed else ForwardPath.SEQUENCE_TRITON_TRAINING
        return ForwardPath.SEQUENCE_TRITON_MODULES
    return ForwardPath.SEQUENCE_PYTORCH


def whole_on_one_cuda_device(weights):
    """Whether all `weights` lie on one CUDA device, none sharded: FSDP2 and tensor parallelism shard weights as
    DTensors (which have `placements`) and gather them in module hooks that a replayed CUDA graph would skip."""
    devices = set()
    for weight in weights:
        if hasattr(weight, "placements"):
            return False
        devices.add(weight.device)
    return len(devices) == 1 and next(iter(devices)).type == "cuda"


def _is_plain_linear(module):
    """A plain nn.Linear whose weight code may read: not a PEFT or quantised layer, nor one accelerate hooks to move
    or offload its weight around each call (it keeps the hook in the instance __dict__)."""
    return type(module) is nn.Linear and "_hf_hook" not in module.__dict__


def _kernels_can_read_projections(model):
    """Whether the fused paths may read the weights of the layers and the head: every module below the blocks
    is one this file made (no PEFT or quantised layer in their place), and none is hooked by accelerate to move or
    offload its weights around each call (it keeps the hook in the instance __dict__; a hook on a whole block only
    moves its inputs to the block's device, before the kernels run)."""
    own = (RWKV7TimeMix, RWKV7ChannelMix, LoRA, nn.Sequential, nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.Tanh,
           nn.Sigmoid, nn.Identity)
    head = model.get_output_embeddings()  # decoding runs the head's matrix-vector product in a kernel too
    if head is not None and not _is_plain_linear(head):
        return False
    # every forward asks: a walk over _modules costs less than nested modules() generators
    below = [child for block in model.base_model.layers for child in block._modules.values()]
    while below:
        module = below.pop()
        if module is None:
            continue
        if type(module) not in own or "_hf_hook" in module.__dict__:
            return False
        below.extend(module._modules.values())
    return True


def _call_readers(shifted, readers):
    """The outputs of the modules reading each lerp, given (the lerps, the new prev): `project` on the modules."""
    mixed, prev = shifted
    return [module(m) for m, modules in zip(mixed, readers) for module in modules], prev


def _project_reference(x, norm, prev, mixes, readers, **shift_kwargs):
    return _call_readers(kernels.ops_reference.shift_mix_reference(norm(x), prev, mixes, **shift_kwargs), readers)


def _project_kernel(x, norm, prev, mixes, readers, **shift_kwargs):
    return _call_readers(kernels.shift_mix_sequence.shift_mix_sequence(norm(x), prev, mixes, **shift_kwargs), readers)


def _project_fused(x, norm, prev, mixes, readers, **shift_kwargs):
    weights = [[module.weight for module in modules] for modules in readers]
    return kernels.shift_mix_sequence.norm_shift_mix_linear(x, norm.weight, norm.bias, norm.eps, prev, mixes, weights,
                                                            **shift_kwargs)


def _time_mix_after_loras(time_mix, r, w, k, v, a, v_gate, v_first, g, loras, params, **kwargs):
    """`time_mix` (ops_reference.time_mix_reference's arguments) of the LoRAs' outputs, given their down-projections'
    (w, a, v_gate, g; v_gate None in layer 0): the LoRAs run as modules, their outputs kept for the backward."""
    w_lora, a_lora, v_lora, g_lora = loras
    v_gate = None if v_gate is None else v_lora.from_down(v_gate)
    return time_mix(r, w_lora.from_down(w), k, v, a_lora.from_down(a), v_gate, v_first, g_lora.from_down(g), params,
                    **kwargs)


@cache
def _after_loras(time_mix):
    """_time_mix_after_loras of `time_mix`, one object for each (the contexts of a path hold equal ops)."""
    return partial(_time_mix_after_loras, time_mix)


def _time_mix_recomputing_loras(r, w, k, v, a, v_gate, v_first, g, loras, params, **kwargs):
    """_time_mix_after_loras with time_mix_sequence, whose backward recomputes the LoRAs' outputs from their
    up-projections' inputs (of the LoRAs' rank) instead of keeping them."""
    # the modules' math on their weights (this path runs only on plain modules): fewer calls on the CPU
    linear_input = kernels.time_mix_sequence.LinearInput
    ups = [None if hidden is None else linear_input(_ACTIVATIONS[lora.activation](hidden), lora.up.weight, lora.up.bias)
           for lora, hidden in zip(loras, (w, a, v_gate, g))]
    w, a, v_gate, g = (None if up is None else F.linear(*up) for up in ups)
    return kernels.time_mix_sequence.time_mix_sequence(r, w, k, v, a, v_gate, v_first, g, params, recompute=ups,
                                                       **kwargs)


def _relu_square_value_reference(k, value):
    return value(torch.relu(k).square())


def _relu_square_value_kernel(k, value):
    return value(kernels.relu_square.relu_square(k))


def _relu_square_value_fused(k, value):
    return kernels.relu_square.relu_square_linear(k, value.weight)


class BlockOps(NamedTuple):
    """The implementations of the block's ops on the paths that run the block's math in its modules, each with the
    arguments and results of its reference."""

    # (x, norm, prev, mixes, readers, attention_mask=, in_place=, cu_seqlens=) -> ([reader(mixed[m]) for each
    # reader of each mix m], the new prev): the block's LayerNorm `norm` of x, its token shift and lerps
    # (ops_reference.shift_mix_reference), then the modules (no-bias linear layers) reading each lerp; readers[m]
    # are those of mixes[m]
    project: Callable
    # (r, w, k, v, a, v_gate, v_first, g, loras, params, state=, attention_mask=, in_place=, cu_seqlens=):
    # ops_reference.time_mix_reference of the LoRAs' outputs, given their down-projections' w, a, v_gate, g and the
    # LoRAs (RWKV7TimeMix.loras; v_gate and its LoRA None in layer 0)
    time_mix: Callable
    relu_square_value: Callable  # (k, value) -> value(relu(k)^2)


@dataclass
class ForwardContext:
    """What the layers of one forward share besides their inputs."""

    path: ForwardPath
    attention_mask: torch.Tensor | None  # [B, T] of this call's tokens, 1 = token, 0 = padding; None: no padding
    cu_seqlens: torch.Tensor | None = None  # [N + 1] offsets of N sequences packed into one row (see _packed_offsets)

    def __post_init__(self):
        # a decoding step updates the states where they lie (a CUDA graph of the step owns them)
        self.in_place = self.path in (ForwardPath.DECODE_TRITON, ForwardPath.DECODE_PYTORCH)
        # the implementations of the block's ops on the paths that run the block's math in modules
        reference = kernels.ops_reference
        if self.path is ForwardPath.SEQUENCE_TRITON_TRAINING:
            # read the weights: the backward recomputes the LayerNorms' outputs, the lerps, the LoRAs' outputs and
            # relu(k)^2 instead of keeping them
            self.ops = BlockOps(_project_fused, _time_mix_recomputing_loras, _relu_square_value_fused)
        elif self.path is ForwardPath.SEQUENCE_TRITON_MODULES:
            # the shift kernel takes rows without gaps: rows with padding shift in the reference
            project = _project_kernel if self.attention_mask is None else _project_reference
            self.ops = BlockOps(project, _after_loras(kernels.time_mix_sequence.time_mix_sequence),
                                _relu_square_value_kernel)
        elif self.path is ForwardPath.DECODE_PYTORCH:
            self.ops = BlockOps(_project_reference, _after_loras(kernels.torch_decode.time_mix_step),
                                _relu_square_value_reference)
        else:
            self.ops = BlockOps(_project_reference, _after_loras(reference.time_mix_reference),
                                _relu_square_value_reference)
        # the training loss's cross entropy of a chunk of logits (rwkv7_kernels/linear_cross_entropy.py)
        kernels_run = self.path in (ForwardPath.SEQUENCE_TRITON, ForwardPath.SEQUENCE_TRITON_TRAINING,
                                    ForwardPath.SEQUENCE_TRITON_MODULES)
        self.cross_entropy = (kernels.cross_entropy_rows.cross_entropy_rows if kernels_run
                              else reference.cross_entropy_rows_reference)

    def on(self, device):
        """This context with its tensors on `device`; itself when they lie there already."""
        if all(t is None or t.device == device for t in (self.attention_mask, self.cu_seqlens)):
            return self
        mask, cu_seqlens = (None if t is None else t.to(device) for t in (self.attention_mask, self.cu_seqlens))
        return replace(self, attention_mask=mask, cu_seqlens=cu_seqlens)


def _padding_mask(attention_mask, inputs):
    """This call's part of `attention_mask` ([B, S >= T]: generate passes the mask of the whole sequence so far, whose
    last T columns belong to this call), or None when there is no padding to skip."""
    if attention_mask is None:
        return None
    B, T = inputs.shape[:2]
    if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
        raise ValueError(
            f"attention_mask must be [batch, >= {T}] (1 = token, 0 = padding), got {tuple(attention_mask.shape)}"
        )
    attention_mask = attention_mask[:, -T:]
    if T > 1 and bool(attention_mask.all()):
        # no padding (generate passes a mask even for one prompt): the paths without padding run fused kernels. One
        # host sync per prompt; decoding steps keep their mask and need none.
        return None
    return attention_mask


def _packed_offsets(inputs, attention_mask, cache, use_cache, position_ids=None, cu_seq_lens_q=None, cu_seqlens=None):
    """The offsets [N + 1] (int32) of the sequences packed into this call's tokens, taken row after row, or None
    when there is no packing. Packed sequences each start from a zero state and a zero token shift, as if alone.

    Packing is given as fla's `cu_seqlens` or flash-attention's `cu_seq_lens_q` (one row: B = 1), or by
    `position_ids` restarting at 0 inside a row (transformers' DataCollatorWithFlattening, TRL's padding-free
    batches; position_ids that only count up are no packing). Packed sequences leave no state to continue, so they
    take no cache, and padding inside them contradicts their boundaries: both are errors.
    """
    B, T = inputs.shape[:2]
    given = cu_seqlens if cu_seqlens is not None else cu_seq_lens_q
    offsets = None
    if position_ids is not None:
        if position_ids.shape != (B, T):
            raise ValueError(f"position_ids must be [batch, tokens] = {(B, T)}, got {tuple(position_ids.shape)}")
        starts = position_ids == 0
        if T > 1 and bool(starts[:, 1:].any()):  # one host sync
            starts[:, 0] = True
            end = torch.tensor([B * T], device=inputs.device)
            offsets = torch.cat([starts.flatten().nonzero().flatten(), end]).to(torch.int32)
    if given is not None:
        given = given.to(device=inputs.device, dtype=torch.int32)
        if B != 1 or given.dim() != 1 or given.numel() < 2 or int(given[0]) != 0 or int(given[-1]) != T:
            raise ValueError(
                f"cu_seqlens / cu_seq_lens_q must be the offsets [0, ..., {T}] of sequences packed into one row "
                f"(batch size 1), got {given.tolist() if given.dim() == 1 else tuple(given.shape)} for inputs of "
                f"shape {(B, T)}"
            )
        if offsets is not None and not torch.equal(offsets, given):
            raise ValueError("position_ids and cu_seqlens / cu_seq_lens_q disagree on where the packed sequences start")
        offsets = given
    if offsets is None:
        return None
    if attention_mask is not None:
        raise ValueError(
            "padding (zeros in attention_mask) inside packed sequences contradicts their boundaries: pack without "
            "padding, or pass padded rows without position_ids / cu_seqlens"
        )
    if cache is not None or use_cache:
        raise ValueError("packed sequences (position_ids restarting at 0, or cu_seqlens) leave no state to continue: "
                         "pass them without a cache and with use_cache=False")
    return offsets


def forward_context(model, inputs, cache, attention_mask, use_cache, position_ids=None, cu_seq_lens_q=None,
                    cu_seqlens=None, graphable=False) -> ForwardContext:
    """How one forward of `model` runs: this call's padding (_padding_mask), its packed sequences (_packed_offsets)
    and its path (choose_path), worked out once for the whole model."""
    mask = _padding_mask(attention_mask, inputs)
    packed = _packed_offsets(inputs, mask, cache, use_cache, position_ids, cu_seq_lens_q, cu_seqlens)
    path = choose_path(model, inputs, cache, mask, graphable, packed=packed is not None)
    return ForwardContext(path, mask, packed)


# ---------------------------------------------------------------------------------------------------------------
# The layers
# ---------------------------------------------------------------------------------------------------------------


_ACTIVATIONS = {None: lambda x: x, "tanh": torch.tanh, "sigmoid": torch.sigmoid}  # the LoRAs', by name


class LoRA(nn.Module):
    """x -> activation(x A) B (+ bias): the low-rank projections of the time mix (fla's `lora.0`, `lora.2`)."""

    MODULES = {None: nn.Identity, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}

    def __init__(self, dim: int, rank: int, activation: str | None, bias: bool):
        super().__init__()
        self.activation = activation  # the name the kernels take (rwkv7_kernels/common.py)
        self.lora = nn.Sequential(nn.Linear(dim, rank, bias=False), self.MODULES[activation](), nn.Linear(rank, dim, bias=bias))

    # read by every forward: the Sequential's dict, not its __getitem__ (which walks its modules)
    @property
    def down(self):
        return self.lora._modules["0"]

    @property
    def up(self):
        return self.lora._modules["2"]

    def forward(self, x):
        return self.lora(x)

    def up_input(self, hidden):
        """activation(hidden): the up-projection's input, given the down-projection's output x A."""
        return self.lora._modules["1"](hidden)

    def from_down(self, hidden):
        """activation(hidden) B (+ bias): the rest of the LoRA, given its down-projection's output x A."""
        return self.up(self.up_input(hidden))


class RWKV7TimeMix(nn.Module):
    """The attention replacement: six token-shift lerps, the projections and LoRAs, the WKV-7 recurrence, GroupNorm,
    the bonus and the gate."""

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
        self.w_lora = LoRA(C, config.decay_low_rank_dim, "tanh", bias=True)
        self.a_lora = LoRA(C, config.a_low_rank_dim, None, bias=True)
        if layer_idx > 0:  # layer 0 produces v_first; the others mix it in
            self.v_lora = LoRA(C, config.v_low_rank_dim, None, bias=True)
        self.g_lora = LoRA(C, config.gate_low_rank_dim, "sigmoid", bias=False)
        self.g_norm = nn.GroupNorm(H, C, eps=N * config.norm_eps)

    def mixes(self):
        """The token-shift lerps' weights, for r, w, k, v, a, g."""
        return self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g

    def loras(self):
        """The LoRAs after the lerps: w's, a's, v's gate (None in layer 0), g's."""
        return self.w_lora, self.a_lora, self.v_lora if self.layer_idx > 0 else None, self.g_lora

    def params(self):
        return kernels.TimeMixParams(
            self.k_k, self.k_a, self.r_k, self.g_norm.weight, self.g_norm.bias, self.g_norm.eps
        )

    def forward(self, x, norm, v_first, state: LayerState, ctx: ForwardContext):
        """x [B, T, C]: the block's input; norm: the block's attn_norm, applied to x by `project` (the training
        path's backward recomputes its output); v_first: layer 0's v (None entering layer 0).
        Returns (the time mix's output [B, T, C], v_first, the layer's state with this mix's part updated)."""
        # lerps between each token's xa = norm(x) and the previous token's, x_r = xa + (xa_prev - xa) * self.x_r,
        # ..., each read by its projections: r = x_r W_r, the LoRAs' down-projections x_w A_w, ...
        v_readers = (self.v_proj, self.v_lora.down) if self.layer_idx > 0 else (self.v_proj,)
        readers = ((self.r_proj,), (self.w_lora.down,), (self.k_proj,), v_readers, (self.a_lora.down,),
                   (self.g_lora.down,))
        (r, w, k, v, *v_gate, a, g), attn_shift = ctx.ops.project(
            x, norm, state.attn_shift, self.mixes(), readers, attention_mask=ctx.attention_mask,
            in_place=ctx.in_place, cu_seqlens=ctx.cu_seqlens,
        )
        # the LoRAs' up-projections, then the time mix: w_raw = tanh(x_w A_w) B_w + w0, a_raw, v's gate, g
        y, v_first, wkv = ctx.ops.time_mix(
            r, w, k, v, a, v_gate[0] if v_gate else None, v_first, g, self.loras(), self.params(), state=state.wkv,
            attention_mask=ctx.attention_mask, in_place=ctx.in_place, cu_seqlens=ctx.cu_seqlens,
        )
        return self.o_proj(y), v_first, state._replace(wkv=wkv, attn_shift=attn_shift)


class RWKV7ChannelMix(nn.Module):
    """The feed-forward: a token-shift lerp, then relu(x W_key)^2 W_value."""

    def __init__(self, config: RWKV7Config):
        super().__init__()
        self.x_k = nn.Parameter(torch.empty(config.hidden_size))
        self.key = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.value = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x, norm, state: LayerState, ctx: ForwardContext):
        """x [B, T, C]: the block's input after the time mix; norm: the block's ffn_norm, applied to x by `project`.
        Returns (output [B, T, C], the state, ffn_shift updated)."""
        (k,), ffn_shift = ctx.ops.project(x, norm, state.ffn_shift, (self.x_k,), ((self.key,),),
                                          attention_mask=ctx.attention_mask, in_place=ctx.in_place,
                                          cu_seqlens=ctx.cu_seqlens)
        return ctx.ops.relu_square_value(k, self.value), state._replace(ffn_shift=ffn_shift)


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

    def forward(self, x, v_first, state: LayerState, ctx: ForwardContext):
        """One layer: x [B, T, C], v_first (layer 0's v; None entering layer 0), this layer's state before the call.
        Returns (x, v_first, the layer's state after the call)."""
        # under a device_map, accelerate moves the block's tensor arguments to its device, but not the context's
        ctx = ctx.on(x.device)
        if ctx.path is ForwardPath.DECODE_TRITON:
            return decode_block_triton(self, x, v_first, state, ctx)
        if ctx.path is ForwardPath.SEQUENCE_TRITON:
            return sequence_block_triton(self, x, v_first, state)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        out, v_first, state = self.attn(x, self.attn_norm, v_first, state, ctx)
        x = x + out
        out, state = self.ffn(x, self.ffn_norm, state, ctx)
        return x + out, v_first, state


def sequence_block_triton(block, x, v_first, state):
    """RWKV7Block.forward for a prefill (no autograd, no padding) with Triton kernels for its non-linear ops: each
    mix's LayerNorm, token shift and lerps in one kernel (norm_shift_mix_fused.py), the time mix around the chunked
    WKV-7 in two (time_mix_sequence.py); the projections are matrix products on the modules' weights."""
    attn, ffn = block.attn, block.ffn
    if block.pre_norm is not None:
        x = block.pre_norm(x)
    norm = block.attn_norm
    (x_r, x_w, x_k, x_v, x_a, x_g), attn_shift = kernels.norm_shift_mix_fused.norm_shift_mix_fused(
        x, state.attn_shift, attn.mixes(), (norm.weight, norm.bias, norm.eps)
    )

    def lora(module, x):
        up = module.up
        return F.linear(_ACTIVATIONS[module.activation](F.linear(x, module.down.weight)), up.weight, up.bias)

    v_gate = lora(attn.v_lora, x_v) if attn.layer_idx > 0 else None
    y, v_first, wkv = kernels.time_mix_sequence.time_mix_sequence(
        F.linear(x_r, attn.r_proj.weight), lora(attn.w_lora, x_w), F.linear(x_k, attn.k_proj.weight),
        F.linear(x_v, attn.v_proj.weight), lora(attn.a_lora, x_a), v_gate, v_first, lora(attn.g_lora, x_g),
        attn.params(), state=state.wkv,
    )
    x = x + F.linear(y, attn.o_proj.weight)
    norm = block.ffn_norm
    (x_k,), ffn_shift = kernels.norm_shift_mix_fused.norm_shift_mix_fused(
        x, state.ffn_shift, (ffn.x_k,), (norm.weight, norm.bias, norm.eps)
    )
    x = x + F.linear(torch.relu(F.linear(x_k, ffn.key.weight)).square(), ffn.value.weight)
    return x, v_first, LayerState(wkv, attn_shift, ffn_shift)


def decode_block_triton(block, x, v_first, state, ctx):
    """RWKV7Block.forward for one decoding step in fused Triton kernels (rwkv7_kernels/decode_step.py), five
    launches a layer: per mix, its LayerNorm, token shift, lerps and input projections in one kernel; the time mix
    from the LoRA hidden activations on (the LoRA up-projections included) in another; the residual adds in the
    output projections. The layer's state is updated in place."""
    step, attn, ffn, mask = kernels.decode_step, block.attn, block.ffn, ctx.attention_mask
    if block.pre_norm is not None:
        x = block.pre_norm(x)
    loras = {"w": (attn.x_w, attn.w_lora), "a": (attn.x_a, attn.a_lora), "g": (attn.x_g, attn.g_lora)}
    if attn.layer_idx > 0:
        loras["v"] = (attn.x_v, attn.v_lora)
    projections = [(attn.x_r, attn.r_proj.weight, None), (attn.x_k, attn.k_proj.weight, None),
                   (attn.x_v, attn.v_proj.weight, None)]
    projections += [(mix, lora.down.weight, lora.activation) for mix, lora in loras.values()]
    r, k, v, *hidden = step.norm_mix_linear(
        x, block.attn_norm.weight, block.attn_norm.bias, block.attn_norm.eps, state.attn_shift, projections, mask
    )
    ups = {name: (h, lora.up.weight, lora.up.bias) for (name, (_, lora)), h in zip(loras.items(), hidden)}
    y, v_first, _ = step.time_mix(
        r, k, v, (ups["w"], ups["a"], ups.get("v"), ups["g"]), v_first, attn.params(), state.wkv, mask
    )
    x = step.linear(y, attn.o_proj.weight, residual=x)
    (key,) = step.norm_mix_linear(
        x, block.ffn_norm.weight, block.ffn_norm.bias, block.ffn_norm.eps, state.ffn_shift,
        [(ffn.x_k, ffn.key.weight, "relu2")], mask,
    )
    return step.linear(key, ffn.value.weight, residual=x), v_first, state


# ---------------------------------------------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------------------------------------------


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
        self.implementation = "auto"  # see set_implementation
        self._cuda_device = None  # on_one_cuda_device's answer, until the weights move

    def set_implementation(self, implementation: str):
        """Which code runs this model's forwards, one of IMPLEMENTATIONS: "auto" (the default), "triton" or
        "pytorch"; choose_path decides within it. Compare "auto" with "pytorch" to debug numerics."""
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {list(IMPLEMENTATIONS)}, got {implementation!r}")
        for module in self.modules():
            if isinstance(module, RWKV7PreTrainedModel):
                module.implementation = implementation

    def on_one_cuda_device(self):
        """Whether every weight is whole on one CUDA device (not split by device_map, not offloaded, not sharded)."""
        if self._cuda_device is None:
            self._cuda_device = whole_on_one_cuda_device(self.parameters())
        return self._cuda_device

    def _apply(self, fn, *args, **kwargs):
        self._cuda_device = None  # .to(), .cuda(), .half() ... may move the weights
        return super()._apply(fn, *args, **kwargs)

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
            module.w_lora.up.bias.copy_(decay_speed + 0.5)
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


def _check_inputs(input_ids, inputs_embeds, output_attentions):
    """input_ids or inputs_embeds, whichever was given (exactly one must be), not empty."""
    if output_attentions:
        raise ValueError("RWKV-7 has no attention weights to output; call it with output_attentions=False")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    inputs = input_ids if input_ids is not None else inputs_embeds
    _check_not_empty(inputs)
    return inputs


def _checkpointed_layer(layer, ctx, x, v_first, *state):
    """layer(x, v_first, LayerState(*state), ctx) with the state as separate tensors in and out, as
    torch.utils.checkpoint passes them (it sees tensors at the top level only)."""
    x, v_first, state = layer(x, v_first, LayerState(*state), ctx)
    return (x, v_first, *state)


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
        position_ids: torch.LongTensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        context: ForwardContext | None = None,
        **kwargs,
    ):
        """input_ids [B, T] (or inputs_embeds [B, T, C]); attention_mask [B, T] or [B, S >= T] (generate passes the
        mask of the whole sequence so far: its last T columns belong to this call), 1 = token, 0 = padding.
        cache (or past_key_values, its name before transformers 5.24): an RWKV7Cache, updated in place.
        position_ids restarting at 0 inside a row, cu_seq_lens_q or cu_seqlens: sequences packed into the rows, each
        computed as if alone (see _packed_offsets); position_ids that only count up change nothing.
        context: what RWKV7ForCausalLM worked out for the call from those (forward_context), used as it is."""
        inputs = _check_inputs(input_ids, inputs_embeds, output_attentions)
        cache = _one_cache(cache, past_key_values)
        ctx = context or forward_context(
            self, inputs, cache, attention_mask, use_cache, position_ids, cu_seq_lens_q, cu_seqlens
        )
        packed = ctx.cu_seqlens
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if self.gradient_checkpointing and self.training and use_cache:
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing; using use_cache=False")
            use_cache = False

        x = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, C = x.shape
        if packed is not None:  # the packed sequences as one row, each from zero states
            x = x.reshape(1, B * T, C)
            use_cache, zeros = False, x.new_zeros(1, C)
        elif cache is None:  # the states of this call alone; returned with use_cache
            cache = RWKV7Cache()
        if cache is not None:
            cache.fit_batch(B)

        hidden_states = () if output_hidden_states else None
        v_first = None
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden_states += (x.view(B, T, C),)
            if packed is None:
                state = cache.layer(i, B, self.config, x.device, x.dtype)
            else:
                state = LayerState(None, zeros, zeros)
            if self.gradient_checkpointing and self.training:
                x, v_first, *state = self._gradient_checkpointing_func(
                    partial(_checkpointed_layer, layer, ctx), x, v_first, *state
                )
                state = LayerState(*state)
            else:
                x, v_first, state = layer(x, v_first, state, ctx)
            if cache is not None:
                cache.update(i, state)
        x = self.norm(x).view(B, T, C)
        if output_hidden_states:
            hidden_states += (x,)
        if cache is not None:
            cache.advance(T)

        output = RWKV7ModelOutput(
            last_hidden_state=x, **{CACHE_NAME: cache if use_cache else None}, hidden_states=hidden_states
        )
        return output if return_dict else output.to_tuple()


_WARMUP_STREAMS = {}
# Submodules registered anywhere in the process so far (a PEFT wrapper put in a projection's place, say): a decoding
# graph re-checks the model it was captured on only when this has changed since its last check.
_module_registrations = 0


def _count_module_registration(module, name, submodule):
    global _module_registrations
    _module_registrations += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_module_registration)


def _warmup_stream(device):
    """One side stream per device for graph warm-ups: cuBLAS keeps a workspace for every stream it has run on,
    so a new stream per graph would leave a workspace behind each time."""
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[device]


class RWKV7DecodeGraph:
    """A CUDA graph of one decoding step of RWKV7ForCausalLM (one token per row, a fixed batch size), replayed
    instead of launching the step's kernels one by one from Python.

    It captures the step's forward on the path choose_path picks without graphs (DECODE_TRITON, or DECODE_PYTORCH),
    which reads and updates the states of its own RWKV7Cache in place. The cache being decoded borrows those tensors
    (RWKV7Cache.borrow_tensors_of) and keeps them while it goes on decoding; when another cache comes, the previous
    one first gets copies (own_copies), so no two caches ever share a tensor.
    """

    def __init__(self, model, batch_size):
        device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        self.input_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.attention_mask = torch.ones(batch_size, 1, dtype=torch.long, device=device)
        self.mask_is_ones = True  # whether attention_mask holds ones: a step without a mask then needs no fill
        self.cache = RWKV7Cache()
        for i in range(model.config.num_hidden_layers):
            self.cache.update(i, self.cache.layer(i, batch_size, model.config, device, dtype))
        self.owner = None  # weak reference to the cache that borrows the states
        # the module tree the graph was captured on: replacing or hooking a module (PEFT, accelerate) outdates it
        self.modules = [(parent._modules, name, child) for parent in model.modules() for name, child in parent._modules.items()]
        self.checked_registrations = _module_registrations

        with torch.no_grad():
            context = forward_context(model, self.input_ids, self.cache, self.attention_mask, use_cache=True)

            def step():
                return model(self.input_ids, cache=self.cache, context=context).logits

            side = _warmup_stream(device)  # warm up (compile kernels, set up cuBLAS) off the capturing stream
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = step()

    def is_current(self):
        """Whether the model still has the modules (and no accelerate hooks) the graph was captured on; looked at
        again only after submodules were registered somewhere since the last look."""
        if self.checked_registrations != _module_registrations:
            if not all(
                modules.get(name) is child and "_hf_hook" not in child.__dict__ for modules, name, child in self.modules
            ):
                return False
            self.checked_registrations = _module_registrations
        return True

    def replay(self, input_ids, attention_mask, cache):
        """The logits of one decoding step of `cache`'s rows (attention_mask [B, 1] or None); advances the cache."""
        if not cache.shares_tensors_with(self.cache):
            owner = self.owner() if self.owner is not None else None
            if owner is not None and owner is not cache and owner.shares_tensors_with(self.cache):
                owner.own_copies()
            cache.borrow_tensors_of(self.cache)
            self.owner = weakref.ref(cache)
        self.input_ids.copy_(input_ids)
        if attention_mask is not None:
            self.attention_mask.copy_(attention_mask)
            self.mask_is_ones = False
        elif not self.mask_is_ones:  # a step without a mask after one with it: no padding from here on
            self.attention_mask.fill_(1)
            self.mask_is_ones = True
        self.graph.replay()
        cache.advance(1)
        return self.logits.clone()  # the next replay overwrites the static output


class RWKV7ForCausalLM(RWKV7PreTrainedModel, GenerationMixin):
    def __init__(self, config: RWKV7Config):
        super().__init__(config)
        self.model = RWKV7Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._decode_graphs = {}  # batch size -> RWKV7DecodeGraph
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
        position_ids: torch.LongTensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        context: ForwardContext | None = None,
        **kwargs,
    ):
        """labels [B, T]: the loss is next-token cross entropy, shifted inside; label -100 is ignored. In training mode
        it is computed from the final hidden states chunk by chunk (rwkv7_kernels/linear_cross_entropy.py), never
        holding the [B, T, vocab] logits: `logits` is then None. Without labels, or in eval mode, logits as usual.
        logits_to_keep: compute logits for the last n positions only (0: all).
        cache (or past_key_values, its name before transformers 5.24): an RWKV7Cache, updated in place.
        Other arguments: RWKV7Model.forward. The code that runs: choose_path (context: one worked out already).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if context is None:
            inputs = _check_inputs(input_ids, inputs_embeds, output_attentions)
            cache = _one_cache(cache, past_key_values)
            graphable = (input_ids is not None and use_cache is not False and labels is None
                         and not output_hidden_states)
            context = forward_context(
                self, inputs, cache, attention_mask, use_cache, position_ids, cu_seq_lens_q, cu_seqlens, graphable
            )
            if context.path is ForwardPath.DECODE_GRAPH:
                logits = self._decode_graph(inputs.shape[0]).replay(input_ids, context.attention_mask, cache)
                output = RWKV7CausalLMOutput(logits=logits, **{CACHE_NAME: cache})
                return output if return_dict else output.to_tuple()
        outputs = self.model(
            input_ids=input_ids, inputs_embeds=inputs_embeds, cache=cache, past_key_values=past_key_values,
            use_cache=use_cache, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            return_dict=True, context=context,
        )
        hidden = outputs.last_hidden_state
        hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        loss = logits = None
        if labels is not None and self.training and _is_plain_linear(self.lm_head):
            loss = self._fused_loss(hidden, labels, context.cross_entropy, **kwargs)
        else:
            if context.path is ForwardPath.DECODE_TRITON:  # a one-row head is a fused matrix-vector kernel too
                logits = kernels.decode_step.linear(hidden, self.lm_head.weight)
            else:
                logits = self.lm_head(hidden)
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = RWKV7CausalLMOutput(
            loss=loss, logits=logits, **{CACHE_NAME: outputs.cache}, hidden_states=outputs.hidden_states
        )
        return output if return_dict else output.to_tuple()

    def _fused_loss(self, hidden, labels, cross_entropy, shift_labels=None, num_items_in_batch=None, ignore_index=-100,
                    **kwargs):
        """The loss transformers' ForCausalLMLoss computes (next-token cross entropy; pre-shifted `shift_labels` as
        given under context parallelism; divided by `num_items_in_batch` when Trainer passes it), without the
        logits (rwkv7_kernels/linear_cross_entropy.py)."""
        if shift_labels is None:
            hidden, shift_labels = hidden[:, :-1], labels[:, 1:]
        shift_labels = shift_labels.to(hidden.device)
        return kernels.linear_cross_entropy.linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, shift_labels.reshape(-1), num_items_in_batch,
            ignore_index, rows=cross_entropy,
        )

    def _decode_graph(self, batch_size):
        graph = self._decode_graphs.get(batch_size)
        if graph is None or not graph.is_current():
            self._decode_graphs[batch_size] = graph = RWKV7DecodeGraph(self, batch_size)
        return graph

    def release_decode_graphs(self):
        """Frees the CUDA graphs of decoding steps (and their memory); the next decoding step captures anew."""
        self._decode_graphs = {}

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
