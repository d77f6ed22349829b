"""The engine: KV-cache decoding equals full recomputation, sampling rules, stops, tools, errors, cleanup."""
import dataclasses
import gc
import weakref

import pytest
import torch

from nanochat.common import UserError
from nanochat.engine import (FINISHED, Engine, KVCache, SamplingParams, StreamDecoder, assistant_parts, fit_prompt,
                             sample_next_token)
from tests.engine_helpers import one_torch_thread  # noqa: F401  (autouse: one torch thread)
from tests.engine_helpers import (TOOL_CONVERSATION, known_logits_gpt, random_gpt, train_tokenizer,
                                  train_tool_caller)
from tests.model_cases import SWITCH_CASES


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def special_ids(tokenizer):
    return [tokenizer.encode_special(name) for name in tokenizer.special_tokens]


def naive_greedy(model, prompt, max_tokens):
    """Reference: recompute the whole sequence for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


@pytest.mark.parametrize("switches", [dict(num_kv_heads=4), dict(num_kv_heads=2), dict(num_kv_heads=1),
                                      *SWITCH_CASES.values()], ids=["mha", "gqa", "mqa", *SWITCH_CASES])
def test_cached_greedy_equals_recompute(tokenizer, switches):
    model = random_gpt(tokenizer.vocab_size, **switches)
    with torch.no_grad():
        model.lm_head.weight[special_ids(tokenizer)] = 0.0  # keep greedy text free of stop and tool tokens
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("The quick brown fox", prepend="<|bos|>")
    results, masks = engine.generate_batch(prompt, num_samples=3, max_tokens=40, temperature=0.0)
    expected = naive_greedy(model, prompt, 40)
    assert results == [expected] * 3
    assert masks == [[0] * len(prompt) + [1] * 40] * 3


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_cache_logits_match_full_forward_per_row(num_kv_heads):
    """A batch-1 prefill copied into 3 rows, then different tokens per row: logits equal full recomputes."""
    model = random_gpt(200, num_kv_heads=num_kv_heads)
    prompt = torch.randint(0, 200, (1, 9))
    continuations = torch.randint(0, 200, (3, 6))
    with torch.no_grad():
        prefill = model.new_cache(1, 9)
        prefill_logits = model(prompt, kv_cache=prefill)
        cache = model.new_cache(3, 15)
        cache.fill_from(prefill)
        steps = [model(continuations[:, t:t + 1], kv_cache=cache) for t in range(6)]
        full = model(torch.cat([prompt.expand(3, -1), continuations], dim=1))
    assert cache.keys.shape == (model.config.depth, 3, num_kv_heads, 15, 8)  # only kv heads are stored
    assert torch.allclose(prefill_logits[0], full[0, :9], atol=1e-4)
    assert torch.allclose(torch.cat(steps, dim=1), full[:, 9:], atol=1e-4)


def test_seeded_sampling_is_reproducible(tokenizer):
    engine = Engine(random_gpt(tokenizer.vocab_size), tokenizer)
    prompt = tokenizer.encode("hello", prepend="<|bos|>")

    def sample(seed):
        return engine.generate_batch(prompt, num_samples=2, max_tokens=30, temperature=1.0, seed=seed)[0]

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    assert first[0] != first[1]  # rows share the prefill but sample independently


TOP_LOGITS = {10: 9.0, 11: 8.0, 12: 7.0, 13: 5.0, 14: 4.0}


def sampled_tokens(engine, **sampling):
    results, _ = engine.generate_batch([5], num_samples=64, max_tokens=8, temperature=1.0, seed=3, **sampling)
    return {t for row in results for t in row[1:]}


def nucleus(model, top_p):
    """The smallest set of most-likely tokens whose probability reaches top_p, from the model's own logits."""
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([[5]]))[0, -1], dim=-1).tolist()
    chosen, mass = set(), 0.0
    for token in sorted(range(len(probs)), key=lambda t: -probs[t]):
        chosen.add(token)
        mass += probs[token]
        if mass >= top_p:
            return chosen
    return chosen


def test_top_k_and_top_p_restrict_the_support(tokenizer):
    model = known_logits_gpt(tokenizer.vocab_size, TOP_LOGITS)
    engine = Engine(model, tokenizer)
    unrestricted = sampled_tokens(engine)
    assert not unrestricted <= set(TOP_LOGITS)  # the ~300 zero-logit tokens get sampled without a filter
    assert sampled_tokens(engine, top_k=2) == {10, 11}
    assert sampled_tokens(engine, top_k=1) == {10}
    for top_p in (0.7, 0.85):
        support = nucleus(model, top_p)
        assert len(support) in (2, 3)
        assert sampled_tokens(engine, top_p=top_p) == support
    assert sampled_tokens(engine, top_k=3, top_p=0.7) == nucleus(model, 0.7)


