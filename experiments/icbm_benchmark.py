"""Registration benchmark on real anatomy, against the peers that install here, in one run.

``python experiments/icbm_benchmark.py [--pairs 4] [-c weights/<run>] [--methods ...] [--out evaluate/icbm_benchmark]``

``--anatomy abdomen`` runs the same benchmark on CT: the abdomen phantom of ``data_util/synthetic.py``
in HU (96^3 at 3 mm; liver, kidneys, spine, stomach) instead of the template, an HU offset and noise
as the scanner change, Dice over its 4 labels (error and folding over them). A phantom, not a real scan: it tests a CT model on
shapes another generator made.

Data: the ICBM152 2009a T1 template from nilearn's wheel (``data_util/icbm.py``) on a 2 mm RAS grid
(99x117x95) is the fixed image, with grey/white-matter labels from its probability maps. Each moving
image is the template read through a known transform ``phi = A o (id + d)``: a smooth random field
``d`` (cubic B-spline, control points every 40 mm, up to ``--magnitude`` mm) and a random affine
``A`` (rotations up to 10 deg per axis, scales 0.9-1.1, shears up to 0.05, shifts up to 10 mm),
then a scanner change (smooth bias field, gamma contrast, Gaussian noise). Seeds ``0..pairs-1``.

Every method returns, for each fixed voxel ``x``, the moving-image point it reads (``y(x)``, world
mm). Scores: GM/WM Dice of the moving labels resampled through ``y`` (nearest), the true
displacement error ``|y(x) - phi^-1(x)|`` (mm, mean over the brain), folding (% of the brain
with det J <= 0) and seconds per pair (the registration itself: the peers' call; ours: register.py's
preprocess + refine/network + outputs stages, its own report; also the whole command's wall time).

Methods: ``identity``; ``refine`` (``register.py --refine``, no model); with ``-c``: ``network``,
``network+refine`` (the network's flow carried to the benchmark grid (2 mm, ``--refine_spacing 2``), and refined
there) and ``affine+network+refine`` (``--affine
affine``: our affine stage, the network on the aligned pair, then refinement, all on the model grid); peers when installed (``pip install -r requirements-peers.txt``):
``ants-affine``, ``ants-syn`` (antspyx ``Affine`` / ``SyN``), ``sitk-bspline`` (SimpleITK: affine,
then a B-spline on an 8^3 mesh at 1/4 and 1/2 resolution, Mattes MI, 10 % random samples), ``convexadam`` (MIND + convex + Adam, no affine stage). Peers use 2 threads
(``--threads``) like ours.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
from scipy import ndimage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_util.icbm import IcbmPairs  # noqa: E402
from data_util.synthetic import AbdomenPairs  # noqa: E402
from network.outputs import atomic_write_text  # noqa: E402
from data_util.image_io import ImageError, load_image  # noqa: E402
from data_util.preprocess import Grid, grid_points, world_to_voxel  # noqa: E402

METHODS = ("identity", "affine", "refine", "network", "network+refine", "affine+network+refine", "ants-affine", "ants-syn",
           "sitk-bspline", "convexadam")
PEER_MODULES = {"ants-affine": "ants", "ants-syn": "ants", "sitk-bspline": "SimpleITK", "convexadam": "convexAdam"}
PAIR_SOURCES = {"icbm152": (IcbmPairs, 2.0), "abdomen": (AbdomenPairs, 3.0)}    # class, grid spacing mm
NETWORK_SECONDS: dict = {}     # (method, seed) -> seconds of the network itself (register.py's report)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=4, help="test pairs (seeds 0..N-1)")
    p.add_argument("-c", "--checkpoint", default=None, help="trained model for the network rows")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                   help="methods to run (default: all that can run here)")
    p.add_argument("--magnitude", type=float, default=8.0, help="largest displacement of the smooth field, mm")
    p.add_argument("--contrast", choices=["same", "inverted"], default="same",
                   help="moving image contrast: same (T1), or inverted (T2-like, a cross-contrast test)")
    p.add_argument("--refine_args", default="", help="extra register.py options for our rows, e.g. '--refine 40'")
    p.add_argument("--out", default="evaluate/icbm_benchmark", help="work folder (inputs, outputs, results)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every method")
    p.add_argument("--template_dir", default=None, help="folder with the ICBM152 files (default: nilearn's)")
    p.add_argument("--anatomy", choices=sorted(PAIR_SOURCES), default="icbm152",
                   help="icbm152: the brain template (MRI); abdomen: the CT abdomen phantom")
    args = p.parse_args(argv)
    if args.anatomy == "abdomen" and args.contrast != "same":
        p.error("--contrast inverted: the abdomen CT pairs have one contrast")
    return args


# ---- data ---------------------------------------------------------------------------------------

def make_pairs(args) -> tuple:
    """Writes fixed / moving NIfTIs; returns ``(grid, fixed labels, [pair dict])``."""
    source, spacing = PAIR_SOURCES[args.anatomy]
    pairs = source(os.path.join(args.out, "inputs"), args.magnitude, args.contrast, args.template_dir, spacing)
    args.modality, args.spacing, args.label_names = pairs.modality, spacing, dict(pairs.label_names)
    return pairs.grid, pairs.fixed_labels, [pairs.write(seed) for seed in range(args.pairs)]


# ---- scoring ------------------------------------------------------------------------------------

def world_points(grid: Grid) -> np.ndarray:
    return grid_points(grid, 0, grid.shape[2])


def label_key(name: str) -> str:
    """``dice_gm``, ``dice_liver``: the column of one label's Dice."""
    return "dice_" + {"grey matter": "gm", "white matter": "wm"}.get(name, name.replace(" ", "_"))


