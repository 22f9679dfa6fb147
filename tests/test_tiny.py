import torch

from rlhflab.models.tiny import split_words


def test_tokenizer_round_trip_and_specials(tiny_tokenizer):
    ids = tiny_tokenizer("the cat sat on the mat .")["input_ids"]
    assert tiny_tokenizer.unk_token_id not in ids
    assert tiny_tokenizer.decode(ids) == "the cat sat on the mat ."
    assert split_words("2+3=5") == ["2", "+", "3", "=", "5"]
    assert tiny_tokenizer("zebra")["input_ids"] == [tiny_tokenizer.unk_token_id]
    text = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.strip().endswith("<|assistant|>")


def test_tiny_model_forward_and_generate(tiny_tokenizer, tiny_model):
    ids = torch.tensor([tiny_tokenizer("the cat")["input_ids"]])
    out = tiny_model(input_ids=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tiny_tokenizer))
    gen = tiny_model.generate(ids, max_new_tokens=5, do_sample=True)
    assert gen.shape[1] <= ids.shape[1] + 5
