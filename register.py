"""Register one scan pair: NIfTI / DICOM in, NIfTI + CSV + PNG out.

``python register.py -c weights/<run> --fixed F --moving M -o OUT [--fixed_label FL --moving_label ML]
[--fixed_landmarks F.csv --moving_landmarks M.csv] [--modality auto|ct|mri|uint8] [--refine [N]]``

``python register.py --fixed F --moving M -o OUT --refine [N]`` registers without a trained model:
affine (rigid, then 12-dof), then deformable instance optimisation (``network/refine.py``) on a grid
of ``--spacing`` mm (default 2) covering the fixed image. With ``-c``, ``--refine`` starts from the
network's flow (``--refine_from affine``: from its affine stem's output) and refines it on the model
grid, or on a finer one (``--refine_spacing``); ``--affine affine`` aligns the pair first and runs the
network on it. ``N``: Adam iterations at the finest level (each coarser level gets twice as many;
``--refine 0``: the affine stage only).

Models trained on roughly aligned pairs (the shipped ``weights/brain_mri_lite``) record the affine
stage they expect (``register_affine``); ``--affine auto`` then runs it before the network, with or
without ``--refine`` (``--affine none`` skips it). The intensity mapping also comes from the
checkpoint (``input_normalisation``) unless ``--modality`` is given.

``F`` / ``M``: ``.nii`` / ``.nii.gz`` files or DICOM series folders, any orientation, spacing and size.
Both are resampled in world coordinates onto the model grid (``--orientation``, default LPS; the
checkpoint's image size; isotropic spacing that fits the fixed image's field of view, or
``--spacing``; ``--crop label`` centres it on the fixed label map), intensities mapped to [0, 1]
(CT window ``--window 290 120``; MRI 0.5-99.5 percentiles). Everything written lies on the fixed
image's original grid with its header:

* ``warped.nii.gz``: the moving image (its original intensities) resampled through the registration;
* ``warped_label.nii.gz``: the moving label map (``--label_interp nearest|linear``);
* ``displacement.nii.gz``: ``(X, Y, Z, 1, 3)`` float32 mm in world RAS+ (NIfTI vector intent). For the
  fixed voxel at world ``x``, the moving image is read at ``x + d(x)`` (pull-back);
* ``displacement_itk.nii.gz``: the same field with LPS components (the first two negated), the
  displacement-field transform that antsApplyTransforms, SimpleITK and 3D Slicer apply directly;
* ``jacobian.nii.gz``: the determinant of ``x -> x + d(x)`` (<= 0 where the map folds);
* ``landmarks.csv`` (fixed landmarks mapped into the moving image, with the registration error when
  moving landmarks are given) and ``moving_landmarks_in_fixed.csv``;
* ``figure.png`` (fixed / moving / warped / differences / deformation grid / Jacobian, three planes);
* ``report.json``: every number printed plus the preprocessing (grid, normalisation, translation).
"""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import json
import os
import sys
import time

import numpy as np
import torch

from data_util.image_io import ImageError, Volume, apply_affine, load_image, load_label_for, read_landmarks, \
    save_nifti
from data_util.preprocess import MODEL_MODALITIES, Grid, add_preprocessing_args, label_box, model_grid, \
    normalisation_for, preprocessing_arg_error, resample, resample_labels, fov_grid
from data_util.world_transform import WorldDisplacement
from network import CheckpointError, SizeError, build_model, load_checkpoint
from network.checkpoint import load_weights
from network.outputs import atomic_write_text
from network.cli import ArgumentParser, explicit_dests, fail, positive_float, positive_int, resolve_device
from network.inference import prepare, register, set_threads, tune_allocator
from network.metrics import dice_per_label
from network.outputs import OutputError, OutputSet, os_error_reason
from network.refine import register_pair
from network.refine_cli import add_refine_args, network_start, refine_arg_error, refine_config, stage_affine

# every file register.py may write: an existing -o folder holding anything else is not replaced
OUTPUT_NAMES = ("warped.nii.gz", "warped_label.nii.gz", "displacement.nii.gz", "displacement_itk.nii.gz",
                "jacobian.nii.gz", "landmarks.csv",
                "moving_landmarks_in_fixed.csv", "figure.png", "report.json")
# a checkpoint's input_normalisation -> --modality
TRAINED_MODALITIES = {"uint8": "uint8", "l2r": "l2r", "none": "none", "mri": "mri", "ct": "ct"}