def score(grid: Grid, fixed_labels, pair, y: np.ndarray, label_names: dict) -> dict:
    """``y``: ``(3, X, Y, Z)`` moving world points of every fixed voxel; Dice per label of
    ``label_names`` and their mean."""
    from network.metrics import dice_per_label, jacobian_determinant
    import torch
    vox = world_to_voxel(grid.affine, y)
    warped = ndimage.map_coordinates(pair["moving_labels"], vox.reshape(3, -1), order=0, mode="constant")
    warped = warped.reshape(grid.shape)
    per_label = dice_per_label(fixed_labels, warped, tuple(label_names))
    out = {label_key(name): per_label[value] for value, name in label_names.items()}
    out["dice"] = float(np.mean(list(out.values())))
    inside = fixed_labels > 0                         # the brain, or the phantom's organs
    x = world_points(grid)
    truth = pair["transform"].inverse(x[:, inside])
    out["error_mm"] = float(np.linalg.norm(y[:, inside] - truth, axis=0).mean())
    flow = torch.from_numpy((vox - world_to_voxel(grid.affine, x)).astype(np.float32))[None]
    det = jacobian_determinant(flow)[0].numpy()
    out["folding_pct"] = float(100 * (det[inside[:-1, :-1, :-1]] <= 0).mean())
    return out


# ---- methods ------------------------------------------------------------------------------------

