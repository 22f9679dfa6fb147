"""The DPO-family stage's wiring between a batch and the pure losses of `rlhflab.losses.preference`.

`rlhflab.losses.preference` is tested on its own; these tests pin what the stage feeds it: which rows are
chosen and which rejected, sums or per-token means, the response lengths, the reference log-probs of the
right rows, and every option of `algo` (beta, label_smoothing, average_logps, simpo_gamma, the KTO
weights and reference point, orpo_lambda, simpo_beta, cpl_alpha, cpl_gamma and cpl_lambda). The stage
runs a row of `preference.PREFERENCE_LOSS_TABLE` with `preference.run_preference_loss`; the table's keyword mapping is
part of the wiring, so the expected values here call the functions with keywords written out by hand.
Two kinds of check:

1. Step-0 values through the real stage (`dpo.train`, policy == reference): closed forms derived by hand.
2. Policy != reference: `dpo.batch_loss` on a batch versus the pure function called on log-probs this
   file computes itself (plain logits, log_softmax, gather on `collate_pairs(stack=True)`'s loss_mask).
   Options take distinct nonzero values and chosen/rejected responses differ in length, so a dropped
   option, a swap of chosen and rejected, or a sum fed where a mean belongs changes the value.
"""

import contextlib
import copy
import functools
import json
import math

import pytest
import torch
from torch.testing import assert_close

from rlhflab.config import DPOAlgo
from rlhflab.data import (
    PairwiseRecord,
    UnpairedRecord,
    collate_pairs,
    collate_unpaired,
    tokenize_pair,
    tokenize_unpaired,
)
from rlhflab.data.tokenize import mismatched_partners
from rlhflab.losses import preference
from rlhflab.losses.preference import PREFERENCE_LOSS_TABLE
from rlhflab.stages import dpo
from rlhflab.stages import reference as ref_cache

from ..helpers import SHORT_TEXT, perturb_, save_model_dir, stage_config, tiny_lm, write_jsonl

CPU = torch.device("cpu")
TOL = {"atol": 1e-5, "rtol": 1e-5}

# (prompt, chosen, rejected): response lengths differ inside every pair, longer chosen in some pairs and
# longer rejected in others, so swapping lengths or halves, or summing instead of averaging, shows.
PAIRS = [
    ("the cat sat on the mat", "the cat is very happy .", "no"),
    ("what is the cat", "sad", "the cat is not very good !"),
    ("i like the dog", "i love the dog", "i hate it , the dog is bad"),
    ("why is the film bad", "the film was very bad , i say no", "it is good"),
    ("hello", "hi", "hello you"),
]
PAIR_BATCH = [3, 0, 4, 1]  # a subset out of order: the cached reference must follow these indices

# (prompt, completion, desirable): both labels in one batch, so the two KTO weights both show.
UNPAIRED = [
    ("the cat sat on the mat", "the cat is very happy .", True),
    ("what is the cat", "sad", False),
    ("i like the dog", "i love the dog", True),
    ("why is the film bad", "the film was very bad , i say no", False),
    ("hello", "hi you", True),
    ("how is the day", "the day was good", True),
]
UNPAIRED_BATCH = [4, 1, 2, 0, 3]

PAIRED_FNS = {
    "dpo": preference.dpo,
    "cdpo": preference.cdpo,
    "robust_dpo": preference.robust_dpo,
    "ipo": preference.ipo,
    "hinge": preference.hinge,
}
SMOOTHED = ("dpo", "cdpo", "robust_dpo")

# (loss, algo options): every option that changes a loss's call, at a distinct nonzero value.
REF_PAIRED_CASES = [
    *[
        (name, {"beta": 0.3, "label_smoothing": 0.2, "average_logps": avg})
        for name in SMOOTHED
        for avg in (False, True)
    ],
    *[(name, {"beta": 0.3, "average_logps": avg}) for name in ("ipo", "hinge") for avg in (False, True)],
]
REF_FREE_CASES = [
    ("orpo", {"orpo_lambda": 0.3}),
    ("simpo", {"simpo_beta": 1.5, "simpo_gamma": 0.3, "label_smoothing": 0.2}),
    ("simpo", {"simpo_beta": 2.5, "simpo_gamma": 0.3}),
    ("cpl", {"cpl_alpha": 0.5, "cpl_gamma": 0.9, "cpl_lambda": 0.6}),
]
KTO_OPTIONS = {"beta": 0.3, "kto_desirable_weight": 1.0, "kto_undesirable_weight": 1.7}
KL_ESTIMATE = 0.4  # z0 handed to batch_loss (a nonzero reference point, so dropping it shows)


