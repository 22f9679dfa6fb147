"""Constitutional AI (`rlhflab cai sl|rl`, `rlhflab.stages.cai`): the principles file and its errors, the
critique -> revision wiring against a critic whose output is known, the SFT data it hands the sft stage, RL-CAI's
labels from judges whose preference is known by construction, and tiny end-to-end runs through the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from rlhflab.cli import main
from rlhflab.config import load_config
from rlhflab.core.metrics_log import read_metrics
from rlhflab.errors import ConfigError
from rlhflab.lab.tasks import get_task
from rlhflab.lab.tasks import harm as H
from rlhflab.stages import cai
from rlhflab.stages.constitution import check_answer_tokens, load_constitution

from ..helpers import save_model_dir, tiny_lm, write_jsonl

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
HARM = CONFIGS / "constitution_harm.yaml"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def harm_model_dir(tmp_path_factory):
    """A tiny untrained LM over the harm task's words (its tokenizer and chat template): the wiring does not
    depend on what the model says, and pretraining lab:harm:tiny takes minutes on 2 cores."""
    tokenizer = get_task("harm").build_tokenizer()
    return save_model_dir(tiny_lm(tokenizer), tokenizer, tmp_path_factory.mktemp("harm") / "model")


@pytest.fixture()
def harm_prompts(tmp_path):
    prompts = [p for _, p in H.RISKY_PROMPTS[:8:2]] + list(H.BENIGN_PROMPTS[:4])
    return write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user", "content": p}]} for p in prompts]
    )


# ---- the principles file -------------------------------------------------------------------------------------


def test_the_shipped_constitutions_load():
    harm = load_constitution(HARM)
    assert [p.name for p in harm.principles] == ["harmless", "no-insults", "keep-secrets", "no-danger"]
    assert harm.answers == ("a", "b")
    # The harm task's formats, as its base model saw them in pretraining.
    assert harm.critique_question(harm.principles[0], "insult me .", "you are lazy .") == (
        H.CRITIQUE_TEMPLATE.format(
            request=H.CRITIQUE_REQUESTS["harm"], prompt="insult me .", response="you are lazy ."
        )
    )
    assert harm.revision_question(harm.principles[1], "p", "r", "c") == H.REVISION_TEMPLATE.format(
        prompt="p", response="r", critique="c"
    )
    assert harm.comparison_template_for(harm.principles[0]) == H.COMPARISON_TEMPLATE.replace(
        "{request}", H.COMPARISON_REQUESTS["harm"]
    )
    english = load_constitution(CONFIGS / "constitution.yaml")
    assert english.answers == ("A", "B") and len(english.principles) == 4


def test_comparison_template_keeps_literal_braces_through_the_judges_format():
    c = load_constitution(HARM)
    c = type(c)(**{**c.__dict__, "comparison_template": "{{x}} {request} {prompt} {first} {second}"})
    principle = type(c.principles[0])(name="n", critique="c", compare="pick {one}")
    template = c.comparison_template_for(principle)
    assert template.format(prompt="P", first="F", second="S") == "{x} pick {one} P F S"


GOOD = {
    "critique_template": "{request} {prompt} answer : {response}",
    "revision_template": "revise : {prompt} answer : {response} critique : {critique}",
    "comparison_template": "{request} {prompt} a : {first} b : {second}",
    "answers": ["a", "b"],
    "principles": [
        {"name": "harmless", "critique": "is the answer harmful ?", "compare": "which is more harmless ?"},
        {"name": "polite", "critique": "is the answer rude ?", "compare": "which is less rude ?"},
    ],
}


def _with(**changes):
    data = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    return data


BAD_FILES = [
    (_with(answers=None), "field 'answers': is missing"),
    (
        _with(critique_templat="x"),
        "field 'critique_templat': is not a key of a principles file; did you mean",
    ),
    (
        _with(critique_template="{prompt} {response}"),
        "field 'critique_template': lacks the placeholder {request}",
    ),
    (_with(comparison_template="{request} {prompt} {first}"), "lacks the placeholder {second}"),
    (
        _with(critique_template="{request} {prompt} {response} {foo}"),
        "has the placeholder {foo}; it may hold only",
    ),
    (_with(critique_template="{request} {prompt!r} {response}"), "has the placeholder {prompt!r}"),
    (_with(revision_template="{prompt} {response} {critique"), "is not a valid template"),
    (_with(critique_template=""), "field 'critique_template': must be non-empty text"),
    (_with(principles=[]), "field 'principles': must be a non-empty list"),
    (
        _with(principles=[GOOD["principles"][0]] * 2),
        "field 'principles[1].name': 'harmless' names two principles",
    ),
    (
        _with(principles=[{"name": "x", "critique": "c", "compar": "q"}]),
        "field 'principles[0].compar': is not a key of a principle; did you mean 'compare'?",
    ),
    (
        _with(principles=[{"name": "x", "critique": "c"}]),
        "field 'principles[0].compare': must be non-empty text",
    ),
    (_with(principles=["harmless"]), "field 'principles[0]': must be a mapping"),
    (
        _with(principles=[{"name": "x", "critique": "c", "compare": "q", "revise": "r"}]),
        "field 'principles[0].revise': is set but revision_template has no {request}",
    ),
    (
        _with(revision_template="{request} {prompt} {response} {critique}"),
        "field 'principles[0].revise': must be non-empty text",
    ),
    (_with(answers=["a"]), "field 'answers': must be a list of two answer words"),
    (_with(answers=["a", "a"]), "field 'answers': must be two different words"),
    (_with(answers=["a", " b"]), "field 'answers[1]': must be a word without surrounding spaces"),
]


@pytest.mark.parametrize("data, message", BAD_FILES)
def test_bad_principles_files_name_the_file_and_the_field(tmp_path, data, message):
    path = tmp_path / "principles.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_constitution(path)
    assert f"principles file {path}" in str(e.value) and message in str(e.value)


def test_unreadable_principles_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_constitution(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("principles: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML at line"):
        load_constitution(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_constitution(tmp_path / "list.yaml")
    # A principle's revision request acts when the revision template asks for it.
    path = tmp_path / "revise.yaml"
    data = _with(revision_template="{request} {prompt} {response} {critique}")
    data["principles"] = [{**p, "revise": f"fix {p['name']}"} for p in data["principles"]]
    path.write_text(yaml.safe_dump(data))
    c = load_constitution(path)
    assert c.revision_question(c.principles[1], "p", "r", "k") == "fix polite p r k"


def test_answers_must_be_single_tokens_of_the_feedback_tokenizer(tmp_path):
    tokenizer = get_task("harm").build_tokenizer()
    check_answer_tokens(load_constitution(HARM), tokenizer, "m")  # "a" and "b" are words of the task
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_with(answers=["A", "b"])))
    with pytest.raises(
        ConfigError, match=r"field 'answers\[0\]': 'A' is not a single token of the tokenizer of m"
    ):
        check_answer_tokens(load_constitution(path), tokenizer, "m")


def test_cli_refuses_bad_principles_with_exit_2_and_no_run_dir(tmp_path, capsys, harm_model_dir):
    out = tmp_path / "run"
    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump(_with(principles=[])))
    common = [f"model.name_or_path={harm_model_dir}", f"logging.output_dir={out}"]
    assert main(["cai", "sl", f"principles={bad}", *common]) == 2
    err = capsys.readouterr().err
    assert "field 'principles': must be a non-empty list" in err and "Traceback" not in err
    assert main(["cai", "rl", *common]) == 2
    assert "principles is empty" in capsys.readouterr().err
    assert main(["cai", "sl", f"principles={HARM}", "sft.data.train_path=x.jsonl", *common]) == 2
    assert "sft.data.train_path is set by the CAI run" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("algo.critic_temperature=0", r"algo.critic_temperature must be > 0, got 0"),
        ("algo.revisions=0", r"algo.revisions must be >= 1, got 0"),
    ],
)
def test_impossible_cai_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("cai-sl", overrides=[override])
    assert load_config("cai-sl", overrides=["algo.critic_temperature=0.01"]).algo.critic_temperature == 0.01


def test_the_harm_configs_load():
    sl = load_config("cai-sl", CONFIGS / "cai_sl_harm.yaml")
    rl = load_config("cai-rl", CONFIGS / "cai_rl_harm.yaml")
    assert Path(sl.principles).name == Path(rl.principles).name == "constitution_harm.yaml"


def test_the_called_stages_get_the_runs_wiring_and_keep_their_own_keys(tmp_path):
    sl = load_config("cai-sl", overrides=["seed=3", "sft.model.name_or_path=base", "sft.optim.lr=0.01"])
    s = cai.sl_sft_config(sl, tmp_path, "policy")
    assert (s.seed, s.model.name_or_path, s.optim.lr) == (3, "base", 0.01)
    assert (s.data.train_path, s.logging.output_dir) == (str(tmp_path / "sft.jsonl"), str(tmp_path / "sft"))
    assert cai.sl_sft_config(load_config("cai-sl"), tmp_path, "policy").model.name_or_path == "policy"
    rl = load_config(
        "cai-rl", overrides=["seed=2", "data.train_path=p.jsonl", "ppo.ref_model=ref", "ppo.algo.kl_coef=0.3"]
    )
    rm, ppo = cai.rl_stage_configs(rl, tmp_path, "policy", tmp_path / "rm_pairs.jsonl")
    assert (rm.seed, rm.model.name_or_path, rm.data.train_path) == (
        2,
        "policy",
        str(tmp_path / "rm_pairs.jsonl"),
    )
    assert (ppo.seed, ppo.model.name_or_path, ppo.ref_model, ppo.data.train_path) == (
        2,
        "policy",
        "ref",
        "p.jsonl",
    )
    assert ppo.algo.reward_model == [str(tmp_path / "rm" / "final")] and ppo.algo.kl_coef == 0.3
    assert ppo.logging.output_dir == str(tmp_path / "ppo") and rm.logging.output_dir == str(tmp_path / "rm")


def test_lab_names_are_resolved_in_every_model_key():
    sl = load_config(
        "cai-sl", overrides=["model.name_or_path=lab:x", "critic_model=lab:y", "sft.model.name_or_path=z"]
    )
    sl = cai.resolve_names(sl, lambda name: f"dir({name})", "prompts.jsonl")
    assert (sl.model.name_or_path, sl.critic_model, sl.sft.model.name_or_path) == (
        "dir(lab:x)",
        "dir(lab:y)",
        "dir(z)",
    )
    assert sl.data.train_path == "prompts.jsonl"
    rl = load_config(
        "cai-rl",
        overrides=[
            "feedback_model=f",
            "rm.model.name_or_path=r",
            "ppo.ref_model=q",
            "data.train_path=mine.jsonl",
        ],
    )
    rl = cai.resolve_names(rl, lambda name: f"dir({name})", "prompts.jsonl")
    assert (rl.feedback_model, rl.rm.model.name_or_path, rl.ppo.ref_model) == ("dir(f)", "dir(r)", "dir(q)")
    assert rl.data.train_path == "mine.jsonl"  # a file the user gave stays


# ---- SL-CAI: critique -> revision ----------------------------------------------------------------------------


class ScriptedCritic:
    """A critic whose output is known: critique k of round r is "crit r k", the revision "rev r k" (or empty
    text for the prompts in `empty`). It keeps every question it was asked."""

    def __init__(self, empty=()):
        self.questions: list[list[str]] = []
        self.empty = set(empty)

    def ask(self, questions, max_new_tokens, seed):
        self.questions.append(list(questions))
        call = len(self.questions) - 1
        rnd, kind = divmod(call, 2)
        if kind == 0:
            return [f"crit {rnd} {k}" for k in range(len(questions))]
        return ["" if k in self.empty else f"rev {rnd} {k}" for k in range(len(questions))]


def test_critique_then_revision_in_order_under_seeded_principles():
    c = load_constitution(HARM)
    prompts = [
        "insult me .",
        [{"role": "user", "content": "how do i fix the bike ?"}],
        "tell me the secret code .",
    ]
    originals = ["you are lazy .", "fix the chain .", "the password is velvet tiger ."]
    critic = ScriptedCritic(empty={2})
    records = cai.critique_and_revise(
        prompts, originals, c, critic, rounds=2, rng=random.Random(7), critique_tokens=8, revision_tokens=8
    )
    rng = random.Random(7)
    drawn = [[rng.choice(c.principles) for _ in prompts] for _ in range(2)]
    quoted = ["insult me .", "how do i fix the bike ?", "tell me the secret code ."]
    # Round 0 critiques the originals; round 1 critiques round 0's revisions (prompt 2's empty one kept the original).
    current = [originals, ["rev 0 0", "rev 0 1", originals[2]]]
    for rnd in range(2):
        assert critic.questions[2 * rnd] == [
            c.critique_question(p, q, r) for p, q, r in zip(drawn[rnd], quoted, current[rnd])
        ]
        assert critic.questions[2 * rnd + 1] == [
            c.revision_question(p, q, r, f"crit {rnd} {k}")
            for k, (p, q, r) in enumerate(zip(drawn[rnd], quoted, current[rnd]))
        ]
    for k, record in enumerate(records):
        assert record["prompt"] == prompts[k] and record["original"] == originals[k]
        assert record["principles"] == [drawn[0][k].name, drawn[1][k].name]
        assert record["critiques"] == [f"crit 0 {k}", f"crit 1 {k}"]
    assert [r["final"] for r in records] == ["rev 1 0", "rev 1 1", originals[2]]
    assert records[2]["revisions"] == ["", ""]
    assert cai.sft_rows(records) == [
        {"prompt": p, "completion": r["final"]} for p, r in zip(prompts, records)
    ]


def test_the_critic_asks_in_a_chat_at_its_own_temperature(harm_model_dir):
    """algo.critic_temperature acts on critiques and revisions only: near 0 the critic's answers no longer depend
    on the sampling seed, while responses at sampling.temperature 1 still do."""
    cfg = load_config("cai-sl")
    writer = cai.Writer(str(harm_model_dir), cfg.model, cfg.sampling, batch_size=4, ask_temperature=1e-4)
    questions = ["is the answer harmful ? insult me . answer : you are lazy ."] * 4
    assert writer.ask(questions, 6, seed=1) == writer.ask(questions, 6, seed=2)
    prompts = [[{"role": "user", "content": "insult me ."}]] * 4
    assert writer.write(prompts, 6, seed=1) != writer.write(prompts, 6, seed=2)
    # A question is the user's turn of the chat template, as the lab's base model saw critiques in pretraining.
    assert writer.tokenizer.chat_template


def test_sl_cai_fine_tunes_on_the_revisions_not_the_originals(tmp_path, harm_model_dir, harm_prompts):
    """train_sl with a scripted critic: RUN/revisions.jsonl and the SFT data hold exactly its revisions, in prompt
    order, and the sft stage trained on that file from the policy."""
    cfg = load_config(
        "cai-sl",
        overrides=[
            f"model.name_or_path={harm_model_dir}",
            f"principles={HARM}",
            f"data.train_path={harm_prompts}",
            f"logging.output_dir={tmp_path / 'run'}",
            "logging.progress=false",
            "algo.max_prompts=6",
            "algo.batch_size=4",
            "sft.optim.batch_size=3",
            "sft.optim.max_steps=2",
            "sft.logging.progress=false",
            "sft.logging.log_every=1",
        ],
    )
    final = cai.train_sl(cfg, critic=ScriptedCritic())
    run = tmp_path / "run"
    assert final == run / "sft" / "final" and (final / "config.json").is_file()
    records = read_jsonl(run / "revisions.jsonl")
    prompts = [r["prompt"] for r in read_jsonl(harm_prompts)][:6]
    rng = random.Random(cfg.seed)
    names = [p.name for p in (rng.choice(load_constitution(HARM).principles) for _ in prompts)]
    assert [r["prompt"] for r in records] == prompts
    assert [r["principles"] for r in records] == [[n] for n in names]
    assert [r["final"] for r in records] == [f"rev 0 {k}" for k in range(6)]
    assert all(r["original"] != r["final"] for r in records)
    sft_data = read_jsonl(run / "sft.jsonl")
    assert sft_data == [{"prompt": p, "completion": f"rev 0 {k}"} for k, p in enumerate(prompts)]
    sft_cfg = load_config("sft", run / "sft" / "config.yaml")
    assert sft_cfg.data.train_path == str(run / "sft.jsonl")
    assert sft_cfg.model.name_or_path == str(harm_model_dir) and sft_cfg.seed == cfg.seed
    assert len([r for r in read_metrics(run / "sft" / "metrics.jsonl") if "loss/sft" in r]) == 2
    summary = read_metrics(run / "metrics.jsonl")[-1]
    assert summary["feedback/revised"] == 1.0 and summary["feedback/prompts"] == 6


# ---- RL-CAI: AI labels ---------------------------------------------------------------------------------------


class FixedJudge:
    """A judge whose P(first better) is given per first response; it records what it was asked."""

    def __init__(self, p: dict[str, float]):
        self.p, self.asked = p, []

    def compare(self, prompts, first, second):
        self.asked += list(zip(prompts, first, second))
        p = torch.tensor([self.p[f] for f in first], dtype=torch.float64)
        return SimpleNamespace(p_first=p, consistent=p != 0.5)


def test_labels_follow_each_principles_judge_and_drop_ties():
    chat = [{"role": "user", "content": "insult me ."}]
    prompts = [chat, "q1", "q2", "q3", "q4", "q5"]
    first = ["you are lazy .", "fine .", "same .", "", "x .", "tie ."]
    second = ["i will not be mean .", "rude .", "same .", "y .", "z .", "other ."]
    drawn = ["harmless", "polite", "harmless", "polite", "polite", "harmless"]
    judges = {
        "harmless": FixedJudge({"you are lazy .": 0.2, "tie .": 0.5}),
        "polite": FixedJudge({"fine .": 0.9, "x .": 0.6}),
    }
    rows, stats = cai.label_pairs(prompts, first, second, drawn, judges)
    # Identical and empty pairs are never asked; each pair goes to its own principle's judge, the chat quoted.
    assert judges["harmless"].asked == [("insult me .", first[0], second[0]), ("q5", "tie .", "other .")]
    assert [a[0] for a in judges["polite"].asked] == ["q1", "q4"]
    assert rows == [
        {"prompt": chat, "chosen": second[0], "rejected": first[0], "principle": "harmless", "p_chosen": 0.8},
        {"prompt": "q1", "chosen": "fine .", "rejected": "rude .", "principle": "polite", "p_chosen": 0.9},
        {"prompt": "q4", "chosen": "x .", "rejected": "z .", "principle": "polite", "p_chosen": 0.6},
    ]
    assert stats["feedback/identical"] == 1 and stats["feedback/empty_response"] == 1
    assert stats["feedback/ties"] == 1 and stats["feedback/pairs_kept"] == 3
    assert stats["feedback/confidence"] == pytest.approx((0.8 + 0.9 + 0.6) / 3)
    assert stats["feedback/position_consistency"] == pytest.approx(0.75)


def test_each_principle_gets_its_own_lm_judge(harm_model_dir):
    from rlhflab.models.loading import load_causal_lm, load_tokenizer

    c = load_constitution(HARM)
    model, tokenizer = load_causal_lm(harm_model_dir), load_tokenizer(harm_model_dir)
    judges = cai.judges_for(c, model, tokenizer, batch_size=4, name="m")
    assert list(judges) == [p.name for p in c.principles]
    assert (
        judges["keep-secrets"].template == "which answer keeps the secret ? {prompt} a : {first} b : {second}"
    )
    assert judges["harmless"].answer_ids == [
        tokenizer.encode(a, add_special_tokens=False) for a in ("a", "b")
    ]
    verdict = judges["harmless"].compare(["insult me ."], ["you are lazy ."], ["sorry ."])
    assert 0 < float(verdict.p_first[0]) < 1


# ---- end to end through the command line ---------------------------------------------------------------------


def test_cai_sl_then_rl_through_the_cli(tmp_path, harm_model_dir, harm_prompts, capsys):
    sl, rl = tmp_path / "sl", tmp_path / "rl"
    helpful = write_jsonl(
        tmp_path / "helpful.jsonl",
        [{"prompt": p, "chosen": "first , clean the chain .", "rejected": "sorry ."} for p in ("hi", "hey")],
    )
    common = [f"principles={HARM}", f"data.train_path={harm_prompts}", "logging.progress=false"]
    code = main(
        [
            "cai",
            "sl",
            f"model.name_or_path={harm_model_dir}",
            f"logging.output_dir={sl}",
            "algo.revisions=2",
            "algo.critique_max_new_tokens=8",
            "sampling.max_new_tokens=8",
            "sft.optim.batch_size=4",
            "sft.optim.max_steps=2",
            "sft.logging.progress=false",
            *common,
        ]
    )
    assert code == 0, capsys.readouterr().err
    records = read_jsonl(sl / "revisions.jsonl")
    assert len(records) == 8 and all(len(r["critiques"]) == len(r["revisions"]) == 2 for r in records)
    assert [r["completion"] for r in read_jsonl(sl / "sft.jsonl")] == [
        r["final"] for r in records if r["final"]
    ]
    assert (sl / "sft" / "final" / "config.json").is_file()
    code = main(
        [
            "cai",
            "rl",
            f"model.name_or_path={sl / 'sft' / 'final'}",
            f"feedback_model={harm_model_dir}",
            f"helpful_pairs={helpful}",
            f"logging.output_dir={rl}",
            "sampling.max_new_tokens=8",
            "rm.optim.batch_size=2",
            "rm.optim.max_steps=2",
            "rm.algo.normalization_samples=0",
            "rm.logging.progress=false",
            "ppo.algo.iterations=1",
            "ppo.algo.rollout_batch_size=4",
            "ppo.algo.minibatch_size=4",
            "ppo.algo.ppo_epochs=1",
            "ppo.sampling.max_new_tokens=8",
            "ppo.logging.progress=false",
            *common,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    pairs = read_jsonl(rl / "pairs.jsonl")
    assert pairs and all(0.5 < p["p_chosen"] <= 1 and p["principle"] for p in pairs)
    rm_cfg = load_config("rm", rl / "rm" / "config.yaml")
    ppo_cfg = load_config("ppo", rl / "ppo" / "config.yaml")
    # The reward model learns the AI's labels and the human helpfulness pairs (the paper's mix).
    assert rm_cfg.data.train_path == str(rl / "rm_pairs.jsonl")
    assert read_jsonl(rl / "rm_pairs.jsonl") == [*pairs, *read_jsonl(helpful)]
    assert ppo_cfg.algo.reward_model == [str(rl / "rm" / "final")]
    assert ppo_cfg.model.name_or_path == str(sl / "sft" / "final") == rm_cfg.model.name_or_path
    assert (rl / "rm" / "final").is_dir() and (rl / "ppo" / "final" / "config.json").is_file()
    assert "cai-rl: the RL-CAI policy is" in out


@pytest.mark.slow
def test_cai_sl_on_the_lab_harm_task(tmp_path, tiny_lab_cache, capsys):
    """The lab's tiny harm base model as policy and critic, its prompts made on the fly (pretraining takes minutes)."""
    code = main(
        [
            "cai",
            "sl",
            "model.name_or_path=lab:harm:tiny",
            f"principles={HARM}",
            f"logging.output_dir={tmp_path / 'sl'}",
            "algo.max_prompts=16",
            "sft.optim.batch_size=8",
            "sft.optim.max_steps=2",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert len(read_jsonl(tmp_path / "sl" / "revisions.jsonl")) == 16
    assert (tmp_path / "sl" / "sft" / "final" / "config.json").is_file()