def build_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("-c", "--checkpoint", default=None,
                   help="weights/<run>[:STEP] or a ckpt_<step>.pt file (optional with --refine)")
    p.add_argument("--fixed", required=True, help="fixed image: NIfTI file or DICOM series folder")
    p.add_argument("--moving", required=True, help="moving image: NIfTI file or DICOM series folder")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--fixed_label", help="label map on the fixed image's grid")
    p.add_argument("--moving_label", help="label map on the moving image's grid")
    p.add_argument("--fixed_landmarks", help="text/CSV, three numbers per row (see --landmark_units)")
    p.add_argument("--moving_landmarks", help="corresponding moving landmarks, same count and order")
    p.add_argument("--landmark_units", choices=["mm", "voxel"], default="mm",
                   help="mm: world RAS+ coordinates; voxel: indices into that image (default mm)")
    p.add_argument("--size", type=positive_int, nargs=3, default=None,
                   help="model grid size (default: the checkpoint's)")
    p.add_argument("--spacing", type=positive_float, default=None,
                   help="model grid spacing in mm (default: fit the FOV into the checkpoint's size; without -c: 2)")
    p.add_argument("--align", choices=["none", "center", "com"], default="none",
                   help="initial translation of the moving image: none, field-of-view centres, or "
                        "intensity centres of mass (scans not in a common world frame)")
    p.add_argument("-r", "--rep", type=positive_int, default=None, help="shared-weight repetitions at test time")
    p.add_argument("-g", "--gpu", default="-1", help="GPU id, or -1 for the CPU")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no_figure", action="store_true", help="skip figure.png")
    p.add_argument("--fixed_mask", help="region of the fixed image the refinement compares (mask on its grid)")
    p.add_argument("--refine_spacing", type=positive_float, default=None,
                   help="with -c and --refine: refine on a grid of this spacing (mm) over the fixed image, "
                        "starting from the network's flow carried there (default: the model grid)")
    add_preprocessing_args(p, modalities=MODEL_MODALITIES)
    add_refine_args(p)
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    args.explicit = explicit_dests(p, argv)
    problem = preprocessing_arg_error(args) or refine_arg_error(args, args.explicit,
                                                                affine_without_refine=args.checkpoint is not None)
    if problem:
        p.error(problem)
    if args.refine is None and "refine_spacing" in args.explicit:
        p.error("--refine_spacing needs --refine")
    if args.checkpoint is None:
        if args.refine is None:
            p.error("give -c CHECKPOINT, or --refine to register without a trained model (or both)")
        for flag in ("rep", "refine_from", "refine_spacing"):
            if flag in args.explicit:
                p.error(f"--{flag} needs -c CHECKPOINT (without it, --spacing sets the grid)")
    return args


# ---- loading ------------------------------------------------------------------------------------

def load_model(args, device):
    state = load_checkpoint(args.checkpoint)
    config = dict(state["model_config"])
    if args.rep is not None:
        config["rep"] = args.rep
    if args.size is not None and tuple(args.size) != tuple(config["image_size"]):
        if config.get("affine"):
            raise CheckpointError(f"{state['path']}: --size {tuple(args.size)}: this model's affine stem "
                                  f"only takes its training size {tuple(config['image_size'])}")
        config["image_size"] = list(args.size)
    try:
        model = build_model(config)
    except (SizeError, ValueError, TypeError, KeyError) as e:
        where = f"--size {' '.join(map(str, args.size))}" if args.size is not None and isinstance(e, SizeError) \
            else state["path"]
        raise CheckpointError(f"{where}: {str(e).splitlines()[0]}") from None
    load_weights(model, state)
    return prepare(model.to(device), channels_last=device.type == "cpu"), state


def network_affine(state: dict) -> str:
    """The affine stage the checkpoint's model was trained to follow (``none`` unless recorded:
    models trained on roughly aligned pairs record ``register_affine``)."""
    value = state.get("register_affine", "none")
    return value if value in ("none", "rigid", "affine") else "none"


