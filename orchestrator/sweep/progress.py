"""The line printed when a trial ends: method, parameters, rungs, state, best so far."""

from __future__ import annotations

from typing import Any

from orchestrator.study.group import StudyGroup
from orchestrator.study.records import Rung, State, TrialRecord


class Progress:
    """A ``TrialListener`` printing one line per finished trial."""

    def __init__(self, group: StudyGroup, say: Any, multi_objective: bool = False) -> None:
        self.group = group
        self.say = say
        self.multi_objective = multi_objective

    def trial_started(self, record: TrialRecord) -> None:
        pass

    def trial_rung(self, record: TrialRecord, rung: Rung) -> None:
        pass

    def trial_finished(self, record: TrialRecord) -> None:
        params = " ".join(f"{k.split('.', 1)[-1]}={_short(v)}" for k, v in record.params.items() if k != "method")
        rungs = " ".join(f"{r.score:.3f}@{r.n_items}" for r in record.rungs)
        state = record.state.value
        if record.state is State.COMPLETE and record.value is not None:
            state = f"complete {record.value:.4f}"
        reason = f" ({record.reason})" if record.reason and record.state is not State.PRUNED else ""
        self.say(f"trial {record.number:>3} {record.method:<16} {params}  | {rungs} | {state}{self._best(record)}{reason}")

    def _best(self, record: TrialRecord) -> str:
        if self.multi_objective:
            return ""
        done = [r for r in self.group.records() if r.state is State.COMPLETE and r.value is not None]
        if record.state is State.COMPLETE and record.value is not None and all(r.number != record.number for r in done):
            done.append(record)
        if not done:
            return ""
        best = max(done, key=lambda r: r.value)
        return f" | best {best.value:.4f} (#{best.number} {best.method})"


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
