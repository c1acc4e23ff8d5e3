"""Sequences packed into one row (transformers' DataCollatorWithFlattening, TRL's padding-free batches, fla's
cu_seqlens) give what each sequence gives alone: logits, loss and gradients, through every way of marking them."""

import copy

import pytest
import torch
from helpers import relative_rms_error, tiny_model
from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

LENGTHS = [13, 1, 40, 7]
VOCAB = 97


def sequences(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]


def packing(seqs, via):
    """The model arguments of `seqs` packed into one row, marked `via` position_ids, cu_seq_lens_q or cu_seqlens."""
    ids = torch.cat(seqs)[None]
    offsets = torch.tensor([0, *torch.tensor([len(s) for s in seqs]).cumsum(0).tolist()], dtype=torch.int32)
    if via == "position_ids":
        return {"input_ids": ids, "position_ids": torch.cat([torch.arange(len(s)) for s in seqs])[None]}
    return {"input_ids": ids, via: offsets}


def packed_labels(seqs):
    """The labels DataCollatorWithFlattening makes: the tokens, with -100 where a sequence starts."""
    return torch.cat([torch.cat([torch.tensor([-100]), s[1:]]) for s in seqs])[None]


def model(seed=3):
    return tiny_model(hidden=128, layers=2, head_dim=64, vocab=VOCAB, seed=seed)


@pytest.mark.parametrize("via", ["position_ids", "cu_seq_lens_q", "cu_seqlens"])
def test_packed_logits_loss_and_gradients_equal_each_sequence_alone(via):
    seqs = sequences()
    m = model()
    with torch.no_grad():
        alone = torch.cat([m(s[None]).logits[0] for s in seqs])
        packed = m(**packing(seqs, via)).logits[0]
    assert relative_rms_error(packed, alone) <= 1e-5

    packed_model, alone_model = m.train(), copy.deepcopy(m)
    loss = packed_model(**packing(seqs, via), labels=packed_labels(seqs)).loss
    loss.backward()
    counts = [len(s) - 1 for s in seqs]
    expected = 0
    for s, count in zip(seqs, counts):
        if count:
            part = alone_model(s[None], labels=s[None]).loss * count / sum(counts)
            part.backward()
            expected = expected + part.detach()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(packed_model.named_parameters(), alone_model.named_parameters()):
        assert relative_rms_error(p.grad, q.grad) <= 1e-5, name


def test_rows_of_packed_sequences():
    """Several rows, each packing sequences (position_ids restart inside each row), as one row of them all."""
    rows = [sequences([13, 1, 7], seed=1), sequences([4, 17], seed=2)]
    ids = torch.stack([torch.cat(r) for r in rows])
    position_ids = torch.stack([torch.cat([torch.arange(len(s)) for s in r]) for r in rows])
    m = model()
    with torch.no_grad():
        packed = m(ids, position_ids=position_ids).logits
        for row, seqs in enumerate(rows):
            alone = torch.cat([m(s[None]).logits[0] for s in seqs])
            assert relative_rms_error(packed[row], alone) <= 1e-5
        counting = torch.arange(ids.shape[1]).expand_as(ids)  # position_ids that only count up: no packing
        torch.testing.assert_close(m(ids, position_ids=counting).logits, m(ids).logits, rtol=0, atol=0)


@pytest.mark.kernels
@pytest.mark.slow
def test_packed_through_the_chunked_kernel():
    """With the kernels (on the CPU under the interpreter in CI), packed sequences run the chunked WKV-7 kernel's
    cu_seqlens path, with gradients."""
    from conftest import KERNEL_TEST_DEVICE as DEVICE

    from modeling_rwkv7 import ForwardPath, choose_path

    seqs = sequences([37, 1, 20])
    m = model(seed=4).to(DEVICE).train()
    reference = copy.deepcopy(m)
    m.set_implementation("triton")
    reference.set_implementation("pytorch")
    inputs = {k: v.to(DEVICE) for k, v in packing(seqs, "cu_seqlens").items()}
    labels = packed_labels(seqs).to(DEVICE)
    assert choose_path(m, inputs["input_ids"], None, None, packed=True) is ForwardPath.SEQUENCE_TRITON_TRAINING
    loss = m(**inputs, labels=labels).loss
    ref = reference(**inputs, labels=labels).loss
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)
    for (name, p), (_, q) in zip(m.named_parameters(), reference.named_parameters()):
        assert relative_rms_error(p.grad, q.grad) <= 1e-4, name


