"""The LDR + ALDK paper's tables from checkpoints: evaluation on the paper's splits, speed, parameters.

Table 1 (comparison): per method, Dice and Jacc on SLIVER, LiTS, LSPIG (paired) and LPBA (atlas),
CPU and GPU seconds per pair, parameters. A method is a liver checkpoint (SLIVER, LiTS, LSPIG from
the liver config) and/or a brain checkpoint (LPBA from the brain config).
Table 2 (ablation, SLIVER): plain vs distilled students at each cascade count.

Dice and Jacc are means (std) over the pairs of a split (as ``eval.py``: trilinear mask warp,
threshold 128; LPBA the mean over its 56 labels). Seconds per pair: median of ``runs`` fast-path
registrations (:func:`engine.evaluation.time_registration`) of a random pair at the model's image
size, batch 1, on the CPU with the process's threads, and on the GPU when there is one. The
published claims are relative (the papers' absolute numbers are only in table images), so each is
placed beside the same quantity computed from the measured rows, with paired per-pair differences
and their standard errors.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
from dataclasses import dataclass, field

import numpy as np
import torch

from data_util import open_dataset
from engine.evaluation import evaluate_pairs, load_model, time_registration
from network import CheckpointError, SizeError, build_model, count_parameters, load_checkpoint
from network.cli import fail
from network.inference import prepare
from network.metrics import summarise
from network.outputs import OutputSet, atomic_write_text


@dataclass(frozen=True)
class Split:
    key: str          # column name
    title: str        # paper's name
    config: str       # "liver" or "brain"
    scheme: str       # scheme of the config
    paired: bool = False


SPLITS = (Split("sliver", "SLIVER", "liver", "sliver"), Split("lits", "LiTS", "liver", "lits"),
          Split("lspig", "LSPIG", "liver", "lspig", paired=True), Split("lpba", "LPBA", "brain", "2"))
LIVER_SPLITS = tuple(s for s in SPLITS if s.config == "liver")

# Published relative claims (LDR + ALDK, TMI 2022, as its authors' blog states them; whether "%"
# means points or relative percent is not stated, so both are computed).
TABLE1_CLAIMS = {
    "sliver_dice_gap_3cas": -0.3, "cpu_speedup_3cas": 21.0, "params_ratio_3cas": 8.0,
    "sliver_dice_gap_1cas": -0.2, "cpu_speedup_1cas": 15.0,
    "others_dice_gap": -0.5, "others_jacc_gap": -1.25, "cpu_seconds": 1.0,
}
TABLE2_CLAIMS = {1: (3.4, 5.2), 2: (4.0, 4.9), 3: (3.1, 3.9)}       # ALDK - plain: (dDice %, dJacc %)


@dataclass
class Source:
    """A model to evaluate: a checkpoint spec (``weights/<run>[:STEP]``), or an in-memory model
    (the stand-in demo's)."""
    spec: str
    model: object = None
    note: str = ""
    state: dict = None

    def load(self, dataset):
        """``(model, state)``; a checkpoint is read once, then reused for every split."""
        if self.model is None:
            try:
                self.state = load_checkpoint(self.spec)
            except CheckpointError as e:
                fail(str(e))
            self.model = load_model(self.state, dict(self.state["model_config"]), dataset)
        if tuple(dataset.image_size) != tuple(self.model.config.image_size):
            fail(f"{self.state['path'] if self.state else self.spec}: dataset size {tuple(dataset.image_size)} "
                 f"differs from the model's {tuple(self.model.config.image_size)}")
        return self.model, self.state or {"path": self.spec, "step": 0}

    def release(self) -> None:
        """Free a model read from a checkpoint (an in-memory demo model stays)."""
        if self.state is not None:
            self.model = self.state = None


@dataclass
class Method:
    label: str
    liver: Source | None = None
    brain: Source | None = None
    results: dict = field(default_factory=dict)      # split key -> evaluation
    speed: dict = field(default_factory=dict)


def evaluate_source(source: Source, config_path: str, split: Split, limit, device, batch: int = 1) -> tuple:
    """``(model, evaluation)``: one model on one split. The evaluation holds the checkpoint, step,
    pair count, Dice / Jacc mean, std, n, and the per-pair ids, Dice and Jacc (for paired tests)."""
    dataset = open_dataset(config_path, paired=split.paired, splits=[split.scheme])
    model, state = source.load(dataset)
    model = prepare(model.to(device))
    loader = dataset.loader(split.scheme, batch, loop=False, num_workers=0, limit=limit)
    class_values = list(dataset.segmentation_class_value.values()) if dataset.segmentation_class_value else None
    rows, _ = evaluate_pairs(model, loader, device, class_values)
    if not rows:
        fail(f"{config_path}: split '{split.scheme}' has no pairs")
    summary = summarise(rows, ("dice", "jacc", "dice_before", "jacc_before"))
    return model, {
        "checkpoint": state["path"], "step": state["step"], "note": source.note, "dataset": config_path,
        "scheme": split.scheme, "paired": split.paired, "atlas": getattr(dataset, "atlas", None),
        "n_pairs": len(rows), "of_pairs": dataset.num_pairs(split.scheme),
        **{k: {"mean": m, "std": s, "n": n} for k, (m, s, n) in summary.items()},
        "pairs": [[r["id1"], r["id2"], r["dice"], r["jacc"]] for r in rows]}


def measure_speed(model, runs: int, gpu: bool) -> dict:
    """CPU (and GPU) median seconds per pair at the model's image size; parameters."""
    cpu = time_registration(prepare(model.to("cpu")), torch.device("cpu"), runs)
    out = {"cpu_s": cpu, "gpu_s": None, "params": count_parameters(model),
           "time_size": list(model.config.image_size), "threads": torch.get_num_threads()}
    if gpu and torch.cuda.is_available():
        device = torch.device("cuda")
        out["gpu_s"] = time_registration(prepare(model.to(device)), device, runs)
        out["gpu"] = torch.cuda.get_device_name(device)
        model.to("cpu")
    return out


def run_method(method: Method, configs: dict, splits, limit, device, runs: int, gpu: bool, log=print) -> None:
    """Evaluate ``method`` on ``splits`` and time its (first) model; results stored on the method."""
    speeds = []
    for source, group in ((method.liver, "liver"), (method.brain, "brain")):
        if source is None:
            continue
        model = None
        for split in (s for s in splits if s.config == group):
            model, method.results[split.key] = evaluate_source(source, configs[group], split, limit, device)
            r = method.results[split.key]
            log(f"  {method.label} / {split.title}: Dice {r['dice']['mean']:.4f} Jacc {r['jacc']['mean']:.4f} "
                f"({r['n_pairs']} of {r['of_pairs']} pairs)")
        if model is not None:
            speeds.append(measure_speed(model, runs, gpu))
        source.release()
    if speeds:
        method.speed = dict(speeds[0])
        if len(speeds) > 1 and speeds[1]["params"] != speeds[0]["params"]:
            method.speed["params_brain"] = speeds[1]["params"]


# ---- comparisons ---------------------------------------------------------------------------------

def paired_difference(a: dict, b: dict, metric: str) -> dict | None:
    """``b - a`` over the pairs both evaluated (matched by ids): mean, standard error, n, and the
    relative difference of the means in percent. None without common pairs."""
    column = {"dice": 2, "jacc": 3}[metric]
    left = {(p[0], p[1]): p[column] for p in a["pairs"]}
    diffs = np.array([p[column] - left[(p[0], p[1])] for p in b["pairs"] if (p[0], p[1]) in left], np.float64)
    diffs = diffs[np.isfinite(diffs)]
    if diffs.size == 0:
        return None
    se = float(diffs.std(ddof=1) / math.sqrt(diffs.size)) if diffs.size > 1 else math.nan
    base = a[metric]["mean"]
    return {"points": 100 * float(diffs.mean()), "se_points": 100 * se, "n": int(diffs.size),
            "relative_pct": 100 * float(diffs.mean()) / base if base else math.nan}


def table1_comparison(reference: Method, ours: Method) -> dict:
    """The measured counterparts of the published Table 1 claims (``ours`` against ``reference``)."""
    out = {"reference": reference.label, "ours": ours.label, "datasets": {}}
    for split in SPLITS:
        if split.key in reference.results and split.key in ours.results:
            out["datasets"][split.key] = {m: paired_difference(reference.results[split.key], ours.results[split.key], m)
                                          for m in ("dice", "jacc")}
    others = [v for k, v in out["datasets"].items() if k != "sliver"]
    for m in ("dice", "jacc"):
        vals = [v[m] for v in others if v[m] is not None]
        out[f"others_{m}_gap"] = ({"points": float(np.mean([v["points"] for v in vals])),
                                   "relative_pct": float(np.mean([v["relative_pct"] for v in vals])),
                                   "datasets": len(vals)} if vals else None)
    rs, os_ = reference.speed, ours.speed
    out["cpu_speedup"] = rs["cpu_s"] / os_["cpu_s"] if rs and os_ else None
    out["gpu_speedup"] = (rs["gpu_s"] / os_["gpu_s"]) if rs and os_ and rs.get("gpu_s") and os_.get("gpu_s") else None
    out["params_ratio"] = rs["params"] / os_["params"] if rs and os_ else None
    out["ours_cpu_s"] = os_.get("cpu_s") if os_ else None
    return out


# ---- rendering -----------------------------------------------------------------------------------

def _cell(result: dict | None, metric: str) -> str:
    if not result:
        return "–"
    return f"{result[metric]['mean']:.3f} ({result[metric]['std']:.3f})"


def _num(v, spec=".3f", none="n/a") -> str:
    return none if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _diff(d: dict | None) -> str:
    if d is None:
        return "–"
    return f"{d['points']:+.2f} ± {_num(d.get('se_points'), '.2f')} pt ({d['relative_pct']:+.2f}%)"


def _params(speed: dict) -> str:
    if not speed:
        return "–"
    extra = f" / {speed['params_brain']:,}" if "params_brain" in speed else ""
    return f"{speed['params']:,}{extra}"


def table1_rows(methods) -> list:
    """Header and rows of Table 1 (strings, paper column order)."""
    header = ["Method"] + [f"{s.title} {m}" for s in SPLITS for m in ("Dice", "Jacc")] + ["CPU s", "GPU s", "Params"]
    rows = [header]
    for m in methods:
        cells = [m.label] + [_cell(m.results.get(s.key), k) for s in SPLITS for k in ("dice", "jacc")]
        rows.append(cells + [_num(m.speed.get("cpu_s")), _num(m.speed.get("gpu_s")), _params(m.speed)])
    return rows


def markdown(rows) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines) + "\n"


