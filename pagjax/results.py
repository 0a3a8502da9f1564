"""What a sweep's measurements say: per-method curves and regime labels, summaries, the
final table, the per-seed evidence of each label, model health, and the files that hold
them (results.csv, regimes.json, summary.json, figure3.png, gradients_<method>.png).

results.csv has one row per (method, strength, seed): `ID_COLUMNS`, then every registered
metric's columns (`pagjax.metrics`), then `STATUS_COLUMNS` (`result_columns`).
"""
from __future__ import annotations

import os
import warnings

import numpy as np

from pagjax import io as io_lib
from pagjax import measure as measure_lib
from pagjax import metrics as metrics_lib
from pagjax import plots, regimes
from pagjax.sweep_config import STRENGTH_NAMES, SweepConfig, method_points

ID_COLUMNS = ("method", "strength", "seed")
STATUS_COLUMNS = ("regime", "diverged")


def result_columns(measure: measure_lib.MeasureConfig | None = None) -> tuple[str, ...]:
    """results.csv's columns, from the metric registry (with `measure`, also the columns
    that depend on its settings, e.g. ``on_change@<eps>``)."""
    return ID_COLUMNS + metrics_lib.columns(measure) + STATUS_COLUMNS


def method_curves(rows: list[dict], config: SweepConfig, method: str, num_classes: int) -> tuple[dict, regimes.RegimeResult]:
    """(S, seeds) arrays of a method's measurements and its regime labels."""
    strengths = np.asarray(config.strengths[method], float)
    seeds = list(config.seeds)

    def grid(col):
        out = np.full((len(strengths), len(seeds)), np.nan)
        for r in rows:
            if r["method"] == method and not r["diverged"] and r.get(col) is not None:
                out[list(strengths).index(r["strength"]), seeds.index(r["seed"])] = r[col]
        return out

    curves = {c: grid(c) for c in metrics_lib.columns()}
    with warnings.catch_warnings():  # all-NaN rows (diverged or unmeasured) are expected
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = {c: np.nanmean(v, 1) for c, v in curves.items()}
    ok = np.isfinite(mean["on_change"]) & np.isfinite(mean["off_change"]) & np.isfinite(mean["accuracy"])
    labels = ["diverged"] * len(strengths)
    result = None
    if ok.any():
        result = regimes.label_regimes(strengths[ok], mean["on_change"][ok], mean["off_change"][ok],
                                       mean["accuracy"][ok], chance=1.0 / num_classes)
        for i, lab in zip(np.nonzero(ok)[0], result.labels):
            labels[i] = lab
    learned = not np.isfinite(mean["bayes_cosine"]).any() and np.isfinite(mean["learned_bayes_cosine"]).any()
    column = "learned_bayes_cosine" if learned else "bayes_cosine"
    if config.measure.alignment == "paper":  # the paper's protocol (pagjax.measure docstring)
        column = "paper_lpips_alignment" if np.isfinite(mean["paper_lpips_alignment"]).any() else "paper_score_cosine"
    curves.update(strengths=strengths, labels=labels, mean=mean, alignment_column=column)
    return curves, result


def summarize(curves: dict, result: regimes.RegimeResult | None, method: str) -> dict:
    """The per-method line of the final table."""
    column = curves.get("alignment_column", "bayes_cosine")
    align = curves["mean"][column]
    out = {"method": method, "alignment": metrics_lib.alignment_labels().get(column, column)}
    if np.isfinite(align).any():
        i = int(np.nanargmax(align))
        out.update(peak_bayes_cosine=float(align[i]), peak_at=float(curves["strengths"][i]),
                   accuracy_at_peak=float(curves["mean"]["accuracy"][i]),
                   weakest_bayes_cosine=float(align[0]))
    if result is not None:
        out.update(crossover=result.crossover, first_aligned=result.first_aligned,
                   first_excessive=result.first_excessive)
    out["regimes"] = list(curves["labels"])
    return out


