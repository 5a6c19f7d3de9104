"""report stage: one comparison table (reports/summary.md) and plots from every metrics/<system>.json.

    python -m pipeline.report --params params.yaml --metrics metrics --out reports

The TTS table follows the paper's Tables 2, 4 and 5: judge WER (with S/D/I), SIM, generated
vs ground-truth minutes, longest silence, max-length hits; ablation rows follow their system.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from meld.config import EvaluateConfig, read_params, run_stage

TTS_COLUMNS = [
    ("WER", "wer", "{:.1%}"), ("GT-WER (vocoded)", "wer_ground_truth_vocoded", "{:.1%}"),
    ("WER MELD-STT judge", "wer_meld_stt_judge", "{:.1%}"), ("GT-WER MELD-STT", "wer_ground_truth_meld_stt_judge", "{:.1%}"),
    ("S/D/I", None, None), ("SIM", "sim", "{:.3f}"), ("SIM n", None, None),
    ("SIM GT cont.", "sim_ground_truth_continuation", "{:.3f}"),
    ("SIM other spk.", "sim_other_speaker", "{:.3f}"),
    ("SIM other spk. (vocoded)", "sim_other_speaker_vocoded", "{:.3f}"), ("dur. ratio", "duration_ratio", "{:.2f}"),
    ("gen. min / GT min", None, None), ("longest sil. (s)", "longest_silence_s", "{:.3f}"),
    ("GT longest sil. (s)", "ground_truth_longest_silence_s", "{:.3f}"), ("max-len hits", "max_length_hits", "{}"),
    ("RTF", "rtf", "{:.3g}"),  # significant digits: a GPU's 0.0004 is not 0.000
]


def _finite(v) -> bool:
    return v is not None and not (isinstance(v, float) and not math.isfinite(v))


def _number(v, fmt: str) -> str:
    """A metric as a table cell: "–" where there is none, NaN and inf said as such (never "nan%")."""
    if v is None:
        return "–"
    return fmt.format(v) if _finite(v) else str(v).replace("nan", "NaN")


def _name(text) -> str:
    """A system, split or speaker name as one Markdown table cell: a '|' would split the cell and a
    newline end the row, shifting every later cell of the table."""
    return " ".join(str(text).splitlines()).replace("|", "\\|")


def _cell(m: dict, key: str | None, fmt: str | None, title: str) -> str:
    if title == "S/D/I":
        return f"{m['substitutions']}/{m['deletions']}/{m['insertions']}" if "substitutions" in m else "–"
    if title == "SIM n":  # generations SIM averages over / all of them (older metrics files lack the count)
        return f"{m['sim_generations']}/{m['generations']}" if "sim_generations" in m else "–"
    if title == "gen. min / GT min":  # a missing total is "–", not 0.00 minutes
        return f"{_number(m.get('generated_minutes'), '{:.2f}')} / {_number(m.get('ground_truth_minutes'), '{:.2f}')}"
    return _number(m.get(key), fmt)


def tts_table(all_metrics: list[dict]) -> list[str]:
    head = ["system", "split"] + [c[0] for c in TTS_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in all_metrics:
        if m.get("unavailable"):
            lines.append(f"| {_name(m['system'])} | – | {_name(m['unavailable'])} |" + " |" * (len(head) - 3))
            continue
        if not m.get("splits"):
            if m.get("task") != "stt":  # a TTS or joint system evaluated with evaluate.splits: [] is named, not dropped
                lines.append(f"| {_name(m['system'])} | – | no TTS split evaluated (evaluate.splits is empty) |"
                             + " |" * (len(head) - 3))
            continue  # an STT-only system: its rows are in the STT table
        rows = [(m["system"], m.get("splits", {}))] + list(m.get("ablations", {}).items())
        for name, splits in rows:
            for split, s in splits.items():
                if not s:  # no utterance of the split within evaluate.min_seconds..max_seconds
                    lines.append(f"| {_name(name)} | {_name(split)} | no utterance within "
                                 "evaluate.min_seconds..max_seconds |" + " |" * (len(head) - 3))
                    continue
                lines.append("| " + " | ".join([_name(name), _name(split)]
                                               + [_cell(s, k, f, t) for t, k, f in TTS_COLUMNS]) + " |")
    return lines


def stt_table(all_metrics: list[dict]) -> list[str]:
    rows = [m for m in all_metrics if m.get("stt")]
    if not rows:
        return []
    splits = sorted({s for m in rows for s in m["stt"]})
    lines = ["| system | task mode | decoding | " + " | ".join(f"WER {_name(s)}" for s in splits) + " |",
             "|" + "---|" * (3 + len(splits))]
    for m in rows:
        cells = [_number(m["stt"][s].get("wer"), "{:.1%}") if s in m["stt"] else "–" for s in splits]
        lines.append(f"| {_name(m['system'])} | {_name(m.get('task', 'stt'))} | {stt_decoding(m)} | "
                     + " | ".join(cells) + " |")
    return lines


def stt_decoding(metrics: dict) -> str:
    """How the evaluation decoded a system's STT: greedy or beam N (``evaluate.stt_beam_size``), with the
    CTC prefix score's weight where one was applied; "beam search" for metrics written before the beam
    size was recorded."""
    beam = metrics.get("stt_beam_size")
    text = "beam search" if beam is None else "greedy" if beam == 1 else f"beam {beam}"
    weight = metrics.get("stt_ctc_weight")
    return text + (f", CTC weight {weight:g}" if isinstance(weight, (int, float)) and weight > 0 else "")


def stt_speaker_table(all_metrics: list[dict]) -> list[str]:
    """STT WER per split and speaker (rows) for every STT-capable system (columns): where a
    system's errors sit, e.g. new recorded people in ``test_unseen`` against the seen voices."""
    rows = [m for m in all_metrics if any(v.get("per_speaker") for v in (m.get("stt") or {}).values())]
    if not rows:
        return []
    lines = ["| split | speaker | " + " | ".join(_name(m["system"]) for m in rows) + " |", "|" + "---|" * (2 + len(rows))]
    for split in sorted({s for m in rows for s in m["stt"]}):
        speakers = sorted({spk for m in rows for spk in m["stt"].get(split, {}).get("per_speaker", {})})
        for spk in speakers:
            cells = [m["stt"].get(split, {}).get("per_speaker", {}).get(spk) for m in rows]
            lines.append(f"| {_name(split)} | {_name(spk)} | " + " | ".join(_number(c, "{:.1%}") for c in cells) + " |")
    return lines


