"""The constitution of Constitutional AI (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback",
Sec. 3.1 and 4.1, Appendix C): a YAML principles file, read and checked.

    critique_template:   "... {prompt} ... {response} ... {request}"       {request}: a principle's critique request
    revision_template:   "... {prompt} ... {response} ... {critique}"      (+ {request}: its revision request)
    comparison_template: "... {prompt} ... {first} ... {second} ... {request}"   {request}: its comparison question
    answers: [A, B]      the answer words that pick the first / the second response (one token each)
    principles:
      - {name: harmless, critique: "...", compare: "...", revise: "..."}   revise: only with {request} above

Every error names the file and the field, and says what was expected (`rlhflab.errors.ConfigError`).
"""

from __future__ import annotations

import difflib
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rlhflab.errors import ConfigError

# Template -> (placeholders it must have, placeholders it may have).
TEMPLATES = {
    "critique_template": ({"request", "prompt", "response"}, set()),
    "revision_template": ({"prompt", "response", "critique"}, {"request"}),
    "comparison_template": ({"request", "prompt", "first", "second"}, set()),
}
PRINCIPLE_KEYS = ("name", "critique", "compare", "revise")


@dataclass(frozen=True)
class Principle:
    """One principle: its name, critique request, comparison question and (optional) revision request."""

    name: str
    critique: str
    compare: str
    revise: str = ""


@dataclass(frozen=True)
class Constitution:
    """A principles file, checked. Templates hold {request} (the principle's text), {prompt}, {response},
    {critique}, {first} and {second}; answers are the two answer words of a comparison (first, second)."""

    critique_template: str
    revision_template: str
    comparison_template: str
    answers: tuple[str, str]
    principles: tuple[Principle, ...]
    path: str = ""

    def critique_question(self, principle: Principle, prompt: str, response: str) -> str:
        return self.critique_template.format(request=principle.critique, prompt=prompt, response=response)

    def revision_question(self, principle: Principle, prompt: str, response: str, critique: str) -> str:
        return self.revision_template.format(
            request=principle.revise, prompt=prompt, response=response, critique=critique
        )

    def comparison_template_for(self, principle: Principle) -> str:
        """The comparison question of `principle` as `LMJudge` takes it: {request} filled in, {prompt}, {first}
        and {second} left for the judge, every other brace doubled so that its str.format writes it as is."""
        out = []
        for literal, name, _, _ in string.Formatter().parse(self.comparison_template):
            out.append(_escape(literal))
            if name == "request":
                out.append(_escape(principle.compare))
            elif name is not None:
                out.append("{" + name + "}")
        return "".join(out)


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _bad(path: Any, key: str, message: str) -> ConfigError:
    return ConfigError(f"principles file {path}, field '{key}': {message}")


