"""Asynchronous successive halving (ASHA, one bracket) whose rung records outlive an interrupted sweep.

Ray Tune's own ``ASHAScheduler`` keeps its rungs in memory, and ``Tuner.restore`` brings back the
scheduler pickled when the sweep *started*: a resumed sweep forgets every result reported before the
interruption, so the trials that resume are compared only with one another (and a trial whose stop was
lost in the interrupt trains on past it). This scheduler keeps each rung record as a line of a JSON
file in the sweep's work directory and reads the file again whenever it is unpickled, so a resumed
sweep decides as the uninterrupted one would have.

The algorithm is ASHA's (Li et al., 2020) as Ray Tune implements it with ``brackets=1`` and
``stop_last_trials=False``: rungs at ``grace_period * reduction_factor**k`` up to ``max_t``; the first
report of a trial at or past a rung's step is compared with the results earlier trials reported there
and stopped when it falls outside the best ``1 / reduction_factor`` of them (the percentile cut of
numpy's linear interpolation); only the highest rung a report has reached counts. Two deliberate
differences: a trial reporting a non-finite objective (a diverged run) is stopped at its rung, where
Ray's would let it train on; and a trial reporting again at a rung it has a record for (it resumed from
a checkpoint older than its stop) gets the recorded answer again, and one that ASHA stopped is stopped
again wherever it reports next (the stop was lost in an interrupt after the trial had checkpointed past
it), the stop then recorded at that step too.

Given the Tune experiment's folder, the records file keeps its place relative to it: a sweep restored
from a moved experiment (Tune moves its trials along) reads and writes the records in the new place.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

log = logging.getLogger("meld.tune")


def rung_steps(grace_period: int, max_t: int, reduction_factor: float) -> list[float]:
    """The rungs' steps, lowest first: grace_period, x reduction_factor, ... while <= max_t."""
    # an infinite max_t never ends the loop below; a NaN slips past every comparison
    finite = all(map(math.isfinite, (grace_period, max_t, reduction_factor)))
    if not finite or not (0 < grace_period <= max_t) or reduction_factor <= 1:
        raise ValueError(
            f"ASHA needs finite 0 < grace_period <= max_t and reduction_factor > 1, got grace_period={grace_period}, "
            f"max_t={max_t}, reduction_factor={reduction_factor}"
        )
    steps, step = [], grace_period
    while step <= max_t:
        steps.append(step)
        step *= reduction_factor
    return steps