def trained_normalisation(state: dict):
    """``(modality, where it came from)`` the model was trained with, or ``(None, why unknown)``.

    Checkpoints record ``input_normalisation``; for older ones an RCN HDF5 training dataset
    (``train_args["dataset"]``, when its JSON can still be read) means uint8 volumes (/255)."""
    stored = state.get("input_normalisation")
    if isinstance(stored, str):
        if stored in TRAINED_MODALITIES:
            return TRAINED_MODALITIES[stored], f"checkpoint input_normalisation {stored!r}"
        return None, f"checkpoint input_normalisation {stored!r} is unknown here"
    dataset = (state.get("train_args") or {}).get("dataset")
    for path in (dataset, (state.get("train_args") or {}).get("dataset_abspath")):
        if not isinstance(path, str) or not path.lower().endswith(".json") or not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            continue
        from data_util.formats import is_learn2reg_config
        if is_learn2reg_config(config):
            mode = config.get("normalisation", "l2r")
            if mode in TRAINED_MODALITIES:
                return TRAINED_MODALITIES[mode], f"its Learn2Reg training dataset {path}"
        elif isinstance(config, dict) and any(isinstance(v, dict) and str(v.get("type", "")).upper() == "HDF5"
                                              for v in (config.get("files") or {}).values()):
            return "uint8", f"its RCN HDF5 training dataset {path}"
    return None, "the checkpoint does not record its input normalisation"


def choose_modalities(args, state: dict | None, inputs: dict) -> dict:
    """``{"fixed": modality, "moving": modality}``: the user's explicit ``--modality``, else the
    model's training normalisation, else ``auto`` (today's detection)."""
    if state is None:
        return {side: args.modality for side in ("fixed", "moving")}
    trained, source = trained_normalisation(state)
    given = args.modality if "modality" in args.explicit else None
    if given not in (None, "auto"):
        if trained is not None and given != trained:
            print(f"register.py: warning: --modality {given} differs from the normalisation the model was "
                  f"trained with ({trained}, from {source})", file=sys.stderr)
        return {side: given for side in ("fixed", "moving")}
    if trained is None:
        print(f"note: {source}; --modality auto (CT window or MRI percentiles per image)")
        return {side: "auto" for side in ("fixed", "moving")}
    chosen = {}
    for side in ("fixed", "moving"):
        volume = inputs[side]
        low, high = float(volume.data.min()), float(volume.data.max())
        if trained == "uint8" and (low < -0.5 or high > 255.5):
            print(f"register.py: warning: the model was trained on uint8 volumes (/255, from {source}) but "
                  f"{volume.path} has values in [{low:.4g}, {high:.4g}]; using --modality auto for it "
                  f"(pass --modality to choose)", file=sys.stderr)
            chosen[side] = "auto"
        else:
            chosen[side] = trained
    print(f"intensity normalisation from the model: {trained} ({source})")
    return chosen


def check_not_constant(volume: Volume) -> None:
    data = volume.data
    if data.size and float(data.max()) <= float(data.min()):
        raise ImageError(f"{volume.path}: image is constant ({float(data.min()):g} everywhere); nothing to register")


def load_inputs(args) -> dict:
    inputs = {"fixed": load_image(args.fixed), "moving": load_image(args.moving)}
    for side in ("fixed", "moving"):
        check_not_constant(inputs[side])
    for side in ("fixed", "moving"):
        path = getattr(args, f"{side}_label")
        inputs[f"{side}_label"] = load_label_for(inputs[side], path) if path else None
        path = getattr(args, f"{side}_landmarks")
        inputs[f"{side}_landmarks"] = read_landmarks(path, inputs[side], args.landmark_units) if path else None
    f, m = inputs["fixed_landmarks"], inputs["moving_landmarks"]
    if f is not None and m is not None and f.shape != m.shape:
        raise ImageError(f"{args.moving_landmarks}: {len(m)} landmarks, but {args.fixed_landmarks} has {len(f)}")
    inputs["fixed_mask"] = load_label_for(inputs["fixed"], args.fixed_mask) if args.fixed_mask else None
    if inputs["fixed_mask"] is not None and not (inputs["fixed_mask"].data > 0).any():
        raise ImageError(f"{args.fixed_mask}: the mask is empty")
    if args.crop == "label" and inputs["fixed_label"] is None:
        raise ImageError(f"{args.fixed}: --crop label needs --fixed_label")
    return inputs


# ---- preprocessing --------------------------------------------------------------------------------

def centre_of_mass(volume: Volume, norm) -> np.ndarray:
    weights = norm.apply(volume.data).astype(np.float64)
    if weights.sum() <= 0:
        return apply_affine(volume.affine, (np.asarray(volume.shape)[None] - 1) / 2)[0]
    ijk = np.array([(weights.sum(axis=tuple(b for b in range(3) if b != a)) * np.arange(n)).sum()
                    for a, n in enumerate(volume.shape)]) / weights.sum()
    return apply_affine(volume.affine, ijk[None])[0]


DEFAULT_REFINE_SPACING = 2.0     # mm, the grid of --refine without -c


