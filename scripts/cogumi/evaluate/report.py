"""The validation reports, written atomically into <candidate>/validation/: report.json, report.md, samples.jsonl,
wtl.png. Also reads a stored samples.jsonl back as a baseline, so an earlier run or an external model's outputs
stand in for generating a baseline again.

samples.jsonl rows (one per problem), enough to audit every verdict by hand:
  {"task", "id", "prompt", "gold" (MATH: the gold answer; code: the tests), "outcome" (win, tie_right, tie_wrong,
   loss, judge_error), "candidate": {"output", "passed", "reason" (the rule that decided, or the judge error's
   cause), "extracted" (the answer or program judged), "judge_error"}, "baseline": {...same...}}
As a baseline, a row gives its output from a top-level "output" (an external model's outputs: task, id, output,
optionally prompt) or else from "candidate" (an earlier validation: that run's candidate is today's baseline).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from cogumi.core import fsutil
from cogumi.core.errors import EXIT_DISK_STOP, UserError
from cogumi.core.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text, iter_jsonl
from cogumi.evaluate.pairing import OUTCOMES, RATE_METRICS, GateResult, describe_gate, unreachable

log = logging.getLogger(__name__)

REPORT_FILES = ("report.json", "report.md", "samples.jsonl", "wtl.png")
COLORS = {"win": "#2e7d32", "tie_right": "#90caf9", "tie_wrong": "#b0bec5", "loss": "#c62828"}
LABELS = {"win": "win", "tie_right": "tie (both right)", "tie_wrong": "tie (both wrong)", "loss": "loss"}


class ReportDiskStop(UserError):
    """The disk filled while writing the reports: each file is written under a temporary name first, so none is
    half-written; the same command writes them all again."""

    exit_code = EXIT_DISK_STOP


def write_reports(out_dir: Path, report: dict, samples: list[dict]) -> dict[str, Path]:
    """Write the four report files; returns their paths by name. A full disk is exit 3, not a traceback."""
    from cogumi.merge.output_dir import human_bytes, is_disk_full  # one disk-full test for every stage

    try:
        return _write_reports(Path(out_dir), report, samples)
    except OSError as err:
        if not is_disk_full(err, Path(out_dir)):
            raise
        raise ReportDiskStop("the disk filled while writing the validation reports; no report file is "
                             "half-written (report.json, written last, marks a complete set)", where=str(out_dir),
                             fix=f"free space there ({human_bytes(fsutil.free_bytes(Path(out_dir)))} free now), "
                                 "then run the same command again") from err


def _write_reports(out_dir: Path, report: dict, samples: list[dict]) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in REPORT_FILES}
    atomic_write_text(paths["samples.jsonl"], "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in samples))
    atomic_write_bytes(paths["wtl.png"], render_chart(report))
    atomic_write_text(paths["report.md"], render_markdown(report))
    # report.json last: its presence says the other three are complete.
    atomic_write_json(paths["report.json"], report)
    return paths


def check_reference(reference: dict, tasks: list[str], source: str) -> dict:
    """`validate.reference`: {label: "...", task: {win|tie|tie_right|tie_wrong|loss: percent}}, e.g. the origin
    project's expectation. The report shows it beside the measured rates, under its label; it is never a gate."""
    example = "e.g. reference: {label: origin project, math: {win: 6, tie: 70, loss: 24}}"
    if not isinstance(reference, dict) or not isinstance(reference.get("label", ""), str):
        raise UserError(f"{source} must be a mapping of task -> rates, with an optional label", where=source,
                        fix=example)
    checked = {"label": reference.get("label") or "validate.reference"}
    for task, rates in reference.items():
        if task == "label":
            continue
        where = f"{source}.{task}"
        if task not in tasks or not isinstance(rates, dict):
            raise UserError(f"reference for '{task}' must be a mapping of rate -> percent for a task that runs",
                            where=where, fix=f"tasks run: {', '.join(tasks)}; {example}")
        for name, value in rates.items():
            if name not in RATE_METRICS or isinstance(value, bool) or not isinstance(value, int | float) \
                    or not 0 <= value <= 100:
                raise UserError(f"reference {task}.{name}: {value!r} is not a rate in percent", where=f"{where}.{name}",
                                fix=f"rates are {', '.join(RATE_METRICS)}, each 0-100")
        checked[task] = {name: float(value) for name, value in rates.items()}
    return checked if len(checked) > 1 else {}


