"""The model on a CUDA GPU: Triton kernels against the CPU reference, and graphed decoding against eager decoding.

These need a CUDA GPU (marker `gpu`); on a machine with one, run
    python -m pytest -m "gpu or kernels"
"""

import copy
import gc
from pathlib import Path

import pytest
import torch
from helpers import relative_rms_error as rel
from helpers import tiny_model

from modeling_rwkv7 import ForwardPath, RWKV7DecodeGraph, RWKV7ForCausalLM, choose_path

pytestmark = pytest.mark.gpu


def make_model(seed=0, layers=3, hidden=256, vocab=1000):
    return tiny_model(hidden=hidden, layers=layers, vocab=vocab, seed=seed)


@torch.no_grad()
def test_gpu_bf16_logits_match_cpu_reference():
    cpu = make_model()
    gpu = copy.deepcopy(cpu).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 1000, (2, 300), generator=torch.Generator().manual_seed(0))
    ref = cpu(ids, use_cache=True)
    out = gpu(ids.cuda(), use_cache=True)
    error = rel(out.logits.float().cpu(), ref.logits)
    print(f"\nbf16 GPU vs float32 CPU logits: relative RMS error {error:.2e}")
    assert error <= 5e-3 * 4  # bf16 weights and activations through 3 layers; the WKV kernel alone is <= 5e-3
    for mine, theirs in zip(out.cache.wkv, ref.cache.wkv):
        assert mine.dtype == torch.float32
        assert rel(mine.cpu(), theirs) <= 2e-2


def graphed_and_eager_step(model, tokens, mask, cache, eager_cache):
    """The logits of one decoding step replayed from a CUDA graph (implementation "auto") and run eagerly through
    the same kernels (implementation "triton")."""
    model.set_implementation("auto")
    assert choose_path(model, tokens, cache, mask, graphable=True) is ForwardPath.DECODE_GRAPH
    graphed = model(tokens, attention_mask=mask, cache=cache).logits
    model.set_implementation("triton")
    eager = model(tokens, attention_mask=mask, cache=eager_cache).logits
    model.set_implementation("auto")
    return graphed, eager


@pytest.mark.parametrize("many_rows", [False, True], ids=["4_rows", "lora_up_rows"])
@torch.no_grad()
def test_graphed_decoding_equals_eager_decoding(many_rows):
    """A CUDA graph replays the eager step exactly; with many rows the time mix applies its LoRAs in a launch of
    their own first (decode_step.time_mix), which the graph must hold too."""
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
        graphed, eager = graphed_and_eager_step(model, tokens, mask, cache, eager_cache)
        torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
        tokens = graphed[:, -1].argmax(-1, keepdim=True)
    assert isinstance(model._decode_graphs[batch], RWKV7DecodeGraph)
    for mine, theirs in zip(cache.states, eager_cache.states):
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@torch.no_grad()
def test_two_caches_decoding_in_turn_keep_their_own_states():
    model = make_model(seed=2).to("cuda", torch.bfloat16)
    first = model(torch.randint(0, 1000, (1, 20), device="cuda"), use_cache=True).cache
    second = model(torch.randint(0, 1000, (1, 30), device="cuda"), use_cache=True).cache
    references = [copy.deepcopy(first), copy.deepcopy(second)]
    token = torch.tensor([[7]], device="cuda")
    for _ in range(3):
        for cache, reference in zip((first, second), references):
            graphed, eager = graphed_and_eager_step(model, token, None, cache, reference)
            torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    assert not any(a is b for a, b in zip(first.wkv, second.wkv))
    # a copy taken while its cache holds the graph's tensors is independent of it
    snapshot = copy.deepcopy(second)
    model(token, cache=second)
    assert not torch.equal(snapshot.wkv[0], second.wkv[0])


@torch.no_grad()
def test_graph_follows_a_changed_module_tree():
    """A graph captured before a projection is wrapped (PEFT) replays no more: the next step captures anew, through
    the wrapper."""
    model = make_model(seed=6).to("cuda", torch.bfloat16)
    cache = model(torch.randint(0, 1000, (1, 8), device="cuda"), use_cache=True).cache
    token = torch.tensor([[3]], device="cuda")
    model(token, cache=copy.deepcopy(cache))
    before = model._decode_graphs[1]

    class Doubled(torch.nn.Module):
        def __init__(self, base_layer):
            super().__init__()
            self.base_layer = base_layer

        def forward(self, x):
            return 2 * self.base_layer(x)

    model.model.layers[2].ffn.value = Doubled(model.model.layers[2].ffn.value)
    graphed = model(token, cache=copy.deepcopy(cache)).logits
    assert model._decode_graphs[1] is not before
    model.set_implementation("pytorch")
    torch.testing.assert_close(graphed, model(token, cache=copy.deepcopy(cache)).logits, rtol=2e-2, atol=2e-2)


@torch.no_grad()
def test_generate_on_gpu_greedy_beam_and_batch():
    model = make_model(seed=3).to("cuda", torch.bfloat16)
    model.generation_config.pad_token_id = 0
    ids = torch.randint(1, 1000, (2, 12), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    model.set_implementation("triton")  # graphs off: every step eager
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    model.set_implementation("auto")
    assert torch.equal(greedy, eager)
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=10, num_beams=3, do_sample=False)
    assert beams.shape == (2, 22)