def render_csv(rows) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


PUBLISHED_TABLE1_MD = """Published (LDR + ALDK paper, relative claims only; "%" may be points or relative percent):

| Comparison | Quantity | Published |
|---|---|---|
| 3-cas LDR + ALDK vs Affine + 3-cas VTN | SLIVER Dice | {sliver_dice_gap_3cas:+.1f}% |
| 3-cas LDR + ALDK vs Affine + 3-cas VTN | CPU speed-up | ~{cpu_speedup_3cas:.0f}x |
| 3-cas LDR + ALDK vs Affine + 3-cas VTN | fewer inference parameters | ~{params_ratio_3cas:.0f}x |
| 1-cas LDR + ALDK vs Affine + 1-cas VTN | SLIVER Dice | {sliver_dice_gap_1cas:+.1f}% |
| 1-cas LDR + ALDK vs Affine + 1-cas VTN | CPU speed-up | ~{cpu_speedup_1cas:.0f}x |
| LDR + ALDK vs the best expensive model | LiTS, LSPIG, LPBA average Dice / Jacc | {others_dice_gap:+.2f}% / {others_jacc_gap:+.2f}% |
| LDR + ALDK | CPU seconds per 128^3 pair | ~{cpu_seconds:.0f} s |
"""


def comparisons_md(comparisons) -> str:
    """The measured counterparts, one row per ``--compare`` pair."""
    lines = ["Measured here (ours − reference over the same pairs, mean ± standard error in points = x 100, "
             "and the relative difference of the means):", "",
             "| Ours vs reference | SLIVER ΔDice | SLIVER ΔJacc | LiTS, LSPIG, LPBA average ΔDice | average ΔJacc "
             "| CPU speed-up | GPU speed-up | Fewer params | Ours CPU s |", "|" + "---|" * 9]
    for c in comparisons:
        sliver = c["datasets"].get("sliver", {})
        gaps = []
        for m in ("dice", "jacc"):
            g = c[f"others_{m}_gap"]
            gaps.append("–" if g is None else f"{g['points']:+.2f} pt ({g['relative_pct']:+.2f}%), {g['datasets']} sets")
        lines.append(f"| {c['ours']} vs {c['reference']} | {_diff(sliver.get('dice'))} | {_diff(sliver.get('jacc'))} "
                     f"| {gaps[0]} | {gaps[1]} | {_num(c['cpu_speedup'], '.1f')}x | {_num(c['gpu_speedup'], '.1f')}x "
                     f"| {_num(c['params_ratio'], '.1f')}x | {_num(c['ours_cpu_s'], '.3f')} |")
    return "\n".join(lines) + "\n"


