"""What Constitutional AI asks of language models (`rlhflab.stages.cai`; Bai et al. 2022): responses, critiques
and revisions written by a `Writer`, the critique -> revision loop of SL-CAI, and RL-CAI's AI labels from one
`LMJudge` per principle.

Across the processes `torchrun` / `accelerate launch` start (`stages.parallel`), every call's work is shared out
in whole units: a `Writer` call's generation batches (algo.batch_size consecutive rows, batch i from the seed
`seed * 100_003 + i`), and `label_pairs`' comparison calls (up to algo.batch_size pairs of one principle). Process
r does units r, r + W, ... and the results are gathered back in order on every process. A unit holds the same
rows, padded to the same width, whatever the number of processes, so it is computed exactly as one process
computes it: the texts, and the judge's probabilities down to the last bit. Everything between the calls (the
principles drawn, the questions built from the previous call's answers) runs on every process alike, from the
run's one seeded stream, which every process replays.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from rlhflab.config import ModelSection, SamplingSection
from rlhflab.rollout.generate import generate
from rlhflab.stages.common import mixed_precision, resolve_device
from rlhflab.stages.constitution import Constitution
from rlhflab.stages.on_policy import sampling_settings
from rlhflab.stages.parallel import DataParallel


def quote(prompt: Any) -> str:
    """A prompt as a question quotes it: text as is, a one-message chat as its content, a longer chat as
    'role: content' lines."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return str(prompt[0].get("content", ""))
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)


