"""The DPO stage's BCO wiring: the running reward shift delta, the batch loss, and delta across --resume.

`rlhflab.losses.preference.bco` and `BCORewardShift` are tested on their own (tests/losses); these tests pin
what the stage does with them:

1. Step 0 through the real stage (policy == reference, delta = 0): every example costs log 2.
2. Policy != reference: the stage's batch loss versus `bco` called on log-probs this file computes itself,
   with a nonzero delta; one optimizer step's forward passes (split into uneven micro-batches) fold exactly
   the step's implicit rewards into delta, after the step used the previous delta.
3. --resume restores delta: a run interrupted after its checkpoint and resumed ends with the same weights
   and logs the same delta as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from rlhflab.config import DPOAlgo, load_config
from rlhflab.core.checkpoint import latest_checkpoint
from rlhflab.data import UnpairedRecord, collate_unpaired, tokenize_unpaired
from rlhflab.losses import preference
from rlhflab.losses.preference import PREFERENCE_LOSS_TABLE, BCORewardShift
from rlhflab.models.tiny import tiny_causal_lm
from rlhflab.stages import dpo
from rlhflab.stages import reference as ref_cache
from rlhflab.stages.reference import REF_CACHE

CPU = torch.device("cpu")
TOL = {"atol": 1e-5, "rtol": 1e-5}
BETA = 0.3
SHIFT = 0.07  # a delta handed to the stage (nonzero, so dropping or mis-scaling it shows)

# (prompt, completion, desirable): 4 desirable, 2 undesirable, completions of different lengths.
UNPAIRED = [
    ("the cat sat on the mat", "the cat is very happy .", True),
    ("what is the cat", "sad", False),
    ("i like the dog", "i love the dog", True),
    ("why is the film bad", "the film was very bad , i say no", False),
    ("hello", "hi you", True),
    ("how is the day", "the day was good", True),
]
BATCH = [4, 1, 2, 0, 3]  # a subset out of order: the cached reference must follow these indices


# ---- Fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    """(policy, reference): the reference is the policy with every weight perturbed (fixed seed)."""
    policy = tiny_causal_lm(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=0).eval()
    reference = copy.deepcopy(policy).requires_grad_(False)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return policy, reference


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    return [
        tokenize_unpaired(UnpairedRecord(p, c, good), tiny_tokenizer, max_length=32)
        for p, c, good in UNPAIRED
    ]


def _hand_sums(model, batch):
    """Summed response log-probs [R], computed here from plain logits of a right-padded batch."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["loss_mask"][:, 1:]).sum(-1)


def _context(policy, pad_id, shift, *, reference=None, cache=None):
    live = functools.partial(contextlib.nullcontext, reference) if reference is not None else None
    return dpo.PreferenceContext(
        model=policy,
        row=PREFERENCE_LOSS_TABLE["bco"],
        algo=DPOAlgo(loss="bco", beta=BETA),
        device=CPU,
        pad_id=pad_id,
        ref_cache=cache,
        live_ref=live,
        reward_shift=shift,
    )


def _shift_at(value: float) -> BCORewardShift:
    shift = BCORewardShift()
    shift.load_state_dict({"value": value, "count": 10})
    return shift


# ---- 1. Step 0 through the real stage ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer, models):
    out = tmp_path_factory.mktemp("bco") / "tiny-model"
    models[0].save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bco-data") / "unpaired.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": p, "completion": c, "label": g}) + "\n" for p, c, g in UNPAIRED)
    )
    return path


def _cfg(model_dir, data, out, *extra):
    return load_config(
        "dpo",
        None,
        [
            f"model.name_or_path={model_dir}",
            f"data.train_path={data}",
            f"logging.output_dir={out}",
            "data.max_length=32",
            "data.max_prompt_length=16",
            "optim.lr=1e-2",
            "logging.log_every=1",
            "logging.progress=false",
            "logging.tensorboard=false",
            "model.device=cpu",
            "algo.loss=bco",
            f"algo.beta={BETA}",
            *extra,
        ],
    )


def _rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss/bco" in r]