def format_table(summaries: list[dict]) -> str:
    """The short table printed at the end of a sweep."""
    def f(v):
        return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3g}"

    head = f"{'method':<11}{'crossover':>10}{'peak cos':>9}{'at':>8}{'acc@peak':>9}{'weakest cos':>12}{'aligned from':>13}{'excessive from':>15}"
    lines = [head, "-" * len(head)]
    for s in summaries:
        lines.append(f"{s['method']:<11}{f(s.get('crossover')):>10}{f(s.get('peak_bayes_cosine')):>9}"
                     f"{f(s.get('peak_at')):>8}{f(s.get('accuracy_at_peak')):>9}{f(s.get('weakest_bayes_cosine')):>12}"
                     f"{f(s.get('first_aligned')):>13}{f(s.get('first_excessive')):>15}")
    return "\n".join(lines)


CHANCE_MARGIN = 0.1  # "at chance": accuracy within 10% of the chance-to-perfect range above chance


def at_chance(accuracy: float, num_classes: int) -> bool:
    """Whether a model's accuracy is at chance: trained to nothing (e.g. by a huge learning
    rate or strength) without ever producing a NaN, so it is not marked diverged."""
    chance = 1.0 / num_classes
    return bool(np.isfinite(accuracy) and accuracy <= chance + CHANCE_MARGIN * (1.0 - chance))


def seed_evidence(curves: dict, num_classes: int) -> list[dict]:
    """Per strength: the label, each seed's off/on ratio and accuracy, whether the seeds
    agree on the weak / Bayes-aligned side (off/on above or below 1) and which seeds are
    at chance. A label its seeds do not agree on hinges on rounding and seeds: it needs
    more seeds, not more trust."""
    out = []
    for i, s in enumerate(curves["strengths"]):
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = curves["off_change"][i] / curves["on_change"][i]
        acc = curves["accuracy"][i]
        ok = np.isfinite(ratio)
        sides = {bool(r > 1) for r in ratio[ok]}
        chance_seeds = [j for j, a in enumerate(acc) if at_chance(a, num_classes)]
        out.append({
            "strength": float(s), "label": curves["labels"][i],
            "off_on_per_seed": [None if not np.isfinite(r) else float(r) for r in ratio],
            "off_on_spread": [float(ratio[ok].min()), float(ratio[ok].max())] if ok.any() else None,
            "accuracy_per_seed": [None if not np.isfinite(a) else float(a) for a in acc],
            "seeds_agree": len(sides) <= 1 and int(ok.sum()) >= 2,
            "measured_seeds": int(ok.sum()),
            "at_chance_seeds": chance_seeds,
        })
    return out


def model_health(rows_by_method: dict, num_classes: int) -> list[str]:
    """Console lines naming the diverged and collapsed (at-chance) models, and why a
    method has no labels at all; empty when every model trained."""
    lines = []
    for method, rows in rows_by_method.items():
        diverged = [r for r in rows if r.get("diverged")]
        collapsed = [r for r in rows if not r.get("diverged") and at_chance(float(r.get("accuracy", np.nan)), num_classes)]
        name = lambda r: f"{r['strength']:g}/seed {r['seed']}"  # noqa: E731
        if diverged and len(diverged) == len(rows):
            lines.append(f"{method}: every model diverged (a NaN/inf loss or gradient): no regime labels; "
                         "lower the learning rate (--lr) or the strengths")
        elif diverged:
            lines.append(f"{method}: {len(diverged)} of {len(rows)} models diverged (NaN/inf), left out of the "
                         f"curves: {', '.join(map(name, diverged))}")
        if collapsed:
            lines.append(f"{method}: {len(collapsed)} of {len(rows)} models are at chance accuracy (collapsed "
                         f"without a NaN; their labels are not evidence): {', '.join(map(name, collapsed))}")
    return lines