def test_greedy_ignores_top_k_and_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    generator = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, generator, 0.0, top_k=2, top_p=0.1).tolist() == [1, 0]


def test_rows_stop_independently(tokenizer):
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    engine = Engine(known_logits_gpt(tokenizer.vocab_size, {assistant_end: 5.0, 10: 6.0}), tokenizer)
    generation = engine.generate([5], num_samples=8, max_tokens=40, temperature=1.0, top_k=2, seed=1)
    columns = list(generation)
    rows = [[column[0][i] for column in columns] for i in range(8)]
    stop_steps = []
    for i, row in enumerate(rows):
        assert generation.finish_reasons[i] == "stop"
        stop = row.index(assistant_end)
        stop_steps.append(stop)
        assert set(row[:stop]) <= {10}
        assert row[stop + 1:] == [FINISHED] * (len(row) - stop - 1)
        assert generation.num_generated[i] == stop + 1
    assert len(set(stop_steps)) > 1
    assert max(stop_steps) == len(columns) - 1  # the generation ends with the last row
    results, _ = engine.generate_batch([5], num_samples=8, max_tokens=40, temperature=1.0, top_k=2, seed=1)
    assert [len(r) - 1 for r in results] == stop_steps  # stop token left out of the batch results


def test_max_tokens_and_context_give_length(tokenizer):
    engine = Engine(known_logits_gpt(tokenizer.vocab_size, {10: 5.0}, max_seq_len=16), tokenizer)
    generation = engine.generate([5] * 4, max_tokens=6, temperature=0.0)
    assert len(list(generation)) == 6 and generation.finish_reasons == ["length"]
    generation = engine.generate([5] * 12, max_tokens=100, temperature=0.0)
    assert len(list(generation)) == 16 - 12 + 1 and generation.finish_reasons == ["length"]
    assert len(list(engine.generate([5] * 16, max_tokens=100))) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(tokens=[]), "the prompt is empty"),
    (dict(tokens=[5] * 17), "the prompt has 17 tokens but the model's context is 16"),
    (dict(tokens=[10**6]), "prompt token ids must be in"),
    (dict(max_tokens=0), "max_tokens must be >= 1"),
    (dict(num_samples=0), "num_samples must be >= 1"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_k=0), "top_k must be >= 1 or None"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
])
def test_bad_arguments_raise_before_any_work(tokenizer, kwargs, message):
    engine = Engine(known_logits_gpt(tokenizer.vocab_size, {}, max_seq_len=16), tokenizer)
    arguments = {"tokens": [5], **kwargs}
    with pytest.raises(UserError, match=message):
        engine.generate(**arguments)


def test_stop_strings_end_a_row(tokenizer):
    model = random_gpt(tokenizer.vocab_size)
    with torch.no_grad():
        model.lm_head.weight[special_ids(tokenizer)] = 0.0
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("hello", prepend="<|bos|>")
    free_text = tokenizer.decode(engine.generate_batch(prompt, max_tokens=30)[0][0][len(prompt):])
    stop = free_text[8:11]
    generation = engine.generate(prompt, max_tokens=30, temperature=0.0, stop=[stop])
    tokens = [column[0] for column, _ in generation]
    assert generation.finish_reasons == ["stop"]
    text = tokenizer.decode(tokens)
    assert stop in text and stop not in tokenizer.decode(tokens[:-1])
    decoder = StreamDecoder(tokenizer, stop=[stop])
    assert "".join(decoder.push(t) for t in tokens) + decoder.flush() == free_text[:free_text.index(stop)]


def test_early_stop_frees_the_cache_and_leaves_grad_mode_alone(tokenizer):
    engine = Engine(random_gpt(tokenizer.vocab_size), tokenizer)
    generation = engine.generate([tokenizer.bos_token_id], num_samples=4, max_tokens=50)
    next(generation)
    next(generation)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    cache = weakref.ref(generation.steps.gi_frame.f_locals["cache"])
    assert cache() is not None
    generation.close()
    gc.collect()
    assert cache() is None
    with pytest.raises(StopIteration):
        next(generation)


def stream_text(tokenizer, ids, stop=()):
    decoder = StreamDecoder(tokenizer, stop=stop)
    pieces = [decoder.push(t) for t in ids]
    return pieces, decoder.flush()


