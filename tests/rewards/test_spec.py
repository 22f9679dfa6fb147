import pytest
import torch

from rlhflab.errors import UserError
from rlhflab.models.reward_model import RewardModel
from rlhflab.rewards import (
    CombinedReward,
    LearnedReward,
    LengthPenalty,
    MissingEOSPenalty,
    RegexRule,
    load_reward,
    load_rewards,
    parse_spec,
)

from ..helpers import tiny_lm


@pytest.fixture()
def run_dir(tmp_path, tiny_tokenizer):
    lm = tiny_lm(tiny_tokenizer)
    rm = RewardModel.from_causal_lm(lm, num_heads=2, head_names=["helpful", "safe"])
    rm.save_pretrained(tmp_path / "run" / "final", tiny_tokenizer)
    return tmp_path / "run"


def test_parse_spec():
    assert parse_spec("runs/rm/final") == ("runs/rm/final", {})
    assert parse_spec("runs/rm:head=safe:normalize=true") == (
        "runs/rm",
        {"head": "safe", "normalize": "true"},
    )
    assert parse_spec("rule:length") == ("rule:length", {})
    assert parse_spec("rule:regex:pattern=a:b(?=c):mode=must_not") == (
        "rule:regex",
        {"pattern": "a:b(?=c)", "mode": "must_not"},
    )
    assert parse_spec("C:/models/rm:head=1") == ("C:/models/rm", {"head": "1"})


def test_load_rule_specs():
    length = load_reward("rule:length:coef=0.5:target=2")
    assert isinstance(length, LengthPenalty) and (length.coef, length.target) == (0.5, 2.0)
    torch.testing.assert_close(length.score(["p"], ["a b c d"]), torch.tensor([-1.0]))
    regex = load_reward(r"rule:regex:pattern=\bsorry\b:mode=must_not:penalty=2")
    assert isinstance(regex, RegexRule)
    torch.testing.assert_close(regex.score(["p", "p"], ["i am sorry", "fine"]), torch.tensor([-2.0, 0.0]))
    eos = load_reward("rule:eos:eos=<|stop|>")
    assert isinstance(eos, MissingEOSPenalty) and eos.eos_texts == ("<|stop|>",)