def preprocess(args, inputs, image_size, grid: Grid | None = None) -> dict:
    """Both images on the model grid (``grid``, else ``image_size``; None: ``--size``, else
    ``--spacing`` (default 2 mm) over the fixed field of view), normalised to [0, 1]."""
    fixed, moving = inputs["fixed"], inputs["moving"]
    box = label_box(inputs["fixed_label"], args.margin) if args.crop == "label" else None
    if grid is not None:
        pass
    elif image_size is None and args.size is None:
        grid = fov_grid(fixed, args.spacing or DEFAULT_REFINE_SPACING, args.orientation, box=box)
    else:
        grid = model_grid(fixed, image_size or tuple(args.size), args.spacing, args.orientation, box=box)
    modalities = args.modalities if hasattr(args, "modalities") else {"fixed": args.modality, "moving": args.modality}
    norms = {side: normalisation_for(inputs[side], modalities[side], args.window, args.percentiles)
             for side in ("fixed", "moving")}
    translation = np.zeros(3)
    if args.align == "center":
        translation = (apply_affine(moving.affine, (np.asarray(moving.shape)[None] - 1) / 2)
                       - apply_affine(fixed.affine, (np.asarray(fixed.shape)[None] - 1) / 2))[0]
    elif args.align == "com":
        translation = centre_of_mass(moving, norms["moving"]) - centre_of_mass(fixed, norms["fixed"])
    shift = (lambda w: w + translation[:, None, None, None]) if args.align != "none" else None
    out = {"grid": grid, "norms": norms, "translation": translation,
           "fixed": norms["fixed"].apply(resample(fixed, grid)),
           "moving": norms["moving"].apply(resample(moving, grid, world_map=shift))}
    for side in ("fixed", "moving"):
        image, n = out[side], norms[side]
        if not np.isfinite(image).all():
            raise ImageError(f"{inputs[side].path}: NaN/Inf after {n.modality} normalisation; nothing to register")
        if float(image.max()) <= float(image.min()):
            raise ImageError(f"{inputs[side].path}: constant ({float(image.min()):g}) on the model grid after "
                             f"{n.modality} normalisation [{n.low:.4g}, {n.high:.4g}] (the scan lies outside the "
                             f"grid, or --modality / --window do not fit it); nothing to register")
    return out


# ---- outputs on the fixed grid --------------------------------------------------------------------

def mean(values) -> float:
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def landmark_tables(inputs, disp: WorldDisplacement) -> dict:
    """CSV texts and errors for the landmark outputs."""
    fixed_pts, moving_pts = inputs["fixed_landmarks"], inputs["moving_landmarks"]
    moving, fixed = inputs["moving"], inputs["fixed"]
    tables, stats = {}, {}
    def through(fn, points):
        """``fn`` on the present rows; missing (NaN) rows stay NaN."""
        out = np.full_like(points, np.nan)
        ok = np.isfinite(points).all(1)
        if ok.any():
            out[ok] = fn(points[ok])
        return out

    if fixed_pts is not None:
        mapped = through(disp.map_points, fixed_pts)
        mapped_vox = apply_affine(np.linalg.inv(moving.affine), mapped)
        header = ["id", "fixed_x", "fixed_y", "fixed_z", "in_moving_x", "in_moving_y", "in_moving_z",
                  "in_moving_i", "in_moving_j", "in_moving_k"]
        rows = [[n, *fixed_pts[n], *mapped[n], *mapped_vox[n]] for n in range(len(fixed_pts))]
        if moving_pts is not None:
            before = np.linalg.norm(fixed_pts - moving_pts, axis=1)
            after = np.linalg.norm(mapped - moving_pts, axis=1)
            header += ["moving_x", "moving_y", "moving_z", "error_before_mm", "error_after_mm"]
            rows = [r + [*moving_pts[n], before[n], after[n]] for n, r in enumerate(rows)]
            both = np.isfinite(before)
            if both.any():
                stats = {"landmark_error_before_mm": float(before[both].mean()),
                         "landmark_error_after_mm": float(after[both].mean()), "landmark_pairs": int(both.sum())}
        tables["landmarks.csv"] = render_csv(header, rows)
    if moving_pts is not None:
        back = through(disp.invert_points, moving_pts)
        back_vox = apply_affine(np.linalg.inv(fixed.affine), back)
        header = ["id", "moving_x", "moving_y", "moving_z", "in_fixed_x", "in_fixed_y", "in_fixed_z",
                  "in_fixed_i", "in_fixed_j", "in_fixed_k"]
        tables["moving_landmarks_in_fixed.csv"] = render_csv(
            header, [[n, *moving_pts[n], *back[n], *back_vox[n]] for n in range(len(moving_pts))])
    return {"tables": tables, "stats": stats}


