"""A feedback source's state in the checkpoints of an online run (online DPO), across data-parallel processes."""

from __future__ import annotations

from rlhflab.errors import ConfigError


class FeedbackCheckpoint:
    """The feedback source's state in the checkpoints (its queries, its random stream): one process's dict, or
    across processes every process's, gathered after each step (only the main process writes a checkpoint)."""

    def __init__(self, feedback, par):
        self.feedback, self.par, self.states = feedback, par, []
        self.active = hasattr(feedback, "state_dict")

    def state(self) -> dict:
        return {"feedback": self.states if self.par.world > 1 else self.feedback.state_dict()}

    def after_step(self) -> None:
        if self.active and self.par.world > 1:
            self.states = self.par.gather([self.feedback.state_dict()])

    def resume(self, resumed: dict) -> None:
        if self.active and "feedback" in resumed:
            self.feedback.load_state_dict(_own_state(resumed["feedback"], self.par))


def _own_state(saved, par) -> dict:
    """This process's feedback state from a checkpoint: one process's dict, or the list of every process's,
    which only the same number of processes can take up (each its own)."""
    if isinstance(saved, dict) and par.world == 1:
        return saved
    n = len(saved) if isinstance(saved, list) else 1
    if n != par.world:
        raise ConfigError(
            f"config: this online-dpo run was checkpointed by {n} process(es) and is resumed by {par.world}; its "
            f"feedback sources' states (the queries asked, their random streams) are per process: resume it with "
            f"{n} process(es)"
        )
    return saved[par.rank]
