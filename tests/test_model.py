"""The model against the official RWKV-7 implementation (BlinkDL's `rwkv` package), and its forward/cache contract."""

import copy
import json

import pytest
import torch
from helpers import max_error_over_std, tiny_model
from official import official_math_fp64, official_model, random_official_weights, write_model_dir
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM

from configuration_rwkv7 import RWKV7Config


# (hidden, layers, head_dim, LoRA ranks w/a/v/g, ffn width): one layer; non-default ranks; 4 heads and 5 layers
SHAPES = {
    "128x1": dict(hidden=128, layers=1, head_dim=64, ranks=(16, 16, 8, 32)),
    "256x3-ranks": dict(hidden=256, layers=3, head_dim=64, ranks=(24, 40, 12, 56), ffn=640),
    "4heads-5layers": dict(hidden=256, layers=5, head_dim=64, ranks=(8, 8, 8, 16)),
}
# from_pretrained's dtype argument: `torch_dtype` before transformers 4.56, `dtype` after
DTYPE_ARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
TOKENS = [5, 17, 3, 90, 42, 42, 7, 0, 61, 12, 33, 8]


@pytest.fixture(scope="module", params=list(SHAPES))
def case(request, tmp_path_factory):
    official = random_official_weights(**SHAPES[request.param], seed=len(request.param))
    ref = official_model(official, tmp_path_factory.mktemp(request.param))
    return request.param, official, ref


def test_matches_official_whole_sequence_and_token_by_token(case):
    name, official, ref = case
    model = tiny_model(official)
    L = model.config.num_hidden_layers

    ref_seq, ref_state = ref.forward(TOKENS, None, full_output=True)
    ref_steps, state = [], None
    for token in TOKENS:
        logits, state = ref.forward([token], state)
        ref_steps.append(logits)
    ref_steps = torch.stack(ref_steps)

    with torch.no_grad():
        out = model(torch.tensor([TOKENS]), use_cache=True)
        cache, ours_steps = None, []
        for token in TOKENS:
            step = model(torch.tensor([[token]]), cache=cache, use_cache=True)
            cache = step.cache
            ours_steps.append(step.logits[0, -1])
    ours_seq, ours_steps = out.logits[0], torch.stack(ours_steps)

    errors = {
        "sequence": max_error_over_std(ours_seq, ref_seq),
        "token-by-token": max_error_over_std(ours_steps, ref_steps),
    }
    print(f"\n{name}: max|diff|/std vs official: {errors}")
    assert errors["sequence"] <= 5e-5, errors
    assert errors["token-by-token"] <= 5e-5, errors
    for i in range(L):
        official_wkv = ref_state[3 * i + 1].transpose(-1, -2)  # official [H, V, K] -> fla [H, K, V]
        for ours in (out.cache.wkv[i][0], cache.wkv[i][0]):
            assert ours.dtype == torch.float32
            torch.testing.assert_close(ours, official_wkv, rtol=1e-4, atol=1e-4 * official_wkv.abs().max().item())
        torch.testing.assert_close(out.cache.attn_shift[i][0], ref_state[3 * i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.cache.ffn_shift[i][0], ref_state[3 * i + 2], rtol=1e-5, atol=1e-5)


def test_float64_is_closer_to_exact_math(case):
    name, official, _ = case
    exact_logits, exact_states = official_math_fp64(official, TOKENS)
    errors = {}
    for dtype in (torch.float32, torch.float64):
        with torch.no_grad():
            out = tiny_model(official, dtype)(torch.tensor([TOKENS]), use_cache=True)
        errors[dtype] = max_error_over_std(out.logits[0], exact_logits)
        if dtype == torch.float64:
            for i, state in enumerate(exact_states):
                torch.testing.assert_close(out.cache.wkv[i][0], state.transpose(-1, -2).to(torch.float64))
    print(f"\n{name}: max|diff|/std vs float64 math: float32 {errors[torch.float32]:.2e}, float64 {errors[torch.float64]:.2e}")
    assert errors[torch.float64] < 1e-10
    assert errors[torch.float64] < errors[torch.float32] / 100


def test_sequence_equals_pieces_with_cache_equals_token_by_token():
    model = tiny_model(random_official_weights(hidden=128, layers=3, head_dim=32, seed=3))
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(ids).logits
        cache, pieces = None, []
        for start, end in [(0, 4), (4, 5), (5, 11)]:
            out = model(ids[:, start:end], cache=cache, use_cache=True)
            cache = out.cache
            pieces.append(out.logits)
        cache, steps = None, []
        for t in range(ids.shape[1]):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-5, atol=1e-5)
    assert cache.num_seen_tokens == 11 and len(cache) == 3