class ResumableASHA(FIFOScheduler):
    """ASHA over ``time_attr`` whose rung records are appended to ``records_file``.

    A trial is known by the values of ``key_params`` in its config (the sweep's knobs), not by Tune's
    trial id, so the file reads on its own and a record stays attached to its trial across restores.
    Each line: ``{"config": {...}, "rung": step, "step": reported step, "objective": value, "stopped": bool}``.

    ``experiment_dir``: the Tune experiment's folder (``storage_path / name``). Tune pickles the scheduler,
    absolute paths and all, when the sweep starts; restored from a folder that has moved since, the
    scheduler learns the new one from the trials Tune hands it and moves ``records_file`` along with it
    (without it the restored scheduler read no records and appended to the old path: FileNotFoundError,
    the sweep ending in a TuneError on every rerun, or records written into a copy the report never reads).
    """

    def __init__(self, records_file: str | Path, *, key_params: tuple[str, ...], time_attr: str, max_t: int,
                 grace_period: int, reduction_factor: float, metric: str | None = None, mode: str | None = None,
                 experiment_dir: str | Path | None = None):
        super().__init__()
        self.records_file = Path(records_file)
        self.experiment_dir = Path(experiment_dir).resolve() if experiment_dir is not None else None
        # the records' place relative to the experiment folder, kept when the folder moves
        self._records_from_experiment = (os.path.relpath(self.records_file.resolve(), self.experiment_dir)
                                         if self.experiment_dir is not None else None)
        self.key_params = tuple(key_params)
        self.time_attr = time_attr
        self.max_t = max_t
        self.reduction_factor = reduction_factor
        self.rungs = rung_steps(grace_period, max_t, reduction_factor)
        self._metric, self._mode = None, None  # TrialScheduler's fields (its `metric` property)
        self.set_search_properties(metric, mode)
        self._records: dict[float, dict[str, dict]] | None = None  # rung -> trial key -> record; read lazily

    # Tune pickles the scheduler (at the sweep's start) and restores that pickle on resume: the records
    # are never part of it, so a restored scheduler reads them from the file, which has them all.
    def __getstate__(self):
        return {**self.__dict__, "_records": None}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        if (self._metric and metric and metric != self._metric) or (self._mode and mode and mode != self._mode):
            return False  # set twice, differently: Tune reports the conflict
        if mode is not None and mode not in ("min", "max"):
            raise ValueError(f"ASHA's mode must be 'min' or 'max', got {mode!r}")
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return True

    def follow_the_experiment(self, trial) -> None:
        """Where ``trial``'s experiment folder (its Tune storage, which a restore from a moved folder
        points at the new one) is not the one this scheduler was made for, move the records file with it."""
        now = getattr(getattr(trial, "storage", None), "experiment_fs_path", None)
        if self.experiment_dir is None or now is None or Path(now).resolve() == self.experiment_dir:
            return
        moved_to = Path(os.path.normpath(Path(now).resolve() / self._records_from_experiment))
        log.warning("the sweep's Tune experiment moved from %s to %s: ASHA's rung records are read from and "
                    "written to %s, not %s", self.experiment_dir, Path(now).resolve(), moved_to, self.records_file)
        self.records_file, self.experiment_dir = moved_to, Path(now).resolve()
        self._records = None  # read again, from the records' new place

    def on_trial_add(self, tune_controller, trial):
        # Tune adds every trial of a restored sweep, finished ones too, before any trial reports
        self.follow_the_experiment(trial)
        super().on_trial_add(tune_controller, trial)

    def trial_key(self, config: dict) -> str:
        missing = [k for k in self.key_params if k not in config]
        if missing:
            raise KeyError(f"ASHA keys trials by {list(self.key_params)}, but a trial's config lacks {missing}")
        return json.dumps({k: config[k] for k in self.key_params}, sort_keys=True)

    def records(self) -> dict[float, dict[str, dict]]:
        if self._records is None:
            self._records = {rung: {} for rung in self.rungs}
            rows, cut_off = _read(self.records_file)
            if cut_off:  # mend the cut-off line now, or the next record would be appended to it
                _end_at_a_whole_line(self.records_file)
            for row in rows:
                if row["rung"] in self._records:
                    self._records[row["rung"]][self.trial_key(row["config"])] = row
        return self._records

    def cutoff(self, rung: float) -> float | None:
        """The objective a trial must reach (at or below for ``min``) not to be stopped at ``rung``."""
        sign = 1.0 if self._mode == "max" else -1.0
        scores = [sign * r["objective"] for r in self.records()[rung].values() if math.isfinite(r["objective"])]
        if not scores:
            return None
        return sign * float(np.percentile(scores, (1 - 1 / self.reduction_factor) * 100))

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self._judge(trial, result, final=False)

    def on_trial_complete(self, tune_controller, trial, result: dict):
        if result:
            self._judge(trial, result, final=True)  # its last result counts at its rung, as in Ray's ASHA

    def _judge(self, trial, result: dict, final: bool) -> str:
        if self._metric is None or self._mode is None:
            raise ValueError("ASHA needs a metric and a mode: pass them here or to tune.TuneConfig")
        self.follow_the_experiment(trial)
        if self.time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        step = result[self.time_attr]
        reached = [rung for rung in self.rungs if step >= rung]
        if not reached:
            return TrialScheduler.CONTINUE
        rung, key = reached[-1], self.trial_key(trial.config)
        stop = next((self.records()[r][key] for r in reached if self.records()[r].get(key, {}).get("stopped")), None)
        if stop is not None:
            # A stop lost in an interrupt: the trial resumed from a checkpoint older or newer than it (its
            # workers train on while Tune stops it), and reports again at the stop's rung or past it. It is
            # stopped again, as the uninterrupted sweep stopped it, and where the step differs the stop is
            # recorded at this step too: its results end here now, and the sweep's report counts a trial
            # early-stopped only where its results end (else it stayed unfinished on every rerun).
            if step != stop["step"] and not final:
                self._append(stop["rung"], {**stop, "step": step})
            # Its completion, which Tune sends with the result just stopped, records nothing either: from
            # past a higher rung it would put a trial stopped below that rung among the rung's results.
            return TrialScheduler.STOP
        if key in self.records()[rung]:
            return TrialScheduler.CONTINUE
        objective = float(result[self._metric])
        cutoff = self.cutoff(rung)
        worse = cutoff is not None and (objective > cutoff if self._mode == "min" else objective < cutoff)
        # a trial at max_t has finished: there is nothing left to stop
        stopped = not final and step < self.max_t and (worse or not math.isfinite(objective))
        row = {"config": {k: trial.config[k] for k in self.key_params}, "rung": rung, "step": step,
               "objective": objective, "stopped": stopped}
        self._append(rung, row)
        if stopped:
            why = "not finite" if not math.isfinite(objective) else f"worse than the rung's cutoff {cutoff:.4g}"
            log.info("ASHA stops %s at step %s: %s %.4g, %s", key, step, self._metric, objective, why)
        return TrialScheduler.STOP if stopped else TrialScheduler.CONTINUE

    def _append(self, rung: float, row: dict) -> None:
        """Make ``row`` its trial's record at ``rung``, in memory and as a line of the file."""
        self.records()[rung][self.trial_key(row["config"])] = row
        with open(self.records_file, "a") as f:
            f.write(json.dumps(row) + "\n")

    def summary(self) -> list[dict]:
        """Per rung, lowest first: its step, how many trials reported there, the objective a further
        trial would have to reach there (None: no finite result yet) and the trials stopped there."""
        return [{"step": rung, "trials": len(self.records()[rung]), "cutoff": self.cutoff(rung),
                 "stopped": [r["config"] for r in self.records()[rung].values() if r["stopped"]]}
                for rung in self.rungs]

    def debug_string(self) -> str:
        cuts = ", ".join(f"step {rung:g}: {len(self.records()[rung])} trials, cutoff {self.cutoff(rung)}"
                         for rung in self.rungs)
        return f"ASHA (records in {self.records_file.name}): {cuts}"


def read_records(records_file: Path) -> list[dict]:
    """The file's rows, oldest first. A last line cut off by a killed driver is skipped with a warning
    (the result it held is judged again when the trial reports it again); any other bad line is an error."""
    return _read(records_file)[0]


def _end_at_a_whole_line(records_file: Path) -> None:
    """End the file with a whole record: a cut-off last line is cut away, a last record that lacks
    only its newline gets it. The lines before it are never rewritten: a rewrite of the whole file
    that failed part-way (a second kill, a full disk) lost every record past the point it reached."""
    with open(records_file, "r+b") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        try:
            json.loads(data[end:])
        except ValueError:  # what _read skipped
            f.truncate(end)
        else:  # what _read kept
            f.write(b"\n")


def _read(records_file: Path) -> tuple[list[dict], bool]:
    """:func:`read_records`, and whether the file ends in a cut-off line (read once)."""
    if not records_file.is_file():
        return [], False
    text = records_file.read_text()
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                log.warning("%s: its last line is incomplete (a driver killed while writing it); skipped", records_file)
            else:
                raise ValueError(f"{records_file}, line {i + 1}: not a JSON record ({e})") from e
    return rows, bool(text) and not text.endswith("\n")