def silence_statement(all_metrics: list[dict]) -> list[str]:
    """Does MELD generate less prolonged silence than Mel-LM and MELLE? Said with the numbers, either way."""
    by = {m["system"]: m.get("splits", {}) for m in all_metrics if m.get("splits")}
    if "meld" not in by:
        return []
    out = ["## Prolonged silence (longest silence per generation, mean seconds)", ""]
    for other in ("mel_lm", "melle"):
        if other not in by:
            continue
        for split, s in by["meld"].items():
            o = by[other].get(split)
            if not o or not _finite(s.get("longest_silence_s")) or not _finite(o.get("longest_silence_s")):
                continue  # NaN is neither less nor more
            # judged at the precision shown (ms; a mean of 10 ms frames over a few generations moves in 5 ms
            # steps), so the verdict never contradicts the two numbers beside it
            a, b = round(s["longest_silence_s"], 3), round(o["longest_silence_s"], 3)
            verdict = "less" if a < b else "more" if a > b else "the same"
            truth = s.get("ground_truth_longest_silence_s")
            out.append(f"- {split}: MELD {a:.3f} s vs {other} {b:.3f} s: MELD generates {verdict} prolonged silence "
                       f"(ground truth {f'{truth:.3f} s' if _finite(truth) else '–'}).")
    return out if len(out) > 2 else []


