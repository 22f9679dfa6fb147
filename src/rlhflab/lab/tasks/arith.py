"""The `arith` task: add two to four one-digit numbers step by step; gold gives partial credit.

Why this task: it is verifiable, so both an outcome reward (is the final answer right?) and a process
reward (which steps are right?) exist, as in the process-vs-outcome supervision literature. A response
looks like "3 + 5 = 8 , 8 + 2 = 10 , answer 10 ." (the word-level tokenizer splits numbers into digits).
The demonstrator slips on a step now and then and carries the slip forward, so its outcome is wrong
more often than any single step is; the base model's corpus is sloppier still and sometimes skips the
steps. The gold reward (in `rlhflab.lab.gold`) is half outcome, half the share of correct steps.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from rlhflab.lab.tasks.base import LabTask, PretrainSpec

PROMPT_TEMPLATES = ("add {e} .", "compute {e} .", "what is {e} ?")
MIN_OPERANDS, MAX_OPERANDS = 2, 4


@dataclass(frozen=True)
class SolverStyle:
    """How a simulated solver writes its answer."""

    p_step_error: float  # per step: the result is off by 1 or 2 (and the slip carries forward)
    p_skip_steps: float  # per response: no steps, only "answer N ."
    p_answer_error: float  # per response: the final answer differs from the last step's result


BASE_STYLE = SolverStyle(p_step_error=0.35, p_skip_steps=0.2, p_answer_error=0.15)
DEMO_STYLE = SolverStyle(p_step_error=0.12, p_skip_steps=0.0, p_answer_error=0.03)
ORACLE_STYLE = SolverStyle(p_step_error=0.0, p_skip_steps=0.0, p_answer_error=0.0)


def prompt_operands(prompt: str) -> list[int]:
    """The numbers a prompt asks to add, in order ("add 3 + 5 + 2 ." -> [3, 5, 2])."""
    return [int(w) for w in prompt.replace("+", " ").split() if w.isdigit()]


def _is_heldout(operands: tuple[int, ...]) -> bool:
    # A stable hash (not Python's salted one) so the split is the same in every process.
    return zlib.crc32(" ".join(map(str, operands)).encode()) % 10 == 0


def _slip(value: int, rng: random.Random) -> int:
    off = rng.choice((-2, -1, 1, 2))
    return value + off if value + off >= 0 else value + abs(off)


def solve(operands: list[int], style: SolverStyle, rng: random.Random) -> str:
    """A step-by-step solution in `style`: "a + b = c , c + d = e , answer e ." (words space-separated)."""
    if rng.random() < style.p_skip_steps:
        total = sum(operands)
        answer = _slip(total, rng) if rng.random() < 0.5 else total
        return f"answer {answer} ."
    steps, running = [], operands[0]
    for x in operands[1:]:
        result = running + x
        if rng.random() < style.p_step_error:
            result = _slip(result, rng)
        steps.append(f"{running} + {x} = {result}")
        running = result
    answer = _slip(running, rng) if rng.random() < style.p_answer_error else running
    return " , ".join(steps) + f" , answer {answer} ."


class ArithTask(LabTask):
    """Multi-step addition with outcome and process rewards (see `rlhflab.lab.gold`)."""

    name = "arith"
    description = (
        "add 2-4 one-digit numbers step by step; gold = half outcome (final answer right), "
        "half process (share of correct steps)"
    )
    version = "1"
    max_new_tokens = 32
    pretrain = PretrainSpec(hidden_size=64, num_layers=2, num_heads=4, default_steps=800, tiny_steps=150)

    def vocabulary(self) -> list[str]:
        words = [str(d) for d in range(10)] + ["+", "=", ",", ".", "?", "answer"]
        for template in PROMPT_TEMPLATES:
            words += template.replace("{e}", "").split()
        return list(dict.fromkeys(words))

    def _prompts(self, n: int, rng: random.Random, heldout: bool) -> list[str]:
        out = []
        while len(out) < n:
            k = rng.randint(MIN_OPERANDS, MAX_OPERANDS)
            operands = tuple(rng.randint(1, 9) for _ in range(k))
            if _is_heldout(operands) != heldout:
                continue
            template = rng.choice(PROMPT_TEMPLATES)
            out.append(template.format(e=" + ".join(map(str, operands))))
        return out

    def train_prompts(self, n: int, seed: int = 0) -> list[str]:
        return self._prompts(n, random.Random(f"arith-train-{seed}"), heldout=False)

    def heldout_prompts(self, n: int, seed: int = 0) -> list[str]:
        return self._prompts(n, random.Random(f"arith-heldout-{seed}"), heldout=True)

    def demonstrations(self, prompts: list[str], seed: int = 0) -> list[str]:
        rng = random.Random(f"arith-demo-{seed}")
        return [solve(prompt_operands(p), DEMO_STYLE, rng) for p in prompts]

    def pretraining_pairs(self, n: int, seed: int = 0) -> list[tuple[str, str]]:
        rng = random.Random(f"arith-pretrain-{seed}")
        prompts = self._prompts(n, rng, heldout=False)
        return [(p, solve(prompt_operands(p), BASE_STYLE, rng)) for p in prompts]

    def oracle_responses(self, prompt: str, n: int, seed: int = 0) -> list[str]:
        return [solve(prompt_operands(prompt), ORACLE_STYLE, random.Random(0))] * n
