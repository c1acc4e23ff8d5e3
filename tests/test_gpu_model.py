"""The model on a CUDA GPU: Triton kernels against the CPU reference, and graphed decoding against eager decoding.

These need a CUDA GPU; on a machine with one, run
    python -m pytest tests/test_gpu_model.py tests/test_kernels.py
CI has no GPU, so there every test here is skipped with that reason.
"""

import copy

import pytest
import torch
from official import random_official_weights, to_fla

from configuration_rwkv7 import RWKV7Config
from modeling_rwkv7 import RWKV7DecodeGraph, RWKV7ForCausalLM

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: python -m pytest tests/test_gpu_model.py on one"
)


def make_model(seed=0, layers=3, hidden=256, vocab=1000):
    config, state = to_fla(random_official_weights(hidden=hidden, layers=layers, vocab=vocab, seed=seed))
    model = RWKV7ForCausalLM(RWKV7Config(**config))
    model.load_state_dict(state)
    return model.eval()


def rms_rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@torch.no_grad()
def test_gpu_bf16_logits_match_cpu_reference():
    cpu = make_model()
    gpu = copy.deepcopy(cpu).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 1000, (2, 300), generator=torch.Generator().manual_seed(0))
    ref = cpu(ids, use_cache=True)
    out = gpu(ids.cuda(), use_cache=True)
    error = rms_rel(out.logits.float().cpu(), ref.logits)
    print(f"\nbf16 GPU vs float32 CPU logits: relative RMS error {error:.2e}")
    assert error <= 5e-3 * 4  # bf16 weights and activations through 3 layers; the WKV kernel alone is <= 5e-3
    for mine, theirs in zip(out.cache.wkv, ref.cache.wkv):
        assert mine.dtype == torch.float32
        assert rms_rel(mine.cpu(), theirs) <= 2e-2


@pytest.mark.parametrize("many_rows", [False, True], ids=["4_rows", "lora_up_rows"])
@torch.no_grad()
def test_graphed_decoding_equals_eager_decoding(many_rows):
    """A CUDA graph replays the eager step exactly; with many rows the time mix applies its LoRAs in a launch of
    their own first (kernels.fused_time_mix), which the graph must hold too."""
    model = make_model(seed=1).to("cuda", torch.bfloat16)
    heads = model.config.hidden_size // model.config.head_dim
    batch = 2 * torch.cuda.get_device_properties(0).multi_processor_count // heads + 1 if many_rows else 4
    prompts = torch.randint(0, 1000, (batch, 40), device="cuda")
    cache = model(prompts, use_cache=True).cache
    eager_cache = copy.deepcopy(cache)
    tokens = torch.randint(0, 1000, (batch, 1), device="cuda")
    padded = torch.ones(batch, 1, dtype=torch.long, device="cuda")
    padded[0] = 0  # row 0 gets a padding token
    for step in range(6):
        mask = padded if step % 3 == 0 else None  # and the steps after it, without a mask, none
        graphed = model(tokens, attention_mask=mask, cache=cache).logits
        eager = model._forward_eager(input_ids=tokens, attention_mask=mask, cache=eager_cache,
                                     return_dict=True).logits
        torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
        tokens = graphed[:, -1].argmax(-1, keepdim=True)
    assert isinstance(model._decode_graphs[batch], RWKV7DecodeGraph)
    for mine, theirs in zip(cache.wkv + cache.attn_shift, eager_cache.wkv + eager_cache.attn_shift):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


@torch.no_grad()
def test_two_caches_decoding_in_turn_keep_their_own_states():
    model = make_model(seed=2).to("cuda", torch.bfloat16)
    first = model(torch.randint(0, 1000, (1, 20), device="cuda"), use_cache=True).cache
    second = model(torch.randint(0, 1000, (1, 30), device="cuda"), use_cache=True).cache
    references = [copy.deepcopy(first), copy.deepcopy(second)]
    token = torch.tensor([[7]], device="cuda")
    for _ in range(3):
        for cache, reference in zip((first, second), references):
            graphed = model(token, cache=cache).logits
            eager = model._forward_eager(input_ids=token, cache=reference, return_dict=True).logits
            torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    assert not any(a is b for a, b in zip(first.wkv, second.wkv))
    # a copy taken while its cache holds the graph's tensors is independent of it
    snapshot = copy.deepcopy(second)
    model(token, cache=second)
    assert not torch.equal(snapshot.wkv[0], second.wkv[0])


@torch.no_grad()
def test_generate_on_gpu_greedy_beam_and_batch():
    model = make_model(seed=3).to("cuda", torch.bfloat16)
    model.generation_config.pad_token_id = 0
    ids = torch.randint(1, 1000, (2, 12), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    model._decode_graphs = False  # graphs off: every step eager
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    model.release_decode_graphs()  # graphs back on
    assert torch.equal(greedy, eager)
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=10, num_beams=3, do_sample=False)
    assert beams.shape == (2, 22)


def test_graph_memory_is_released_with_the_model():
    import gc

    def decode_with_a_fresh_model():
        model = make_model(seed=4).to("cuda", torch.bfloat16)
        with torch.no_grad():
            model.generate(torch.randint(1, 1000, (8, 5), device="cuda"), max_new_tokens=4, do_sample=False,
                           pad_token_id=0)
        assert model._decode_graphs  # a graph was captured

    decode_with_a_fresh_model()  # the first one sets up what the process keeps (cuBLAS workspaces, kernels)
    gc.collect()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    decode_with_a_fresh_model()
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == baseline


@torch.no_grad()
def test_cuda_without_usable_triton_runs_the_pytorch_path(monkeypatch):
    """With a triton too old for the kernels (kernels.HAS_TRITON False, and a warning at import), CUDA runs the
    PyTorch references, graphed decoding included, and generates what the CPU does."""
    import modeling_rwkv7

    monkeypatch.setattr(modeling_rwkv7.kernels, "HAS_TRITON", False)
    cpu = make_model(seed=5)
    gpu = copy.deepcopy(cpu).to("cuda")
    ids = torch.randint(1, 1000, (2, 20), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    ref = cpu.generate(ids, **kwargs)
    out = gpu.generate(ids.cuda(), **kwargs)
    assert gpu._decode_graphs  # the decoding steps ran as a CUDA graph
    assert torch.equal(out.sequences.cpu(), ref.sequences)
    assert rms_rel(torch.stack(out.scores).cpu(), torch.stack(ref.scores)) <= 1e-4