# (metric, its ground-truth reference in the same metrics, panel title); a None reference is drawn at 1
# for every row, a real one per row: systems' references differ (Codec-LM's ground truth goes through its codec)
PANELS = [
    ("wer", "wer_ground_truth_vocoded", "judge WER (lower is better)"),
    ("sim", "sim_ground_truth_continuation", "speaker SIM to the prompt (higher is better)"),
    ("longest_silence_s", "ground_truth_longest_silence_s", "longest silence (s)"),
    ("duration_ratio", None, "generated / ground-truth duration"),
]


def plot_points(all_metrics: list[dict]) -> list[dict]:
    """One row per (system or ablation, split) with the plotted metrics and their ground truths
    (also reports/report_plots.json, which `dvc plots` reads)."""
    keys = [k for metric, ref, _ in PANELS for k in (metric, ref) if k]
    points = []
    for m in all_metrics:
        if m.get("unavailable"):
            continue
        for name, splits in [(m["system"], m.get("splits", {}))] + list(m.get("ablations", {}).items()):
            for split, s in splits.items():
                if s:  # NaN as null: report_plots.json stays JSON that DVC and Vega read
                    # system_split: the bar's label in dvc.yaml's plots (one bar per system and split)
                    points.append({"system": name, "split": split, "system_split": f"{name} / {split}",
                                   **{k: s.get(k) if _finite(s.get(k)) else None for k in keys}})
    return points


