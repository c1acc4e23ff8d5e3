"""Fine-tuning paths: gradient checkpointing, transformers' Trainer and PEFT LoRA adapters."""

import copy

import pytest
import torch
from helpers import relative_rms_error, tiny_model
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from rwkv7_kernels.linear_cross_entropy import linear_cross_entropy
from rwkv7_kernels.ops_reference import cross_entropy_rows_reference, linear_cross_entropy_reference

VOCAB = 97


def make_model(seed=31):
    return tiny_model(hidden=128, layers=2, head_dim=32, vocab=VOCAB, seed=seed).train()


def batch(seed=0, size=4, length=24):
    ids = torch.randint(0, VOCAB, (size, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def test_gradient_checkpointing_gives_the_same_gradients():
    plain, checkpointed = make_model(), make_model()
    checkpointed.gradient_checkpointing_enable()
    plain.train(), checkpointed.train()
    inputs = batch()
    losses = [m(**inputs).loss for m in (plain, checkpointed)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p), (_, q) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


class Examples(torch.utils.data.Dataset):
    def __init__(self, n=16):
        self.items = [{k: v[0] for k, v in batch(seed=i, size=1).items()} for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_trainer_lowers_the_loss(tmp_path):
    model = make_model()
    data = Examples()
    before = model(**batch(seed=3)).loss.item()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=6,
                             learning_rate=3e-3, report_to=[], save_strategy="no", logging_steps=100,
                             use_cpu=True, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=data).train()
    model.eval()
    with torch.no_grad():
        after = torch.stack([model(**{k: v[None] for k, v in item.items()}).loss for item in data.items]).mean()
    assert after.item() < before - 0.5


def test_peft_lora_trains_only_the_adapters_and_merges():
    base = make_model()
    reference = copy.deepcopy(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"])
    model = get_peft_model(base, config)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        loss = model(**batch(seed=step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    inputs = {"input_ids": batch(seed=9)["input_ids"]}  # no labels: a training-mode forward with labels has no logits
    with torch.no_grad():
        adapted = model(**inputs).logits
        merged = model.merge_and_unload()(**inputs).logits
        untouched = reference(**inputs).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(adapted, untouched, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("frozen_head", [False, True], ids=["head", "frozen_head"])
@pytest.mark.parametrize("num_items", [None, 50])
def test_linear_cross_entropy_equals_the_loss_on_logits(dtype, frozen_head, num_items):
    """The chunked loss (several chunks here) equals cross entropy on the whole logits, with its gradients."""
    g = torch.Generator().manual_seed(int(frozen_head))
    hidden = torch.randn(37, 16, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(97, 16, generator=g) * 0.3).to(dtype).requires_grad_(not frozen_head)
    labels = torch.randint(0, 97, (37,), generator=g)
    labels[::5] = -100
    ref_hidden, ref_weight = (t.detach().clone().requires_grad_(t.requires_grad) for t in (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, labels, num_items, chunk_rows=8)
    ref = linear_cross_entropy_reference(ref_hidden, ref_weight, labels, num_items)
    (loss * 2).backward()
    (ref * 2).backward()
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(loss, ref, **tolerance)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, **tolerance)
    assert (weight.grad is None) == frozen_head
    if not frozen_head:
        assert weight.grad.dtype == dtype
        torch.testing.assert_close(weight.grad, ref_weight.grad, **tolerance)


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab", [97, 5000])  # one block of columns; two, the second partial
def test_cross_entropy_rows_kernel_matches_reference(dtype, vocab):
    """The loss kernel (rwkv7_kernels/cross_entropy_rows.py; under the interpreter on the CPU in CI) against its
    PyTorch reference: the loss of a chunk, its gradient written over the logits, and the whole chunked loss with
    the kernel inside."""
    from conftest import KERNEL_TEST_DEVICE as DEVICE

    from rwkv7_kernels.cross_entropy_rows import cross_entropy_rows

    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(37, vocab, generator=g) * 3).to(DEVICE, dtype)
    labels = torch.randint(0, vocab, (37,), generator=g).to(DEVICE)
    labels[::5] = -100
    scale = torch.tensor([1 / 30], device=DEVICE)
    ref_total, ref_grad = cross_entropy_rows_reference(logits.clone(), labels, scale)
    total, grad = cross_entropy_rows(logits.clone(), labels, scale)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-5)
    assert grad.dtype == dtype and torch.equal(grad[::5], torch.zeros_like(grad[::5]))  # unlabelled rows
    # the same float32 values rounded to the dtype, up to one rounding step
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-7)
    unchanged = logits.clone()
    total, grad = cross_entropy_rows(unchanged, labels, scale, need_grad=False)
    assert grad is None and torch.equal(unchanged, logits)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-5)

    hidden = torch.randn(37, 16, generator=g).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(vocab, 16, generator=g) * 0.3).to(DEVICE, dtype).requires_grad_()
    ref_hidden, ref_weight = (t.detach().clone().requires_grad_() for t in (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, labels, chunk_rows=8, rows=cross_entropy_rows)
    ref = linear_cross_entropy(ref_hidden, ref_weight, labels, chunk_rows=8)
    loss.backward()
    ref.backward()
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(loss, ref, **tolerance)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, **tolerance)
    torch.testing.assert_close(weight.grad, ref_weight.grad, **tolerance)


@pytest.mark.kernels
def test_peft_lora_training_runs_the_kernels_and_equals_pytorch(monkeypatch):
    """With PEFT's LoRA layers in place of the projections, training still runs the token-shift, time-mix and loss
    kernels between the modules (on the CPU under the interpreter in CI), and the adapters' gradients equal those of
    the PyTorch path."""
    from conftest import KERNEL_TEST_DEVICE as DEVICE

    import rwkv7_kernels
    from modeling_rwkv7 import ForwardPath, choose_path

    calls = {}
    for module, name in (("shift_mix_sequence", "shift_mix_sequence"), ("time_mix_sequence", "time_mix_sequence"),
                         ("cross_entropy_rows", "cross_entropy_rows")):
        kernel = getattr(getattr(rwkv7_kernels, module), name)

        def counted(*args, kernel=kernel, name=name, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return kernel(*args, **kwargs)

        monkeypatch.setattr(getattr(rwkv7_kernels, module), name, counted)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
                        init_lora_weights=False)  # random B too: every adapter weight gets a gradient
    base = tiny_model(hidden=128, layers=2, vocab=VOCAB, seed=5).to(DEVICE).train()
    torch.manual_seed(0)
    adapted = get_peft_model(base, config)
    models = {implementation: copy.deepcopy(adapted) for implementation in ("triton", "pytorch")}
    inputs = {k: v.to(DEVICE) for k, v in batch(seed=3, length=40).items()}
    grads = {}
    for implementation, model in models.items():
        model.base_model.model.set_implementation(implementation)
        model(**inputs).loss.backward()
        grads[implementation] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    triton_model = models["triton"].base_model.model
    triton_model.set_implementation("triton")
    assert choose_path(triton_model, inputs["input_ids"], None, None) is ForwardPath.SEQUENCE_TRITON_MODULES
    assert calls == {"shift_mix_sequence": 4, "time_mix_sequence": 2, "cross_entropy_rows": 1}, calls
    for name, grad in grads["pytorch"].items():
        assert relative_rms_error(grads["triton"][name], grad) <= 1e-4, name


@pytest.mark.kernels
def test_training_path_keeps_few_activations_for_the_backward():
    """What a layer of a bf16 training forward through the kernels keeps for the backward (autograd's saved tensors,
    each storage once, weights aside), per token in units of one [C] bf16 vector: each LayerNorm with its token shift
    and projections keeps only the block's input (and the LayerNorm's mean and 1 / std), relu^2 with the value
    projection only k, the time mix its bf16 inputs but the LoRAs' outputs, WKV-7's output, the chunks' start states
    and WKV-7's parallel pass (4: recomputing it costs a launch as long as its forward), nothing cheaper to recompute.
    Measured 17.7 on this model (13.7 with the parallel pass recomputed); 21.7 with the LoRAs' outputs kept, 23.7
    with also the LayerNorms' outputs, 34.7 with also the lerps and relu(k)^2 (the block's modules around the same
    kernels), 47.7 with PyTorch ops around the WKV-7 kernel."""
    from conftest import KERNEL_TEST_DEVICE as DEVICE

    B, T, C = 2, 64, 128
    ids = torch.randint(0, 1000, (B, T), generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def saved(layers):
        model = tiny_model(hidden=C, layers=layers, vocab=1000, seed=0).to(DEVICE, torch.bfloat16).train()
        model.set_implementation("triton")
        storages = {}

        def keep(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model(ids, labels=ids)
        for p in model.parameters():  # the linear layers keep their weights: not activations
            storages.pop(p.untyped_storage().data_ptr(), None)
        return sum(storages.values()) / (B * T * C * 2)

    per_layer = (saved(4) - saved(2)) / 2  # the embedding, head and loss cancel out
    print(f"\nsaved for the backward: {per_layer:.1f} [C] bf16 vectors per token and layer")
    assert per_layer <= 18.5, per_layer


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "autocast"], ids=["float32", "bf16", "autocast"])
def test_relu_square_kernels_give_the_bits_of_pytorchs_ops(dtype):
    """relu(k)^2, alone and before a linear layer, keeping only k for the backward and running one kernel each way,
    give the bits of relu, square and F.linear under autograd, forward and backward (both round each product once),
    at relu's kink too; under autocast (float32 k and weight, bf16 products) as nn.Linear does."""
    from conftest import KERNEL_TEST_DEVICE as DEVICE

    from rwkv7_kernels.relu_square import relu_square, relu_square_linear

    B, T, F, C = (2, 7, 64, 16) if DEVICE == "cpu" else (2, 4096, 8192, 2048)  # k [B, T, F], weight [C, F]
    g = torch.Generator().manual_seed(9)
    k, weight = torch.randn(B, T, F, generator=g), torch.randn(C, F, generator=g) / F**0.5
    k[0, 0, :8] = 0.0  # relu's kink: both sides take the gradient 0 there
    autocast = dtype == "autocast"
    dtype = torch.float32 if autocast else dtype
    ops = [(relu_square, lambda k: torch.relu(k).square()),
           (relu_square_linear, lambda k, w: torch.nn.functional.linear(torch.relu(k).square(), w))]
    for ours, pytorchs in ops:
        inputs = (k, weight)[:2 if ours is relu_square_linear else 1]
        results = []
        for fn in (ours, pytorchs):
            leaves = [t.to(DEVICE, dtype).clone().requires_grad_() for t in inputs]
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
                out = fn(*leaves)
            d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, out.dtype)
            out.backward(d_out)
            results.append([out] + [t.grad for t in leaves])
        for mine, theirs in zip(*results):
            assert mine.dtype == theirs.dtype
            assert torch.equal(mine, theirs), relative_rms_error(mine, theirs)