def calls(n: int, batch_size: int, world: int = 1) -> int:
    """The generation batches of n rows that the main process runs (batches 0, W, 2W, ... of ceil(n / size))."""
    batches = -(-n // batch_size)
    return -(-batches // world)


class Writer:
    """A causal LM that writes, in batches and sampled: responses to prompts (`write`) and answers to questions
    (`ask`: each question is the user's message of a chat when the tokenizer has a chat template, as instruct
    models and the lab's base models were trained, else raw text). `par`: the processes the batches are shared
    out among (one process by default); `device`: where the model runs (model_cfg.device when None)."""

    def __init__(
        self,
        path: str,
        model_cfg: ModelSection,
        sampling: SamplingSection,
        batch_size: int,
        tick: Callable[[], None] = lambda: None,
        ask_temperature: float | None = None,
        par: Any = None,
        device: torch.device | None = None,
    ):
        from rlhflab.models.loading import load_causal_lm, load_tokenizer

        device = device if device is not None else resolve_device(model_cfg.device)
        self.path, self.batch_size, self.tick = path, batch_size, tick
        self.par = par if par is not None else DataParallel.one()
        self.model = load_causal_lm(path, dtype=model_cfg.dtype, device=str(device)).eval()
        self.tokenizer = load_tokenizer(path)
        self.settings = sampling_settings(sampling)
        self.ask_temperature = ask_temperature or sampling.temperature
        self.amp = mixed_precision(model_cfg, device)

    def write(
        self,
        prompts: Sequence,
        max_new_tokens: int,
        seed: int,
        max_prompt_tokens: int | None = None,
        temperature: float | None = None,
    ) -> list[str]:
        """One sampled response per prompt, in order, on every process (each samples its share of the batches)."""
        settings = dataclasses.replace(
            self.settings, max_new_tokens=max_new_tokens, temperature=temperature or self.settings.temperature
        )
        starts = range(0, len(prompts), self.batch_size)
        mine: list[list[str]] = []
        for i in self.par.shard(range(len(starts))):
            with self.amp():
                rollout = generate(
                    self.model,
                    self.tokenizer,
                    list(prompts[starts[i] : starts[i] + self.batch_size]),
                    settings,
                    batch_size=self.batch_size,
                    # A fresh stream per batch, a function of the call's seed and of the batch's place in the
                    # call (not in this process's share): the batch one process samples.
                    seed=seed * 100_003 + i,
                    max_prompt_tokens=max_prompt_tokens,
                )
            mine.append(rollout.texts)
            self.tick()
        return [text for batch in self.par.gather(mine) for text in batch]

    def ask(self, questions: Sequence[str], max_new_tokens: int, seed: int) -> list[str]:
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        questions = [[{"role": "user", "content": q}] if chat else q for q in questions]
        return self.write(questions, max_new_tokens, seed, temperature=self.ask_temperature)


# ---- SL-CAI --------------------------------------------------------------------------------------------------


def critique_and_revise(
    prompts: Sequence,
    responses: Sequence[str],
    constitution: Constitution,
    critic: Any,
    *,
    rounds: int,
    rng: random.Random,
    critique_tokens: int,
    revision_tokens: int,
    seed: int = 0,
) -> list[dict]:
    """Steps 2-3 of SL-CAI: `rounds` critique -> revision rounds over every response (Bai et al. 2022, Sec. 3.1).

    critic: anything with `ask(questions, max_new_tokens, seed) -> list[str]` (a `Writer`). Each round draws one
    principle per prompt with `rng` (in prompt order), asks for every critique, then for every revision of the
    current response given its critique; a non-empty revision becomes the current response. Returns one record
    per prompt: prompt, original, principles, critiques, revisions (one per round) and final.

    Across processes every process runs this loop over all the prompts, drawing from its own `rng` seeded alike
    (the same principles everywhere); a `Writer` critic shares out each call's batches among them.
    """
    quoted = [quote(p) for p in prompts]
    current = list(responses)
    records = [
        {"prompt": p, "original": r, "principles": [], "critiques": [], "revisions": []}
        for p, r in zip(prompts, responses)
    ]
    for rnd in range(rounds):
        drawn = [rng.choice(constitution.principles) for _ in prompts]
        questions = [constitution.critique_question(c, q, r) for c, q, r in zip(drawn, quoted, current)]
        critiques = critic.ask(questions, critique_tokens, seed * 1000 + 2 * rnd + 1)
        questions = [
            constitution.revision_question(c, q, r, k)
            for c, q, r, k in zip(drawn, quoted, current, critiques)
        ]
        revisions = critic.ask(questions, revision_tokens, seed * 1000 + 2 * rnd + 2)
        for i, (principle, critique, revision) in enumerate(zip(drawn, critiques, revisions)):
            records[i]["principles"].append(principle.name)
            records[i]["critiques"].append(critique)
            records[i]["revisions"].append(revision)
            if revision.strip():  # an empty revision: the critic wrote nothing, the response stands
                current[i] = revision
    for record, final in zip(records, current):
        record["final"] = final
    return records


def sft_rows(records: Sequence[dict]) -> list[dict]:
    """The SFT data of SL-CAI: (prompt, final revision) of every record whose final response is not empty."""
    return [{"prompt": r["prompt"], "completion": r["final"]} for r in records if r["final"].strip()]


# ---- RL-CAI --------------------------------------------------------------------------------------------------


def _verdicts(prompts, first, second, units, judges, par) -> list[tuple[list[float], list[bool]]]:
    """(p_first, consistent) of every unit (principle, pair indices), each asked by one process, in order."""
    mine = []
    for name, idx in par.shard(units):
        verdict = judges[name].compare(
            [quote(prompts[i]) for i in idx], [first[i] for i in idx], [second[i] for i in idx]
        )
        p_first = torch.as_tensor(verdict.p_first, dtype=torch.float64).tolist()
        mine.append((p_first, torch.as_tensor(verdict.consistent, dtype=torch.bool).tolist()))
    return par.gather(mine)


def label_pairs(
    prompts: Sequence,
    first: Sequence[str],
    second: Sequence[str],
    drawn: Sequence[str],
    judges: Mapping[str, Any],
    *,
    batch_size: int = 0,
    par: Any = None,
) -> tuple[list[dict], dict[str, float]]:
    """Step 2 of RL-CAI: pair i is judged by judges[drawn[i]] (its principle's question), anything with
    `compare(prompts, first, second)` returning p_first (P(first better), both orders averaged) and consistent
    (the same response picked in both orders), as `LMJudge` does (Bai et al. 2022, Sec. 4.1).

    Each principle's pairs are asked in calls of up to `batch_size` pairs (0: all in one call); across processes
    (`par`) each process asks its share of the calls and every process gets every verdict.
    Identical pairs and pairs with an empty response are not asked; exact ties (p_first == 1/2) are dropped.
    Returns (rows {prompt, chosen, rejected, principle, p_chosen}, statistics under feedback/*)."""
    n, par = len(prompts), par if par is not None else DataParallel.one()
    asked = [i for i in range(n) if first[i] != second[i] and first[i].strip() and second[i].strip()]
    units = []
    for name in dict.fromkeys(drawn[i] for i in asked):  # the calls of each principle, in a fixed order
        idx = [i for i in asked if drawn[i] == name]
        size = batch_size or len(idx)
        units += [(name, idx[s : s + size]) for s in range(0, len(idx), size)]
    p_first = torch.full((n,), float("nan"), dtype=torch.float64)
    consistent = torch.zeros(n, dtype=torch.bool)
    for (_, idx), (p, same) in zip(units, _verdicts(prompts, first, second, units, judges, par)):
        p_first[idx] = torch.tensor(p, dtype=torch.float64)
        consistent[idx] = torch.tensor(same, dtype=torch.bool)
    rows = []
    for i in asked:
        p = float(p_first[i])
        if p == 0.5:  # the judge cannot tell them apart: no preference to learn
            continue
        chosen, rejected = (first[i], second[i]) if p > 0.5 else (second[i], first[i])
        rows.append(
            {
                "prompt": prompts[i],
                "chosen": chosen,
                "rejected": rejected,
                "principle": drawn[i],
                "p_chosen": max(p, 1 - p),
            }
        )
    identical = sum(first[i] == second[i] for i in range(n))
    stats = {
        "feedback/pairs": float(n),
        "feedback/identical": float(identical),
        "feedback/empty_response": float(n - len(asked) - identical),
        "feedback/ties": float(len(asked) - len(rows)),
        "feedback/pairs_kept": float(len(rows)),
        "feedback/confidence": sum(r["p_chosen"] for r in rows) / max(len(rows), 1),
        "feedback/position_consistency": float(consistent[asked].float().mean()) if asked else float("nan"),
    }
    return rows, stats


def judges_for(constitution: Constitution, model, tokenizer, *, batch_size: int, name: str) -> dict[str, Any]:
    """One `LMJudge` per principle over one model: the principle's comparison question, the file's answers."""
    from rlhflab.models.judge import LMJudge

    return {
        p.name: LMJudge(
            model,
            tokenizer,
            template=constitution.comparison_template_for(p),
            answers=constitution.answers,
            scale=(),
            batch_size=batch_size,
            name=f"{name}:{p.name}",
        )
        for p in constitution.principles
    }
