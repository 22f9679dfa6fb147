"""`rlhflab run` across processes: the main process makes the lab's data, every stage runs data-parallel, and the
main process evaluates and writes the report; the run is one process's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhflab.config import load_config
from rlhflab.errors import ConfigError
from rlhflab.lab.tasks import get_task
from rlhflab.pipeline import METHODS, check_processes, run_pipeline
from rlhflab.stages.parallel import DataParallel, silent

from .test_parallel import FSDP, LAUNCHERS, _accelerate_config, _launch
from .test_pipeline import TINY


def _processes(world: int, *, fsdp=None, zero=None) -> DataParallel:
    par = DataParallel.__new__(DataParallel)
    par.rank, par.world, par.fsdp, par.zero = 0, world, fsdp, zero
    return par


def test_a_run_across_processes_refuses_the_methods_whose_stage_does_not_follow():
    check_processes(list(METHODS), _processes(2))  # every method's stage runs data-parallel
    check_processes(["sft", "rm", "quark", "rest"], _processes(1))  # one process runs everything
    with pytest.raises(ConfigError, match=r"--methods: quark trains with the quark stage, which does not run across "
                       r"processes under DeepSpeed; run the methods that do \(sft, rm, dpo, best_of_n\)"):  # fmt: skip
        check_processes(["sft", "rm", "quark", "dpo", "best_of_n"], _processes(2, zero=object()))
    with pytest.raises(ConfigError, match="rest trains with the rs stage, .* under FSDP.*ddp.yaml"):
        check_processes(["sft", "rm", "rest"], _processes(2, fsdp=object()))


def _gaps(one: Path, two: Path, names) -> dict[str, tuple[float, float]]:
    """Each method's largest weight difference between the two runs, and how far it moved from its start."""
    gaps = {}
    for name in names:
        a, b = (load_file(d / name / "final" / "model.safetensors") for d in (one, two))
        start = load_config(METHODS[name].stage, one / name / "config.yaml").model.name_or_path
        s = load_file(Path(start) / "model.safetensors")
        assert a.keys() == b.keys(), name
        gaps[name] = (
            max(float((a[k] - b[k]).abs().max()) for k in a),
            max(float((a[k] - s[k]).abs().max()) for k in s),
        )
    return gaps


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_the_pipeline_on_two_processes_trains_and_reports_as_one(engine, tmp_path, tiny_lab_cache):
    """The methods trained by 2 processes (data-parallel, or sharded by FSDP) equal 1 process's; the data is made
    once, by the main process, and the report (written once) holds the same table."""
    methods = ["sft", "rm", "ppo", "ppo_kl0", "dpo"] if engine == "ddp" else ["sft", "dpo"]
    tiny = TINY if engine == "ddp" else [o for o in TINY if o.startswith(("data.", "eval.", "sft.", "dpo."))]
    choice = [] if engine == "ddp" else ["--methods", ",".join(methods)]
    run_pipeline(
        output_dir=str(tmp_path / "one"), seed=3, overrides=tiny, methods=None if engine == "ddp" else methods
    )
    launcher = LAUNCHERS["torchrun"] if engine == "ddp" else [*FSDP, _accelerate_config("fsdp")]
    out = _launch(
        launcher, ["run", "--seed", "3", "--output-dir", str(tmp_path / "two"), *choice, *tiny], tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    parts = len(methods) + 2
    assert out.stdout.count("job done") == 1 and out.stdout.count(f"[1/{parts}] data") == 1
    one, two = tmp_path / "one", tmp_path / "two"
    for name in ("sft.jsonl", "pairs.jsonl", "prompts.jsonl"):
        assert (one / "data" / name).read_bytes() == (two / "data" / name).read_bytes()
    # SFT starts from the same base model and matches to ~1e-5 as a lone SFT run does (within 1e-5 data parallel,
    # 1.02e-5 measured under FSDP). Every later stage starts from its run's own SFT model, that far apart, and
    # Adam's first steps divide each gradient element by its own magnitude, so a near-zero element's rounding
    # moves its update: the later stages match to 1e-4.
    gaps = _gaps(one, two, methods)
    assert gaps["sft"][0] <= 2e-5, gaps
    assert all(gap <= 1e-4 and moved > 10 * gap for gap, moved in gaps.values()), gaps
    a, b = (json.loads((d / "report.json").read_text())["policies"] for d in (one, two))
    assert (
        a.keys()
        == b.keys()
        == ({"sft", "ppo", "ppo_kl0", "dpo", "best_of_2"} if engine == "ddp" else {"sft", "dpo"})
    )
    for name in a:
        for key in ("gold_reward_mean", "kl_to_sft", "win_rate_vs_sft"):
            assert b[name][key] == pytest.approx(a[name][key], abs=1e-4), (name, key)


class _Follower(DataParallel):
    """Rank 1 of 2, alone: its all-reduces return what the main process is said to have seen (`said`)."""

    def __init__(self, said):
        self.accelerator, self.rank, self.world, self.fsdp, self.zero = None, 1, 2, None, None
        self.said, self.waits = list(said), 0

    def wait(self):
        self.waits += 1

    def sum(self, value):
        assert value == 0.0  # only the main process's view counts
        return self.said.pop(0)

    def main_first(self, make):
        return make()


def test_a_process_other_than_the_main_one_makes_no_data_and_follows_its_decisions(
    tmp_path, monkeypatch, capsys
):
    """Resuming: this process sees sft finished and no dpo run, the main one says sft must run again and dpo
    continues its run: it trains both as told, makes no data, writes nothing and prints nothing."""
    import rlhflab.pipeline as P
    from rlhflab.core.progress import JobClock

    (tmp_path / "sft" / "final").mkdir(parents=True)
    calls = []
    monkeypatch.setattr(P, "_make_data", lambda *a, **k: pytest.fail("only the main process makes the data"))
    monkeypatch.setattr(
        P, "_train", lambda name, cfg, **kw: calls.append((name, kw["resume"])) or tmp_path / name / "final"
    )
    par = _Follower([0.0, 0.0, 0.0, 1.0])  # sft: not kept, no run to continue; dpo: not kept, continues
    clock = JobClock(["data", "sft", "dpo", "eval"], {}, out=silent)
    got = P._train_all(get_task("sentiment"), tmp_path, 0, {}, {"sft": None, "dpo": None}, clock, relabel=None,
                       resume=True, real=False, par=par)  # fmt: skip
    assert calls == [("sft", False), ("dpo", True)] and got is None and par.waits == 1 and not par.said
    assert capsys.readouterr().out == ""


def test_the_pipeline_on_a_process_other_than_the_main_one_trains_and_leaves_the_report_to_it(
    tmp_path, monkeypatch
):
    import rlhflab.pipeline as P

    trained = []
    monkeypatch.setattr(P, "DataParallel", lambda: _Follower([]))
    monkeypatch.setattr(P, "_train_all", lambda *a, **k: trained.append(k["par"].rank))
    monkeypatch.setattr(P, "_evaluate_all", lambda *a, **k: pytest.fail("the main process evaluates"))
    out = tmp_path / "run"
    assert P.run_pipeline(output_dir=str(out), overrides=TINY) == out / "report.html"
    assert trained == [1] and not out.exists()  # the main process makes the directory and writes in it
