"""The sabotage catalog: each entry breaks one claim of the project in one small edit, and names the
tests that must catch it. Anchors are exact strings that must occur once in the file; when the code
moves, the entry is STALE and must be updated with it (the runner fails on stale entries)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sabotage:
    name: str
    claim: str  # what the broken code violates
    file: str
    anchor: str
    replacement: str
    tests: tuple[str, ...]


SABOTAGES: list[Sabotage] = [
    Sabotage(
        name="packer_drops_a_sample",
        claim="every sample is packed exactly once",
        file="mmtrain/packing/policy.py",
        anchor="            packs.append(ids[p].tolist())",
        replacement="            packs.append(ids[p].tolist()[1:] or ids[p].tolist())",
        tests=("tests/unit/packing/test_algorithms.py",),
    ),
    Sabotage(
        name="cu_seqlens_off_by_one",
        claim="cu_seqlens keep samples apart at their exact boundaries",
        file="mmtrain/steps/batch.py",
        anchor="            bounds.append(offset + used)",
        replacement="            bounds.append(offset + used + (1 if len(bounds) == 1 and used > 1 else 0))",
        tests=("tests/unit/steps/test_batch.py",),
    ),
    Sabotage(
        name="step_lines_miss_train_log",
        claim="step lines go to stdout and to <output_dir>/train.log",
        file="mmtrain/train/log.py",
        anchor="        for h in (self.console, self.file):",
        replacement="        for h in (self.console,):",
        tests=("tests/unit/train/test_log.py",),
    ),
    Sabotage(
        name="tensorboard_step_off_by_one",
        claim="TensorBoard steps count like the log lines (step 1 = the first optimizer step)",
        file="mmtrain/train/log.py",
        anchor="                self.tb.add_scalar(tag, v, global_step=done)",
        replacement="                self.tb.add_scalar(tag, v, global_step=done - 1)",
        tests=("tests/unit/train/test_log.py",),
    ),
    Sabotage(
        name="compare_padding_from_the_wrong_run",
        claim="every number of the compare table is that run's own summary value",
        file="mmtrain/compare.py",
        anchor='            "padding_fraction": summary.get("padding_fraction"),',
        replacement='            "padding_fraction": unpacked.get("padding_fraction"),',
        tests=("tests/unit/test_compare.py",),
    ),
    Sabotage(
        name="analyze_not_training_lengths",
        claim="mmtrain analyze on the training config reports the lengths training packs",
        file="mmtrain/analysis/training.py",
        anchor="    image = tiles * tpt\n",
        replacement="    image = tiles * (tpt + 1)\n",
        tests=("tests/unit/analysis/test_training_view.py",),
    ),
    Sabotage(
        name="run_plot_without_its_series",
        claim="mmtrain plot draws the run's metrics, not empty axes",
        file="mmtrain/analysis/plot.py",
        anchor='    ax.plot(xs, ys, color="tab:blue", linewidth=1.2, label="loss per step", **_marker(len(xs)))',
        replacement="    pass",
        tests=("tests/unit/analysis/test_plot.py",),
    ),
    Sabotage(
        name="noisy_start_up",
        claim="tool commands print at most three warning lines",
        file="mmtrain/quiet.py",
        anchor='    if os.environ.get("MMTRAIN_SHOW_WARNINGS", "") not in ("", "0"):',
        replacement="    if True:",
        tests=("tests/unit/test_quiet.py",),
    ),
    Sabotage(
        name="import_cycle",
        claim="no import cycles inside mmtrain/ (function-level imports included)",
        file="mmtrain/data/config.py",
        anchor="from dataclasses import dataclass\n",
        replacement="from dataclasses import dataclass\n\n\ndef _root():\n    from mmtrain.config import MMTrainConfig\n\n    return MMTrainConfig\n",
        tests=("tests/unit/test_layering.py",),
    ),
]
