"""`generate` with every transformers decoding mode, exact batching with padding, and reusable state.

CI runs this file on the newest transformers 5.x, the newest 4.57.x and the oldest 4.x the README claims.
"""

import contextlib
import copy
import io
import threading

import pytest
import torch
from helpers import tiny_model
from official import REPO, random_official_weights, write_model_dir
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TextIteratorStreamer,
    TextStreamer,
)

from modeling_rwkv7 import RWKV7Cache

VOCAB = 97
PROMPTS = [[5, 17, 3, 90, 42, 42, 7, 61, 12], [33, 8, 1], [70, 70, 2, 9, 11, 4]]


@pytest.fixture(scope="module")
def model():
    model = tiny_model(hidden=128, layers=2, head_dim=32, vocab=VOCAB, seed=21,
                       config=dict(eos_token_id=None, bos_token_id=None, pad_token_id=0))
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def left_pad(prompts, pad=0):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def greedy_by_hand(model, prompt, steps, processors=None):
    """Greedy decoding with plain forward calls and the cache: the reference for generate."""
    ids = torch.tensor([prompt])
    out = model(ids, use_cache=True)
    tokens, scores = list(prompt), []
    for _ in range(steps):
        logits = out.logits[:, -1]
        if processors is not None:
            logits = processors(torch.tensor([tokens]), logits)
        scores.append(logits[0])
        token = int(logits.argmax(-1))
        tokens.append(token)
        out = model(torch.tensor([[token]]), cache=out.cache, use_cache=True)
    return tokens, torch.stack(scores)


@torch.no_grad()
def test_greedy_and_scores_match_forward_by_hand(model):
    expected, expected_scores = greedy_by_hand(model, PROMPTS[0], 8)
    out = model.generate(
        torch.tensor([PROMPTS[0]]), max_new_tokens=8, do_sample=False,
        return_dict_in_generate=True, output_scores=True, output_logits=True,
    )
    assert out.sequences[0].tolist() == expected
    torch.testing.assert_close(torch.stack(out.scores, 1)[0], expected_scores, rtol=1e-5, atol=1e-5)
    no_cache = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=8, do_sample=False, use_cache=False)
    assert no_cache[0].tolist() == expected
    assert model.generate(torch.tensor([PROMPTS[0]]), max_length=len(PROMPTS[0]) + 3).shape[1] == len(PROMPTS[0]) + 3


@contextlib.contextmanager
def transformers_warnings():
    """Collects what transformers warns in the block: its log records (warning_once's memory of earlier warnings
    cleared) and Python warnings."""
    import logging
    import warnings

    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler, transformers_logger = Collect(level=logging.WARNING), logging.getLogger("transformers")
    logging.Logger.warning_once.cache_clear()
    transformers_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
    finally:
        transformers_logger.removeHandler(handler)
    records += [str(w.message) for w in caught]


@torch.no_grad()
def test_generate_feeds_each_token_once_under_either_cache_name(model):
    """transformers 5.24 passes generate's cache as `cache` where earlier versions pass `past_key_values`: each step
    must feed only the new token, on every version, and a cache given under either name must be continued from,
    with no deprecation warning."""
    fed = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: fed.append(kwargs.get("input_ids", args[0] if args else None).shape[1]), with_kwargs=True
    )
    prompt, question = PROMPTS[0], [11, 12, 13]
    try:
        with transformers_warnings() as warned:
            model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False)
            assert fed == [len(prompt), 1, 1, 1, 1]
            expected, _ = greedy_by_hand(model, prompt + question, 4)
            for name in ("cache", "past_key_values"):
                prefix = model(torch.tensor([prompt]), use_cache=True).cache
                fed.clear()
                out = model.generate(torch.tensor([question]), **{name: prefix}, max_new_tokens=4, do_sample=False)
                assert fed == [len(question), 1, 1, 1], name
                assert out[0].tolist() == expected[len(prompt) :], name
                assert prefix.num_seen_tokens == len(prompt) + len(question) + 3  # updated in place
                # the forward takes either name too
                step = model(out[:, -1:], **{name: prefix})
                assert step.cache is prefix and prefix.num_seen_tokens == len(prompt) + len(question) + 4
    finally:
        hook.remove()
    assert not [w for w in warned if "past_key_values" in w or "cache" in w or "deprecat" in w], warned


@torch.no_grad()
def test_repetition_penalty_matches_its_processor(model):
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.7)])
    expected, _ = greedy_by_hand(model, PROMPTS[2], 10, processors)
    out = model.generate(torch.tensor([PROMPTS[2]]), max_new_tokens=10, do_sample=False, repetition_penalty=1.7)
    assert out[0].tolist() == expected