def setup_info(device, limit, runs, configs) -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor() or None, "cpu_threads": torch.get_num_threads(),
            "eval_device": str(device), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "limit": limit, "timing_runs": runs, "configs": configs}


def setup_md(info: dict, methods) -> str:
    notes = [m.label for m in methods for s in (m.liver, m.brain) if s is not None and s.note]
    limit = f"first {info['limit']} pairs of each split" if info["limit"] else "every pair of each split"
    text = (f"Evaluated on {limit} ({info['eval_device']}); seconds per pair: median of {info['timing_runs']} "
            f"fast-path registrations at each model's image size, CPU with {info['cpu_threads']} threads"
            f"{'' if info['gpu'] else ', no GPU on this machine (GPU s: n/a)'}. Torch {info['torch']}.\n")
    if notes:
        text += f"\n**Demo rows** ({', '.join(dict.fromkeys(notes))}): initial weights, not trained; the numbers check " \
                f"the pipeline, not the methods.\n"
    return text


def write_outputs(out_dir: str, name: str, title: str, rows, csv_rows, body_md: str, report: dict) -> list:
    """``<name>.md`` (``rows`` as Markdown, then ``body_md``), ``.csv`` (``csv_rows``, plain
    numbers) and ``.json`` in ``out_dir``, written as one set."""
    with OutputSet(out_dir) as out:
        atomic_write_text(out.path(name + ".md"), f"# {title}\n\n" + markdown(rows) + "\n" + body_md)
        atomic_write_text(out.path(name + ".csv"), render_csv(csv_rows))
        atomic_write_text(out.path(name + ".json"), json.dumps(report, indent=1))
    return [os.path.join(out_dir, f"{name}.{ext}") for ext in ("md", "csv", "json")]


