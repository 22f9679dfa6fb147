"""A local retrieval tool: BM25 over a corpus of passages, and prompts that carry the retrieved evidence.

Sparrow (Glaese et al. 2022, Sec. 2.5) lets the dialogue agent search and show the passage its reply rests
on, so raters can judge whether the reply is "supported by evidence". Here the search engine is Okapi BM25
over a local corpus (no network), the query is the user's message, and the retrieved passage is put in front
of the question with a template the policy was trained on ("evidence : PASSAGE question : PROMPT" by
default), so any stage can train or sample on evidence-carrying prompts without knowing about retrieval:
`rlhflab retrieve` writes such a prompts file.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlhflab.errors import ConfigError

EVIDENCE_TEMPLATE = "evidence : {passage} question : {prompt}"
_TERM = re.compile(r"\w+")


def terms(text: str) -> list[str]:
    """The BM25 terms of `text`: lower-cased runs of letters, digits and underscores (punctuation dropped)."""
    return _TERM.findall(text.lower())


def bm25_scores(
    query: Sequence[str], docs: Sequence[Sequence[str]], *, k1: float = 1.5, b: float = 0.75
) -> np.ndarray:
    """Okapi BM25 scores [D] of each document for a query; documents and query as lists of terms.

    Robertson & Zaragoza (2009, "The Probabilistic Relevance Framework: BM25 and Beyond", eq. 3.15 with the
    IDF of eq. 3.3 kept non-negative as Lucene does):

        score(D, Q) = sum over distinct q in Q of  IDF(q) * f(q, D) (k1 + 1) / (f(q, D) + k1 (1 - b + b |D| / avgdl))
        IDF(q)      = ln(1 + (N - n(q) + 0.5) / (n(q) + 0.5))

    f(q, D): count of q in D; |D|: D's length in terms; avgdl: the mean length; N: number of documents; n(q):
    documents containing q. k1 sets how fast repeated terms saturate, b how much long documents are
    penalized. A term that occurs in every document still scores a little (IDF > 0), so ties between
    documents that share only common words are broken by them, never by accident.
    """
    if k1 < 0 or not 0 <= b <= 1:
        raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
    n_docs = len(docs)
    if n_docs == 0:
        return np.zeros(0)
    counts = [Counter(d) for d in docs]
    lengths = np.array([len(d) for d in docs], dtype=np.float64)
    avgdl = float(lengths.mean()) or 1.0
    norm = k1 * (1 - b + b * lengths / avgdl)
    scores = np.zeros(n_docs)
    for q in dict.fromkeys(query):
        f = np.array([c[q] for c in counts], dtype=np.float64)
        n_q = float((f > 0).sum())
        if n_q == 0:
            continue
        idf = math.log(1 + (n_docs - n_q + 0.5) / (n_q + 0.5))
        # Only where the term occurs: with k1 = 0 an absent term would be 0 / 0.
        scores += idf * np.divide(f * (k1 + 1), f + norm, out=np.zeros(n_docs), where=f > 0)
    return scores


@dataclass
class BM25Index:
    """A corpus of passages, searchable by BM25 (`search`). Build it with `BM25Index(passages)`."""

    passages: list[str]
    k1: float = 1.5
    b: float = 0.75

    def __post_init__(self) -> None:
        if not self.passages:
            raise ConfigError("retrieval: the corpus has no passages")
        self._docs = [terms(p) for p in self.passages]

    def search(self, query: str, k: int = 1) -> list[tuple[int, float]]:
        """The `k` best (passage index, score) for `query`, best first, only passages sharing a term with it
        (score > 0); ties go to the earlier passage."""
        scores = bm25_scores(terms(query), self._docs, k1=self.k1, b=self.b)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [(i, float(scores[i])) for i in order[:k] if scores[i] > 0]


def with_evidence(prompt: str, passages: Sequence[str], template: str = EVIDENCE_TEMPLATE) -> str:
    """`prompt` with the retrieved passages (joined by spaces) in front, by `template`; unchanged if none."""
    if not passages:
        return prompt
    return template.format(passage=" ".join(passages), prompt=prompt)


def split_evidence(text: str, template: str = EVIDENCE_TEMPLATE) -> tuple[str | None, str]:
    """(passage, prompt) of a text made by `with_evidence` with `template`; (None, text) for a plain prompt."""
    head, _, tail = template.partition("{passage}")
    middle = tail.partition("{prompt}")[0]
    if not text.startswith(head) or middle not in text[len(head) :]:
        return None, text
    passage, _, prompt = text[len(head) :].partition(middle)
    return passage, prompt


def check_template(template: str) -> str:
    """`template` if it has exactly one {passage} and one {prompt}, passage first; else a ConfigError."""
    if template.count("{passage}") != 1 or template.count("{prompt}") != 1:
        raise ConfigError(
            f"retrieval: the template must contain {{passage}} and {{prompt}} once each, got {template!r}"
        )
    if template.index("{passage}") > template.index("{prompt}"):
        raise ConfigError(f"retrieval: the template must put {{passage}} before {{prompt}}, got {template!r}")
    return template


def load_corpus(path: str | Path, field: str = "text") -> list[str]:
    """Passages from a corpus file: JSONL/JSON/CSV/Parquet records with a `field` string, or a .txt file with
    one passage per non-empty line. Errors name the file, the record and the field."""
    from rlhflab.data.readers import data_error

    p = Path(path)
    if p.suffix == ".txt":
        if not p.is_file():
            raise ConfigError(f"retrieval: corpus file '{p}' does not exist")
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
        passages = [line for line in lines if line]
        if not passages:
            raise ConfigError(f"retrieval: corpus file '{p}' has no passages (one per line)")
        return passages
    passages = []
    for number, row, unit in _rows(p):
        value = row.get(field)
        if not isinstance(value, str) or not value.strip():
            got = "missing" if field not in row else f"{type(value).__name__} {value!r}"[:80]
            raise data_error(
                f"expected a non-empty passage string, got {got}", path=str(p), unit=unit, number=number,
                field=field,
            )  # fmt: skip
        passages.append(value.strip())
    return passages


def _rows(path: Path):
    """(number, row, unit) of each record of a data file ("line 3" for JSONL, "index 2" for JSON lists, ...)."""
    from rlhflab.data.readers import open_source, read_rows

    src = open_source(path)
    for number, row in read_rows(src):
        yield number, row, src.unit


def add_evidence(
    records: Sequence[Mapping[str, Any]],
    index: BM25Index,
    *,
    k: int = 1,
    template: str = EVIDENCE_TEMPLATE,
    field: str = "prompt",
) -> list[dict[str, Any]]:
    """Prompt records with the best `k` passages for each prompt put in front of it.

    `record[field]` is a string or a conversation (the last user message is the query and gets the evidence).
    Each output record keeps its other fields and gains `evidence` (the passages, best first) and
    `evidence_scores`.
    """
    out = []
    for record in records:
        prompt = record[field]
        if isinstance(prompt, str):
            hits = index.search(prompt, k)
            new_prompt: Any = with_evidence(prompt, [index.passages[i] for i, _ in hits], template)
        else:
            last = max(i for i, m in enumerate(prompt) if m.get("role") == "user")
            hits = index.search(prompt[last]["content"], k)
            passages = [index.passages[i] for i, _ in hits]
            new_prompt = [dict(m) for m in prompt]
            new_prompt[last]["content"] = with_evidence(prompt[last]["content"], passages, template)
        out.append(
            {
                **record,
                field: new_prompt,
                "evidence": [index.passages[i] for i, _ in hits],
                "evidence_scores": [s for _, s in hits],
            }
        )
    return out


def retrieve_file(
    corpus: str | Path,
    prompts: str | Path,
    output: str | Path,
    *,
    k: int = 1,
    template: str = EVIDENCE_TEMPLATE,
    field: str = "prompt",
    corpus_field: str = "text",
) -> dict[str, Any]:
    """`rlhflab retrieve`: read a prompts file, put the best `k` passages of `corpus` in front of each prompt,
    write the records to `output` (JSONL, written whole or not at all). Returns a summary: records, how many
    got evidence, the mean top score."""
    from rlhflab.data.readers import data_error, write_jsonl
    from rlhflab.data.records import is_conversation

    if k < 1:
        raise ConfigError(f"retrieval: k must be >= 1, got {k}")
    check_template(template)
    index = BM25Index(load_corpus(corpus, corpus_field))
    records = []
    for number, row, unit in _rows(Path(prompts)):
        value = row.get(field)
        ok = isinstance(value, str) or (
            is_conversation(value) and any(m.get("role") == "user" for m in value)
        )
        if not ok:
            got = "missing" if field not in row else f"{type(value).__name__}"
            raise data_error(
                f"expected a prompt string or a conversation with a user message, got {got}",
                path=str(prompts), unit=unit, number=number, field=field,
            )  # fmt: skip
        records.append(row)
    out = add_evidence(records, index, k=k, template=template, field=field)
    write_jsonl(out, output)
    found = [r["evidence_scores"][0] for r in out if r["evidence_scores"]]
    return {
        "records": len(out),
        "with_evidence": len(found),
        "mean_top_score": float(np.mean(found)) if found else 0.0,
        "passages": len(index.passages),
    }