def test_stream_decoder_never_splits_a_character(tokenizer):
    text = "héllo 🎉 wörld — 日本語 ok"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text) // 2  # multi-byte characters really are split into byte tokens
    pieces, tail = stream_text(tokenizer, ids)
    assert "".join(pieces) + tail == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_stream_decoder_emits_invalid_bytes_instead_of_waiting_forever(tokenizer):
    lone_continuation = tokenizer.mergeable_ranks[b"\x80"]
    ids = [lone_continuation] + tokenizer.encode("abc")
    pieces, tail = stream_text(tokenizer, ids)
    assert "".join(pieces) + tail == "\ufffdabc"
    pieces, tail = stream_text(tokenizer, tokenizer.encode("ab") + [lone_continuation])
    assert "".join(pieces) == "ab" and tail == "\ufffd"


def test_stream_decoder_holds_back_a_possible_stop_string(tokenizer):
    ids = [tokenizer.encode(c)[0] for c in "say END now"]
    pieces, tail = stream_text(tokenizer, ids, stop=["ENDING", "END now!"])
    assert "".join(pieces) == "say " and tail == "END now"  # never a stop: the held text comes out at the end
    decoder = StreamDecoder(tokenizer, stop=["D n"])
    pieces = [decoder.push(t) for t in ids]
    assert "".join(pieces) == "say EN" and decoder.stopped and decoder.flush() == ""


@pytest.mark.slow
def test_calculator_round_trip_inside_generation(tokenizer):
    conversation = TOOL_CONVERSATION
    sequence, _ = tokenizer.render_conversation(conversation)
    model = train_tool_caller(tokenizer, sequence)
    engine = Engine(model, tokenizer)
    prompt = tokenizer.render_for_completion(conversation)
    results, masks = engine.generate_batch(prompt, max_tokens=20, temperature=0.0)
    completion, completion_mask = results[0][len(prompt):], masks[0][len(prompt):]
    special = tokenizer.encode_special
    call = [special("<|python_start|>"), *tokenizer.encode("6*7"), special("<|python_end|>")]
    forced = [special("<|output_start|>"), *tokenizer.encode("42"), special("<|output_end|>")]
    assert completion[:len(call) + len(forced)] == call + forced
    assert completion_mask[:len(call) + len(forced)] == [1] * len(call) + [0] * len(forced)
    parts = assistant_parts(tokenizer, completion)
    assert parts[:2] == [{"type": "python", "text": "6*7"}, {"type": "python_output", "text": "42"}]


def test_assistant_parts_round_trips_through_rendering(tokenizer):
    content = [{"type": "text", "text": "Let me count. "}, {"type": "python", "text": "'strawberry'.count('r')"},
               {"type": "python_output", "text": "3"}, {"type": "text", "text": " Three."}]
    conversation = {"messages": [{"role": "user", "content": "r in strawberry?"},
                                 {"role": "assistant", "content": content}]}
    ids, _ = tokenizer.render_conversation(conversation)
    start = ids.index(tokenizer.encode_special("<|assistant_start|>")) + 1
    assert assistant_parts(tokenizer, ids[start:]) == content


def test_fit_prompt_keeps_bos_and_the_newest_tokens():
    prompt = list(range(100))  # 0 stands for the BOS
    assert fit_prompt(prompt, max_seq_len=32, max_new_tokens=8) == ([0] + list(range(77, 100)), 8)
    kept, budget = fit_prompt(prompt, max_seq_len=32, max_new_tokens=1000)  # room is capped at half the context
    assert kept == [0] + list(range(85, 100)) and budget == 17
    kept, budget = fit_prompt(prompt, max_seq_len=32, max_new_tokens=0)  # a forward pass only: the whole context
    assert kept == [0] + list(range(69, 100)) and budget == 0
    assert fit_prompt(prompt[:10], max_seq_len=32, max_new_tokens=100) == (prompt[:10], 23)


def test_sampling_params_spell_off_one_way():
    off = SamplingParams(max_tokens=5, temperature=0.7, top_k=0, top_p=1.0).engine_kwargs()
    assert (off["top_k"], off["top_p"], off["stop"]) == (None, None, None)
    on = SamplingParams(top_k=3, top_p=0.9, stop=["\n"], num_samples=2, seed=7).engine_kwargs()
    assert (on["top_k"], on["top_p"], on["stop"], on["num_samples"], on["seed"]) == (3, 0.9, ["\n"], 2, 7)


@pytest.mark.parametrize("flags_class", ["scripts.chat_eval.ChatEvalFlags", "scripts.chat_rl.RLFlags",
                                         "nanochat.terminal.TerminalFlags"])
def test_every_top_k_flag_means_off_at_zero(flags_class):
    import importlib

    from nanochat.flags import parse_flags

    module, name = flags_class.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    assert parse_flags(cls, ["--top_k", "0"]).top_k == 0
    assert "0 = off" in next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == "top_k")
    with pytest.raises(UserError, match=r"top_k must be >= 0 \(0 = off\), got -1"):
        parse_flags(cls, ["--top_k", "-1"])