@pytest.mark.kernels
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "autocast_bf16"])
def test_training_path_reading_the_projections_equals_pytorch(autocast):
    """Training a plain model through the kernels (SEQUENCE_TRITON_TRAINING: the projections read by the ops that
    recompute their inputs in the backward) gives the PyTorch path's loss and gradients: float32 within 1e-4; under
    autocast (float32 weights, bf16 products, as Trainer with bf16=True) the float32 path's within max(5e-2, 2x the
    PyTorch path's error under autocast) per parameter. Not 1.5x as in the pure bf16 test: under autocast the
    PyTorch time mix promotes its intermediates to float32 (its parameters are float32), where the kernels keep them
    in the inputs' bf16, as in a bf16 model; measured up to 1.33x on the CPU and 1.59x on an H200."""
    from conftest import KERNEL_TEST_DEVICE as DEVICE

    from modeling_rwkv7 import ForwardPath, choose_path

    inputs = {k: v.to(DEVICE) for k, v in batch(seed=5, length=40).items()}
    results = {}
    for implementation, bf16 in (("pytorch", False), ("pytorch", autocast), ("triton", autocast)):
        model = tiny_model(hidden=128, layers=2, vocab=VOCAB, seed=6).to(DEVICE).train()
        model.set_implementation(implementation)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**inputs).loss
        loss.backward()
        results[implementation, bf16] = loss, {n: p.grad for n, p in model.named_parameters()}
    assert choose_path(model, inputs["input_ids"], None, None) is ForwardPath.SEQUENCE_TRITON_TRAINING
    (ref_loss, ref), (plain_loss, plain), (loss, grads) = (results[key] for key in (
        ("pytorch", False), ("pytorch", autocast), ("triton", autocast)))
    errors = {name: (relative_rms_error(grads[name], grad), relative_rms_error(plain[name], grad))
              for name, grad in ref.items()}
    bounds = {name: 1e-4 if not autocast else max(5e-2, 2 * plain_error) for name, (_, plain_error) in errors.items()}
    assert all(errors[name][0] <= bound for name, bound in bounds.items()), {
        name: error for name, error in errors.items() if error[0] > bounds[name]}
    assert abs(loss - ref_loss) <= (1e-5 if not autocast else 2 * abs(plain_loss - ref_loss) + 1e-3)


def test_training_loss_needs_no_logits_and_equals_the_usual_loss():
    """In training mode with labels the loss comes from the hidden states (logits None); it and every gradient equal
    the eval-mode loss on the logits, which transformers' loss function computes."""
    inputs = batch(seed=4)
    inputs["labels"][:, :3] = -100
    fused, usual = make_model(seed=7), make_model(seed=7).eval()
    out = fused(**inputs)
    assert out.logits is None
    expected = usual(**inputs)
    assert expected.logits is not None
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-6, atol=1e-6)
    out.loss.backward()
    expected.loss.backward()
    for (name, p), (_, q) in zip(fused.named_parameters(), usual.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