def render_csv(header, rows) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(header)
    for r in rows:
        w.writerow([r[0]] + [f"{v:.4f}" for v in r[1:]])
    return out.getvalue()


def _lps_transform(orientation: str):
    import nibabel.orientations as ornt
    return ornt.ornt_transform(ornt.axcodes2ornt(tuple(orientation.upper())), ornt.axcodes2ornt(("L", "P", "S")))


def to_lps(volume: np.ndarray, orientation: str) -> np.ndarray:
    """Reorder / flip a model-grid array into LPS axis order for display."""
    import nibabel.orientations as ornt
    return ornt.apply_orientation(volume, _lps_transform(orientation))


def index_to_lps(index, shape, orientation: str) -> tuple:
    """A model-grid voxel index as an index into :func:`to_lps` of an array of ``shape``."""
    out = [0, 0, 0]
    for axis, (new_axis, flip) in enumerate(_lps_transform(orientation)):
        out[int(new_axis)] = shape[axis] - 1 - index[axis] if flip < 0 else index[axis]
    return tuple(int(v) for v in out)


def make_figure(args, inputs, prep, flow, jac, warped_model, title):
    from network.layers import warp
    from network.visualization import grid_lines, registration_figure, slice_offsets
    grid = prep["grid"]
    labels = {}
    if inputs["fixed_label"] is not None:
        labels["fixed_label"] = resample_labels(inputs["fixed_label"], grid)
    if inputs["moving_label"] is not None:
        shift = (lambda w: w + prep["translation"][:, None, None, None])
        labels["moving_label"] = resample_labels(inputs["moving_label"], grid, world_map=shift)
        labels["warped_label"] = warp(torch.from_numpy(labels["moving_label"].astype(np.float32))[None, None],
                                      torch.from_numpy(flow)[None], mode="nearest").numpy()[0, 0]
    center = tuple(s // 2 for s in grid.shape)
    if "fixed_label" in labels and (labels["fixed_label"] > 0).any():
        center = tuple(int(v) for v in np.argwhere(labels["fixed_label"] > 0).mean(0).round())
    every = max(6, min(grid.shape) // 8)
    lines = torch.from_numpy(grid_lines(grid.shape, every, slice_offsets(grid.shape, every, center)))
    warped_lines = warp(lines[None, None], torch.from_numpy(flow)[None]).numpy()[0, 0]
    o = args.orientation
    return registration_figure(to_lps(prep["fixed"], o), to_lps(prep["moving"], o), to_lps(warped_model, o),
                               to_lps(warped_lines, o), to_lps(jac, o), spacing=tuple(grid.spacing),
                               center=index_to_lps(center, grid.shape, o), title=title,
                               **{k: to_lps(v, o) for k, v in labels.items()})


def run_network(model, prep: dict, device, rep=None):
    """The model's flow ``(3, X, Y, Z)`` (model-grid voxels) and warped moving image on the model grid."""
    to_tensor = lambda a: torch.from_numpy(a)[None, None].to(device)
    out = register(model, to_tensor(prep["fixed"]), to_tensor(prep["moving"]),
                   channels_last=device.type == "cpu", rep=rep)
    return out["flow"][0].float().cpu().numpy(), out["warped"][0, 0].float().cpu().numpy()


def check_output_folder(out_dir: str) -> None:
    """``-o`` may be new, empty, or a previous register.py output (``report.json`` and only our
    files), which is then replaced as a whole; anything else is refused, never deleted."""
    parent = os.path.dirname(os.path.abspath(out_dir))      # the new set is staged beside -o
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out_dir}: cannot write here ({parent} is read-only or not writable)")
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise OutputError(f"{out_dir}: -o exists and is not a folder")
    try:
        names = sorted(os.listdir(out_dir))
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot read the -o folder ({e.strerror or e})") from None
    if not names:
        return
    if "report.json" not in names:
        raise OutputError(f"{out_dir}: -o is a non-empty folder that is not a register.py output (no report.json); "
                          f"choose a new or empty folder")
    listed = set(OUTPUT_NAMES)
    try:
        with open(os.path.join(out_dir, "report.json"), encoding="utf-8") as f:
            listed |= {n for n in json.load(f).get("files", []) if isinstance(n, str)}
    except (OSError, ValueError, AttributeError):
        pass
    other = [n for n in names if n not in listed]
    if other:
        raise OutputError(f"{out_dir}: -o holds {other[0]!r}, which register.py did not write; the folder would be "
                          f"replaced as a whole, so choose a new or empty folder")


def write_outputs(out_dir: str, files: dict, report=None) -> None:
    """Write every output (and ``report.json``, from ``report()`` called after the others are
    written) into a staging folder, then swap it into place as ``out_dir``: the folder holds the
    complete old set or the complete new one, never a mix; on an error nothing changes."""
    with OutputSet(out_dir) as out:
        try:
            for name, writer in files.items():
                writer(out.path(name))
            if report is not None:
                atomic_write_text(out.path("report.json"), json.dumps(report(), indent=2) + "\n")
        except (OSError, OutputError) as e:       # name the file as the user knows it, not the staging folder
            reason = str(e) if isinstance(e, OutputError) else f"cannot write ({os_error_reason(e, out.staging)})"
            where = os.path.join(out_dir, os.path.basename(getattr(e, "filename", None) or ""))
            message = reason.replace(out.staging, out_dir.rstrip(os.sep)) if isinstance(e, OutputError) \
                else f"{where}: {reason}"
            raise OutputError(message) from None


def ras_to_lps_vectors(displacement: np.ndarray) -> np.ndarray:
    """``(..., 3)`` RAS+ vectors -> LPS (ITK's world frame): the first two components negated."""
    return displacement * np.array([-1.0, -1.0, 1.0], dtype=displacement.dtype)


def check_finite(name: str, array: np.ndarray, checkpoint: str) -> None:
    bad = int((~np.isfinite(array)).sum())
    if bad:
        raise ImageError(f"{checkpoint}: the registration produced {bad} NaN/Inf values in the {name} "
                         f"(NaN weights in the checkpoint?); nothing written")


def _tensor(a, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None].to(device)


def network_start_flow(args, model, prep: dict, flow, device) -> np.ndarray:
    """The refinement's start on the model grid: the network's flow, or its affine stem's."""
    start = network_start(model, _tensor(prep["fixed"], device), _tensor(prep["moving"], device),
                          torch.from_numpy(flow)[None].to(device), args.refine_from)
    return start[0].cpu().numpy()


def carry_flow(flow: np.ndarray, source: Grid, target: Grid) -> np.ndarray:
    """A voxel flow on ``source`` as the same world map in voxels of ``target`` (both isotropic)."""
    d = WorldDisplacement(flow, source).on_grid(target)                       # (X, Y, Z, 3) mm
    u = np.linalg.solve(target.affine[:3, :3], d.reshape(-1, 3).T)
    return u.reshape(3, *target.shape).astype(np.float32)


def refine_on_grid(args, model, prep: dict, inputs: dict, start, device, config) -> tuple:
    """Instance optimisation on ``prep``'s grid; returns ``(flow, warped, result)``. ``start``: the
    initial flow on that grid (a network's), or None: with a model and ``config.affine`` not
    ``none``, affine stage first, then the network on the aligned moving image, then deformable."""
    from network.layers import warp
    fixed, moving = _tensor(prep["fixed"], device), _tensor(prep["moving"], device)
    network = None
    if model is not None and start is None:
        network = lambda f, m: register(model, f, m, channels_last=device.type == "cpu", rep=args.rep)["flow"]
    init = None if start is None else torch.from_numpy(start)[None].to(device)
    mask = None
    if inputs["fixed_mask"] is not None:
        mask = _tensor(resample_labels(inputs["fixed_mask"], prep["grid"]) > 0, device)
    tune_allocator()
    result = register_pair(fixed, moving, config, init_flow=init, mask=mask, log=print, network=network)
    with torch.no_grad():
        warped = warp(moving, result.flow)
    return result.flow[0].cpu().numpy(), warped[0, 0].cpu().numpy(), result


def run_refinement(args, model, prep: dict, inputs: dict, flow, device, config, source: str) -> tuple:
    """``--refine`` (or an affine stage before the network): returns ``(prep, flow, warped, report
    part)``; ``prep`` is the refinement grid's (the model grid, or with ``--refine_spacing`` a finer
    one the network's flow is carried to; with an affine stage, the affine and the network run on
    the model grid first)."""
    try:
        start, first = None, None
        if model is not None and config.affine == "none":
            start = network_start_flow(args, model, prep, flow, device)
        elif model is not None and args.refine_spacing is not None:
            aligned = dataclasses.replace(config, iters=tuple(0 for _ in config.iters))
            start, _, first = refine_on_grid(args, model, prep, inputs, None, device, aligned)
            config = dataclasses.replace(config, affine="none")
        if start is not None and args.refine_spacing is not None:
            box = label_box(inputs["fixed_label"], args.margin) if args.crop == "label" else None
            grid = fov_grid(inputs["fixed"], args.refine_spacing, args.orientation, box=box)
            start = carry_flow(start, prep["grid"], grid)
            model_grid_prep, prep = prep, preprocess(args, inputs, None, grid=grid)
            print(f"refinement grid: {grid.shape} at {args.refine_spacing:.3f} mm")
        flow, warped, result = refine_on_grid(args, model, prep, inputs, start, device, config)
        check_finite("refined flow", flow, source)
    except (ValueError, ImageError) as e:
        fail(f"{source}: {e}" if not isinstance(e, ImageError) else str(e))
    report = refine_report(config, result, prep["grid"], prep["translation"])
    if first is not None:
        report["model_grid_stage"] = refine_report(aligned, first, model_grid_prep["grid"], model_grid_prep["translation"])
    return prep, flow, warped, report


def refine_report(config, result, grid: Grid, translation) -> dict:
    out = {"config": config.to_dict(), "levels": result.levels,
           "seconds": {k: round(v, 4) for k, v in result.seconds.items()}}
    if result.affine is not None:
        G = grid.affine
        world = G @ result.affine @ np.linalg.inv(G)          # fixed world -> moving world (mm, RAS+)
        world[:3, 3] += translation
        out["affine_voxel"] = np.asarray(result.affine).tolist()
        out["affine_world_ras"] = world.tolist()
    return out


def main(argv=None):
    args = parse_args(argv)
    times = {}
    t = time.perf_counter()

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        times[name] = now - t
        t = now

    try:
        set_threads(args.threads)
    except ValueError as e:
        fail(str(e))
    device = resolve_device(args.gpu)
    model, state = None, None
    try:
        check_output_folder(args.output)
        if args.checkpoint is not None:
            model, state = load_model(args, device)
        inputs = load_inputs(args)
        args.modalities = choose_modalities(args, state, inputs)
    except (CheckpointError, ImageError, OutputError) as e:
        fail(str(e))
    image_size = tuple(model.config.image_size) if model is not None else None
    source = state["path"] if state is not None else "the refinement"
    fixed, moving = inputs["fixed"], inputs["moving"]
    print(f"fixed  {fixed.path}: {fixed.describe()}")
    print(f"moving {moving.path}: {moving.describe()}")
    lap("load")

    try:
        prep = preprocess(args, inputs, image_size)
    except (ImageError, ValueError) as e:
        fail(f"{args.fixed}: {e}" if not isinstance(e, ImageError) else str(e))
    grid = prep["grid"]
    for side in ("fixed", "moving"):
        n = prep["norms"][side]
        print(f"{side} intensities: none, as stored" if n.modality == "none" else
              f"{side} intensities: {n.modality}, [{n.low:.4g}, {n.high:.4g}] -> [0, 1]")
    print(f"model grid: {grid.shape} at {grid.spacing[0]:.3f} mm, orientation {args.orientation.upper()}, "
          f"initial translation {np.round(prep['translation'], 2).tolist()} mm")
    lap("preprocess")

    flow = warped_model = None
    expects = network_affine(state) if state is not None else "none"
    affine_first = model is not None and stage_affine(args, True, expects) != "none"
    if affine_first and args.affine == "auto":
        print(f"affine stage first: the model expects affinely aligned inputs ({state['path']} register_affine "
              f"{expects!r}; --affine none skips it)")
    config = (refine_config(args, with_network=model is not None, network_affine=expects)
              if args.refine is not None or affine_first else None)
    if model is not None and (config is None or config.affine == "none"):     # else the network runs after the affine
        flow, warped_model = run_network(model, prep, device, args.rep)
        try:
            check_finite("network's flow", flow, state["path"])
        except ImageError as e:
            fail(str(e))
        lap("network")
    refined = None
    if config is not None:
        prep, flow, warped_model, refined = run_refinement(args, model, prep, inputs, flow, device, config, source)
        grid = prep["grid"]
        lap("refine" if args.refine is not None else "affine+network")

    disp = WorldDisplacement(flow, grid, prep["translation"])
    jac_model = disp.jacobian_determinant()
    fixed_grid = Grid.of(fixed)
    displacement = disp.on_grid(fixed_grid)
    warped = resample(moving, fixed_grid, displacement=displacement)
    jacobian = resample(Volume(jac_model, grid.affine, "jacobian"), fixed_grid, order=1, cval=1.0)
    try:
        for name, array in (("displacement", displacement), ("warped image", warped), ("Jacobian", jacobian)):
            check_finite(name, array, source)
    except ImageError as e:
        fail(str(e))
    report = {"fixed": fixed.path, "moving": moving.path, "checkpoint": state["path"] if state else None,
              "model_grid": grid.to_dict(), "orientation": args.orientation.upper(),
              "normalisation": {k: v.to_dict() for k, v in prep["norms"].items()},
              "initial_translation_mm": prep["translation"].tolist(),
              "displacement_convention": "pull-back, world RAS+ mm: moving is read at x + d(x)",
              "folding_pct": float(100 * (jac_model <= 0).mean()),
              "jacobian_min": float(jac_model.min()), "jacobian_max": float(jac_model.max())}
    if refined is not None:
        report["refine"] = refined
    files = {
        "warped.nii.gz": lambda p: save_nifti(p, warped, fixed, description="warped moving image"),
        "displacement.nii.gz": lambda p: save_nifti(p, displacement[:, :, :, None, :], fixed, intent="vector",
                                                    description="pull-back displacement, RAS mm"),
        "displacement_itk.nii.gz": lambda p: save_nifti(p, ras_to_lps_vectors(displacement)[:, :, :, None, :], fixed,
                                                        intent="vector", description="pull-back displacement, LPS mm"),
        "jacobian.nii.gz": lambda p: save_nifti(p, jacobian, fixed, description="Jacobian determinant"),
    }
    if inputs["moving_label"] is not None:
        warped_label = resample_labels(inputs["moving_label"], fixed_grid, displacement=displacement,
                                       method=args.label_interp)
        dtype = np.uint8 if warped_label.max(initial=0) < 256 else np.int32
        files["warped_label.nii.gz"] = lambda p: save_nifti(p, warped_label.astype(dtype), fixed,
                                                            description="warped moving labels")
        if inputs["fixed_label"] is not None:
            fixed_label = inputs["fixed_label"].data
            before_label = resample_labels(inputs["moving_label"], fixed_grid)
            values = [v for v in np.unique(fixed_label) if v != 0]
            before = dice_per_label(fixed_label, before_label, values)
            after = dice_per_label(fixed_label, warped_label, values)
            report["dice_before"], report["dice_after"] = mean(before.values()), mean(after.values())
            report["dice_per_label"] = {str(v): {"before": before[v], "after": after[v]} for v in before}
    landmarks = landmark_tables(inputs, disp)
    report.update(landmarks["stats"])
    for name, text in landmarks["tables"].items():
        files[name] = lambda p, text=text: atomic_write_text(p, text)
    lap("outputs")

    if not args.no_figure and importlib.util.find_spec("matplotlib") is None:
        print('note: figure.png skipped: matplotlib is not installed (pip install -e ".[figures]")')
    elif not args.no_figure:
        from network.visualization import save_figure
        title = f"{os.path.basename(moving.path.rstrip('/'))} -> {os.path.basename(fixed.path.rstrip('/'))}"
        if "dice_after" in report:
            title += f"   Dice {report['dice_before']:.3f} -> {report['dice_after']:.3f}"
        fig = make_figure(args, inputs, prep, flow, jac_model, warped_model, title)
        files["figure.png"] = lambda p: save_figure(fig, p)
        lap("figure")

    def final_report():
        lap("write")
        report["seconds"] = {k: round(v, 4) for k, v in times.items()}
        report["seconds"]["total"] = round(sum(times.values()), 4)
        report["files"] = sorted(files) + ["report.json"]
        return report

    write_outputs(args.output, files, final_report)

    if "dice_after" in report:
        per_label = ", ".join(f"{k}: {v['before']:.3f}->{v['after']:.3f}" for k, v in report["dice_per_label"].items())
        print(f"Dice {report['dice_before']:.4f} -> {report['dice_after']:.4f} ({per_label})")
    if "landmark_error_after_mm" in report:
        print(f"landmark error ({report['landmark_pairs']} pairs) {report['landmark_error_before_mm']:.3f} -> "
              f"{report['landmark_error_after_mm']:.3f} mm")
    print(f"folding (det J <= 0): {report['folding_pct']:.4f}% of the model grid, det J in "
          f"[{report['jacobian_min']:.3f}, {report['jacobian_max']:.3f}]")
    print("seconds: " + ", ".join(f"{k} {v:.3f}" for k, v in report["seconds"].items()))
    print(f"wrote {', '.join(report['files'])} to {args.output}")
    return 0


def cli() -> int:
    """Console entry point (``ldr-register``): :func:`main` with every fault reported as one line."""
    from network.cli import run

    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