@torch.no_grad()
def test_sampling_modes(model):
    ids = torch.tensor([PROMPTS[1]])
    greedy = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=True, top_k=1), greedy)
    for kwargs in [dict(temperature=0.7), dict(top_p=0.5), dict(min_p=0.2), dict(top_k=5, temperature=1.3)]:
        torch.manual_seed(0)
        first = model.generate(ids, max_new_tokens=6, do_sample=True, **kwargs)
        torch.manual_seed(0)
        assert torch.equal(first, model.generate(ids, max_new_tokens=6, do_sample=True, **kwargs)), kwargs
        assert first.shape == (1, len(PROMPTS[1]) + 6) and int(first.max()) < VOCAB
    torch.manual_seed(0)
    several = model.generate(ids, max_new_tokens=6, do_sample=True, num_return_sequences=4, temperature=5.0)
    assert several.shape == (4, len(PROMPTS[1]) + 6)
    assert len({tuple(row.tolist()) for row in several}) > 1  # the rows are sampled independently


@torch.no_grad()
def test_beam_search_reorders_the_state(model):
    ids, mask = left_pad(PROMPTS[:2])
    kwargs = dict(max_new_tokens=7, num_beams=3, num_return_sequences=2, do_sample=False, early_stopping=True)
    with_cache = model.generate(ids, attention_mask=mask, use_cache=True, **kwargs)
    without_cache = model.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without_cache)
    for row, prompt in enumerate(PROMPTS[:2]):  # each prompt's beams are those it gets alone
        alone = model.generate(torch.tensor([prompt]), **kwargs)
        assert torch.equal(with_cache[2 * row : 2 * row + 2, -alone.shape[1] :], alone)


@torch.no_grad()
def test_left_padded_batch_equals_each_prompt_alone(model):
    ids, mask = left_pad(PROMPTS)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    logits = torch.stack(out.logits, 1)
    for row, prompt in enumerate(PROMPTS):
        alone = model.generate(
            torch.tensor([prompt]), max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        assert out.sequences[row, ids.shape[1] :].tolist() == alone.sequences[0, len(prompt) :].tolist()
        torch.testing.assert_close(logits[row], torch.stack(alone.logits, 1)[0], rtol=0, atol=1e-5)


@torch.no_grad()
def test_padding_leaves_a_non_empty_state_untouched(model):
    prefixes = [[4, 4, 8, 15], [16, 23, 42, 1]]
    cache = model(torch.tensor(prefixes), use_cache=True).cache
    ids, mask = left_pad([PROMPTS[0], PROMPTS[1]])
    out = model.generate(ids, attention_mask=mask, cache=copy.deepcopy(cache), max_new_tokens=5,
                         do_sample=False, return_dict_in_generate=True, output_logits=True)
    for row, (prefix, prompt) in enumerate(zip(prefixes, PROMPTS[:2])):
        expected, expected_logits = greedy_by_hand(model, prefix + prompt, 5)
        assert out.sequences[row, ids.shape[1] :].tolist() == expected[len(prefix) + len(prompt) :]
        torch.testing.assert_close(torch.stack(out.logits, 1)[row], expected_logits, rtol=0, atol=1e-5)


@torch.no_grad()
def test_state_is_reusable_across_questions_and_turns(model):
    system = [9, 9, 3, 27, 81, 5, 5, 60]
    questions = [[11, 12], [40, 2, 2, 7]]
    prefix_cache = model(torch.tensor([system]), use_cache=True).cache
    snapshot = copy.deepcopy(prefix_cache)
    for question in questions:
        answer = model.generate(torch.tensor([question]), cache=copy.deepcopy(prefix_cache),
                                max_new_tokens=5, do_sample=False)
        expected, _ = greedy_by_hand(model, system + question, 5)
        assert answer[0].tolist() == expected[len(system) :]
    for mine, theirs in zip(prefix_cache.wkv + prefix_cache.attn_shift, snapshot.wkv + snapshot.attn_shift):
        assert torch.equal(mine, theirs)  # generating from copies left the original untouched

    # several sampled answers from one prefilled state
    torch.manual_seed(0)
    answers = model.generate(torch.tensor([questions[0]]), cache=copy.deepcopy(prefix_cache),
                             max_new_tokens=5, do_sample=True, temperature=3.0, num_return_sequences=3)
    assert answers.shape == (3, len(questions[0]) + 5) and len({tuple(a.tolist()) for a in answers}) > 1

    # a conversation goes on from a cache generate has updated in place, with only the tokens it has not seen:
    # generate's last token (sampled, never fed back) and the new ones
    state = copy.deepcopy(prefix_cache)
    first = model.generate(torch.tensor([questions[0]]), cache=state, max_new_tokens=4, do_sample=False)
    assert state.num_seen_tokens == len(system) + first.shape[1] - 1
    follow_up = torch.tensor([[13, 21]])
    second = model.generate(torch.cat([first[:, -1:], follow_up], 1), cache=state, max_new_tokens=4, do_sample=False)
    expected, _ = greedy_by_hand(model, system + first[0].tolist() + follow_up[0].tolist(), 4)
    assert second[0, 1:].tolist() == expected[len(system) + first.shape[1] :]


@torch.no_grad()
def test_inputs_embeds_and_hidden_states(model):
    ids = torch.tensor([PROMPTS[0]])
    by_ids = model.generate(ids, max_new_tokens=5, do_sample=False)
    by_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(ids), max_new_tokens=5, do_sample=False)
    assert by_embeds[0].tolist() == by_ids[0, ids.shape[1] :].tolist()
    out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                         output_hidden_states=True)
    assert len(out.hidden_states) == 3
    assert len(out.hidden_states[0]) == model.config.num_hidden_layers + 1
    assert out.hidden_states[0][0].shape[1] == ids.shape[1] and out.hidden_states[1][0].shape[1] == 1