def describe_reference(rates: dict) -> str:
    """`win 6 %, tie 70 %, loss 24 %`."""
    return ", ".join(f"{name} {value:g} %" for name, value in rates.items())


def render_markdown(report: dict) -> str:
    verdict = "PASS" if report["passed"] else "FAIL"
    lines = [
        f"# Validation: {report['phase']} - {verdict}",
        "",
        f"- candidate: `{report['candidate']}`",
        f"- baseline: `{report['baseline']}`{' (stored samples)' if report.get('baseline_stored') else ''}",
        f"- created: {report['created']}; greedy, max_new_tokens {report['max_new_tokens']}, "
        f"limit {report['limit']}, seed {report['seed']}",
        "",
        "![win/tie/loss per task](wtl.png)",
        "",
    ]
    for task, summary in report["tasks"].items():
        counts, pct = summary["counts"], summary["pct"]
        lines += [
            f"## {task.upper()} ({summary['source']}, n = {summary['n']})",
            "",
            "| outcome | count | % |",
            "|---|---:|---:|",
        ]
        for name in OUTCOMES:
            lines.append(f"| {LABELS[name]} | {counts[name]} | {pct[name]:.1f} |")
        lines += [
            f"| **tie (all)** | {counts['tie']} | {pct['tie']:.1f} |",
            "",
            f"Accuracy: candidate {summary['candidate_accuracy']:.1f} %, baseline {summary['baseline_accuracy']:.1f} %."
            f" Exact McNemar p (two-sided, {counts['win']} wins vs {counts['loss']} losses): "
            f"{summary['mcnemar_p']:.4g}; one-sided p that losses exceed wins: {summary['regression_p']:.4g}.",
            "",
        ]
        reference = report.get("reference", {})
        if task in reference:
            lines += [f"Reference, not a gate ({reference['label']}): {describe_reference(reference[task])}.", ""]
        if summary.get("judge_errors"):
            lines += [f"Judge errors: {summary['judge_errors']} of {summary['problems']} problems "
                      f"({summary['judge_error_pct']:.1f} %), left out of the table above; their causes are in "
                      "samples.jsonl (outcome judge_error).", ""]
        gates = [g for g in report["gates"] if g["task"] == task]
        if gates:
            lines += ["| gate | value | limit | result |", "|---|---:|---:|---|"]
            notes = []
            for g in gates:
                value = "not run" if g["value"] is None else f"{g['value']:.4g}"
                lines.append(f"| {g['gate']} | {value} | {g['limit']:g} | {'pass' if g['passed'] else '**FAIL**'} |")
                notes.append(unreachable(GateResult(**g), summary))
            lines.append("")
            lines += [f"Note: {note}." for note in notes if note] + ([""] if any(notes) else [])
        lines += ["| model | prompts | new tokens | wall s | tokens/s |", "|---|---:|---:|---:|---:|"]
        for side in ("candidate", "baseline"):
            stats = summary["generation"].get(side)
            if stats is None:
                lines.append(f"| {side} | stored samples | - | - | - |")
            else:
                lines.append(f"| {side} | {stats['prompts']} | {stats['new_tokens']} | {stats['wall_s']:.2f} | "
                             f"{stats['tokens_per_s']:.1f} |")
        lines.append("")
    not_run = [g for g in report["gates"] if g["task"] not in report["tasks"]]
    if not_run:
        lines += ["## Gates on tasks not run", ""] + [f"- {describe_gate(GateResult(**g))}" for g in not_run] + [""]
    return "\n".join(lines)


