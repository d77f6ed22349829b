"""nanochat.tokenizer: training, tiktoken-format save/load, ordinary encoding, chat rendering, token bytes."""
from __future__ import annotations


import pyarrow.parquet as pq
import pytest
import tiktoken.load

from nanochat.common import UserError
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, get_tokenizer

VOCAB_SIZE = 512


@pytest.fixture(scope="module")
def texts(shared_data) -> list[str]:
    shard = shared_data / "pretrain" / "shard_00000.parquet"
    return pq.ParquetFile(shard).read_row_group(0, columns=["text"]).column("text").to_pylist()[:40]


@pytest.fixture(scope="module")
def tok(texts) -> Tokenizer:
    return Tokenizer.train_from_iterator(texts, VOCAB_SIZE)


def test_vocab_counts_special_tokens_after_the_merges(tok):
    assert tok.vocab_size == VOCAB_SIZE
    assert tok.bos_token_id == VOCAB_SIZE - len(SPECIAL_TOKENS)
    assert [tok.encode_special(name) for name in SPECIAL_TOKENS] == list(range(tok.bos_token_id, VOCAB_SIZE))
    with pytest.raises(UserError, match="unknown special token"):
        tok.encode_special("<|nope|>")


def test_special_token_text_is_encoded_as_plain_text(tok):
    text = "a user typed <|bos|> and <|assistant_end|>"
    ids = tok.encode(text)
    assert all(i < tok.bos_token_id for i in ids)
    assert tok.decode(ids) == text


def test_prepend_append_and_batches(tok, texts):
    ids = tok.encode("hello", prepend=tok.bos_token_id, append="<|assistant_end|>")
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.encode_special("<|assistant_end|>")
    assert ids[1:-1] == tok.encode("hello")
    batch = tok.encode(texts[:10], prepend="<|bos|>", num_threads=2)
    assert batch == [[tok.bos_token_id] + tok.encode(t) for t in texts[:10]]
    for text in texts[:10] + ["ünïcødé 日本語 🎉", ""]:
        assert tok.decode(tok.encode(text)) == text
    with pytest.raises(TypeError, match="str or a list of str"):
        tok.encode(42)


def test_save_load_round_trip_in_tiktoken_format(tok, texts, tmp_path):
    tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer.tiktoken"]
    # tiktoken's own reader accepts the rank file
    assert tiktoken.load.load_tiktoken_bpe(str(tmp_path / "tokenizer.tiktoken")) == tok.mergeable_ranks
    loaded = Tokenizer.load(tmp_path)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.encode(texts) == tok.encode(texts)


def test_get_tokenizer_missing_or_damaged_names_file_and_stage(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError, match=r"tokenizer\.tiktoken is missing.*scripts\.tok_train"):
        get_tokenizer()
    tok.save(tmp_path / "tokenizer")
    assert get_tokenizer().encode("some text") == tok.encode("some text")

    ranks_path = tmp_path / "tokenizer" / "tokenizer.tiktoken"
    good = ranks_path.read_text()
    ranks_path.write_text(good + "not base64!! x\n")
    with pytest.raises(UserError, match=r"tokenizer\.tiktoken is damaged at line \d+.*scripts\.tok_train"):
        get_tokenizer()
    ranks_path.write_text("\n".join(good.splitlines()[:-3]) + "\n")
    with pytest.raises(UserError, match="special tokens"):
        get_tokenizer()
    ranks_path.write_text(good)
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{truncated")
    with pytest.raises(UserError, match=r"tokenizer\.json is damaged.*scripts\.tok_train"):
        get_tokenizer()


def test_vocab_size_too_small_is_a_user_error(texts):
    with pytest.raises(UserError, match="at least 265"):
        Tokenizer.train_from_iterator(texts, 264)
    with pytest.raises(UserError, match="does not compile"):
        Tokenizer.train_from_iterator(texts, 300, pattern="[")


def test_token_bytes_measure_utf8_length(tok, texts):
    lengths = tok.token_bytes()
    assert lengths.shape == (tok.vocab_size,)
    assert lengths[:256].tolist() == [1] * 256
    assert lengths[tok.bos_token_id:].tolist() == [0] * len(SPECIAL_TOKENS)
    for text in texts[:5] + ["ünïcødé 🎉"]:
        assert int(lengths[tok.encode(text, prepend="<|bos|>")].sum()) == len(text.encode("utf-8"))


CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute."},
        {"type": "python", "text": "2+3"},
        {"type": "python_output", "text": "5"},
        {"type": "text", "text": "It is 5."},
    ]},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome."},
]}


def spans(tok: Tokenizer, ids: list[int], mask: list[int]) -> list[tuple[str, int]]:
    """Consecutive tokens with the same mask value, decoded: [(text, mask), ...]."""
    out: list[tuple[list[int], int]] = []
    for token, m in zip(ids, mask):
        if out and out[-1][1] == m:
            out[-1][0].append(token)
        else:
            out.append(([token], m))
    return [(tok.decode(t), m) for t, m in out]


def test_render_conversation_masks_only_what_the_assistant_writes(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    assert len(ids) == len(mask)
    assert spans(tok, ids, mask) == [
        ("<|bos|><|user_start|>Be brief.\n\nWhat is 2+3?<|user_end|><|assistant_start|>", 0),
        ("Let me compute.<|python_start|>2+3<|python_end|>", 1),
        ("<|output_start|>5<|output_end|>", 0),
        ("It is 5.<|assistant_end|>", 1),
        ("<|user_start|>Thanks<|user_end|><|assistant_start|>", 0),
        ("You're welcome.<|assistant_end|>", 1),
    ]
    short_ids, short_mask = tok.render_conversation(CONVERSATION, max_tokens=7)
    assert (short_ids, short_mask) == (ids[:7], mask[:7])


def test_render_for_completion_drops_the_last_reply_and_opens_one(tok):
    ids = tok.render_for_completion(CONVERSATION)
    full, _ = tok.render_conversation(CONVERSATION, max_tokens=None)
    reply = tok.encode("You're welcome.") + [tok.encode_special("<|assistant_end|>")]
    assert ids == full[: len(full) - len(reply)]
    assert ids[-1] == tok.encode_special("<|assistant_start|>")
    prompt = {"messages": CONVERSATION["messages"][:4]}
    assert tok.render_for_completion(prompt) == ids


@pytest.mark.parametrize("conversation, message", [
    ({"messages": []}, "at least one message"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "expected 'user'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "expected 'assistant'"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]}, "bad part"),
])
def test_malformed_conversations_are_user_errors(tok, conversation, message):
    with pytest.raises(UserError, match=message):
        tok.render_conversation(conversation)