def comparison_figure(points: list[dict]):
    """Grouped horizontal bars: a row per system (ablations included), a colour per split, and on each
    bar a black tick at its own system's ground truth for that split, so a bar reads against what real
    speech scores through that system's vocoder or codec (a None reference: one dashed line at 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    systems = list(dict.fromkeys(p["system"] for p in points))
    splits = list(dict.fromkeys(p["split"] for p in points))
    colours = {split: f"C{i}" for i, split in enumerate(splits)}
    height = 0.8 / max(1, len(splits))
    fig, axes = plt.subplots(2, 2, figsize=(13, 2.0 + 0.55 * max(1, len(systems)) * 2), squeeze=False)
    for ax, (metric, reference, title) in zip(axes.flat, PANELS):
        for j, split in enumerate(splits):
            rows = [(systems.index(p["system"]), p[metric]) for p in points
                    if p["split"] == split and p[metric] is not None]
            offset = (j - (len(splits) - 1) / 2) * height
            ax.barh([i + offset for i, _ in rows], [v for _, v in rows], height=height, color=colours[split],
                    label=split)
            for p in points:  # a missing value is said: without it the row reads as a bar of 0
                if p["split"] == split and p[metric] is None:
                    ax.text(0, systems.index(p["system"]) + offset, " n/a", va="center", ha="left", fontsize=7,
                            color="grey", transform=ax.get_yaxis_transform())
            if reference is None:
                continue
            truths = [(p[reference], systems.index(p["system"]) + offset) for p in points
                      if p["split"] == split and p[metric] is not None and p[reference] is not None]
            if truths:
                ax.plot([x for x, _ in truths], [y for _, y in truths], linestyle="none", marker="|", color="black",
                        markersize=max(6.0, 40 * height), markeredgewidth=2, label="ground truth (each row's own)")
        ax.set_title(title, fontsize=10)
        if not systems:
            ax.text(0.5, 0.5, "no TTS results", ha="center", va="center", transform=ax.transAxes)
            continue
        if reference is None:
            ax.axvline(1.0, color="grey", linestyle="--", linewidth=1.2)  # the same length as the ground truth
        ax.set_yticks(range(len(systems)), systems, fontsize=8)
        ax.set_ylim(len(systems) - 0.5, -0.5)  # the first system on top
        ax.grid(axis="x", alpha=0.3)
        if metric == "wer":
            ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    # the splits, then the ground-truth ticks once, from whichever panels drew them (the WER panel has none
    # when every judged speaker is excluded)
    legend = {}
    for ax in axes.flat:
        legend.update((label, handle) for handle, label in zip(*ax.get_legend_handles_labels())
                      if label in splits and label not in legend)
    for ax in axes.flat:
        legend.update((label, handle) for handle, label in zip(*ax.get_legend_handles_labels())
                      if label not in splits and label not in legend)
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=len(splits) + 1, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def plot(all_metrics: list[dict], out: Path) -> list[dict]:
    """Draw ``out/tts_comparison.png``; returns the plotted points."""
    import matplotlib.pyplot as plt

    points = plot_points(all_metrics)
    out.mkdir(parents=True, exist_ok=True)
    fig = comparison_figure(points)
    fig.savefig(out / "tts_comparison.png", dpi=90)
    plt.close(fig)
    return points


def asha_rungs(scheduler: dict) -> str | None:
    """One line on the sweep's ASHA rungs that trials reached: how many reported, how many it stopped,
    and the objective a further trial would have needed there (None for a FIFO sweep)."""
    reached = [r for r in scheduler.get("rungs") or [] if r["trials"]]
    if not reached:
        return None
    parts = [f"step {r['step']}: {r['trials']} trials, {len(r['stopped'])} stopped"
             + (f" (cutoff {r['cutoff']:.4g})" if r["cutoff"] is not None else "") for r in reached]
    return "ASHA rungs: " + "; ".join(parts)


def sweep_table(trials: list[dict], metric: str) -> list[str]:
    """The sweep as a grid, like the paper's Table 6: a row per frame rate (reduction factor), a column
    per slowness weight, each cell the trial's objective at its last step, marked where that step is
    not the full budget (ASHA's stop, a failure, an interrupted sweep) so cells are compared knowingly."""
    if not trials:
        return []
    weights = sorted({t["config"]["slowness_weight"] for t in trials})
    factors = sorted({t["config"]["reduction_factor"] for t in trials})
    cell = {(t["config"]["reduction_factor"], t["config"]["slowness_weight"]): t for t in trials}
    marks = {"completed": "", "early_stopped": "stopped by ASHA", "error": "failed", "unfinished": "unfinished"}
    lines = [f"| {metric} by frame rate | " + " | ".join(f"slowness {w:g}" for w in weights) + " |",
             "|" + "---|" * (1 + len(weights))]
    for r in factors:
        cells = []
        for w in weights:
            t = cell.get((r, w))
            if t is None:
                cells.append("–")
                continue
            value = f"{t['objective']:.4g}" if _finite(t.get("objective")) else "–"
            note = marks.get(t.get("status"), str(t.get("status")))
            cells.append(value + (f" ({note} at step {t.get('steps')})" if note else ""))
        # the mel front end runs at 62.5 frames per second; r of them make one model step
        lines.append(f"| r={r} ({62.5 / r:.4g} Hz) | " + " | ".join(cells) + " |")
    return lines


def read_json_object(path: Path, what: str, rerun: str) -> dict:
    """``path`` as a JSON object; a file that is not one (cut off, empty, hand-edited) ends the stage in one
    line naming it, ``what`` it should hold and the stage ``rerun`` that writes it."""
    try:
        data = json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        raise SystemExit(f"report: {path} is not JSON ({err}): rerun {rerun}") from None
    if not isinstance(data, dict):
        kind = "null" if data is None else {list: "list", str: "string", bool: "boolean"}.get(type(data), "number")
        raise SystemExit(f"report: {path} holds a JSON {kind}, not {what}: rerun {rerun}")
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--metrics", default="metrics")
    p.add_argument("--tune", default=None, help="reports/tune.json of the sweep, if any")
    p.add_argument("--out", default="reports")
    args = p.parse_args(argv)
    params = read_params(args.params)
    systems = params.get("systems", [])
    codec_systems = params.get("codec_systems") or []  # trained on DAC codes: train_codec@ / evaluate_codec@
    metrics = []
    for system in [*systems, *codec_systems]:
        path = Path(args.metrics) / f"{system}.json"
        stage = "evaluate_codec" if system in codec_systems else "evaluate"
        if not path.is_file():
            raise SystemExit(f"report: {path} is missing (did {stage}@{system} run?)")
        m = read_json_object(path, "an evaluation's metrics", f"{stage}@{system}")
        if "system" not in m:
            raise SystemExit(f"report: {path} names no system: not an evaluation's metrics (rerun {stage}@{system})")
        if m.get("complete") is False:  # evaluate writes its splits as they finish; this one stopped early
            raise SystemExit(f"report: {path} holds an evaluation that stopped before its last split "
                             f"(rerun {stage}@{system})")
        metrics.append(m)
    if "codec_lm" not in [*systems, *codec_systems]:
        metrics.append({"system": "codec_lm", "unavailable": "not trained in this run (codec_systems: [codec_lm] "
                        "enables the codes -> train_codec -> evaluate_codec stages)"})
    out = Path(args.out)
    points = plot(metrics, out / "plots")
    (out / "report_plots.json").write_text(json.dumps(points, indent=2))
    # the evaluate stages' prompt (they checked the value; the report only states it)
    prompt_s = (params.get("evaluate") or {}).get("prompt_seconds", EvaluateConfig.prompt_seconds)
    lines = ["# MELD toolkit: comparison", "",
             f"Zero-shot TTS continuation ({prompt_s:g} s prompt + full transcript); judge = external ASR on",
             "[true prompt + continuation] through the vocoder (Codec-LM's: through its DAC codec); GT-WER = the",
             "ground truth through the same vocoder or codec.",
             "SIM = speaker-embedding cosine between the real prompt and the continuation, averaged over the",
             "generations whose prompt and continuation each last at least 0.5 s (a shorter clip's speaker",
             "embedding means little): SIM n = those / all generations; 0 with evaluate.prompt_seconds 0 (no prompt,",
             "no speaker to compare to). Speakers in evaluate.judge_exclude_prefixes are left out of every WER",
             "column of the TTS table, so the external judge's and MELD-STT's columns read the same utterances;",
             "the STT table transcribes every speaker's real speech.", "",
             "## TTS", ""] + tts_table(metrics)
    lines += ["", *silence_statement(metrics)]
    stt = stt_table(metrics)
    if stt:
        lines += ["", "## STT", ""] + stt
        by_speaker = stt_speaker_table(metrics)
        if by_speaker:
            lines += ["", "### STT WER by speaker", ""] + by_speaker
    if args.tune and Path(args.tune).is_file():
        tune = read_json_object(Path(args.tune), "the sweep's report", "the tune stage")
        best = tune.get("best")
        objective = tune.get("objective") or {}
        if best:  # a best that did not train the full budget was compared at fewer steps: say so, and why
            note = {"completed": "",
                    "early_stopped": f" (stopped early by ASHA at step {best.get('steps')}: "
                                     "no trial trained the full budget)",
                    "error": f" (its training failed after step {best.get('steps')}: "
                             "no trial trained the full budget)"}.get(
                best.get("status"), f" ({best.get('status')} at step {best.get('steps')}: "
                                    "no trial trained the full budget)")
            what = objective.get("metric", "objective")
            direction = {"min": " (lower is better)", "max": " (higher is better)"}.get(objective.get("mode"), "")
            summary = f"best trial: `{best['config']}` {what} {best['objective']:.4g}{direction}{note}"
        else:
            summary = "no trial produced a finite objective"
        rungs = asha_rungs(tune.get("scheduler") or {})
        grid = sweep_table(tune.get("trials") or [], objective.get("metric", "objective"))
        lines += ["", "## Ray Tune sweep", "", summary, *(["", rungs] if rungs else []), *(["", *grid] if grid else []),
                  "", "![sweep](tune.png)"]
    lines += ["", "![TTS comparison](plots/tts_comparison.png)", ""]
    (out / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("report", main))