def write_outputs(config: SweepConfig, out_dir: str, rows_by_method: dict, grids_by_method: dict,
                  num_classes: int, evalset, grid_methods=None, figure: bool = True) -> list[dict]:
    """results.csv, regimes.json, summary.json and the figures, from finished methods.

    A method's gradient grid does not change once it is finished: ``grid_methods`` (default:
    all finished methods) says whose ``gradients_<method>.png`` to draw, so a sweep that
    writes its outputs after every method draws each grid once. ``figure=False`` skips
    figure3.png (the tables are always written)."""
    all_rows, summaries, regime_info, fig_curves = [], [], {}, {}
    for method in config.methods:
        if method not in rows_by_method:
            continue
        rows = rows_by_method[method]
        curves, result = method_curves(rows, config, method, num_classes)
        label_of = dict(zip(curves["strengths"].tolist(), curves["labels"]))
        for r in rows:
            all_rows.append({**r, "regime": label_of[r["strength"]]})
        summaries.append(summarize(curves, result, method))
        regime_info[method] = result.as_dict() if result is not None else None
        if regime_info[method] is not None:
            regime_info[method]["per_seed"] = seed_evidence(curves, num_classes)
        fig_curves[method] = {"strengths": curves["strengths"], "labels": curves["labels"],
                              "on_change": curves["on_change"], "off_change": curves["off_change"],
                              "accuracy": curves["accuracy"], "alignment": curves[curves["alignment_column"]],
                              "alignment_label": metrics_lib.alignment_curve_labels()[curves["alignment_column"]]}
        if grid_methods is not None and method not in grid_methods:
            continue
        grids = grids_by_method[method]
        strengths, seeds = method_points(config, method)
        first_seed = [i for i, sd in enumerate(seeds) if sd == config.seeds[0]]
        rows_img = [grids[i] for i in first_seed]
        labels_img = [f"{STRENGTH_NAMES.get(method, 's')}={plots.strength_label(strengths[i])}" for i in first_seed]
        if evalset.bayes_maps is not None:
            rows_img.append(np.asarray(evalset.bayes_maps[: config.measure.grid_images]))
            labels_img.append(f"Bayes s={config.measure.align_noise:g}")
        elif evalset.learned_bayes_maps is not None:
            rows_img.append(np.asarray(evalset.learned_bayes_maps[: config.measure.grid_images]))
            labels_img.append(f"learned Bayes s={config.measure.align_noise:g}")
            if evalset.paper_score_maps is not None:  # the paper's reference: the learned score
                rows_img.append(np.asarray(evalset.paper_score_maps[: config.measure.grid_images]))
                labels_img.append(f"learned score s={config.measure.paper_noise:g}")
            rows_img.insert(0, np.asarray(evalset.x[: config.measure.grid_images]))
            labels_img.insert(0, "image")
        plots.gradient_grid(rows_img, labels_img, os.path.join(out_dir, f"gradients_{method}.png"),
                            title=f"input-gradients of log p(y|x), {method} (seed {config.seeds[0]})")
    io_lib.write_csv(os.path.join(out_dir, "results.csv"), all_rows, result_columns(config.measure))
    io_lib.write_json(os.path.join(out_dir, "regimes.json"), regime_info)
    io_lib.write_json(os.path.join(out_dir, "summary.json"), summaries)
    if fig_curves and figure:
        plots.figure3(fig_curves, os.path.join(out_dir, "figure3.png"), strength_names=STRENGTH_NAMES)
    return summaries


def seed_disagreements(config: SweepConfig, regime_info: dict) -> list[str]:
    """Console lines naming the strengths whose seeds disagree on the weak / Bayes-aligned
    side: such labels hinge on rounding and seeds, and need more seeds."""
    lines = []
    for method in config.methods:
        info = regime_info.get(method) or {}
        shaky = [e for e in info.get("per_seed", []) if e["measured_seeds"] >= 2 and not e["seeds_agree"]]
        if shaky:
            where = ", ".join(f"{e['strength']:g}" for e in shaky)
            lines.append(f"{method}: seeds disagree on the weak / Bayes-aligned side at strength {where} "
                         "(per-seed off/on in regimes.json): run more seeds")
    return lines