def run_ours(args, pair, grid, name: str) -> tuple:
    out = os.path.join(args.out, "outputs", f"{name}_{pair['seed']}")
    cmd = [sys.executable, os.path.join(ROOT, "register.py"), "--fixed", pair["fixed"], "--moving", pair["moving"],
           "-o", out, "--modality", args.modality, "--threads", str(args.threads), "--no_figure"]
    if "network" in name:
        cmd += ["-c", args.checkpoint]
    else:
        cmd += ["--spacing", str(args.spacing)]          # no model: register on the benchmark's grid
    if name.endswith("refine"):
        cmd += ["--refine"] + args.refine_args.split()
    if name == "affine":
        cmd += ["--refine", "0"]
    if name == "network+refine":
        cmd += ["--refine_spacing", str(args.spacing)]    # refine on the same grid as refinement alone
    if name.startswith("affine+"):
        cmd += ["--affine", "affine"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    seconds = sum(v for k, v in report["seconds"].items()
                  if k in ("preprocess", "network", "affine+network", "refine", "outputs"))
    refine = report.get("refine", {})
    found = [report["seconds"].get("network"), refine.get("seconds", {}).get("network"),
             refine.get("model_grid_stage", {}).get("seconds", {}).get("network")]
    network_seconds = next((v for v in found if v is not None), None)
    if network_seconds is not None:
        NETWORK_SECONDS[(name, pair["seed"])] = float(network_seconds)
    import nibabel as nib
    d = np.asarray(nib.load(os.path.join(out, "displacement.nii.gz")).dataobj, dtype=np.float64).reshape(*grid.shape, 3)
    y = world_points(grid) + np.moveaxis(d, -1, 0)
    return y, seconds, wall


def voxels_to_world(grid: Grid, vox: np.ndarray) -> np.ndarray:
    return (grid.affine[:3, :3] @ vox.reshape(3, -1) + grid.affine[:3, 3:4]).reshape(vox.shape)


def run_ants(args, pair, grid, kind: str) -> tuple:
    import ants
    fixed, moving = ants.image_read(pair["fixed"]), ants.image_read(pair["moving"])
    t0 = time.perf_counter()
    reg = ants.registration(fixed, moving, type_of_transform=kind)
    seconds = time.perf_counter() - t0
    # the transforms composed into one displacement field on the fixed grid (LPS mm), defined
    # everywhere, also where the moving field of view ends
    folder = os.path.join(args.out, "outputs")
    os.makedirs(folder, exist_ok=True)
    composed = ants.apply_transforms(fixed, moving, reg["fwdtransforms"],
                                     compose=os.path.join(folder, f"ants_{kind}_{pair['seed']}_"))
    d = ants.image_read(composed).numpy() * np.array([-1.0, -1.0, 1.0])       # LPS -> RAS
    return world_points(grid) + np.moveaxis(d, -1, 0), seconds, seconds


def run_sitk_bspline(args, pair, grid) -> tuple:
    import SimpleITK as sitk
    fixed = sitk.ReadImage(pair["fixed"], sitk.sitkFloat32)
    moving = sitk.ReadImage(pair["moving"], sitk.sitkFloat32)
    t0 = time.perf_counter()

    def method(transform, iterations, shrink, sigmas):
        r = sitk.ImageRegistrationMethod()
        r.SetMetricAsMattesMutualInformation(32)
        r.SetMetricSamplingStrategy(r.RANDOM)
        r.SetMetricSamplingPercentage(0.1, seed=1)
        r.SetInterpolator(sitk.sitkLinear)
        r.SetShrinkFactorsPerLevel(shrink)
        r.SetSmoothingSigmasPerLevel(sigmas)
        r.SetInitialTransform(transform, inPlace=True)
        return r, iterations

    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    r, it = method(init, 100, [4, 2, 1], [2, 1, 0])
    r.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, it)
    r.SetOptimizerScalesFromPhysicalShift()
    affine = r.Execute(fixed, moving)
    bspline = sitk.BSplineTransformInitializer(fixed, [8, 8, 8])
    r, it = method(bspline, 50, [4, 2], [2, 1])         # a full-resolution level costs ~6 min per pair here
    r.SetMovingInitialTransform(affine)
    r.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=it)
    r.Execute(fixed, moving)
    total = sitk.CompositeTransform([affine, bspline])
    seconds = time.perf_counter() - t0
    field = sitk.TransformToDisplacementField(total, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(),
                                              fixed.GetSpacing(), fixed.GetDirection())
    d = sitk.GetArrayFromImage(field).transpose(2, 1, 0, 3) * np.array([-1.0, -1.0, 1.0])   # LPS -> RAS
    return world_points(grid) + np.moveaxis(d, -1, 0), seconds, seconds


def run_convexadam(args, pair, grid) -> tuple:
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt
    fixed = load_image(pair["fixed"]).data.astype(np.float32)
    moving = load_image(pair["moving"]).data.astype(np.float32)
    t0 = time.perf_counter()
    disp = convex_adam_pt(fixed, moving, dtype=torch.float32, device=torch.device("cpu"))
    seconds = time.perf_counter() - t0
    vox = world_to_voxel(grid.affine, world_points(grid)) + np.moveaxis(np.asarray(disp, np.float64), -1, 0)
    return voxels_to_world(grid, vox), seconds, seconds


def run_method(args, name, pair, grid) -> tuple:
    if name == "identity":
        return world_points(grid), 0.0, 0.0
    if name in ("affine", "refine", "network", "network+refine", "affine+network+refine"):
        return run_ours(args, pair, grid, name)
    if name == "ants-affine":
        return run_ants(args, pair, grid, "Affine")
    if name == "ants-syn":
        return run_ants(args, pair, grid, "SyN")
    if name == "sitk-bspline":
        return run_sitk_bspline(args, pair, grid)
    return run_convexadam(args, pair, grid)


def available_methods(args) -> list:
    chosen = list(args.methods or METHODS)
    out = []
    for name in chosen:
        if "network" in name and not args.checkpoint:
            if args.methods:
                sys.exit(f"icbm_benchmark.py: error: --methods {name} needs -c CHECKPOINT")
            continue
        module = PEER_MODULES.get(name)
        if module and importlib.util.find_spec(module) is None:
            print(f"skipping {name}: {module} is not installed (pip install -r requirements-peers.txt)")
            continue
        out.append(name)
    return out


# ---- summary ------------------------------------------------------------------------------------