def test_packed_x_x_layout_loads_to_the_same_logits(tmp_path):
    official = random_official_weights(hidden=128, layers=2, seed=4)
    ids = torch.tensor([TOKENS])
    logits = {}
    for packed in (False, True):
        folder = write_model_dir(tmp_path / f"packed{packed}", official, pack_x_x=packed)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        with torch.no_grad():
            logits[packed] = model(ids).logits
    torch.testing.assert_close(logits[True], logits[False], rtol=0, atol=0)
    torch.testing.assert_close(logits[False], tiny_model(official)(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_save_and_load_round_trip(tmp_path, dtype):
    official = random_official_weights(hidden=128, layers=2, seed=5)
    reference = tiny_model(official)
    folder = write_model_dir(tmp_path / "src", official, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **{DTYPE_ARG: dtype})
    assert {p.dtype for p in model.parameters()} == {dtype}
    model.save_pretrained(tmp_path / "saved")
    saved_config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved_config["auto_map"]["AutoModelForCausalLM"] == "modeling_rwkv7.RWKV7ForCausalLM"
    assert (tmp_path / "saved" / "rwkv7_kernels" / "wkv7_reference.py").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True, **{DTYPE_ARG: dtype})
    for (name, p), (name2, p2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert name == name2 and torch.equal(p, p2), name

    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        out = reloaded(ids, use_cache=True)
        ref = reference(ids).logits
    assert out.cache.wkv[0].dtype == torch.float32
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    assert max_error_over_std(out.logits.float(), ref) <= tolerance


def test_loss_hidden_states_and_tuple_outputs():
    model = tiny_model(random_official_weights(hidden=128, layers=2, seed=6))
    ids = torch.tensor([TOKENS, TOKENS[::-1]])
    labels = ids.clone()
    labels[0, 3] = -100
    labels[1, :5] = -100
    out = model(ids, labels=labels, output_hidden_states=True)
    logits = out.logits[:, :-1].reshape(-1, 97)
    targets = labels[:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(out.hidden_states[0], model.model.embeddings(ids))
    torch.testing.assert_close(out.logits, model.lm_head(out.hidden_states[-1]))

    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    as_tuple = model(ids, labels=labels, return_dict=False, use_cache=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    torch.testing.assert_close(as_tuple[0], out.loss)
    torch.testing.assert_close(as_tuple[1], out.logits)
    only_last = model(ids, logits_to_keep=1).logits
    torch.testing.assert_close(only_last, out.logits[:, -1:])


def test_cache_copies_are_independent_and_reorderable():
    model = tiny_model(random_official_weights(hidden=128, layers=2, seed=7))
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        prefix = model(ids[:, :6], use_cache=True).cache
        branch = copy.deepcopy(prefix)
        a = model(ids[:, 6:], cache=prefix, use_cache=True).logits
        b = model(ids[:, 6:], cache=branch, use_cache=True).logits
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, model(ids).logits[:, 6:], rtol=1e-5, atol=1e-5)

        two = model(torch.tensor([TOKENS[:6], TOKENS[6:]]), use_cache=True).cache
        two.reorder_cache(torch.tensor([1, 1]))
        torch.testing.assert_close(two.wkv[1][0], two.wkv[1][1])
        assert two.get_seq_length() == 0 and two.num_seen_tokens == 6
        with pytest.raises(ValueError, match="divides"):
            model(torch.tensor([[1], [2], [3]]), cache=two)
        # a cache of one row serves a batch: each row continues from the same state
        one = model(ids[:, :6], use_cache=True).cache
        rows = model(torch.tensor([[TOKENS[6]], [TOKENS[6]], [TOKENS[7]]]), cache=one).logits
        torch.testing.assert_close(rows[0], rows[1], rtol=0, atol=0)
        torch.testing.assert_close(rows[0], model(ids).logits[:, 6:7][0], rtol=1e-5, atol=1e-5)
        assert one.batch_size == 3
        with pytest.raises(NotImplementedError, match="rewound"):
            two.crop(3)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_size=100, head_dim=64), "hidden_size"),
        (dict(hidden_size=128, num_hidden_layers=2, value_dim=[128]), "value_dim"),
        (dict(hidden_size=128, num_hidden_layers=2, value_dim=[128, 64]), "value_dim"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(a_low_rank_dim=0), "a_low_rank_dim"),
        (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    ],
)
def test_bad_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        RWKV7Config(**overrides)