def _stats(result: dict | None, metric: str) -> list:
    if not result:
        return ["", "", ""]
    return [result[metric]["mean"], result[metric]["std"], result[metric]["n"]]


def _speed_cells(speed: dict) -> list:
    return [speed.get("cpu_s", ""), "" if speed.get("gpu_s") is None else speed["gpu_s"], speed.get("params", ""),
            speed.get("params_brain", "")]


SPEED_COLUMNS = ["cpu_s", "gpu_s", "params", "params_brain"]


def table1_csv(methods) -> list:
    header = ["method"] + [f"{s.key}_{m}_{q}" for s in SPLITS for m in ("dice", "jacc") for q in ("mean", "std", "n")]
    rows = [header + SPEED_COLUMNS]
    for m in methods:
        cells = [m.label] + [v for s in SPLITS for k in ("dice", "jacc") for v in _stats(m.results.get(s.key), k)]
        rows.append(cells + _speed_cells(m.speed))
    return rows


def method_report(m: Method) -> dict:
    return {"label": m.label, "liver": m.liver.spec if m.liver else None, "brain": m.brain.spec if m.brain else None,
            "results": m.results, "speed": m.speed}


# ---- the two tables ------------------------------------------------------------------------------

def table1(methods, configs: dict, out_dir: str, compare=None, limit=None, device=torch.device("cpu"),
           runs: int = 5, gpu: bool = True, log=print) -> list:
    """Evaluate ``methods`` (:class:`Method`), write Table 1; returns the written paths.
    ``compare``: ``[(ours label, reference label)]`` for the claims (default: the last row against
    the first)."""
    by_label = {m.label: m for m in methods}
    compare = compare or [(methods[-1].label, methods[0].label)]
    for m in methods:
        log(f"{m.label}:")
        run_method(m, configs, SPLITS, limit, device, runs, gpu, log)
    comparisons = [table1_comparison(by_label[ref], by_label[ours]) for ours, ref in compare]
    info = setup_info(device, limit, runs, configs)
    body = ("## Published claims beside the measured ones\n\n" + PUBLISHED_TABLE1_MD.format(**TABLE1_CLAIMS) + "\n"
            + comparisons_md(comparisons) + "\n" + setup_md(info, methods))
    report = {"table": 1, "setup": info, "methods": [method_report(m) for m in methods], "comparisons": comparisons,
              "published_claims": TABLE1_CLAIMS}
    return write_outputs(out_dir, "table1", "Table 1: comparison (Dice, Jacc mean (std) per dataset)",
                         table1_rows(methods), table1_csv(methods), body, report)


