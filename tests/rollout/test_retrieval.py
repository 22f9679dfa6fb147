"""BM25 retrieval and evidence-carrying prompts (`rlhflab.rollout.retrieval`, `rlhflab retrieve`)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rlhflab.cli import main
from rlhflab.errors import ConfigError, DataError
from rlhflab.rollout.retrieval import (
    BM25Index,
    add_evidence,
    bm25_scores,
    check_template,
    load_corpus,
    retrieve_file,
    split_evidence,
    terms,
    with_evidence,
)

DOCS = [["a", "b"], ["a", "c", "c", "d"]]  # lengths 2 and 4: avgdl = 3


def test_bm25_by_hand():
    # k1 = 1.5, b = 0.75. "c": in 1 of 2 documents, IDF = ln(1 + 1.5 / 1.5) = ln 2. D2 has it twice and is longer
    # than average: norm = 1.5 (0.25 + 0.75 x 4/3) = 1.875, score = ln 2 x 2 x 2.5 / (2 + 1.875).
    assert bm25_scores(["c"], DOCS) == pytest.approx([0.0, math.log(2) * 5 / 3.875])
    # "a": in both, IDF = ln(1 + 0.5 / 2.5) = ln 1.2, small but positive. D1 is shorter than average: norm =
    # 1.5 (0.25 + 0.75 x 2/3) = 1.125, score = ln 1.2 x 2.5 / 2.125; D2: ln 1.2 x 2.5 / 2.875.
    a = [math.log(1.2) * 2.5 / 2.125, math.log(1.2) * 2.5 / 2.875]
    assert bm25_scores(["a"], DOCS) == pytest.approx(a)
    # A repeated query term counts once; scores add over distinct terms; an unknown term adds nothing.
    assert bm25_scores(["a", "c", "a", "zzz"], DOCS) == pytest.approx([a[0], a[1] + math.log(2) * 5 / 3.875])
    # b = 0: no length normalization, norm = k1.
    assert bm25_scores(["c"], DOCS, b=0.0)[1] == pytest.approx(math.log(2) * 5 / 3.5)
    # k1 = 0: a term's count no longer matters, only its presence (score = IDF).
    assert bm25_scores(["c"], DOCS, k1=0.0)[1] == pytest.approx(math.log(2))
    assert bm25_scores(["a"], []).shape == (0,)
    with pytest.raises(ValueError, match="k1 >= 0"):
        bm25_scores(["a"], DOCS, b=2.0)


def test_search_ranks_and_drops_passages_with_nothing_in_common():
    index = BM25Index(["The bike: oil the chain.", "Bake the bread.", "oil the bike chain, oil it"])
    assert terms("The bike: oil the chain.") == ["the", "bike", "oil", "the", "chain"]
    hits = index.search("how do I oil my bike?", k=3)
    scores = bm25_scores(terms("how do I oil my bike?"), [terms(p) for p in index.passages])
    assert [i for i, _ in hits] == [int(i) for i in np.argsort(-scores)[:2]]  # best first
    assert {i for i, _ in hits} == {0, 2}  # the bread passage shares no term: not returned
    assert [s for _, s in hits] == pytest.approx(sorted(scores[[0, 2]], reverse=True))
    assert index.search("nothing matches", k=2) == []
    tied = BM25Index(["x y", "x y"])
    assert [i for i, _ in tied.search("x", k=2)] == [0, 1]  # a tie goes to the earlier passage
    with pytest.raises(ConfigError, match="no passages"):
        BM25Index([])


def test_evidence_template_round_trip():
    text = with_evidence("how ?", ["p1 .", "p2 ."])
    assert text == "evidence : p1 . p2 . question : how ?"
    assert split_evidence(text) == ("p1 . p2 .", "how ?")
    assert split_evidence("how ?") == (None, "how ?")
    assert with_evidence("how ?", []) == "how ?"
    custom = "Context: {passage}\nUser: {prompt}"
    assert split_evidence(with_evidence("q", ["p"], custom), custom) == ("p", "q")
    assert check_template(custom) == custom
    for bad in ("no slots", "{prompt} then {passage}", "{passage} {passage} {prompt}"):
        with pytest.raises(ConfigError, match="template"):
            check_template(bad)


def test_add_evidence_to_text_and_chat_prompts():
    index = BM25Index(["oil the chain .", "bake the bread ."])
    rows = add_evidence(
        [
            {"prompt": "how do i oil it ?", "id": 1},
            {"prompt": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "bread ?"}]},
            {"prompt": "nothing here"},
        ],
        index,
    )
    assert rows[0] == {
        "prompt": "evidence : oil the chain . question : how do i oil it ?",
        "id": 1,
        "evidence": ["oil the chain ."],
        "evidence_scores": [pytest.approx(rows[0]["evidence_scores"][0])],
    }
    assert rows[0]["evidence_scores"][0] > 0
    assert rows[1]["prompt"][0] == {"role": "system", "content": "be kind"}  # only the user turn changes
    assert rows[1]["prompt"][1]["content"] == "evidence : bake the bread . question : bread ?"
    assert rows[2]["prompt"] == "nothing here" and rows[2]["evidence"] == []


def test_corpus_files(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("first passage\n\n  second passage \n")
    assert load_corpus(txt) == ["first passage", "second passage"]
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl, line 2, field 'text'.*missing"):
        load_corpus(bad)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ConfigError, match="no passages"):
        load_corpus(tmp_path / "empty.txt")


def test_retrieve_command(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in ["oil the chain .", "bake the bread ."])
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": [{"role": "user", "content": "the chain ?"}]}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["retrieve", "--corpus", str(corpus), "--prompts", str(prompts), "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["prompt"][0]["content"] == "evidence : oil the chain . question : the chain ?"
    assert "1 of 1 prompts got evidence from 2 passages" in capsys.readouterr().out
    # A record without a prompt: exit 2, the file, line and field named, nothing written.
    prompts.write_text('{"prompt": "fine"}\n{"question": "x"}\n')
    out2 = tmp_path / "out2.jsonl"
    assert main(["retrieve", "--corpus", str(corpus), "--prompts", str(prompts), "--out", str(out2)]) == 2
    err = capsys.readouterr().err
    assert "prompts.jsonl, line 2, field 'prompt'" in err and "Traceback" not in err
    assert not out2.exists()
    with pytest.raises(ConfigError, match="k must be >= 1"):
        retrieve_file(corpus, prompts, out2, k=0)