def render_chart(report: dict) -> bytes:
    """A horizontal stacked bar per task (win, ties, loss in percent), labelled; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a GPU box; must precede pyplot
    import matplotlib.pyplot as plt

    tasks = list(report["tasks"])
    fig, ax = plt.subplots(figsize=(9, 1.4 + 0.9 * max(1, len(tasks))), dpi=120)
    try:
        for row, task in enumerate(tasks):
            summary = report["tasks"][task]
            left = 0.0
            for name in OUTCOMES:
                width = summary["pct"][name]
                ax.barh(row, width, left=left, color=COLORS[name], edgecolor="white",
                        label=LABELS[name] if row == 0 else None)
                if width >= 6:  # narrower segments cannot hold a readable label
                    ax.text(left + width / 2, row, f"{width:.0f}%", ha="center", va="center", fontsize=10,
                            color="white" if name in ("win", "loss") else "black")
                left += width
        ax.set_yticks(range(len(tasks)))
        ax.set_yticklabels([f"{t.upper()}\nn={report['tasks'][t]['n']}, p={report['tasks'][t]['mcnemar_p']:.3g}"
                            for t in tasks], fontsize=10)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("% of problems")
        verdict = "PASS" if report["passed"] else "FAIL"
        # The legend sits between title and bars: below the axis it collides with the label on a one-task chart.
        ax.set_title(f"{report['phase']}: candidate vs baseline ({verdict})", fontsize=11, pad=26)
        ax.legend(ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False, fontsize=9)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def read_baseline_samples(path: Path) -> dict[tuple[str, str], dict]:
    """{(task, id): {"output", "prompt"}} from a stored samples.jsonl (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"baseline samples file not found: {path}", where=str(path),
                        fix="give a model folder, or a samples.jsonl from an earlier `make validate`")
    rows = {}
    for where, row in iter_jsonl(path, fix="each line must be one JSON object"):
        if not isinstance(row, dict):
            raise UserError(f"baseline sample is a JSON {type(row).__name__}, not an object", where=where,
                            fix="each line must be one object {task, id, output}")
        output = row.get("output")
        if output is None and isinstance(row.get("candidate"), dict):
            output = row["candidate"].get("output")
        if not isinstance(output, str) or "task" not in row or "id" not in row:
            raise UserError("baseline sample needs task, id and output (or candidate.output)", where=where,
                            fix="use a samples.jsonl written by `make validate`, or rows {task, id, output}")
        key = (str(row["task"]), str(row["id"]))
        if key in rows:
            raise UserError(f"duplicate baseline sample {key[0]}/{key[1]}", where=where,
                            fix="keep one row per task and problem id")
        rows[key] = {"output": output, "prompt": row.get("prompt")}
    log.info("read %d stored baseline samples from %s", len(rows), path)
    return rows


def baseline_outputs(stored: dict, task: str, problems: list, path: Path) -> list[str]:
    """The stored outputs for exactly these problems, in order; a missing or re-worded problem is an error."""
    missing = [p.id for p in problems if (task, str(p.id)) not in stored]
    if missing:
        raise UserError(f"{len(missing)} of {len(problems)} {task} problems have no stored baseline output "
                        f"(first: {missing[0]})", where=str(path),
                        fix="use the same data, limit and seed as the run that wrote it, or give a model folder")
    changed = [p.id for p in problems
               if stored[(task, str(p.id))]["prompt"] not in (None, p.prompt)]
    if changed:
        raise UserError(f"{len(changed)} stored {task} baseline prompts differ from today's (first: {changed[0]}); "
                        "outputs to different prompts are not comparable", where=str(path),
                        fix="regenerate the baseline from its model folder")
    return [stored[(task, str(p.id))]["output"] for p in problems]
