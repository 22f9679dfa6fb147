"""`PreferenceModelFeedback`: labels from P(first preferred) by argmax (ties near 1/2) or drawn, the query count,
checkpointed draws, and a real preference model loaded from disk."""

import pytest
import torch
from torch.testing import assert_close

from rlhflab.errors import ConfigError
from rlhflab.feedback import FeedbackSource, PreferenceModelFeedback, ask_and_collect

NAN = float("nan")


class Probs:
    """A preference model whose P(first preferred) is the number written in the first response."""

    name = "numbers"

    def prob(self, prompts, first, second):
        assert len(prompts) == len(first) == len(second)
        return torch.tensor([float(a) for a in first])


def test_argmax_labels_by_hand():
    fb = PreferenceModelFeedback(Probs())
    assert isinstance(fb, FeedbackSource) and fb.name == "preference_model:numbers"
    first = ["0.9", "0.1", "0.5", "0.5000001", "0.51", "nan"]
    labels = ask_and_collect(fb, ["p"] * 6, first, ["x"] * 6)
    # 0.5 and 0.5 + 1e-7 are within the 1e-6 tie tolerance; 0.51 is not; NaN is no answer.
    assert_close(labels, torch.tensor([1.0, 0.0, 0.5, 0.5, 1.0, NAN]), equal_nan=True)
    assert fb.queries == 6 and fb.last_scores is None
    assert_close(fb.last_probs, torch.tensor([float(a) for a in first]), equal_nan=True)


def test_drawn_labels_follow_the_probability_and_resume_exactly():
    fb = PreferenceModelFeedback(Probs(), mode="bradley_terry", seed=3)
    first = ["0.8"] * 2000 + ["0.0"] * 10 + ["1.0"] * 10 + ["nan"]
    labels = ask_and_collect(fb, ["p"] * len(first), first, ["x"] * len(first))
    assert abs(float(labels[:2000].mean()) - 0.8) < 0.03  # 4 standard errors
    assert labels[2000:2010].tolist() == [0.0] * 10 and labels[2010:2020].tolist() == [1.0] * 10
    assert labels[-1].isnan()
    # The generator is checkpointed: a restored source draws what the original draws next.
    state = fb.state_dict()
    again = PreferenceModelFeedback(Probs(), mode="bradley_terry", seed=99)
    again.load_state_dict(state)
    a = ask_and_collect(fb, ["p"] * 50, ["0.5"] * 50, ["x"] * 50)
    b = ask_and_collect(again, ["p"] * 50, ["0.5"] * 50, ["x"] * 50)
    assert torch.equal(a, b) and again.queries == fb.queries == len(first) + 50


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="mode must be one of"):
        PreferenceModelFeedback(Probs(), mode="sample")
    with pytest.raises(ConfigError, match="tie_tolerance"):
        PreferenceModelFeedback(Probs(), tie_tolerance=0.5)


def test_a_saved_preference_model_as_a_source(tiny_model_dir, tiny_tokenizer, tmp_path):
    from rlhflab.models.preference_model import PreferenceModel

    from ..helpers import perturb_

    model = perturb_(
        PreferenceModel.from_causal_lm(tiny_model_dir, tiny_tokenizer, max_length=32), 0.5, seed=1
    )
    model.save_pretrained(tmp_path / "run" / "final")
    fb = PreferenceModelFeedback.from_pretrained(str(tmp_path / "run"))
    prompts, a, b = ["the cat"] * 3, ["yes", "the cat is happy", "no"], ["no", "sad", "no"]
    labels = ask_and_collect(fb, prompts, a, b)
    p = model.prob(prompts, a, b)
    assert_close(fb.last_probs, p)
    assert labels[2] == 0.5  # identical responses: P = 1/2 exactly, a tie
    assert labels[:2].tolist() == [float(x > 0.5) for x in p[:2].tolist()]
    swapped = ask_and_collect(fb, prompts, b, a)
    assert_close(swapped[:2], 1 - labels[:2])  # the judge is consistent under swapping the order
