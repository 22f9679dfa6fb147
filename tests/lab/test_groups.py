"""Annotator groups with different gold (`rlhflab.lab.groups`): each group's gold by hand, labels that follow the
group that gave them, shares, contested pairs, tags, and the checks."""

from __future__ import annotations

import numpy as np
import pytest

from rlhflab.errors import ConfigError
from rlhflab.lab.annotators import AnnotatorSettings
from rlhflab.lab.gold import gold_components
from rlhflab.lab.groups import (
    AnnotatorGroup,
    PluralisticAnnotators,
    check_groups,
    group_gold,
    relabel_pairs,
    tag_prompt,
    value_split,
)
from rlhflab.lab.tasks import chat_prompt, get_task

PROMPT = "write a review of the film ."
GOOD = "the acting was great ."
BAD = "the acting was awful ."


def test_group_gold_is_the_weighted_terms_by_hand():
    task = get_task("sentiment")
    majority, minority = value_split()
    good, bad = gold_components(task, PROMPT, GOOD), gold_components(task, PROMPT, BAD)
    # Both grammatical, on topic, no repeats: the gold is the VADER sentiment, and the minority's is its negative.
    assert good["gold"] == pytest.approx(good["sentiment"]) and good["sentiment"] > 0.3
    assert bad["gold"] == pytest.approx(bad["sentiment"]) and bad["sentiment"] < -0.3
    got = group_gold(task, minority, [PROMPT, chat_prompt(PROMPT)], [GOOD, BAD])
    np.testing.assert_allclose(got, [-good["sentiment"], -bad["sentiment"]])
    assert group_gold(task, majority, [PROMPT], [GOOD])[0] == pytest.approx(good["gold"])
    # A quality term counts for both: repetition lowers the minority's gold as much as the majority's.
    rep = "the acting was awful , the acting was awful ."
    drop = {
        g.name: group_gold(task, g, [PROMPT], [BAD])[0] - group_gold(task, g, [PROMPT], [rep])[0]
        for g in (majority, minority)
    }
    comps = gold_components(task, PROMPT, rep)
    assert comps["repetition"] > 0
    assert drop["majority"] > 0 and drop["minority"] > 0


def test_each_label_follows_its_groups_gold_and_the_shares_hold():
    task = get_task("sentiment")
    annotators = PluralisticAnnotators(
        task, value_split(minority_share=0.3), AnnotatorSettings(temperature=0), 3
    )
    n = 2000
    labels = annotators.compare([PROMPT] * n, [GOOD] * n, [BAD] * n)
    groups = [gl.group for gl in labels]
    share = groups.count("minority") / n
    assert abs(share - 0.3) < 3 * np.sqrt(0.3 * 0.7 / n)  # within 3 standard errors
    assert all(gl.label.a_preferred == (gl.group == "majority") for gl in labels)
    assert annotators.contested([PROMPT], [GOOD], [BAD]).tolist() == [True]
    # Same sentiment, one repeats: every group prefers the clean one, so the pair is not contested.
    assert annotators.contested(
        [PROMPT], [GOOD], ["the acting was great , the acting was great ."]
    ).tolist() == [False]


def test_relabel_pairs_records_the_group_and_drops_ties():
    task = get_task("sentiment")
    annotators = PluralisticAnnotators(
        task, value_split(minority_share=0.5), AnnotatorSettings(temperature=0, tie_margin=1e-9), 0
    )
    rows = [{"prompt": chat_prompt(PROMPT), "chosen": GOOD, "rejected": BAD}] * 50
    rows += [{"prompt": chat_prompt(PROMPT), "chosen": GOOD, "rejected": GOOD}]  # a tie for everyone
    out, stats = relabel_pairs(rows, annotators)
    assert stats["n"] == len(out) == 50 and sum(stats["per_group"].values()) == 50
    for row in out:
        assert row["chosen"] == (GOOD if row["group"] == "majority" else BAD)
        assert row["prompt"] == chat_prompt(PROMPT) and "rating" in row
    assert stats["agreement_with_own_gold"] == {"majority": 1.0, "minority": 1.0}
    assert stats["contested_share"] == pytest.approx(50 / 51)


def test_draws_are_seeded():
    task = get_task("sentiment")
    a = PluralisticAnnotators(task, value_split(), seed=5).draw_groups(30)
    b = PluralisticAnnotators(task, value_split(), seed=5).draw_groups(30)
    assert a == b and set(a) == {"majority", "minority"}


def test_tag_prompt():
    assert tag_prompt("review the film .", "plain") == "plain review the film ."
    chat = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "review the film ."}]
    tagged = tag_prompt(chat, "plain")
    assert tagged[1]["content"] == "plain review the film ." and chat[1]["content"] == "review the film ."
    assert tagged[0] == chat[0]


def test_bad_groups_are_refused():
    with pytest.raises(ConfigError, match="sum to 1"):
        check_groups("sentiment", [AnnotatorGroup("a", 0.5), AnnotatorGroup("b", 0.3)])
    with pytest.raises(ConfigError, match="distinct"):
        check_groups("sentiment", [AnnotatorGroup("a", 0.5), AnnotatorGroup("a", 0.5)])
    with pytest.raises(ConfigError, match="not terms of the 'sentiment' task's gold"):
        check_groups("sentiment", [AnnotatorGroup("a", 1.0, {"helpfulness": 1.0})])
    with pytest.raises(ConfigError, match="share"):
        AnnotatorGroup("a", 0.0)
    with pytest.raises(ConfigError, match="without spaces"):
        AnnotatorGroup("a b", 1.0)
    with pytest.raises(ConfigError, match="finite"):
        AnnotatorGroup("a", 1.0, {"gold": float("nan")})
    with pytest.raises(ConfigError, match="minority_share"):
        value_split(minority_share=1.0)