def summarise(rows: list, methods: list, label_names: dict) -> dict:
    summary = {}
    for name in methods:
        mine = [r for r in rows if r["method"] == name]
        summary[name] = {k: float(np.mean([r[k] for r in mine])) for k in
                         ("dice", *map(label_key, label_names.values()), "error_mm", "folding_pct")}
        summary[name]["seconds"] = float(np.median([r["seconds"] for r in mine]))
        summary[name]["wall_seconds"] = float(np.median([r["wall_seconds"] for r in mine]))
        network = [r["network_seconds"] for r in mine if r.get("network_seconds") is not None]
        summary[name]["network_seconds"] = float(np.median(network)) if network else None
        summary[name]["dice_sem"] = float(np.std([r["dice"] for r in mine], ddof=1) / np.sqrt(len(mine))) \
            if len(mine) > 1 else float("nan")
    return summary


COMPARISONS = (("affine", "ants-affine"), ("network", "affine"), ("network", "ants-affine"), ("network", "ants-syn"), ("network+refine", "ants-syn"),
               ("network+refine", "network"), ("refine", "ants-syn"), ("refine", "ants-affine"))


def paired(rows, a: str, b: str) -> dict | None:
    """Per-pair Dice difference ``a - b``: mean, standard error, pairs where ``a`` is better."""
    da = {r["seed"]: r["dice"] for r in rows if r["method"] == a}
    db = {r["seed"]: r["dice"] for r in rows if r["method"] == b}
    seeds = sorted(set(da) & set(db))
    if not seeds:
        return None
    diff = np.array([da[s] - db[s] for s in seeds])
    sem = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return {"a": a, "b": b, "mean": float(diff.mean()), "sem": sem, "better": int((diff > 0).sum()), "n": len(diff)}


def render(summary: dict, comparisons: list, args) -> str:
    labels = [label_key(n) for n in args.label_names.values()]
    what = ("ICBM152 at 2 mm" if args.anatomy == "icbm152" else "abdomen CT phantom at 3 mm") + \
        (", bias/gamma/noise" if args.modality == "mri" else ", HU offset/noise")
    lines = [f"{what}, {args.pairs} pairs (random affine + smooth field up to {args.magnitude:g} mm, "
             f"{args.contrast} contrast), {args.threads} threads",
             "", "| method | Dice | " + " | ".join(k[5:].upper() if len(k) < 8 else k[5:] for k in labels)
             + " | error mm | folding % | s / pair | network s | wall s |",
             "|---|---|" + "---|" * len(labels) + "---|---|---|---|---|"]
    for name, s in summary.items():
        net = "" if s.get("network_seconds") is None else f"{s['network_seconds']:.3f}"
        lines.append(f"| {name} | {s['dice']:.4f} ± {s['dice_sem']:.4f} | "
                     + "".join(f"{s[k]:.4f} | " for k in labels)
                     + f"{s['error_mm']:.3f} | {s['folding_pct']:.4f} | {s['seconds']:.2f} | {net} | "
                     f"{s['wall_seconds']:.2f} |")
    if comparisons:
        lines += ["", "| paired Dice difference | mean | sem | pairs better |", "|---|---|---|---|"]
        for c in comparisons:
            lines.append(f"| {c['a']} - {c['b']} | {c['mean']:+.4f} | {c['sem']:.4f} | {c['better']}/{c['n']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(args.threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    torch.set_num_threads(args.threads)
    methods = available_methods(args)
    try:
        grid, fixed_labels, pairs = make_pairs(args)
    except ImageError as e:
        sys.exit(f"icbm_benchmark.py: error: {e}")
    rows = []
    for pair in pairs:
        for name in methods:
            y, seconds, wall = run_method(args, name, pair, grid)
            row = {"method": name, "seed": pair["seed"], "seconds": seconds, "wall_seconds": wall,
                   "network_seconds": NETWORK_SECONDS.get((name, pair["seed"])),
                   **score(grid, fixed_labels, pair, y, args.label_names)}
            rows.append(row)
            per_label = ", ".join(f"{k[5:]} {row[k]:.4f}" for k in map(label_key, args.label_names.values()))
            print(f"pair {pair['seed']} {name:15s} Dice {row['dice']:.4f} ({per_label}) "
                  f"error {row['error_mm']:.3f} mm folding {row['folding_pct']:.4f}% "
                  f"{seconds:.2f} s (wall {wall:.2f} s)", flush=True)
    summary = summarise(rows, methods, args.label_names)
    comparisons = [c for c in (paired(rows, a, b) for a, b in COMPARISONS) if c]
    text = render(summary, comparisons, args)
    print("\n" + text)
    result = {"args": {k: v for k, v in vars(args).items()}, "rows": rows, "summary": summary,
              "comparisons": comparisons}
    for name, content in (("results.json", json.dumps(result, indent=2) + "\n"), ("results.md", text)):
        atomic_write_text(os.path.join(args.out, name), content)
    print(f"wrote {os.path.join(args.out, 'results.json')} and results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