@torch.no_grad()
def test_unsupported_modes_fail_clearly(model):
    ids = torch.tensor([PROMPTS[0]])
    with pytest.raises(ValueError, match="stateful|only supports"):
        model.generate(ids, assistant_model=model, max_new_tokens=3)
    with pytest.raises(ValueError, match="attention weights"):
        model(ids, output_attentions=True)
    cache = model(ids, use_cache=True).cache
    with pytest.raises(NotImplementedError, match="rewound"):
        cache.crop(2)
    assert isinstance(cache, RWKV7Cache)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model with the World vocabulary, its tokenizer and the package's generation config."""
    official = random_official_weights(hidden=64, layers=1, head_dim=32, vocab=65536, ranks=(8, 8, 8, 8), seed=22)
    folder = write_model_dir(tmp_path_factory.mktemp("world"), official)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    model.generation_config = GenerationConfig.from_pretrained(REPO)
    return folder, model, AutoTokenizer.from_pretrained(REPO, trust_remote_code=True)


@torch.no_grad()
def test_stop_strings_and_streamers(world):
    _, model, tokenizer = world
    prompt = tokenizer("User: 你好, how are you? 🙂\n\nAssistant:", return_tensors="pt")
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None)
    full = model.generate(**prompt, **kwargs)[0, prompt.input_ids.shape[1] :]
    text = tokenizer.decode(full)

    stop = tokenizer.decode(full[4:5])  # the text of the 5th generated token
    stopped = model.generate(**prompt, max_new_tokens=12, do_sample=False, stop_strings=[stop], tokenizer=tokenizer)
    new = stopped[0, prompt.input_ids.shape[1] :]
    assert tokenizer.decode(new).endswith(stop) and len(new) <= 5

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        model.generate(**prompt, **kwargs, streamer=TextStreamer(tokenizer, skip_prompt=True))
    assert printed.getvalue() == text + "\n"

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    thread = threading.Thread(target=model.generate, kwargs=dict(**prompt, **kwargs, streamer=streamer))
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert "".join(pieces) == text


@torch.no_grad()
def test_generation_config_stops_at_the_end_of_a_turn(world):
    _, model, tokenizer = world
    turn_end = tokenizer.encode("\n\n")
    assert turn_end == [261] and 261 in model.generation_config.eos_token_id and 0 in model.generation_config.eos_token_id
    # make the model answer "\n\n" after three tokens: the generation stops there
    prompt = tokenizer("User: hi\n\nAssistant:", return_tensors="pt")
    forced = [tokenizer.encode(" Hi")[0], tokenizer.encode("!")[0], 261, 300]

    class Force:
        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - prompt.input_ids.shape[1]
            scores = torch.full_like(scores, -1e9)
            scores[:, forced[step]] = 0
            return scores

    out = model.generate(**prompt, max_new_tokens=10, logits_processor=LogitsProcessorList([Force()]))
    assert out[0, prompt.input_ids.shape[1] :].tolist() == forced[:3]


@torch.no_grad()
def test_device_map_auto(world):
    folder, model, tokenizer = world
    mapped = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, device_map="auto")
    prompt = tokenizer(["User: one\n\nAssistant:", "User: a longer question\n\nAssistant:"], return_tensors="pt",
                       padding=True)
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(mapped.generate(**prompt, **kwargs), model.generate(**prompt, **kwargs))


def test_forward_context_moves_to_a_blocks_device():
    """Under a device_map a block may lie on another device than the model's inputs: it takes the context's
    padding mask and sequence offsets on its own device."""
    from modeling_rwkv7 import ForwardContext, ForwardPath, load_kernels

    load_kernels()
    ctx = ForwardContext(ForwardPath.SEQUENCE_PYTORCH, torch.ones(2, 5), torch.tensor([0, 2, 5]))
    assert ctx.on(torch.device("cpu")) is ctx
    moved = ctx.on(torch.device("meta"))
    assert moved.attention_mask.device.type == "meta" and moved.cu_seqlens.device.type == "meta"
    assert moved.path is ctx.path and moved.ops == ctx.ops
