"""RWKV-7 configuration. Reads every fla-hub RWKV-7 `config.json` as it is (flash-linear-attention's key names)."""

from transformers import PretrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)


class RWKV7Config(PretrainedConfig):
    """Configuration of an RWKV-7 ("Goose") language model.

    The defaults are those of rwkv7-0.4B-world. Keys that only steer flash-linear-attention's own kernels
    (`attn_mode`, `fuse_norm`, `fuse_cross_entropy`, ...) are accepted and kept, and change no result here.

    Args:
        vocab_size: rows of the embedding and of the head (65536 for World/G1 models, 50304 for Pile models).
        hidden_size: C, the model width.
        num_hidden_layers: the number of blocks.
        head_dim: N, the size of one WKV head (64 in every released model). It wins over `num_heads`.
        num_heads: ignored when it disagrees with hidden_size // head_dim (kept for fla configs that set it).
        decay_low_rank_dim, a_low_rank_dim, v_low_rank_dim, gate_low_rank_dim: the ranks of the w, a, v and g LoRAs.
        hidden_ratio, intermediate_size: the channel-mix width; `intermediate_size` wins, else
            hidden_size * hidden_ratio rounded up to a multiple of 32 (as fla does).
        hidden_act: the channel-mix activation; RWKV-7 uses "sqrelu" (relu(x) ** 2), the only one supported.
        norm_bias: whether the LayerNorms have a bias.
        norm_eps: LayerNorm eps; the per-head GroupNorm of the time mix uses head_dim * norm_eps (64e-5).
        norm_first: whether layer 0 normalises the embeddings first (`pre_norm`, the official `ln0`).
        value_dim: fla's per-layer value width (an int or a list with one entry per layer); must equal hidden_size.
    """

    model_type = "rwkv7"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]  # the cache's names before and from transformers 5.24

    def __init__(
        self,
        vocab_size: int = 65536,
        hidden_size: int = 1024,
        num_hidden_layers: int = 24,
        head_dim: int = 64,
        num_heads: int | None = None,
        decay_low_rank_dim: int = 64,
        a_low_rank_dim: int = 64,
        v_low_rank_dim: int = 32,
        gate_low_rank_dim: int = 128,
        hidden_ratio: float = 4.0,
        intermediate_size: int | None = None,
        hidden_act: str = "sqrelu",
        norm_bias: bool = True,
        norm_eps: float = 1e-5,
        norm_first: bool = True,
        value_dim: int | list[int] | None = None,
        initializer_range: float = 0.006,
        max_position_embeddings: int = 2048,
        use_cache: bool = True,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pad_token_id: int | None = None,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        if hidden_size <= 0 or head_dim <= 0 or hidden_size % head_dim != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a positive multiple of head_dim ({head_dim}): "
                "RWKV-7 splits the hidden size into heads of head_dim channels."
            )
        if num_heads is not None and num_heads != hidden_size // head_dim:
            logger.warning(
                f"num_heads={num_heads} disagrees with hidden_size // head_dim = {hidden_size // head_dim}; "
                "head_dim wins, as in flash-linear-attention."
            )
        if hidden_act != "sqrelu":
            raise ValueError(f'hidden_act must be "sqrelu" (relu(x) ** 2, RWKV-7\'s channel mix), got {hidden_act!r}')
        if value_dim is None:
            value_dim = [hidden_size] * num_hidden_layers
        elif isinstance(value_dim, int):
            value_dim = [value_dim] * num_hidden_layers
        if len(value_dim) != num_hidden_layers or any(d != hidden_size for d in value_dim):
            raise ValueError(
                f"value_dim must list hidden_size ({hidden_size}) once per layer ({num_hidden_layers} layers), "
                f"got {value_dim}: this implementation supports value_dim == hidden_size only, as every released "
                "RWKV-7 model has."
            )
        for name, rank in [
            ("decay_low_rank_dim", decay_low_rank_dim),
            ("a_low_rank_dim", a_low_rank_dim),
            ("v_low_rank_dim", v_low_rank_dim),
            ("gate_low_rank_dim", gate_low_rank_dim),
        ]:
            if not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"{name} must be a positive integer, got {rank!r}")
        if intermediate_size is None:
            intermediate_size = 32 * ((int(hidden_size * hidden_ratio) + 31) // 32)
        if tie_word_embeddings:
            raise ValueError("tie_word_embeddings must be false: RWKV-7's head is not tied to its embedding")

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.head_dim = head_dim
        self.num_heads = hidden_size // head_dim
        self.decay_low_rank_dim = decay_low_rank_dim
        self.a_low_rank_dim = a_low_rank_dim
        self.v_low_rank_dim = v_low_rank_dim
        self.gate_low_rank_dim = gate_low_rank_dim
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.norm_bias = norm_bias
        self.norm_eps = norm_eps
        self.norm_first = norm_first
        self.value_dim = value_dim
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