def test_config_reads_fla_hub_config_unchanged():
    fla_hub_04b = {
        "a_low_rank_dim": 64, "architectures": ["RWKV7ForCausalLM"], "attn": None, "attn_mode": "chunk",
        "bos_token_id": 1, "decay_low_rank_dim": 64, "eos_token_id": 2, "fuse_cross_entropy": True,
        "fuse_norm": False, "gate_low_rank_dim": 128, "head_dim": 64, "hidden_act": "sqrelu", "hidden_ratio": 4.0,
        "hidden_size": 1024, "initializer_range": 0.006, "intermediate_size": 4096, "max_position_embeddings": 2048,
        "model_type": "rwkv7", "norm_bias": True, "norm_eps": 1e-05, "norm_first": True, "num_heads": None,
        "num_hidden_layers": 24, "tie_word_embeddings": False, "torch_dtype": "float32",
        "transformers_version": "4.49.0", "use_cache": True, "v_low_rank_dim": 32, "value_dim": [1024] * 24,
        "vocab_size": 65536, "_attn_implementation_autoset": True,
    }
    config = RWKV7Config(**fla_hub_04b)
    assert (config.num_heads, config.head_dim, config.intermediate_size) == (16, 64, 4096)
    assert config.attn_mode == "chunk" and config.fuse_norm is False
    pile = RWKV7Config(hidden_size=768, num_hidden_layers=12, vocab_size=50304, bos_token_id=0, eos_token_id=0,
                       num_heads=12, attn_mode="fused_recurrent")
    assert pile.num_heads == 12 and pile.intermediate_size == 3072


def test_incomplete_and_unsupported_checkpoints_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    official = random_official_weights(hidden=128, layers=2, seed=8)
    folder = write_model_dir(tmp_path / "incomplete", official)
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.attn.k_k"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"Missing weights: \['model.layers.1.attn.k_k'\]"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

    folder = write_model_dir(tmp_path / "deepembed", official)
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.ffn.s_emb.weight"] = torch.zeros(97, 1024)
    state["model.layers.0.ffn.s1"] = torch.zeros(128, 32)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match="DeepEmbed"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def test_base_model_loads_from_a_causal_lm_checkpoint(tmp_path):
    """AutoModel on a causal-LM folder (its auto_map advertises it) loads everything but the head, as transformers'
    own base models do, from the packed x_x layout too; a missing weight is still an error."""
    from transformers import AutoModel

    official = random_official_weights(hidden=128, layers=2, seed=14)
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        expected = tiny_model(official).model(ids).last_hidden_state
    for packed in (False, True):
        folder = write_model_dir(tmp_path / f"packed{packed}", official, pack_x_x=packed)
        base = AutoModel.from_pretrained(folder, trust_remote_code=True)
        assert type(base).__name__ == "RWKV7Model"
        with torch.no_grad():
            torch.testing.assert_close(base(ids).last_hidden_state, expected, rtol=0, atol=0)

    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.ffn.key.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"Missing weights: \['layers.1.ffn.key.weight'\]"):
        AutoModel.from_pretrained(folder, trust_remote_code=True)


def test_wrong_shapes_are_named_with_both_shapes(tmp_path):
    from safetensors.torch import load_file, save_file

    official = random_official_weights(hidden=128, layers=2, seed=15)
    folder = write_model_dir(tmp_path / "r_k", official)
    state = load_file(folder / "model.safetensors")
    state["model.layers.1.attn.r_k"] = torch.zeros(2, 32)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.layers.1.attn.r_k is \[2, 32\] in the checkpoint and \[2, 64\] in the model"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

    folder = write_model_dir(tmp_path / "vocab", official, vocab_size=98)  # 97 rows stored
    with pytest.raises(ValueError) as error:
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    for name in ("model.embeddings.weight", "lm_head.weight"):
        assert f"{name} is [97, 128] in the checkpoint and [98, 128] in the model" in str(error.value)
    # asked for explicitly, mismatched weights are left newly initialised, as transformers does
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, ignore_mismatched_sizes=True)
    assert model.lm_head.weight.shape == (98, 128)


def test_empty_input_is_a_clear_error():
    model = tiny_model(random_official_weights(hidden=128, layers=1, seed=16))
    empty = torch.zeros(2, 0, dtype=torch.long)
    with pytest.raises(ValueError, match=r"empty \(shape \(2, 0\)\)"):
        model(empty)
    with pytest.raises(ValueError, match="empty"):
        model.generate(empty, max_new_tokens=2)
