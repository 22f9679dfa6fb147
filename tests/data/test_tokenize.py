import pytest

from rlhflab.data import (
    PairwiseRecord,
    PromptRecord,
    RankedRecord,
    SFTRecord,
    UnpairedRecord,
    tokenize_pair,
    tokenize_prompt,
    tokenize_ranked,
    tokenize_record,
    tokenize_sft,
    tokenize_unpaired,
)
from rlhflab.data.tokenize import conversation_segments
from rlhflab.errors import ConfigError
from rlhflab.models.tiny import build_word_tokenizer

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
S = lambda c: {"role": "system", "content": c}  # noqa: E731


@pytest.fixture()
def ids(tiny_tokenizer):
    return lambda text: tiny_tokenizer.convert_tokens_to_ids(text.split())


def _mask(n_false: int, n_true: int) -> list[bool]:
    return [False] * n_false + [True] * n_true


def test_text_sft_masks_prompt_and_counts_eos(tiny_tokenizer, ids):
    out = tokenize_sft(SFTRecord("say hello", "hello !"), tiny_tokenizer)
    assert out["input_ids"] == ids("say hello hello ! <eos>")
    assert out["loss_mask"] == _mask(2, 3)
    assert out["attention_mask"] == [1] * 5
    assert tokenize_sft(SFTRecord("say hello", "hello !"), tiny_tokenizer, add_eos=False)["input_ids"] == ids(
        "say hello hello !"
    )
    # a response already ending in EOS does not get a second one
    assert tokenize_sft(SFTRecord("hi", "hello <eos>"), tiny_tokenizer)["input_ids"] == ids("hi hello <eos>")


def test_chat_sft_prompt_completion(tiny_tokenizer, ids):
    out = tokenize_sft(SFTRecord([U("say yes")], [A("yes")]), tiny_tokenizer)
    assert out["input_ids"] == ids("<|user|> say yes <|assistant|> yes <eos>")
    assert out["loss_mask"] == _mask(4, 2)  # the template's own <eos> closes the turn and counts; none added
    # text given as the completion of a chat prompt is one assistant turn
    assert tokenize_sft(SFTRecord([U("say yes")], "yes"), tiny_tokenizer) == out


def test_multi_turn_messages_count_every_assistant_turn(tiny_tokenizer, ids):
    msgs = [S("be happy"), U("hi"), A("hello !"), U("how was the film ?"), A("very good")]
    out = tokenize_sft(SFTRecord(messages=msgs), tiny_tokenizer)
    expected = (
        "<|system|> <unk> happy <|user|> hi <|assistant|> hello ! <eos> "
        "<|user|> how was the film ? <|assistant|> very good <eos>"
    )
    assert out["input_ids"] == ids(expected)
    assert out["loss_mask"] == _mask(6, 3) + _mask(7, 3)
    # the pieces join to exactly the template's full rendering
    full = tiny_tokenizer.apply_chat_template(msgs, tokenize=False)
    assert "".join(t for t, _ in conversation_segments(msgs, tiny_tokenizer)) == full
    assert tokenize_sft(SFTRecord(messages=msgs), tiny_tokenizer, max_length=8)["loss_mask"] == _mask(6, 2)


def test_multi_turn_with_another_template():
    tok = build_word_tokenizer(["hi", "hello", "yes", "no", "system", "user", "assistant", "[", "]", ":"])
    # ChatML-like: role headers, BOS in the text, a separator after each turn, trailing user turn
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}[ {{ m['role'] }} ] : {{ m['content'] }} <eos> {% endfor %}"
        "{% if add_generation_prompt %}[ assistant ] :{% endif %}"
    )
    msgs = [U("hi"), A("hello"), U("yes"), A("no"), U("hi")]
    out = tokenize_sft(SFTRecord(messages=msgs), tok)
    toks = tok.convert_ids_to_tokens(out["input_ids"])
    counted = [t for t, m in zip(toks, out["loss_mask"]) if m]
    assert counted == ["hello", "<eos>", "no", "<eos>"]
    assert toks[0] == "<bos>" and toks.count("<bos>") == 1
    assert (
        out["input_ids"]
        == tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    )