def _text_field(path: Any, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad(path, key, f"must be non-empty text, got {value!r}")
    return value


def _check_template(path: Any, key: str, value: Any) -> str:
    """A template's placeholders: each required one present, nothing else (and no format syntax in them)."""
    text = _text_field(path, key, value)
    required, optional = TEMPLATES[key]
    try:
        fields = [(n, s, c) for _, n, s, c in string.Formatter().parse(text) if n is not None]
    except ValueError as e:  # an unmatched brace
        raise _bad(
            path, key, f"is not a valid template ({e}); write a literal brace as {{{{ or }}}}"
        ) from None
    allowed = required | optional
    for name, spec, conversion in fields:
        if name not in allowed or spec or conversion:
            raise _bad(
                path,
                key,
                f"has the placeholder {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
                f"; it may hold only {', '.join('{' + f + '}' for f in sorted(allowed))}",
            )
    missing = sorted(required - {n for n, _, _ in fields})
    if missing:
        raise _bad(
            path,
            key,
            f"lacks the placeholder {{{missing[0]}}}; it needs {', '.join('{' + f + '}' for f in sorted(required))}",
        )
    return text


def _check_principle(path: Any, i: int, item: Any, revise: bool) -> Principle:
    where = f"principles[{i}]"
    if not isinstance(item, dict):
        raise _bad(path, where, f"must be a mapping with keys {', '.join(PRINCIPLE_KEYS)}, got {item!r}")
    for key in item:
        if key not in PRINCIPLE_KEYS:
            close = difflib.get_close_matches(str(key), PRINCIPLE_KEYS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(PRINCIPLE_KEYS)}"
            raise _bad(path, f"{where}.{key}", f"is not a key of a principle{hint}")
    values = {k: _text_field(path, f"{where}.{k}", item.get(k)) for k in ("name", "critique", "compare")}
    if revise:
        values["revise"] = _text_field(path, f"{where}.revise", item.get("revise"))
    elif "revise" in item:
        raise _bad(
            path,
            f"{where}.revise",
            "is set but revision_template has no {request} to put it in; add {request} there or remove it",
        )
    return Principle(**values)


def _check_answers(path: Any, answers: Any) -> tuple[str, str]:
    if not isinstance(answers, list) or len(answers) != 2:
        raise _bad(
            path,
            "answers",
            f"must be a list of two answer words (first, second), e.g. [A, B], got {answers!r}",
        )
    for i, a in enumerate(answers):
        if not isinstance(a, str) or not a.strip() or a != a.strip():
            raise _bad(path, f"answers[{i}]", f"must be a word without surrounding spaces, got {a!r}")
    if answers[0] == answers[1]:
        raise _bad(path, "answers", f"must be two different words, got {answers!r}")
    return answers[0], answers[1]


def load_constitution(path: str | Path) -> Constitution:
    """Read and check a principles file (YAML): critique_template, revision_template, comparison_template,
    answers [first, second] and principles, a list of {name, critique, compare, revise (when revision_template
    has {request})}.

    Raises:
        ConfigError: naming the file and the field (a missing file, bad YAML, a missing or unknown key or
            placeholder, an empty list, a duplicate name).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"principles file {p} does not exist; give a YAML principles file, e.g. configs/constitution.yaml"
        )
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"principles file {p} is not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    known = (*TEMPLATES, "answers", "principles")
    if not isinstance(data, dict):
        raise ConfigError(f"principles file {p} must hold a mapping with keys {', '.join(known)}")
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            raise _bad(
                p, key, f"is not a key of a principles file{f'; did you mean {close[0]!r}?' if close else ''}"
            )
    for key in known:
        if key not in data:
            raise _bad(p, key, "is missing")
    templates = {key: _check_template(p, key, data[key]) for key in TEMPLATES}
    items = data["principles"]
    if not isinstance(items, list) or not items:
        raise _bad(p, "principles", f"must be a non-empty list of principles, got {items!r}")
    revise = "request" in {n for _, n, _, _ in string.Formatter().parse(templates["revision_template"])}
    principles = tuple(_check_principle(p, i, item, revise) for i, item in enumerate(items))
    names = [q.name for q in principles]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise _bad(p, f"principles[{i}].name", f"{name!r} names two principles; names must be unique")
    return Constitution(
        **templates, answers=_check_answers(p, data["answers"]), principles=principles, path=str(p)
    )


def check_answer_tokens(constitution: Constitution, tokenizer, model: str) -> None:
    """Refuse answers the feedback model's tokenizer cannot write as one token (with or without a leading
    space): the judge reads each answer's probability at one position."""
    for i, answer in enumerate(constitution.answers):
        ids = [tokenizer.encode(t, add_special_tokens=False) for t in (answer, " " + answer)]
        if not any(len(t) == 1 and t[0] != tokenizer.unk_token_id for t in ids):
            raise _bad(
                constitution.path,
                f"answers[{i}]",
                f"{answer!r} is not a single token of the tokenizer of {model}; pick answers it writes as one "
                "token (e.g. A and B)",
            )
