import pytest

from rlhflab.data import (
    LLAMA2_RATINGS,
    PairwiseRecord,
    PromptRecord,
    RankedRecord,
    RecordError,
    SFTRecord,
    UnpairedRecord,
    margin_for_rating,
    normalize_rating,
    record_to_dict,
)
from rlhflab.data.records import normalize_margin_table
from rlhflab.errors import ConfigError, DataError


def test_llama2_ratings_are_in_strength_order():
    """Index = the strength that `losses.llama2_margins` reads (Table 27: strongest first)."""
    assert LLAMA2_RATINGS == ("significantly_better", "better", "slightly_better", "negligibly_better")


@pytest.mark.parametrize(
    "name, canonical",
    [
        ("Significantly Better", "significantly_better"),
        ("significantly-better", "significantly_better"),
        ("  SLIGHTLY_better ", "slightly_better"),
        ("Better", "better"),
        ("Negligibly Better / Unsure", "negligibly_better"),
        ("negligibly better or unsure", "negligibly_better"),
        ("unsure", "negligibly_better"),
        ("negligibly_better", "negligibly_better"),
    ],
)
def test_rating_names_normalize(name, canonical):
    assert normalize_rating(name) == canonical


def test_margin_for_rating_and_custom_tables():
    large = {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "negligibly_better": 0.0}
    assert margin_for_rating("Slightly Better", large) == 1.0
    assert margin_for_rating("negligibly better / unsure", large) == 0.0
    with pytest.raises(RecordError, match="unknown rating 'slightly beter'.*did you mean 'slightly_better'"):
        margin_for_rating("slightly beter", large)
    assert normalize_margin_table({"Much Better": 2, "Same": 0}) == {"much_better": 2.0, "same": 0.0}
    with pytest.raises(ConfigError, match="'better' must be a finite number"):
        normalize_margin_table({"better": float("nan")})


def test_records_validate_when_built_in_code():
    with pytest.raises(DataError, match="field 'completion': is missing"):
        SFTRecord(prompt="hi")
    with pytest.raises(RecordError, match="not both"):
        SFTRecord("hi", "yes", messages=[{"role": "assistant", "content": "x"}])
    with pytest.raises(RecordError, match="field 'label': expected true or false, got int 1"):
        UnpairedRecord("hi", "yes", 1)
    with pytest.raises(RecordError, match="field 'margin'"):
        PairwiseRecord("hi", "a", "b", margin=float("inf"))
    with pytest.raises(RecordError, match="has 1 response"):
        RankedRecord("hi", ["a"])
    with pytest.raises(RecordError, match="has 3 entries but there are 2 responses"):
        RankedRecord("hi", ["a", "b"], ranks=[0, 1, 2])
    with pytest.raises(RecordError, match="is empty"):
        PromptRecord("  ")
    with pytest.raises(RecordError, match="field 'completion': is empty"):
        SFTRecord("hi", "")


def test_ranks_are_dense_and_group_ties():
    rec = RankedRecord("hi", ["a", "b", "c", "d", "e"], ranks=[2, 5, 5, 9, 9])
    assert rec.ranks == (0, 1, 1, 2, 2)
    assert rec.tie_groups == [[0], [1, 2], [3, 4]] and rec.has_ties
    assert RankedRecord("hi", ["a", "b"]).tie_groups == [[0], [1]]


def test_chat_prompt_turns_text_responses_into_assistant_turns():
    rec = PairwiseRecord([{"role": "user", "content": "hi"}], "yes", "no", rating="Better")
    assert rec.chosen == [{"role": "assistant", "content": "yes"}]
    assert rec.rating == "better" and rec.margin is None  # only loaders look ratings up in a table


def test_record_to_dict():
    assert record_to_dict(PairwiseRecord("p", "a", "b")) == {"prompt": "p", "chosen": "a", "rejected": "b"}
    assert record_to_dict(RankedRecord("p", ["a", "b", "c"], ranks=[0, 1, 1]))["ranks"] == [0, 1, 1]
    assert "ranks" not in record_to_dict(RankedRecord("p", ["a", "b"]))
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    assert record_to_dict(SFTRecord(messages=msgs)) == {"messages": msgs}