def test_input_that_contradicts_packing_is_an_error():
    seqs = sequences()
    m = model()
    packed = packing(seqs, "position_ids")
    padding = torch.ones_like(packed["input_ids"])
    padding[0, 3] = 0
    with pytest.raises(ValueError, match="padding .* inside packed sequences"):
        m(**packed, attention_mask=padding)
    m(**packed, attention_mask=torch.ones_like(padding))  # a mask without padding is no contradiction
    with pytest.raises(ValueError, match="no state to continue"):
        m(**packed, use_cache=True)
    cache = m(seqs[0][None], use_cache=True).cache
    with pytest.raises(ValueError, match="no state to continue"):
        m(**packed, cache=cache)
    two_rows = torch.cat(seqs[:2] * 2)[None].expand(2, -1)
    with pytest.raises(ValueError, match="one row"):
        m(two_rows, cu_seqlens=torch.tensor([0, 5, 28], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"offsets \[0, \.\.\., 61\]"):
        m(packed["input_ids"], cu_seqlens=torch.tensor([0, 13, 60], dtype=torch.int32))
    with pytest.raises(ValueError, match="disagree"):
        m(**packed, cu_seq_lens_q=torch.tensor([0, 14, 61], dtype=torch.int32))


class Examples(torch.utils.data.Dataset):
    def __init__(self, seqs):
        self.items = [{"input_ids": s.tolist()} for s in seqs]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def padded_collator(features):
    """Right padding with an attention mask; labels -100 on padding and on each first token (never a target)."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, f in enumerate(features):
        ids[row, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[row, : len(f["input_ids"])] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_trainer_with_data_collator_with_flattening_trains_as_padded_batches(tmp_path):
    seqs = sequences([13, 1, 40, 7, 22, 5, 30, 9], seed=5)
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=0.1,
                optim="sgd", lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True,
                dataloader_num_workers=0, seed=0, data_seed=0)
    models = {}
    for name, collator in [("packed", DataCollatorWithFlattening()), ("padded", padded_collator)]:
        models[name] = model(seed=6).train()
        Trainer(model=models[name], args=TrainingArguments(**args), train_dataset=Examples(seqs),
                data_collator=collator).train()
    untouched = model(seed=6)
    for (name, p), (_, q), (_, r) in zip(models["packed"].named_parameters(), models["padded"].named_parameters(),
                                         untouched.named_parameters()):
        assert relative_rms_error(p, q) <= 1e-5, name
    assert any(not torch.equal(p, r) for p, r in zip(models["packed"].parameters(), untouched.parameters()))


@pytest.mark.slow
def test_trl_sft_trainer_padding_free_trains_as_padded(tmp_path):
    """TRL's SFTTrainer (its default loss) with padding-free batches, which pack the examples into one row with
    position_ids and cu_seq_lens, trains the model as padded batches of the same examples do."""
    from datasets import Dataset
    from official import REPO
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(REPO, trust_remote_code=True)
    texts = ["The cat sat on the mat.", "A", "Rivers run to the sea, and the sea is never full.", "Hello world",
             "One two three four five six seven.", "Time flies like an arrow."]
    models = {}
    for padding_free in (True, False):
        models[padding_free] = tiny_model(hidden=64, layers=1, head_dim=64, vocab=65536, ranks=(8, 8, 8, 8),
                                          seed=7).train()
        config = SFTConfig(output_dir=str(tmp_path / str(padding_free)), padding_free=padding_free,
                           per_device_train_batch_size=3, max_steps=2, learning_rate=0.1, optim="sgd",
                           lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True,
                           dataloader_num_workers=0, seed=0, data_seed=0, logging_steps=1, max_length=None)
        trainer = SFTTrainer(model=models[padding_free], args=config, processing_class=tokenizer,
                             train_dataset=Dataset.from_dict({"text": texts}))
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        assert len(losses) == 2 and all(loss == loss for loss in losses)  # logged and not NaN
    for (name, p), (_, q) in zip(models[True].named_parameters(), models[False].named_parameters()):
        assert relative_rms_error(p, q) <= 1e-4, name
