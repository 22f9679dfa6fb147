"""`rlhflab control`: the methods one command each; Christiano et al. with the synthetic labeller or with people
answering through the labelling app's store."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from rlhflab.cli import main
from rlhflab.label.store import Store

from ..label import conftest as label_databases

sqlite_url, cheap_argon2 = label_databases.sqlite_url, label_databases.cheap_argon2
TINY = ["labels=12", "rl_steps=1024", "chunk=512", "initial_episodes=2", "eval_episodes=2", "fit_steps=10"]


def test_christiano_with_the_synthetic_labeller_saves_the_policy_and_the_reward(tmp_path):
    out = tmp_path / "run"
    assert (
        main(["control", "christiano", *TINY, "query=random", "--seed", "3", "--output-dir", str(out)]) == 0
    )
    result = json.loads((out / "result.json").read_text())
    assert result["settings"]["labels"] == 12 and result["settings"]["query"] == "random"
    assert [c["env_steps"] for c in result["curve"]] == [512, 1024]
    assert result["labels_used"] == 12 and result["curve"][-1]["labels"] == 12
    saved = torch.load(out / "reward.pt", weights_only=False)
    assert len(saved["members"]) == 3 and len(saved["stats"]) == 3
    from stable_baselines3 import PPO

    policy = PPO.load(out / "policy.zip", device="cpu")
    assert policy.predict(torch.zeros(3).numpy(), deterministic=True)[0].shape == (1,)


@pytest.mark.parametrize(
    "args, message",
    [
        (["labels=x"], "labels must be of type int"),
        (["nonsense=1"], "'nonsense=1' is not KEY=VALUE of a known setting"),
        (["--labeller", "human"], "--labeller human needs --label-project"),
        (["query=best"], "query must be one of disagreement, random"),
        (["--task", "CartPole-v1"], "control task 'CartPole-v1' is not supported"),
        (
            ["--labeller", "human", "--label-project", "p", "--task", "Reacher-v5"],
            "drawn for Pendulum-v1 only",
        ),
        (["--label-project", "p"], "--label-project is for --labeller human"),
    ],
)
def test_bad_settings_exit_2_before_any_work(args, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["control", "christiano", *args, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()


@pytest.mark.slow  # about 12 s: three rounds, each polled once a second
def test_christiano_asks_people_through_the_labelling_app(sqlite_url, tmp_path):
    """--labeller human: every round's queries become segment items of the project; an annotator answering
    "A better" to each gives the run all its labels."""
    store = Store(sqlite_url)
    store.add_project("pendulum")
    token = store.add_user("ann")
    store.add_member("pendulum", "ann")
    who, stop = store.user_by_token(token), threading.Event()

    def annotate():
        while not stop.is_set():
            view = store.next_assignment(who, "pendulum")
            if view is None:
                time.sleep(0.02)
                continue
            store.submit_label(who, view["assignment"], {"choice": "A"}, f"k{view['assignment']}")

    thread = threading.Thread(target=annotate, daemon=True)
    thread.start()
    out = tmp_path / "run"
    try:
        code = main(["control", "christiano", *TINY, "--labeller", "human", "--label-db", sqlite_url,
                     "--label-project", "pendulum", "--label-timeout", "30", "--output-dir", str(out)])  # fmt: skip
    finally:
        stop.set()
        thread.join()
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    assert result["labels_used"] == 12
    rows = store.labelled("pendulum")
    assert len(rows) == 12 and {r["kind"] for r in rows} == {"segment"}
    assert all(r["responses"][0].startswith("data:image/gif;base64,") for r in rows)
    store.close()


@pytest.mark.slow
def test_trex_is_its_experiment_on_one_seed(tmp_path):
    out = tmp_path / "trex"
    tiny = ["demos.every=64", "demos.episodes=2", "reward.pairs=32", "reward.steps=5", "rl.steps=64",
            "eval.episodes=2", "eval.heldout=1"]  # fmt: skip
    assert main(["control", "trex", *tiny, "--seed", "1", "--output-dir", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["experiment"] == "trex" and result["seeds"] == [1]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["Reacher-v5", "HalfCheetah-v5"])
def test_christiano_runs_on_mujoco_tasks(task, tmp_path):
    """MuJoCo environments through gymnasium[mujoco]: the learned reward scores their observations, the segments
    and PPO use their action spaces; the true return is the environment's."""
    out = tmp_path / "run"
    assert main(["control", "christiano", *TINY, "--task", task, "--output-dir", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["env_id"] == task and result["labels_used"] == 12 and len(result["curve"]) == 2


def test_mujoco_tasks_get_the_zoo_settings():
    from rlhflab.control.ppo import ppo_kwargs

    n_envs, kwargs = ppo_kwargs("HalfCheetah-v5", 100_000)
    assert n_envs == 1 and kwargs["n_steps"] == 512 and kwargs["learning_rate"] == pytest.approx(2.0633e-05)
    assert kwargs["policy_kwargs"]["activation_fn"] is torch.nn.ReLU
    _, again = ppo_kwargs("HalfCheetah-v5", 100_000)  # the table itself is not changed by a call
    assert again["policy_kwargs"]["activation_fn"] is torch.nn.ReLU
    assert ppo_kwargs("Reacher-v5", 256)[1]["n_steps"] == 256  # a short run gets shorter rollouts
