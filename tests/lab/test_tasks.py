import pytest

from rlhflab.errors import UserError
from rlhflab.lab.tasks import TASKS, chat_prompt, get_task, prompt_text
from rlhflab.lab.tasks.arith import prompt_operands
from rlhflab.lab.tasks.sentiment import SUBJECTS, prompt_subject


def test_registry_and_unknown_task():
    assert set(TASKS) >= {"sentiment", "arith", "harm"}
    assert get_task("sentiment").name == "sentiment"
    task = get_task("arith")
    assert get_task(task) is task
    with pytest.raises(UserError, match="sentiment, arith"):
        get_task("chess")


@pytest.mark.parametrize("name", ["sentiment", "arith", "harm"])
def test_prompts_are_seeded_and_heldout_is_disjoint(name):
    task = get_task(name)
    train = task.train_prompts(3000, seed=0)
    heldout = task.heldout_prompts(500, seed=0)
    assert train[:50] == task.train_prompts(50, seed=0)  # a longer draw extends a shorter one
    assert task.train_prompts(20, seed=1) == task.train_prompts(20, seed=1)
    assert task.train_prompts(20, seed=1) != task.train_prompts(20, seed=2)
    assert not set(train) & set(heldout)
    assert len(set(heldout)) > 5


@pytest.mark.parametrize("name", ["sentiment", "arith", "harm"])
def test_vocabulary_covers_everything_the_task_writes(name):
    task = get_task(name)
    tok = task.build_tokenizer()
    prompts = task.train_prompts(200, seed=3) + task.heldout_prompts(50, seed=3)
    texts = (
        prompts + task.demonstrations(prompts, seed=3) + [r for _, r in task.pretraining_pairs(300, seed=3)]
    )
    texts += task.oracle_responses(prompts[0], 20)
    for text in texts:
        assert tok.unk_token_id not in tok(text)["input_ids"], text
    assert len(tok) < 300  # a small vocabulary keeps the LM head cheap


def test_demonstrations_are_deterministic_and_on_task():
    task = get_task("sentiment")
    prompts = task.train_prompts(100, seed=0)
    demos = task.demonstrations(prompts, seed=5)
    assert demos == task.demonstrations(prompts, seed=5)
    assert demos != task.demonstrations(prompts, seed=6)
    assert all(d.endswith((".", "!")) for d in demos)
    on_topic = sum(
        any(w in {prompt_subject(p), *SUBJECTS[prompt_subject(p)]} for w in d.split())
        for p, d in zip(prompts, demos)
    )
    assert on_topic > 70


def test_arith_prompts_and_demonstrations():
    task = get_task("arith")
    assert prompt_operands("what is 3 + 5 + 2 ?") == [3, 5, 2]
    prompts = task.train_prompts(200, seed=0)
    assert all(2 <= len(prompt_operands(p)) <= 4 for p in prompts)
    demos = task.demonstrations(prompts, seed=0)
    correct = sum(d.endswith(f"answer {sum(prompt_operands(p))} .") for p, d in zip(prompts, demos))
    assert 100 < correct < 200  # the demonstrator slips sometimes, but not mostly


def test_chat_prompt_round_trip():
    msgs = chat_prompt("review the film .")
    assert msgs == [{"role": "user", "content": "review the film ."}]
    assert prompt_text(msgs) == "review the film ."
    assert prompt_text("plain") == "plain"