def table2_rows(rows) -> list:
    header = ["Setup", "LDR Dice", "LDR Jacc", "LDR + ALDK Dice", "LDR + ALDK Jacc", "ΔDice (measured)",
              "ΔJacc (measured)", "ΔDice (published)", "ΔJacc (published)", "CPU s", "GPU s", "Params"]
    out = [header]
    for n, plain, distilled, diff in rows:
        p, d = plain.results.get("sliver"), distilled.results.get("sliver")
        claim = TABLE2_CLAIMS.get(n)
        out.append([f"{n}-cas", _cell(p, "dice"), _cell(p, "jacc"), _cell(d, "dice"), _cell(d, "jacc"),
                    _diff(diff["dice"]), _diff(diff["jacc"]),
                    f"{claim[0]:+.1f}%" if claim else "–", f"{claim[1]:+.1f}%" if claim else "–",
                    _num(distilled.speed.get("cpu_s")), _num(distilled.speed.get("gpu_s")), _params(distilled.speed)])
    return out


def table2(pairs, configs: dict, out_dir: str, limit=None, device=torch.device("cpu"), runs: int = 5,
           gpu: bool = True, log=print) -> list:
    """``pairs``: ``[(cascades, plain Method, distilled Method)]`` (liver sources), evaluated on SLIVER;
    writes Table 2 and returns the written paths."""
    rows = []
    for n, plain, distilled in pairs:
        for m in (plain, distilled):
            log(f"{m.label}:")
            run_method(m, configs, SPLITS[:1], limit, device, runs, gpu, log)
        diff = {k: paired_difference(plain.results["sliver"], distilled.results["sliver"], k) for k in ("dice", "jacc")}
        rows.append((n, plain, distilled, diff))
    info = setup_info(device, limit, runs, {"liver": configs["liver"]})
    body = ("ΔDice, ΔJacc: LDR + ALDK − LDR over the same SLIVER pairs, mean ± standard error in points "
            "(x 100), with the relative difference of the means; the published gains do not say whether "
            "they are points or relative percent.\n\n" + setup_md(info, [m for _, p, d, _ in rows for m in (p, d)]))
    report = {"table": 2, "setup": info, "published_claims": {str(k): v for k, v in TABLE2_CLAIMS.items()},
              "rows": [{"cascades": n, "plain": method_report(p), "distilled": method_report(d), "difference": diff}
                       for n, p, d, diff in rows]}
    return write_outputs(out_dir, "table2", "Table 2: ablation on SLIVER, LDR vs LDR + ALDK", table2_rows(rows),
                         table2_csv(rows), body, report)