def _case_id(case):
    name, options = case
    return name + "".join(f"-{k}={v}" for k, v in options.items())


# ---- Fixtures: one tiny policy and a different reference per module ----------------------------------------


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    """(policy, reference): the reference is the policy with every weight perturbed (fixed seed)."""
    policy = tiny_lm(tiny_tokenizer).eval()
    reference = perturb_(copy.deepcopy(policy).requires_grad_(False), 0.05, seed=1234)
    return policy, reference


@pytest.fixture(scope="module")
def pair_examples(tiny_tokenizer):
    return [tokenize_pair(PairwiseRecord(p, c, r), tiny_tokenizer, max_length=32) for p, c, r in PAIRS]


@pytest.fixture(scope="module")
def unpaired_examples(tiny_tokenizer):
    return [
        tokenize_unpaired(UnpairedRecord(p, c, good), tiny_tokenizer, max_length=32)
        for p, c, good in UNPAIRED
    ]


def _hand_logps(model, batch):
    """Computed here, not by the stage: (sums [R], token counts [R], token log-probs [R, T-1] (0 off the
    response), response mask [R, T-1]) from plain logits of a right-padded batch."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["loss_mask"][:, 1:]
    logps = logps * mask
    return logps.sum(-1), mask.sum(-1), logps, mask


@pytest.fixture(scope="module")
def pair_batch(models, pair_examples, tiny_tokenizer):
    """Hand log-probs of PAIR_BATCH: rows 0..B-1 chosen, B..2B-1 rejected."""
    policy, reference = models
    batch = collate_pairs(
        [pair_examples[i] for i in PAIR_BATCH], pad_token_id=tiny_tokenizer.pad_token_id, stack=True
    )
    sums, counts, tokens, mask = _hand_logps(policy, batch)
    return {
        "sums": sums,
        "counts": counts,
        "tokens": tokens,
        "mask": mask,
        "ref_sums": _hand_logps(reference, batch)[0],
    }


@pytest.fixture(scope="module")
def pair_cache(models, pair_examples, tiny_tokenizer):
    """The stage's own reference cache of every pair (batches of 2, so its length sort matters)."""
    return {
        "train": ref_cache.reference_logps(
            models[1], pair_examples, "pairwise", CPU, tiny_tokenizer.pad_token_id, batch_size=2
        )[0]
    }


def _context(name, options, policy, pad_id, *, reference=None, cache=None):
    live = functools.partial(contextlib.nullcontext, reference) if reference is not None else None
    return dpo.PreferenceContext(
        model=policy,
        row=PREFERENCE_LOSS_TABLE[name],
        algo=DPOAlgo(loss=name, **options),
        device=CPU,
        pad_id=pad_id,
        ref_cache=cache,
        live_ref=live,
    )


def _halves(x):
    b = x.shape[0] // 2
    return x[:b], x[b:]


def _assert_same_output(out, expected):
    """The loss [B] and every metric the stage passes through unchanged."""
    assert_close(out.loss.detach(), expected.loss, **TOL)
    shared = set(out.metrics) & set(expected.metrics)
    for key in shared:
        assert_close(out.metrics[key].detach(), expected.metrics[key], **TOL, msg=key)


# ---- Preconditions and coverage ------------------------------------------------------------------------------


def test_the_batches_can_show_each_mutation(pair_batch, pair_examples):
    """The data the other tests use is not degenerate: every pair's chosen and rejected responses differ in
    length (both ways round), the reference differs from the policy on every row and in the gap h."""
    chosen_n, rejected_n = _halves(pair_batch["counts"])
    assert (chosen_n != rejected_n).all()
    assert (chosen_n > rejected_n).any() and (chosen_n < rejected_n).any()
    diff = pair_batch["sums"] - pair_batch["ref_sums"]
    assert diff.abs().min() > 1e-3
    h = torch.sub(*_halves(diff))
    assert h.abs().min() > 0.1
    assert len(PAIR_BATCH) < len(pair_examples) and sorted(PAIR_BATCH) != PAIR_BATCH