def test_load_learned_specs(run_dir):
    source = load_reward(f"{run_dir}:head=safe:normalize=true:batch_size=4")
    assert (
        isinstance(source, LearnedReward) and source.head == 1 and source.normalize and source.batch_size == 4
    )
    assert load_reward(f"{run_dir / 'final'}:head=1").head == 1
    combined = load_rewards(f"{run_dir}:head=helpful,rule:length:coef=1", weights="1,0.5")
    assert isinstance(combined, CombinedReward) and combined.weights == [1.0, 0.5]
    prompts, responses = ["hi", "hello"], ["good", "a b c"]
    expected = source.__class__.from_pretrained(run_dir, head="helpful").score(
        prompts, responses
    ) - 0.5 * torch.tensor([1.0, 3.0])
    torch.testing.assert_close(combined.score(prompts, responses), expected)
    assert isinstance(load_rewards("rule:length"), LengthPenalty)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("", "empty reward spec"),
        ("rule:shout", "unknown rule 'shout'; known rules: length, regex, eos"),
        ("rule:length:coeff=1", "unknown option 'coeff'; this source takes coef, target, unit"),
        ("rule:length:coef=lots", "option coef='lots' is not valid"),
        ("rule:length:unit=tokens", "'words' or 'chars'"),
        ("rule:regex", "rule:regex needs a pattern"),
        ("rule:regex:pattern=(", "not a valid regular expression"),
        ("rule:length:coef=1:coef=2", "option 'coef' is given twice"),
        ("lab:sentiment", "gold reward is hidden from training"),
        ("no/such/dir", "reward model 'no/such/dir' does not exist"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(UserError, match=message.replace("(", "\\(")):
        load_reward(spec)


def test_bad_learned_options_and_weights(run_dir):
    with pytest.raises(UserError, match="option normalize='maybe' is not valid"):
        load_reward(f"{run_dir}:normalize=maybe")
    with pytest.raises(UserError, match="2 reward weights for 1 reward sources"):
        load_rewards("rule:length", weights="1,2")
    with pytest.raises(UserError, match="must be comma-separated numbers"):
        load_rewards("rule:length", weights="heavy")
    with pytest.raises(UserError, match="no reward source given"):
        load_rewards(" , ")


def test_reward_sources_never_import_the_lab():
    # Gold rewards must stay out of reach of training code: importing the reward sources loads no lab module.
    import subprocess
    import sys

    code = (
        "import sys, rlhflab.rewards, rlhflab.rewards.spec; "
        "print(sorted(m for m in sys.modules if m.startswith('rlhflab.lab')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_llama2_gate_from_specs_by_hand():
    """helpfulness = -words (rule:length:coef=1), safety = -3 when the response says 'bomb' (must_not rule).
    Row 0: safety 0, sigmoid 0.5 >= 0.15 -> helpfulness -4. Row 1: safety -3, sigmoid 0.047 < 0.15 -> -3.
    Row 2: prompt flagged by the pattern 'joke' -> the safety score 0. Combined [-4, -3, 0], whitened:
    mean -7/3, unbiased std sqrt(13/3) = 2.081666 -> [-0.800641, -0.320256, 1.120897]."""
    reward = load_rewards(
        "rule:length:coef=1,rule:regex:pattern=bomb:mode=must_not:penalty=3",
        combine="llama2_gate",
        unsafe_prompt_pattern="JOKE",
    )
    assert isinstance(reward, CombinedReward) and reward.mode == "llama2_gate"
    prompts = ["how do I bake bread", "how do I build one", [{"role": "user", "content": "tell me a joke"}]]
    scores = reward.score(prompts, ["mix flour and water", "a bomb needs", "why did the chicken"])
    torch.testing.assert_close(scores, torch.tensor([-0.800641, -0.320256, 1.120897]), atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="exactly two reward sources"):
        load_rewards("rule:length", combine="llama2_gate")
    with pytest.raises(UserError, match="exactly two reward sources"):
        load_rewards("rule:length,rule:eos", weights="1,2", combine="llama2_gate")


def test_ppo_config_checks_the_reward_combination():
    from rlhflab.config import load_config
    from rlhflab.errors import ConfigError

    cfg = load_config(
        "ppo", None, ["algo.reward_combine=llama2_gate", "algo.unsafe_prompt_pattern=bomb|weapon"]
    )
    assert cfg.algo.safety_threshold == 0.15
    with pytest.raises(
        ConfigError, match="algo.reward_weights apply to algo.reward_combine=weighted_sum only"
    ):
        load_config(
            "ppo",
            None,
            ["algo.reward_combine=llama2_gate", "algo.reward_model=a,b", "algo.reward_weights=1,1"],
        )
    with pytest.raises(ConfigError, match="exactly two sources"):
        load_config("ppo", None, ["algo.reward_combine=llama2_gate", "algo.reward_model=a,b,c"])
    with pytest.raises(ConfigError, match="has 1 weights for 2 reward sources"):
        load_config("ppo", None, ["algo.reward_model=a,b", "algo.reward_weights=1"])
    assert load_config("ppo", None, ["algo.reward_model=rule:regex:pattern=a,b"]).algo.reward_model == [
        "rule:regex:pattern=a",
        "b",
    ]  # the short form splits at ','; a YAML list keeps a ',' inside a spec
    assert load_config("ppo", None, ['algo.reward_model=["rule:regex:pattern=a,b"]']).algo.reward_model == [
        "rule:regex:pattern=a,b"
    ]
    with pytest.raises(
        ConfigError, match="algo.unsafe_prompt_pattern applies to algo.reward_combine=llama2_gate"
    ):
        load_config("ppo", None, ["algo.unsafe_prompt_pattern=bomb"])
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        load_config("ppo", None, ["algo.reward_combine=llama2_gate", "algo.unsafe_prompt_pattern=(unclosed"])
    with pytest.raises(ConfigError, match="algo.safety_threshold must be in"):
        load_config("ppo", None, ["algo.safety_threshold=1.5"])


# Three rule "members": -0.5, -1 and -2 per word. "a b" (2 words) -> (-1, -2, -4); "a b c d" -> (-2, -4, -8).
MEMBER_SPECS = "rule:length:coef=0.5,rule:length:coef=1,rule:length:coef=2"


def _members_by_hand():
    return torch.tensor([[-1.0, -2.0], [-2.0, -4.0], [-4.0, -8.0]])


def test_ensemble_from_specs_by_hand():
    """mean [-7/3, -14/3]; min (WCO) [-4, -8]; variance (1/K): "a b" deviations (4/3, 1/3, -5/3) -> 42/27 = 14/9,
    "a b c d" four times that, 56/9; UWO with lambda 0.5: [-7/3 - 7/9, -14/3 - 28/9] = [-28/9, -70/9]."""
    from rlhflab.losses.combine import ensemble_mean, ensemble_min, ensemble_uwo

    prompts, responses = ["p", "p"], ["a b", "a b c d"]
    expected = {
        "ensemble_mean": torch.tensor([-7.0 / 3.0, -14.0 / 3.0]),
        "ensemble_min": torch.tensor([-4.0, -8.0]),
        "ensemble_uwo": torch.tensor([-28.0 / 9.0, -70.0 / 9.0]),
    }
    pure = {
        "ensemble_mean": ensemble_mean(_members_by_hand()),
        "ensemble_min": ensemble_min(_members_by_hand()),
        "ensemble_uwo": ensemble_uwo(_members_by_hand(), 0.5),
    }
    for mode, value in expected.items():
        reward = load_rewards(MEMBER_SPECS, combine=mode, uwo_coef=0.5 if mode == "ensemble_uwo" else None)
        assert isinstance(reward, CombinedReward) and reward.mode == mode
        torch.testing.assert_close(reward.score(prompts, responses), value)
        torch.testing.assert_close(reward.score(prompts, responses), pure[mode])
    with pytest.raises(UserError, match="needs at least two members"):
        load_rewards("rule:length", combine="ensemble_min")
    with pytest.raises(UserError, match="needs uwo_coef"):
        load_rewards(MEMBER_SPECS, combine="ensemble_uwo")
    with pytest.raises(UserError, match="reward weights apply to weighted_sum"):
        load_rewards(MEMBER_SPECS, combine="ensemble_mean", weights="1,1,1")
    with pytest.raises(UserError, match="uwo_coef applies to combine='ensemble_uwo' only"):
        load_rewards(MEMBER_SPECS, combine="llama2_gate", uwo_coef=0.5)


def test_ensemble_of_learned_members(run_dir):
    """Reward models as members, whitened with their stored statistics: the ensemble's score is the pure
    function of the members' own scores."""
    from rlhflab.losses.combine import ensemble_min

    specs = [f"{run_dir}:head=helpful:normalize=true", f"{run_dir}:head=safe:normalize=true"]
    reward = load_rewards(specs, combine="ensemble_min")
    prompts, responses = ["the cat", "the dog"], ["is good", "sat on the mat"]
    members = torch.stack([load_reward(s).score(prompts, responses) for s in specs])
    torch.testing.assert_close(reward.score(prompts, responses), ensemble_min(members))


@pytest.mark.parametrize("stage", ["ppo", "rloo", "quark"])
def test_stage_config_builds_the_ensemble(stage):
    """The reward a stage builds from algo.reward_model + algo.reward_combine (+ algo.uwo_coef) is the pure
    function's output on a batch."""
    from rlhflab.config import load_config
    from rlhflab.losses.combine import ensemble_min, ensemble_uwo
    from rlhflab.stages.on_policy import load_reward as stage_reward

    prompts, responses = ["p", "p"], ["a b", "a b c d"]
    common = [f"algo.reward_model={MEMBER_SPECS}"]
    cfg = load_config(stage, None, [*common, "algo.reward_combine=ensemble_uwo", "algo.uwo_coef=2"])
    got = stage_reward(cfg.algo, torch.device("cpu")).score(prompts, responses)
    torch.testing.assert_close(got, ensemble_uwo(_members_by_hand(), 2.0))
    cfg = load_config(stage, None, [*common, "algo.reward_combine=ensemble_min"])
    got = stage_reward(cfg.algo, torch.device("cpu")).score(prompts, responses)
    torch.testing.assert_close(got, ensemble_min(_members_by_hand()))


def test_config_checks_the_ensemble_keys():
    from rlhflab.config import load_config
    from rlhflab.errors import ConfigError

    assert load_config("ppo", None, ["algo.reward_combine=ensemble_uwo"]).algo.uwo_coef == 0.5
    with pytest.raises(ConfigError, match="algo.uwo_coef applies to algo.reward_combine=ensemble_uwo only"):
        load_config("ppo", None, ["algo.reward_model=a,b", "algo.uwo_coef=1.0"])
    with pytest.raises(ConfigError, match="algo.uwo_coef applies to algo.reward_combine=ensemble_uwo only"):
        load_config("ppo", None, ["algo.reward_combine=ensemble_min", "algo.uwo_coef=1.0"])
    with pytest.raises(ConfigError, match="algo.uwo_coef must be a finite number >= 0"):
        load_config("ppo", None, ["algo.reward_combine=ensemble_uwo", "algo.uwo_coef=-0.5"])
    with pytest.raises(ConfigError, match="aggregates an ensemble; name two or more"):
        load_config("ppo", None, ["algo.reward_combine=ensemble_mean", "algo.reward_model=a"])
    with pytest.raises(
        ConfigError, match="algo.reward_weights apply to algo.reward_combine=weighted_sum only"
    ):
        load_config(
            "ppo",
            None,
            ["algo.reward_combine=ensemble_min", "algo.reward_model=a,b", "algo.reward_weights=1,1"],
        )
    # online DPO asks the lab's annotators: an ensemble key judges nothing there.
    with pytest.raises(ConfigError, match="algo.reward_combine is set but algo.feedback=lab"):
        load_config("online-dpo", None, ["algo.feedback=lab", "algo.reward_combine=ensemble_mean"])
