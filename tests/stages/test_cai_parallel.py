"""Constitutional AI across processes (`rlhflab cai sl|rl` under `torchrun`, `stages.cai_sampling`): each process
writes and judges its share of every call's batches, exactly as one process does, and every process gets all
the answers back in order; W processes write the files one process writes, byte for byte, and the stages they
call end at one process's models."""

from __future__ import annotations

import contextlib
import json
import random
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhflab.cli import main
from rlhflab.config import load_config
from rlhflab.core.metrics_log import read_metrics
from rlhflab.errors import ConfigError
from rlhflab.lab.tasks import get_task
from rlhflab.lab.tasks import harm as H
from rlhflab.stages import cai
from rlhflab.stages.constitution import load_constitution
from rlhflab.stages.parallel import DataParallel

from ..helpers import save_model_dir, tiny_lm, write_jsonl
from .test_parallel import LAUNCHERS, _assert_same_weights, _launch, _ThreadPar

HARM = Path(__file__).resolve().parents[2] / "configs" / "constitution_harm.yaml"


@pytest.fixture(scope="module")
def harm_model_dir(tmp_path_factory):
    """A tiny untrained LM over the harm task's words (its tokenizer, chat template and the answer words a / b),
    its matrices scaled up: at initialization its next-token distribution hardly moves with the context, so
    that a critique asked under the wrong principle would come out as the right one's (the same draws)."""
    tokenizer = get_task("harm").build_tokenizer()
    model = tiny_lm(tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    return save_model_dir(model, tokenizer, tmp_path_factory.mktemp("harm") / "model")


def _prompts(n: int) -> list:
    """n chat prompts of the harm task, risky and benign."""
    texts = [p for _, p in H.RISKY_PROMPTS[::2]][: (n + 1) // 2] + list(H.BENIGN_PROMPTS[: n // 2])
    return [[{"role": "user", "content": p}] for p in texts]


class _GatherPar(_ThreadPar):
    """Rank `rank` of 2 in a thread, whose `gather` puts the two threads' shares back in order as
    `DataParallel.gather` does (a barrier stands for the all-gather). The threads take turns between gathers
    (`turn`): seeded sampling forks torch's one global RNG, which two processes each have but two threads share."""

    def __init__(self, rank, slots, barrier, turn):
        super().__init__(rank, slots, barrier)
        self.turn = turn

    def gather(self, items):
        self.turn.release()
        self.barrier.wait()  # the other thread has read the last gather's slots
        self.slots[self.rank] = list(items)
        self.barrier.wait()
        parts = list(self.slots)
        self.turn.acquire()
        n = sum(len(p) for p in parts)
        return [parts[i % 2][i // 2] for i in range(n)]


def _in_two_threads(work) -> list:
    """work(par) in two threads standing for two processes; their results, rank 0's first."""
    slots, barrier, turn = [None, None], threading.Barrier(2), threading.Lock()
    out, errors = [None, None], []

    def run(rank):
        turn.acquire()
        try:
            out[rank] = work(_GatherPar(rank, slots, barrier, turn))
        except BaseException as e:  # a failed thread must fail the test, not hang the other at a barrier
            errors.append(e)
            barrier.abort()
        finally:
            turn.release()

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


@contextlib.contextmanager
def _one_thread():
    """The main process's own computation on one thread, as each launched process runs (OMP_NUM_THREADS=1):
    a matrix product may add in another order on two, which the judge's probabilities would show."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---- each call's batches shared out, gathered back in order --------------------------------------------------


def test_critiques_and_revisions_shared_out_are_one_process_s(harm_model_dir):
    """5 prompts in batches of 2 (3 batches a call: rank 0 writes batches 0 and 2, rank 1 batch 1) through a
    response call and 2 critique -> revision rounds: every process ends with one process's records, principles
    included, having written only its share of every call."""
    cfg = load_config("cai-sl", overrides=["model.device=cpu", "sampling.max_new_tokens=6"])
    constitution, prompts = load_constitution(HARM), _prompts(5)

    # The models are loaded here: transformers' loading is not thread-safe (it builds on the meta device).
    writers = [cai.Writer(str(harm_model_dir), cfg.model, cfg.sampling, 2) for _ in range(3)]

    def work(par=None):
        writer, ticks = writers[2 if par is None else par.rank], []
        writer.tick = lambda: ticks.append(1)
        writer.par = par if par is not None else writer.par
        originals = writer.write(prompts, 6, seed=3)
        records = cai.critique_and_revise(
            prompts, originals, constitution, writer, rounds=2, rng=random.Random(5),
            critique_tokens=6, revision_tokens=6, seed=3,
        )  # fmt: skip
        return records, len(ticks)

    with _one_thread():
        one, calls = work()
        (rank0, calls0), (rank1, calls1) = _in_two_threads(work)
    assert rank0 == rank1 == one and len(one) == 5
    assert (calls, calls0, calls1) == (5 * 3, 5 * 2, 5 * 1)  # 5 calls of 3 batches, shared 2 : 1
    assert len({r["original"] for r in one}) > 1 and any(r["final"] != r["original"] for r in one)
    assert len({name for r in one for name in r["principles"]}) > 1  # drawn at random, the same on both


class _RecordingJudge:
    """P(first better) a function of the texts alone; it records the pairs it was asked, call by call."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def compare(self, prompts, first, second):
        self.calls.append(list(first))
        p = torch.tensor([(len(a) % 5) / 4 for a in first], dtype=torch.float64)
        return SimpleNamespace(p_first=p, consistent=p > 0.5)


def test_labels_shared_out_by_calls_are_one_process_s():
    """The comparison calls (up to batch_size pairs of one principle) are shared out: each is asked once, by one
    process, and every process gets one process's rows and statistics."""
    n = 11
    prompts = [f"q{i}" for i in range(n)]
    first = [f"answer {'x' * i}" for i in range(n)]
    second = [f"other {i}" for i in range(n)]
    second[3] = first[3]  # identical: never asked
    drawn = [("harmless", "polite")[i % 3 == 0] for i in range(n)]

    def work(par=None, batch_size=2):
        judges = {"harmless": _RecordingJudge(), "polite": _RecordingJudge()}
        rows, stats = cai.label_pairs(prompts, first, second, drawn, judges, batch_size=batch_size, par=par)
        return rows, stats, {k: j.calls for k, j in judges.items()}

    rows, stats, asked = work()
    assert [len(c) for c in asked["harmless"]] == [2, 2, 2, 1] and [len(c) for c in asked["polite"]] == [2, 1]
    whole = work(batch_size=0)  # one call per principle: the same labels
    assert whole[:2] == (rows, stats) and [len(c) for c in whole[2]["harmless"]] == [7]
    (rows0, stats0, asked0), (rows1, stats1, asked1) = _in_two_threads(work)
    assert rows0 == rows1 == rows and stats0 == stats1 == stats and rows
    # Calls 0, 2, 4 of the fixed order (harmless' 4, then polite's 2) are rank 0's; 1, 3, 5 rank 1's.
    assert asked0 == {"harmless": asked["harmless"][0::2], "polite": asked["polite"][:1]}
    assert asked1 == {"harmless": asked["harmless"][1::2], "polite": asked["polite"][1:]}


@pytest.mark.parametrize(
    ("phase", "override", "key"),
    [
        ("sl", "sft.optim.batch_size=1", "sft.optim.batch_size"),
        ("rl", "rm.optim.batch_size=1", "rm.optim.batch_size"),
        ("rl", "ppo.algo.rollout_batch_size=1 ppo.algo.minibatch_size=1", "ppo.algo.rollout_batch_size"),
    ],
)
def test_a_called_stages_batch_too_small_for_the_processes_is_refused_before_sampling(
    phase, override, key, monkeypatch, tmp_path
):
    """Each process needs a share of every step of the stage called last: refused at once, one line naming the
    key, not after minutes of sampling (no model is loaded: the policy does not exist)."""
    par = DataParallel.__new__(DataParallel)
    par.rank, par.world = 0, 2
    monkeypatch.setattr(cai, "DataParallel", lambda: par)
    cfg = load_config(
        f"cai-{phase}",
        overrides=[
            f"principles={HARM}",
            "model.name_or_path=missing",
            f"logging.output_dir={tmp_path}",
            *override.split(),
        ],
    )
    with pytest.raises(ConfigError, match=rf"^config: {key}=1 is smaller than the 2 processes; [^\n]*$"):
        cai.train(cfg)
    assert not (tmp_path / "config.yaml").exists()


# ---- 2 processes (torchrun) write and train as 1 -------------------------------------------------------------


def _one_and_two(phase: str, args: list[str], tmp_path: Path, capsys) -> str:
    """`rlhflab cai PHASE` in this process (into tmp_path/one) and in 2 under torchrun (tmp_path/two); both
    succeed; returns the two processes' stdout."""
    with _one_thread():
        code = main(["cai", phase, *args, f"logging.output_dir={tmp_path / 'one'}"])
    assert code == 0, capsys.readouterr().err
    out = _launch(
        LAUNCHERS["torchrun"], ["cai", phase, *args, f"logging.output_dir={tmp_path / 'two'}"], tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "data parallel over 2 processes" in out.stdout
    return out.stdout


def _same_file(tmp_path: Path, name: str) -> list[dict]:
    one, two = ((tmp_path / run / name).read_bytes() for run in ("one", "two"))
    assert two == one, name
    return [json.loads(line) for line in one.decode().splitlines()]


def _summary(tmp_path: Path, run: str) -> dict:
    row = read_metrics(tmp_path / run / "metrics.jsonl")[-1]
    return {k: v for k, v in row.items() if k.startswith("feedback/")}


@pytest.mark.slow
def test_cai_sl_on_two_processes_writes_and_trains_as_one(harm_model_dir, tmp_path, capsys):
    """6 prompts in batches of 4 rows (each call's 2 batches split 1 : 1), 2 critique -> revision rounds: the
    revisions and SFT data are one process's byte for byte, written once; the SFT run on them takes one
    process's steps (final weights to 1e-5); the run's summary is printed and logged once."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in _prompts(6)])
    args = [
        f"model.name_or_path={harm_model_dir}", f"principles={HARM}", f"data.train_path={prompts}",
        "model.device=cpu", "logging.progress=false", "algo.batch_size=4", "algo.revisions=2",
        "algo.critique_max_new_tokens=6", "sampling.max_new_tokens=6", "sft.optim.batch_size=4",
        "sft.optim.max_steps=2", "sft.optim.lr=2e-3", "sft.logging.progress=false", "sft.logging.log_every=1",
    ]  # fmt: skip
    out = _one_and_two("sl", args, tmp_path, capsys)
    assert out.count("cai-sl: 6 prompts") == 1 and out.count("cai-sl: the SL-CAI model is") == 1
    records = _same_file(tmp_path, "revisions.jsonl")
    sft_data = _same_file(tmp_path, "sft.jsonl")
    assert len(records) == 6 and len(sft_data) >= 4 and len({r["original"] for r in records}) > 1
    _assert_same_weights(
        tmp_path / "one" / "sft" / "final", tmp_path / "two" / "sft" / "final", harm_model_dir
    )
    steps = [r["step"] for r in read_metrics(tmp_path / "two" / "sft" / "metrics.jsonl") if "loss/sft" in r]
    assert steps == [1, 2]  # the SFT run trained, logged once
    assert _summary(tmp_path, "two") == _summary(tmp_path, "one") and _summary(tmp_path, "one")


@pytest.mark.slow
def test_cai_rl_on_two_processes_labels_and_trains_as_one(harm_model_dir, tmp_path, capsys):
    """8 prompts x 2 samples in batches of 4 rows (2 : 2 of each call's 4 batches), compared in calls of up to 4
    pairs of a principle: the pairs file is one process's byte for byte (the judge's probabilities too), written
    once; the rm and ppo stages take one process's steps (each final model to 1e-5)."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in _prompts(8)])
    args = [
        f"model.name_or_path={harm_model_dir}", f"principles={HARM}", f"data.train_path={prompts}",
        "model.device=cpu", "logging.progress=false", "algo.batch_size=4", "sampling.max_new_tokens=6",
        "rm.optim.batch_size=2", "rm.optim.max_steps=3", "rm.optim.lr=5e-4", "rm.algo.normalization_samples=0",
        "rm.logging.progress=false", "ppo.algo.iterations=2", "ppo.algo.rollout_batch_size=4",
        "ppo.algo.minibatch_size=4", "ppo.algo.ppo_epochs=2", "ppo.sampling.max_new_tokens=6", "ppo.optim.lr=5e-4",
        "ppo.logging.progress=false",
    ]  # fmt: skip
    out = _one_and_two("rl", args, tmp_path, capsys)
    assert out.count("cai-rl: 8 prompts x 2 samples") == 1 and out.count("cai-rl: AI feedback") == 1
    assert out.count("cai-rl: the RL-CAI policy is") == 1
    pairs = _same_file(tmp_path, "pairs.jsonl")
    assert len(pairs) >= 2 and len({p["principle"] for p in pairs}) > 1
    assert all(0.5 < p["p_chosen"] <= 1 for p in pairs)
    for stage in ("rm", "ppo"):
        _assert_same_weights(
            tmp_path / "one" / stage / "final", tmp_path / "two" / stage / "final", harm_model_dir
        )
    assert _summary(tmp_path, "two") == _summary(tmp_path, "one") and _summary(tmp_path, "one")