def test_template_that_is_not_prefix_stable_is_a_config_error(tiny_tokenizer):
    tok = build_word_tokenizer(["hi", "hello"])
    tok.chat_template = (
        "{% for m in messages %}{% if loop.last and m['role'] == 'assistant' %}hello "
        "{% endif %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    with pytest.raises(ConfigError, match="renders the prompt differently once a response follows"):
        tokenize_sft(SFTRecord([U("hi")], [A("hi")]), tok)
    plain = build_word_tokenizer(["hi"])
    plain.chat_template = None
    with pytest.raises(ConfigError, match="has no chat template"):
        tokenize_sft(SFTRecord([U("hi")], [A("hi")]), plain)


def test_truncation_keeps_prompt_end_and_response_start(tiny_tokenizer, ids):
    rec = SFTRecord("what is 2 + 2 ?", "it is 4 .")  # 6 prompt tokens, 4 + EOS response tokens
    out = tokenize_sft(rec, tiny_tokenizer, max_length=8, max_prompt_length=4)
    assert out["input_ids"] == ids("2 + 2 ? it is 4 .")  # EOS cut with the response's end
    assert out["loss_mask"] == _mask(4, 4)
    # without max_prompt_length the prompt may use all but one token
    out = tokenize_sft(rec, tiny_tokenizer, max_length=5)
    assert out["input_ids"] == ids("is 2 + 2 ? it")[1:] and out["loss_mask"] == _mask(4, 1)
    # a short prompt is not cut; the response takes the room left
    out = tokenize_sft(SFTRecord("hi", "it is 4 ."), tiny_tokenizer, max_length=4, max_prompt_length=3)
    assert out["input_ids"] == ids("hi it is 4")
    assert tokenize_sft(rec, tiny_tokenizer, max_length=100)["input_ids"] == ids(
        "what is 2 + 2 ? it is 4 . <eos>"
    )
    # the BOS survives keep-the-end truncation
    out = tokenize_sft(SFTRecord("<bos> what is 2 + 2 ?", "4"), tiny_tokenizer, max_prompt_length=4)
    assert out["input_ids"] == ids("<bos> + 2 ? 4 <eos>")


@pytest.mark.parametrize(
    "max_length, max_prompt_length, pattern",
    [
        (8, 8, "must be smaller than max_length"),
        (8, 9, "must be smaller"),
        (1, None, "max_length must be"),
        (8, 0, "max_prompt_length must be"),
        (8.0, None, "integer"),
    ],
)
def test_impossible_lengths_are_config_errors(tiny_tokenizer, max_length, max_prompt_length, pattern):
    with pytest.raises(ConfigError, match=pattern):
        tokenize_sft(
            SFTRecord("hi", "hello"),
            tiny_tokenizer,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
        )


def test_pair_shares_one_truncated_prompt(tiny_tokenizer, ids):
    rec = PairwiseRecord("how was the movie ?", "very very good", "bad", margin=1.5)
    out = tokenize_pair(rec, tiny_tokenizer, max_length=6, max_prompt_length=3)
    assert out["prompt_input_ids"] == ids("the movie ?")
    assert out["chosen_input_ids"] == ids("the movie ? very very good")
    assert out["chosen_loss_mask"] == _mask(3, 3)
    assert out["rejected_input_ids"] == ids("the movie ? bad <eos>")
    assert out["rejected_loss_mask"] == _mask(3, 2) and out["rejected_attention_mask"] == [1] * 5
    assert out["margin"] == 1.5
    chat = tokenize_pair(PairwiseRecord([U("hi")], [A("yes")], [A("no")]), tiny_tokenizer)
    assert chat["chosen_input_ids"] == ids("<|user|> hi <|assistant|> yes <eos>")
    assert chat["rejected_loss_mask"] == _mask(3, 2) and chat["margin"] is None


def test_ranked_and_unpaired(tiny_tokenizer, ids):
    rec = RankedRecord("hi", ["hello", "yes", "no"], ranks=(0, 1, 1))
    out = tokenize_ranked(rec, tiny_tokenizer)
    assert out["input_ids"] == [ids("hi hello <eos>"), ids("hi yes <eos>"), ids("hi no <eos>")]
    assert out["loss_mask"] == [_mask(1, 2)] * 3 and out["ranks"] == [0, 1, 1]
    out = tokenize_unpaired(UnpairedRecord("hi", "no", False), tiny_tokenizer)
    assert (
        out["input_ids"] == ids("hi no <eos>") and out["loss_mask"] == _mask(1, 2) and out["label"] is False
    )


def test_prompt_for_generation(tiny_tokenizer, ids):
    out = tokenize_prompt(PromptRecord([S("be happy"), U("how was the day ?")]), tiny_tokenizer)
    assert out["input_ids"] == ids("<|system|> <unk> happy <|user|> how was the day ? <|assistant|>")
    assert tokenize_prompt("how was the day ?", tiny_tokenizer, max_prompt_length=2)["input_ids"] == ids(
        "day ?"
    )
    via_record = tokenize_record(PromptRecord("how was the day ?"), tiny_tokenizer, max_length=3)
    assert via_record == {"input_ids": ids("the day ?"), "attention_mask": [1, 1, 1]}
    assert tokenize_record(SFTRecord("hi", "yes"), tiny_tokenizer)["input_ids"] == ids("hi yes <eos>")