def test_graph_memory_is_released_with_the_model():
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
    assert rel(torch.stack(out.scores).cpu(), torch.stack(ref.scores)) <= 1e-4


TINY_ENGLISH = Path(__file__).resolve().parent.parent / "models" / "rwkv7-tiny-english"
GRADIENT_BOUND = 5e-2  # relative RMS error of a bf16 gradient against float32, per parameter
ENGLISH_PROMPTS = ["The history of the", "User: What does \"garden\" mean?\n\nAssistant:", "It is a truth universally",
                   "In Python, a list is", "She looked at him and said"]


@torch.no_grad()
def test_tiny_english_bf16_greedy_agrees_with_float32_cpu():
    """The small trained model (models/rwkv7-tiny-english) in bf16 on the GPU continues each prompt greedily as it
    does in float32 on the CPU for at least 8 tokens (bf16 rounding flips a choice between close logits sooner or
    later); the agreement per prompt is printed."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_ENGLISH.parent.parent, trust_remote_code=True)
    cpu = RWKV7ForCausalLM.from_pretrained(TINY_ENGLISH, dtype=torch.float32).eval()
    gpu = RWKV7ForCausalLM.from_pretrained(TINY_ENGLISH, dtype=torch.bfloat16).cuda().eval()
    agreement = []
    for prompt in ENGLISH_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        kwargs = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0, eos_token_id=None)
        ours = cpu.generate(ids, **kwargs)[0, ids.shape[1]:]
        theirs = gpu.generate(ids.cuda(), **kwargs)[0, ids.shape[1]:].cpu()
        same = (ours != theirs).nonzero()
        agreement.append(int(same[0]) if len(same) else len(ours))
    print(f"\nbf16 GPU greedy agrees with float32 CPU for {agreement} of 64 tokens")
    assert min(agreement) >= 8, agreement


def test_tiny_english_bf16_training_gradients_match_float32():
    """One training step of the small trained model in bf16 on the GPU (the training path: fused shift, time mix and
    loss kernels with their backward) against float32 on the GPU (the PyTorch references, TF32 off): the loss, and
    every parameter's gradient within a relative RMS error bound; the same bf16 step through the PyTorch references
    is measured beside it and printed, the precision bf16 itself allows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_ENGLISH.parent.parent, trust_remote_code=True)
    text = (TINY_ENGLISH.parent.parent / "README.md").read_text()  # English prose and code
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :512].reshape(2, 256).cuda()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def step(dtype, implementation):
        model = RWKV7ForCausalLM.from_pretrained(TINY_ENGLISH, dtype=dtype).cuda().train()
        model.set_implementation(implementation)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.float().item(), {n: p.grad.float() for n, p in model.named_parameters()}

    ref_loss, ref = step(torch.float32, "pytorch")
    loss, fused = step(torch.bfloat16, "auto")
    torch_loss, plain = step(torch.bfloat16, "pytorch")
    errors = {n: (rel(fused[n], ref[n]), rel(plain[n], ref[n])) for n in ref}
    worst = sorted(errors.items(), key=lambda e: -e[1][0])[:8]
    print(f"\nloss float32 {ref_loss:.5f}, bf16 fused {loss:.5f}, bf16 PyTorch {torch_loss:.5f}; relative RMS error "
          "of the bf16 gradients (fused, PyTorch), largest first: "
          + ", ".join(f"{n} {a:.1e} {b:.1e}" for n, (a, b) in worst))
    assert abs(loss - ref_loss) <= 1e-2 * ref_loss
    for name, (fused_error, plain_error) in errors.items():
        assert fused_error <= max(GRADIENT_BOUND, 1.5 * plain_error), (name, fused_error, plain_error)


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs: python -m pytest -m gpu -k two_gpus on a machine with them")
@torch.no_grad()
def test_model_split_over_two_gpus_generates_as_on_one(tmp_path):
    """device_map splits the blocks over two GPUs: greedy generate gives one GPU's tokens, each layer's state lies
    on its layer's GPU, and decoding runs without a CUDA graph (one graph cannot follow a step across devices)."""
    make_model(seed=3, layers=4).to(torch.bfloat16).save_pretrained(tmp_path)
    one = RWKV7ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).to("cuda:0").eval()
    device_map = {"model.embeddings": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1,
                  "model.layers.3": 1, "model.norm": 1, "lm_head": 1}
    split = RWKV7ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map=device_map).eval()
    assert not split.on_one_cuda_device()

    prompts = torch.randint(1, 1000, (3, 50), generator=torch.Generator().manual_seed(3)).to("cuda:0")
    mask = torch.ones_like(prompts)
    mask[1, :20] = 0  # left padding: the mask reaches the blocks on the second GPU too
    prompts[1, :20] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(split.generate(prompts, **kwargs).cpu(), one.generate(prompts, **kwargs).cpu())

    cache = split(prompts, attention_mask=mask, use_cache=True).cache
    for i, state in enumerate(cache.states):
        expected = torch.device("cuda", device_map[f"model.layers.{i}"])
        assert all(tensor.device == expected for tensor in state), (i, [tensor.device for tensor in state])
