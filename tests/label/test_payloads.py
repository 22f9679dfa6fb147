"""What a label of each kind may hold: the answer in shown positions becomes response indices."""

import pytest

from rlhflab.data.records import LLAMA2_RATINGS
from rlhflab.errors import UserError
from rlhflab.label.payloads import STRENGTHS, LabelInvalid, check_item, normalize


def test_strengths_are_llama2_ratings():
    assert STRENGTHS == LLAMA2_RATINGS


def test_pairwise_maps_shown_positions_to_response_indices():
    # Shown B first: position A is response 1, position B is response 0.
    out = normalize("pairwise", {"choice": "A", "strength": "better", "safety": "B"}, [1, 0])
    assert out == {
        "preferred": 1,
        "strength": "better",
        "safe": [0],
        "reason": None,
        "edited": None,
        "shown_first": 1,
    }
    out = normalize("pairwise", {"choice": "B", "strength": "slightly_better"}, [1, 0])
    assert out["preferred"] == 0 and out["safe"] is None
    assert normalize("pairwise", {"choice": "tie", "safety": "neither"}, [0, 1])["preferred"] is None
    assert normalize("pairwise", {"choice": "tie", "safety": "both"}, [1, 0])["safe"] == [0, 1]


@pytest.mark.parametrize(
    "answer, field",
    [
        ({"choice": "C", "strength": "better"}, "choice"),
        ({"choice": "A"}, "strength"),
        ({"choice": "A", "strength": "much_better"}, "strength"),
        ({"choice": "tie", "strength": "better"}, "strength"),
        ({"choice": "tie", "edited": "x"}, "edited"),
        ({"choice": "A", "strength": "better", "safety": "maybe"}, "safety"),
        ({"choice": "A", "strength": "better", "reason": 3}, "reason"),
        ({"choice": "A", "strength": "better", "edited": "x" * 20_001}, "edited"),
        ({"choice": "A", "strength": "better", "colour": "red"}, "colour"),
    ],
)
def test_pairwise_refusals_name_the_field(answer, field):
    with pytest.raises(LabelInvalid) as e:
        normalize("pairwise", answer, [0, 1])
    assert e.value.field == field and e.value.status == 422


def test_ranking_is_stored_by_response_index():
    # Shown order C, A, B (indices 2, 0, 1); the annotator ranks shown A best, then shown C, then shown B.
    out = normalize("ranking", {"ranks": [0, 2, 1]}, [2, 0, 1])
    assert out == {"ranks": [2, 1, 0], "shown_first": 2}
    assert normalize("ranking", {"ranks": [0, 1, 1]}, [0, 1, 2])["ranks"] == [0, 1, 1]  # a tie


@pytest.mark.parametrize("ranks", [[0, 0, 0], [0, 2, 2], [1, 2, 3], [0, 1], [0, 1, 1.5], [0, True, 2], "012"])
def test_a_ranking_must_be_a_dense_ranking(ranks):
    with pytest.raises(LabelInvalid, match="ranks"):
        normalize("ranking", {"ranks": ranks}, [0, 1, 2])


def test_thumbs_and_ratings():
    assert normalize("thumbs", {"thumb": "up"}, [0]) == {"good": True}
    assert normalize("thumbs", {"thumb": "down"}, [0]) == {"good": False}
    with pytest.raises(LabelInvalid):
        normalize("thumbs", {"thumb": "sideways"}, [0])
    ok = normalize("ratings", {"ratings": {"helpful": 7, "honest": 1}}, [0], ("helpful", "honest"))
    assert ok == {"ratings": {"helpful": 7, "honest": 1}}
    for bad in ({"helpful": 8, "honest": 1}, {"helpful": 3}, {"helpful": 3, "honest": 2, "funny": 1}):
        with pytest.raises(LabelInvalid):
            normalize("ratings", {"ratings": bad}, [0], ("helpful", "honest"))
    with pytest.raises(LabelInvalid, match="object"):
        normalize("thumbs", ["up"], [0])


def test_check_item_counts_responses_per_kind():
    check_item("pairwise", ["a", "b"], "item 0")
    check_item("ranking", ["a", "b", "c"], "item 0")
    for kind, responses in (("pairwise", ["a"]), ("thumbs", ["a", "b"]), ("ranking", ["a"]), ("poll", ["a"])):
        with pytest.raises(UserError, match="item 0"):
            check_item(kind, responses, "item 0")