def test_every_loss_in_the_table_has_a_wiring_case():
    """A loss added to the table must get a case here (and in PAIRED_FNS if it takes the paired signature);
    the cases below assume each loss's data kind and whether it reads a reference."""
    covered = {n for n, _ in REF_PAIRED_CASES + REF_FREE_CASES} | {"kto", "bco"}  # both: own files
    assert covered == set(PREFERENCE_LOSS_TABLE)
    assert {n for n, r in PREFERENCE_LOSS_TABLE.items() if r.reference and r.data == "pairwise"} == set(
        PAIRED_FNS
    )
    assert {n for n, r in PREFERENCE_LOSS_TABLE.items() if not r.reference} == {"orpo", "simpo", "cpl"}
    assert PREFERENCE_LOSS_TABLE["kto"].data == "unpaired" and PREFERENCE_LOSS_TABLE["kto"].reference


# ---- 1. Step-0 closed forms through the real stage ---------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer, models):
    return save_model_dir(models[0], tiny_tokenizer, tmp_path_factory.mktemp("wiring") / "tiny-model")


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("wiring-data")
    pairs = write_jsonl(
        root / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    )
    # Unbalanced labels (4 desirable, 2 undesirable), so swapping the KTO weights changes the step's mean.
    unpaired = write_jsonl(
        root / "unpaired.jsonl", [{"prompt": p, "completion": c, "label": good} for p, c, good in UNPAIRED]
    )
    return {"pairwise": pairs, "unpaired": unpaired}


def _train_step0(model_dir, data, out, *extra):
    """One optimizer step on one batch holding every example; returns the logged training row."""
    n = sum(1 for line in data.read_text().splitlines() if line.strip())
    cfg = stage_config(
        "dpo",
        model_dir,
        *SHORT_TEXT,
        f"optim.batch_size={n}",
        "optim.max_steps=1",
        *extra,
        data=data,
        out=out,
    )
    dpo.train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return next(r for r in rows if any(k.startswith("loss/") and k != "loss/grad_norm" for k in r))


# With policy == reference every log-ratio is 0, so h = 0 for the paired losses:
#  dpo (eps = 0.2): (1 - eps)(-log sigma(0)) + eps(-log sigma(-0)) = (1 - eps + eps) log 2 = log 2.
#  cdpo: the same formula, log 2 (cdpo is dpo with label smoothing).
#  robust_dpo (eps = 0.2): [-(1 - eps) log sigma(0) + eps log sigma(0)] / (1 - 2 eps)
#                         = [(1 - eps) log 2 - eps log 2] / (1 - 2 eps) = log 2 for every eps < 1/2.
#  ipo (beta = 0.4): (h - 1/(2 beta))^2 = (1/0.8)^2 = 1.5625.
#  hinge (beta = 0.4): max(0, 1 - beta h) = 1.
#  kto: r = 0 and z0 = max(0, mean(0)) = 0, so each example costs lambda (1 - sigma(0)) = lambda / 2;
#       4 desirable at lambda_D = 1.0 and 2 undesirable at lambda_U = 1.7 over 6: (4 + 3.4) / 6 / 2.
# A stage reading the wrong reference rows (halves or examples swapped) would give h != 0 here.
STEP0 = [
    ("dpo", ["algo.label_smoothing=0.2"], math.log(2)),
    ("cdpo", ["algo.label_smoothing=0.2"], math.log(2)),
    ("robust_dpo", ["algo.label_smoothing=0.2"], math.log(2)),
    ("ipo", ["algo.beta=0.4"], (1 / (2 * 0.4)) ** 2),
    ("hinge", ["algo.beta=0.4"], 1.0),
    (
        "kto",
        ["algo.kto_desirable_weight=1.0", "algo.kto_undesirable_weight=1.7"],
        (4 * 1.0 + 2 * 1.7) / 6 / 2,
    ),
]


