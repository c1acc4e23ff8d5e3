"""The small trained model in models/rwkv7-tiny-english (scripts/train_small_model.py): its greedy continuations of
English prompts equal the official `rwkv` package's token for token, its logits match, and scoring a text with the
state carried window after window gives the model's own loss. Real weights make greedy decoding a strong check:
their logits are far from flat."""

import math

import numpy as np
import pytest
import torch
from helpers import max_error_over_std
from official import REPO, fla_to_official, official_model
from safetensors.torch import load_file
from transformers import AutoTokenizer

from modeling_rwkv7 import RWKV7ForCausalLM

FOLDER = REPO / "models" / "rwkv7-tiny-english"
PROMPTS = ["The history of the", "It is a truth universally acknowledged that",
           "User: What does \"garden\" mean?\n\nAssistant:", "In Python, a list is", "She looked at him and said"]
NEW_TOKENS = 48
# the first 2048 tokens of the held-out split of scripts/prepare_corpus.py, and the held-out cross-entropy (nats per
# token) of a unigram model fitted on the train split, from its manifest
HELDOUT = REPO / "tests" / "data" / "tiny_english_heldout.npy"
UNIGRAM_HELDOUT_LOSS = 6.762


@pytest.fixture(scope="module")
def model():
    return RWKV7ForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REPO, trust_remote_code=True)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    weights = {k: v.float() for k, v in fla_to_official(load_file(FOLDER / "model.safetensors")).items()}
    return official_model(weights, tmp_path_factory.mktemp("tiny_english"))


def official_greedy(official, ids, steps):
    logits, state = official.forward(ids, None)
    tokens, all_logits = [], [logits]
    for _ in range(steps):
        tokens.append(int(logits.argmax()))
        logits, state = official.forward([tokens[-1]], state)
        all_logits.append(logits)
    return tokens, torch.stack(all_logits[:-1])


def test_the_folder_holds_weights_and_configuration_only():
    assert sorted(p.name for p in FOLDER.iterdir()) == ["config.json", "model.safetensors"]
    assert (FOLDER / "model.safetensors").stat().st_size < 40e6


@torch.no_grad()
@pytest.mark.slow
def test_greedy_continuations_equal_the_official_package(model, tokenizer, official):
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        expected, expected_logits = official_greedy(official, ids, NEW_TOKENS)
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True,
                             output_logits=True)
        assert out.sequences[0, len(ids):].tolist() == expected, prompt
        assert max_error_over_std(torch.stack(out.logits)[:, 0], expected_logits) <= 5e-5, prompt
    english = tokenizer.decode(out.sequences[0, len(ids):])
    assert sum(word.isalpha() for word in english.split()) >= 10  # words, not noise


@torch.no_grad()
def test_logits_of_a_text_match_the_official_package(model, tokenizer, official):
    ids = tokenizer("Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition,")["input_ids"]
    reference, _ = official.forward(ids, None, full_output=True)
    assert max_error_over_std(model(torch.tensor([ids])).logits[0], reference) <= 5e-5


@torch.no_grad()
def test_held_out_loss_far_below_a_unigram_model_and_rolling_scores_equal_it(model):
    """The held-out text scored as lm-eval's loglikelihood_rolling scores a document (the end-of-document id 0 as
    its first context, every token predicted once) but in windows of 64 tokens with the state carried from one to
    the next, as an RNN runs: the same log-likelihood as the whole text in one forward, and a perplexity far below
    the unigram model's on the same text."""
    heldout = np.load(HELDOUT).astype(np.int64).tolist()
    tokens = [0] + heldout
    whole = model(torch.tensor([tokens]), labels=torch.tensor([tokens])).loss.item() * len(heldout)
    cache, rolling = None, 0.0
    for start in range(0, len(tokens) - 1, 64):
        window = torch.tensor([tokens[start : start + 65]])
        out = model(window[:, :-1], cache=cache, use_cache=True)
        cache = out.cache
        rolling -= torch.log_softmax(out.logits[0], -1).gather(1, window[0, 1:, None]).sum().item()
    assert rolling == pytest.approx(whole, rel=1e-5)
    perplexity = math.exp(whole / len(heldout))
    print(f"\nheld-out sample: perplexity {perplexity:.1f} over {len(heldout)} tokens")
    assert perplexity < math.exp(UNIGRAM_HELDOUT_LOSS) / 10
