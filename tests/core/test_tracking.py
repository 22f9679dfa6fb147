import json
import math

import pytest
import torch

from rlhflab.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rlhflab.core.health import check_finite
from rlhflab.core.io import atomic_dir, atomic_write_text
from rlhflab.core.metrics_log import MetricsLogger, read_metrics
from rlhflab.core.run_dir import prepare_run_dir
from rlhflab.core.seeding import batch_schedule, seed_everything
from rlhflab.errors import TrainingHealthError, UserError


def test_batch_schedule_depends_only_on_seed_and_epoch():
    a = batch_schedule(10, 3, seed=1, epoch=0)
    assert a == batch_schedule(10, 3, seed=1, epoch=0)
    assert a != batch_schedule(10, 3, seed=1, epoch=1)
    assert len(a) == 3 and all(len(b) == 3 for b in a)  # drop_last: 10 // 3 full batches
    assert len(set(sum(a, []))) == 9


def _train(model, opt, steps, start=0, data=None):
    for step in range(start, steps):
        x, y = data[step]
        # Dropout-like randomness inside the step makes RNG restoration matter for exactness.
        noise = torch.randn_like(x) * 0.01
        loss = ((model(x + noise) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_resume_is_exact(tmp_path):
    torch.manual_seed(0)
    data = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(6)]

    seed_everything(0)
    ref = torch.nn.Linear(3, 1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.1)
    _train(ref, ref_opt, 6, data=data)

    seed_everything(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    _train(model, opt, 3, data=data)
    save_checkpoint(tmp_path, 3, model=model, optimizer=opt, state={"epoch": 0})
    torch.randn(100)  # the interrupted process's RNG moves on; the checkpoint must not care

    seed_everything(123)
    resumed = torch.nn.Linear(3, 1)
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=0.1)
    state = load_checkpoint(latest_checkpoint(tmp_path), model=resumed, optimizer=resumed_opt)
    assert state == {"step": 3, "epoch": 0}
    _train(resumed, resumed_opt, 6, start=3, data=data)
    for p, q in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_rotation_and_atomicity(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000003"]

    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("crash while writing")
    assert not target.exists() and not list(tmp_path.glob(".out*"))


def test_atomic_write_text_replaces_whole_file(tmp_path):
    p = tmp_path / "a" / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two" and len(list(p.parent.iterdir())) == 1


def test_metrics_logger_writes_jsonl_and_tensorboard(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=True)
    log.log(1, {"loss/train": torch.tensor(0.5), "reward/mean": 2, "skip": "text", "vec": torch.ones(3)})
    log.log(2, {"loss/train": float("nan")})
    log.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["step"] == 1 and rows[0]["loss/train"] == 0.5 and rows[0]["reward/mean"] == 2.0
    assert "skip" not in rows[0] and "vec" not in rows[0]
    assert math.isnan(json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])["loss/train"])
    assert list((tmp_path / "tb").iterdir())


def test_run_dir_refuses_to_clobber(tmp_path):
    out = tmp_path / "run"
    prepare_run_dir(out, "sft", resume=False)
    (out / "config.yaml").write_text("x")
    with pytest.raises(UserError, match="--resume"):
        prepare_run_dir(out, "sft", resume=False)
    assert prepare_run_dir(out, "sft", resume=True) == out
    prepare_run_dir(out, "sft", resume=False, overwrite=True)
    assert not (out / "config.yaml").exists()
    with pytest.raises(UserError, match="no run to resume"):
        prepare_run_dir(tmp_path / "new", "sft", resume=True)


def test_check_finite(tmp_path):
    check_finite({"loss": torch.tensor(1.0), "x": 2.0}, step=1)
    with pytest.raises(
        TrainingHealthError, match="step 7: loss/train is not finite.*last good checkpoint is"
    ):
        check_finite({"loss/train": torch.tensor([1.0, float("nan")])}, step=7, last_good=tmp_path)