@pytest.mark.parametrize("loss, extra, expected", STEP0, ids=[s[0] for s in STEP0])
def test_step0_loss_is_the_closed_form(loss, extra, expected, model_dir, data_files, tmp_path):
    """Policy == reference at the first step: the stage's logged loss is the hand-derived value above."""
    data = data_files[PREFERENCE_LOSS_TABLE[loss].data]
    row = _train_step0(model_dir, data, tmp_path / loss, f"algo.loss={loss}", *extra)
    assert row[f"loss/{loss}"] == pytest.approx(expected, abs=1e-5)
    assert row["reward/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert row["reward/rejected"] == pytest.approx(0.0, abs=1e-5)
    if loss == "kto":
        assert row["kl/reference_point"] == pytest.approx(0.0, abs=1e-6)
    else:
        assert row["reward/margin"] == pytest.approx(0.0, abs=1e-5)


# ---- 2. Policy != reference: the stage's loss of a batch versus the pure function by hand -----------------


def test_cached_reference_rows_follow_the_batch(pair_cache, pair_batch):
    """The cache holds (chosen, rejected) per example; a batch's rows are its chosen then its rejected
    response, in the batch's example order."""
    rows = ref_cache.cache_rows(pair_cache["train"], PAIR_BATCH)
    assert_close(rows, pair_batch["ref_sums"], **TOL)


@pytest.mark.parametrize("ref_mode", ["cache", "live"])
@pytest.mark.parametrize("case", REF_PAIRED_CASES, ids=_case_id)
def test_reference_loss_matches_the_pure_function(
    case, ref_mode, models, pair_examples, pair_batch, pair_cache, tiny_tokenizer
):
    """dpo/cdpo/robust_dpo/ipo/hinge: fn(pc, pr, rc, rr, beta, [label_smoothing]) on sums, or on
    per-token means (sum / response length) with average_logps, policy and reference alike."""
    name, options = case
    policy, reference = models
    ctx = _context(
        name,
        options,
        policy,
        tiny_tokenizer.pad_token_id,
        **({"cache": pair_cache} if ref_mode == "cache" else {"reference": reference}),
    )
    out, _ = dpo.batch_loss(ctx, "train", pair_examples, PAIR_BATCH)

    pol, ref, n = pair_batch["sums"], pair_batch["ref_sums"], pair_batch["counts"].float()
    if options["average_logps"]:
        pol, ref = pol / n, ref / n
    kw = {"label_smoothing": options["label_smoothing"]} if name in SMOOTHED else {}
    expected = PAIRED_FNS[name](*_halves(pol), *_halves(ref), beta=options["beta"], **kw)
    _assert_same_output(out, expected)


@pytest.mark.parametrize("case", REF_FREE_CASES, ids=_case_id)
def test_reference_free_loss_matches_the_pure_function(
    case, models, pair_examples, pair_batch, tiny_tokenizer
):
    """orpo: per-token means, lambda = orpo_lambda; simpo: sums with the chosen and rejected lengths,
    beta = simpo_beta, gamma = simpo_gamma and label smoothing; cpl: token log-probs and masks,
    alpha = cpl_alpha, gamma = cpl_gamma, lambda = cpl_lambda. No reference."""
    name, options = case
    ctx = _context(name, options, models[0], tiny_tokenizer.pad_token_id)
    out, _ = dpo.batch_loss(ctx, "train", pair_examples, PAIR_BATCH)

    sums, n = pair_batch["sums"], pair_batch["counts"]
    if name == "orpo":
        expected = preference.orpo(*_halves(sums / n.float()), beta=options["orpo_lambda"])
    elif name == "simpo":
        expected = preference.simpo(
            *_halves(sums),
            *_halves(n),
            beta=options["simpo_beta"],
            gamma=options["simpo_gamma"],
            label_smoothing=options.get("label_smoothing", 0.0),
        )
    else:
        (tc, tr), (mc, mr) = _halves(pair_batch["tokens"]), _halves(pair_batch["mask"])
        expected = preference.cpl(
            tc,
            mc,
            tr,
            mr,
            alpha=options["cpl_alpha"],
            gamma=options["cpl_gamma"],
            conservative_lambda=options["cpl_lambda"],
        )
    _assert_same_output(out, expected)


def _kto_by_hand(policy_logps, ref_logps, desirable, z0):
    """The pure KTO loss with KTO_OPTIONS' beta and weights passed by keyword, as written out by hand."""
    return preference.kto(
        policy_logps,
        ref_logps,
        desirable,
        z0,
        beta=KTO_OPTIONS["beta"],
        desirable_weight=KTO_OPTIONS["kto_desirable_weight"],
        undesirable_weight=KTO_OPTIONS["kto_undesirable_weight"],
    )


@pytest.mark.parametrize("ref_mode", ["cache", "live"])
def test_kto_loss_matches_the_pure_function(ref_mode, models, unpaired_examples, tiny_tokenizer):
    """kto(policy sums, reference sums of the same rows, labels, z0, beta, lambda_D, lambda_U) with the z0
    handed to batch_loss; per-kind rewards are beta * r on the rows of that kind (NaN elsewhere)."""
    policy, reference = models
    pad_id = tiny_tokenizer.pad_token_id
    kw = (
        {
            "cache": {
                "train": ref_cache.reference_logps(
                    reference, unpaired_examples, "unpaired", CPU, pad_id, batch_size=2
                )[0]
            }
        }
        if ref_mode == "cache"
        else {"reference": reference}
    )
    ctx = _context("kto", KTO_OPTIONS, policy, pad_id, **kw)
    out, _ = dpo.batch_loss(
        ctx, "train", unpaired_examples, UNPAIRED_BATCH, kl_estimate=torch.tensor(KL_ESTIMATE)
    )

    batch = collate_unpaired([unpaired_examples[i] for i in UNPAIRED_BATCH], pad_token_id=pad_id)
    pol, ref = _hand_logps(policy, batch)[0], _hand_logps(reference, batch)[0]
    good = batch["label"]
    assert good.any() and not good.all()
    expected = _kto_by_hand(pol, ref, good, KL_ESTIMATE)
    _assert_same_output(out, expected)
    implicit = KTO_OPTIONS["beta"] * (pol - ref)
    assert_close(out.metrics["reward/chosen"][good], implicit[good], **TOL)
    assert_close(out.metrics["reward/rejected"][~good], implicit[~good], **TOL)
    assert (
        out.metrics["reward/chosen"][~good].isnan().all()
        and out.metrics["reward/rejected"][good].isnan().all()
    )


def test_kto_evaluate_feeds_the_kl_reference_point(models, unpaired_examples, tiny_tokenizer):
    """evaluate() computes z0 = max(0, mean(policy - reference)) over the mismatched (prompt, other
    completion) rows and hands it to every batch's KTO loss; eval/loss is the mean over examples."""
    policy, reference = models
    pad_id = tiny_tokenizer.pad_token_id
    partners = mismatched_partners([p for p, _, _ in UNPAIRED])
    kl_examples = [
        tokenize_unpaired(UnpairedRecord(p, UNPAIRED[j][1], good), tiny_tokenizer, max_length=32)
        for (p, _, good), j in zip(UNPAIRED, partners)
    ]
    cache = {
        split: ref_cache.reference_logps(reference, ex, "unpaired", CPU, pad_id, batch_size=2)[0]
        for split, ex in (("eval", unpaired_examples), ("eval_kl", kl_examples))
    }
    ctx = _context("kto", KTO_OPTIONS, policy, pad_id, cache=cache)
    metrics = dpo.evaluate(ctx, unpaired_examples, kl_examples, batch_size=4)

    kl_batch = collate_unpaired(kl_examples, pad_token_id=pad_id)
    z0 = (_hand_logps(policy, kl_batch)[0] - _hand_logps(reference, kl_batch)[0]).mean().clamp(min=0)
    assert z0 > 0.05  # a reference point that matters, so dropping it shows
    batch = collate_unpaired(unpaired_examples, pad_token_id=pad_id)
    expected = _kto_by_hand(
        _hand_logps(policy, batch)[0], _hand_logps(reference, batch)[0], batch["label"], z0
    )
    assert metrics["eval/kl/reference_point"] == pytest.approx(float(z0), abs=1e-5)
    assert metrics["eval/loss"] == pytest.approx(float(expected.loss.mean()), abs=1e-5)