def table2_csv(rows) -> list:
    header = ["cascades"] + [f"{arm}_{m}_{q}" for arm in ("plain", "distilled") for m in ("dice", "jacc")
                             for q in ("mean", "std", "n")]
    header += [f"delta_{m}_{q}" for m in ("dice", "jacc") for q in ("points", "se_points", "relative_pct", "n")]
    header += [f"published_delta_{m}_pct" for m in ("dice", "jacc")] + SPEED_COLUMNS
    out = [header]
    for n, plain, distilled, diff in rows:
        cells = [n] + [v for arm in (plain, distilled) for m in ("dice", "jacc") for v in _stats(arm.results.get("sliver"), m)]
        for m in ("dice", "jacc"):
            d = diff[m] or {}
            cells += [d.get("points", ""), d.get("se_points", ""), d.get("relative_pct", ""), d.get("n", "")]
        claim = TABLE2_CLAIMS.get(n, ("", ""))
        out.append(cells + list(claim) + _speed_cells(distilled.speed))
    return out


# ---- the stand-in demo ---------------------------------------------------------------------------

DEMO_TABLE1 = (("Affine + 1-cas VoxelMorph (RCN)", dict(base_network="VoxelMorph", preset="rcn", n_cascades=1), None),
               ("Affine + 1-cas VTN (RCN)", dict(base_network="VTN", preset="rcn", n_cascades=1), None),
               ("Affine + 3-cas VTN (RCN)", dict(base_network="VTN", preset="rcn", n_cascades=3), None),
               ("1-cas LDR + ALDK", dict(base_network="LDR", preset="ldr-liver", n_cascades=1),
                dict(base_network="LDR", preset="ldr-brain", n_cascades=1)),
               ("3-cas LDR + ALDK", dict(base_network="LDR", preset="ldr-liver", n_cascades=3),
                dict(base_network="LDR", preset="ldr-brain", n_cascades=3)))
DEMO_COMPARE = [("3-cas LDR + ALDK", "Affine + 3-cas VTN (RCN)"), ("1-cas LDR + ALDK", "Affine + 1-cas VTN (RCN)")]


def demo_source(config: dict, size: int, seed: int) -> Source:
    torch.manual_seed(seed)
    try:
        model = build_model(dict(config, image_size=(size,) * 3))
    except (SizeError, ValueError) as e:
        fail(f"--size {size}: {str(e).splitlines()[0]}")
    name = f"demo:{config['preset']}-{config['base_network']}x{config['n_cascades']}-seed{seed}"
    return Source(name, model, note="stand-in demo")


def demo_table1_methods(size: int) -> list:
    out = []
    for k, (label, liver, brain) in enumerate(DEMO_TABLE1):
        out.append(Method(label, demo_source(liver, size, k), demo_source(brain or liver, size, 100 + k)))
    return out


def demo_table2_pairs(size: int) -> list:
    out = []
    for n in (1, 2, 3):
        config = dict(base_network="LDR", preset="ldr-liver", n_cascades=n)
        out.append((n, Method(f"{n}-cas LDR", demo_source(config, size, 10 * n)),
                    Method(f"{n}-cas LDR + ALDK", demo_source(config, size, 10 * n + 1))))
    return out


__all__ = ["SPLITS", "Source", "Method", "table1", "table2", "paired_difference", "demo_table1_methods",
           "demo_table2_pairs", "DEMO_COMPARE", "TABLE1_CLAIMS", "TABLE2_CLAIMS"]