def test_step0_loss_is_log2_with_no_shift(model_dir, data_file, tmp_path):
    """Policy == reference: r = 0 for every example and delta starts at 0, so each example costs
    -log sigma(0) = log 2; accuracy = the share of undesirable examples (r = 0 is not above delta = 0) = 2/6.
    BCO reads no mismatched KL rows: the reference cache holds none (KTO's train_kl / eval_kl)."""
    out = tmp_path / "run"
    dpo.train(_cfg(model_dir, data_file, out, "optim.batch_size=6", "optim.max_steps=1"))
    (row,) = _rows(out)
    assert row["loss/bco"] == pytest.approx(math.log(2), abs=1e-5)
    assert row["reward/shift"] == 0.0
    assert row["reward/implicit"] == pytest.approx(0.0, abs=1e-6)
    assert row["reward/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert row["reward/rejected"] == pytest.approx(0.0, abs=1e-6)
    assert row["reward/accuracy"] == pytest.approx(2 / 6)
    assert "kl/reference_point" not in row
    cached = set(torch.load(out / REF_CACHE, weights_only=True)["logps"])
    assert "train" in cached and not any(split.endswith("_kl") for split in cached)


# ---- 2. Policy != reference: the batch loss and the shift update versus the pure functions ----------------


@pytest.mark.parametrize("ref_mode", ["cache", "live"])
def test_batch_loss_matches_the_pure_function(ref_mode, models, examples, tiny_tokenizer):
    """bco(policy sums, reference sums of the same rows, labels, delta = the context's shift, beta)."""
    policy, reference = models
    pad_id = tiny_tokenizer.pad_token_id
    kw = (
        {
            "cache": {
                "train": ref_cache.reference_logps(
                    reference, examples, "unpaired", CPU, pad_id, batch_size=2
                )[0]
            }
        }
        if ref_mode == "cache"
        else {"reference": reference}
    )
    ctx = _context(policy, pad_id, _shift_at(SHIFT), **kw)
    out, _ = dpo.batch_loss(ctx, "train", examples, BATCH)

    batch = collate_unpaired([examples[i] for i in BATCH], pad_token_id=pad_id)
    pol, ref, good = _hand_sums(policy, batch), _hand_sums(reference, batch), batch["label"]
    assert good.any() and not good.all()
    assert (pol - ref).abs().min() > 1e-3  # the reference differs on every row
    expected = preference.bco(pol, ref, good, SHIFT, beta=BETA)
    assert_close(out.loss.detach(), expected.loss, **TOL)
    assert_close(out.metrics["reward/implicit"], BETA * (pol - ref), **TOL)
    assert_close(out.metrics["reward/shift"], torch.full((len(BATCH),), SHIFT), **TOL)
    assert_close(out.metrics["reward/chosen"][good], BETA * (pol - ref)[good], **TOL)
    assert out.metrics["reward/chosen"][~good].isnan().all()


def test_a_step_folds_its_rewards_into_the_shift(models, examples, tiny_tokenizer):
    """One optimizer step's forward/backward over BATCH in micro-batches of 2 (2 + 2 + 1): the loss uses the
    delta from before the step, then delta = (10 x SHIFT + sum of the step's 5 rewards) / 15."""
    policy, reference = models
    policy = copy.deepcopy(policy)  # the step's backward fills .grad; keep the shared policy clean
    pad_id = tiny_tokenizer.pad_token_id
    shift = _shift_at(SHIFT)
    ctx = _context(policy, pad_id, shift, reference=reference)
    metrics, _, forward_only = dpo._preference_gradients(
        ctx, examples, None, BATCH, 2, step=1, last_ckpt=None
    )

    batch = collate_unpaired([examples[i] for i in BATCH], pad_token_id=pad_id)
    rewards = BETA * (_hand_sums(policy, batch) - _hand_sums(reference, batch))
    expected = preference.bco(
        _hand_sums(policy, batch), _hand_sums(reference, batch), batch["label"], SHIFT, beta=BETA
    )
    assert metrics["loss/bco"] == pytest.approx(float(expected.loss.mean()), abs=1e-5)
    assert metrics["reward/shift"] == pytest.approx(SHIFT)
    assert shift.count == 15
    assert shift.value == pytest.approx((10 * SHIFT + float(rewards.sum())) / 15, abs=1e-6)
    assert forward_only == 0  # no KL rows


# ---- 3. --resume restores the shift -------------------------------------------------------------------------


def test_resume_restores_the_shift(model_dir, data_file, tmp_path, monkeypatch):
    """4 steps of 3 examples (micro-batches of 1), a checkpoint at step 2. Run b crashes in step 3 and resumes
    from the checkpoint: with delta restored it ends with run a's weights and logs run a's deltas. delta is
    0 at step 1 (nothing seen yet) and at step 2 (policy == reference at step 1), nonzero from step 3 on."""
    common = ["optim.batch_size=3", "optim.micro_batch_size=1", "optim.max_steps=4", "logging.save_every=2"]
    final_a = dpo.train(_cfg(model_dir, data_file, tmp_path / "a", *common))
    deltas_a = [r["reward/shift"] for r in _rows(tmp_path / "a")]
    assert deltas_a[:2] == [0.0, pytest.approx(0.0, abs=1e-7)]
    assert abs(deltas_a[2]) > 1e-4 and deltas_a[3] != deltas_a[2]

    calls = {"n": 0}
    real_step = dpo.optimizer_step

    def crash_on_third(optimizer, scheduler):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real_step(optimizer, scheduler)

    monkeypatch.setattr(dpo, "optimizer_step", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        dpo.train(_cfg(model_dir, data_file, tmp_path / "b", *common))
    monkeypatch.setattr(dpo, "optimizer_step", real_step)
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt.name == "step-00000002"
    saved = torch.load(ckpt / "trainer_state.pt", weights_only=False)["state"]["reward_shift"]
    assert saved["count"] == 6 and saved["value"] == pytest.approx(deltas_a[2], abs=1e-9)

    final_b = dpo.train(_cfg(model_dir, data_file, tmp_path / "b", *common), resume=True)
    assert [r["reward/shift"] for r in _rows(tmp_path / "b")][-2:] == pytest.approx(deltas_a[2:], abs=1e-9)
    a = AutoModelForCausalLM.from_pretrained(final_a).state_dict()
    b = AutoModelForCausalLM.from_pretrained(final_b).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
