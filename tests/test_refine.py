"""Instance optimisation (network/refine.py) and ``register.py --refine``: similarities against hand
values, recovery of a known affine and a known smooth field, refinement from the true flow, the ITK
transform applied by SimpleITK, and one-line errors."""
import json
import math
import os
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scan_data as sd  # noqa: E402
from faults import assert_clean_error, leftovers, run_script  # noqa: E402

from network.layers import identity_grid, warp  # noqa: E402
from network.losses import MIND_PAIRS, mind_ssc  # noqa: E402
from network.refine import RefineConfig, Similarity, affine_matrix_flow, register_pair  # noqa: E402


def smooth_noise(shape, sigma=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *shape, generator=g, dtype=torch.float64).numpy()[0, 0]
    from scipy import ndimage
    x = ndimage.gaussian_filter(x, sigma)
    x = (x - x.min()) / (x.max() - x.min())
    return torch.from_numpy(x.astype(np.float32))[None, None]


# ---- similarities against hand values -------------------------------------------------------------

def test_mind_ssc_matches_a_hand_computation():
    img = torch.rand(1, 1, 6, 5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = mind_ssc(img, radius=1, dilation=2)[0].numpy()
    a = img[0, 0].numpy()
    S = np.array(a.shape)

    def at(p):
        return a[tuple(np.clip(p, 0, S - 1))]

    assert len(MIND_PAIRS) == 12
    D = np.zeros((12, *a.shape))
    for x in np.ndindex(*a.shape):
        for k, (u, v) in enumerate(MIND_PAIRS):
            values = []
            for q in np.ndindex(3, 3, 3):
                y = np.clip(np.array(x) + np.array(q) - 1, 0, S - 1)
                values.append((at(y + 2 * np.array(u)) - at(y + 2 * np.array(v))) ** 2)
            D[(k, *x)] = np.mean(values)
    D = D - D.min(0)
    V = D.mean(0)
    V = np.clip(V, max(V.mean() * 1e-3, 1e-6), V.mean() * 1e3)
    assert np.allclose(got, np.exp(-D / V), atol=1e-10)
    assert got.max() <= 1.0 and np.allclose(got.max(0), 1.0)      # the most similar pair is 1 at every voxel


def test_lncc_matches_a_hand_computation_and_honours_the_mask():
    g = torch.Generator().manual_seed(2)
    f = torch.rand(1, 1, 5, 4, 6, generator=g, dtype=torch.float64)
    w = torch.rand(1, 1, 5, 4, 6, generator=g, dtype=torch.float64)
    fa, wa = f[0, 0].numpy(), w[0, 0].numpy()
    n, eps = 27.0, 1e-5
    cc = np.zeros(fa.shape)
    for x in np.ndindex(*fa.shape):
        box = tuple(slice(max(c - 1, 0), c + 2) for c in x)      # zeros outside count in n
        si, sj = fa[box].sum(), wa[box].sum()
        sii, sjj, sij = (fa[box] ** 2).sum(), (wa[box] ** 2).sum(), (fa[box] * wa[box]).sum()
        cross = sij - si * sj / n
        cc[x] = cross ** 2 / ((sii - si * si / n) * (sjj - sj * sj / n) + eps)
    sim = Similarity("lncc", lncc_window=3)
    assert float(sim(f, w)) == pytest.approx(float(np.mean(1 - cc)), abs=1e-10)
    mask = torch.zeros_like(f)
    mask[..., :2, :, :] = 1
    assert float(sim(f, w, mask)) == pytest.approx(float(np.mean((1 - cc)[:2])), abs=1e-10)
    assert float(sim(f, -3 * f)) == pytest.approx(float(sim(f, f)), abs=1e-5)   # contrast-sign invariant


def test_ncc_and_mse_hand_values():
    f = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 4, 1, 1)
    w = torch.tensor([2.0, 4.0, 6.0, 9.0]).view(1, 1, 4, 1, 1)
    r = np.corrcoef([1, 2, 3, 4], [2, 4, 6, 9])[0, 1]
    assert float(Similarity("ncc")(f, w)) == pytest.approx(1 - r, abs=1e-6)
    assert float(Similarity("mse")(f, w)) == pytest.approx((1 + 4 + 9 + 25) / 4, abs=1e-6)


# ---- recovery of known transforms ------------------------------------------------------------------

def blob_image(shape):
    """Smooth blobs on a zero background, well inside the grid."""
    p = identity_grid(shape, dtype=torch.float64)[0]
    c = (torch.tensor(shape, dtype=torch.float64) - 1).view(3, 1, 1, 1) / 2
    out = torch.zeros(shape, dtype=torch.float64)
    for centre, radius, weight in (((0, 0, 0), 9.0, 1.0), ((-5, 3, 2), 4.0, 1.5), ((4, -4, -3), 3.5, -0.6),
                                   ((2, 5, -5), 3.0, 1.2)):
        r = ((p - c - torch.tensor(centre, dtype=torch.float64).view(3, 1, 1, 1)) ** 2).sum(0).sqrt()
        out += weight / (1 + torch.exp(2 * (r - radius)))
    return out.float()[None, None]


def test_affine_stage_recovers_a_known_affine_to_half_a_millimetre():
    shape, spacing = (40, 40, 40), 2.0                          # mm per voxel
    angle = math.radians(10.0)
    axis = torch.tensor([1.0, 2.0, 0.5])
    axis = axis / axis.norm()
    K = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    R = torch.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K
    M = 1.1 * R                                                 # moving is read at A p
    c = (torch.tensor(shape, dtype=torch.float32) - 1) / 2
    shift = torch.tensor([5.0, -3.0, 4.0]) / spacing            # 5 mm along x (7.1 mm in all)
    A = torch.eye(4)
    A[:3, :3], A[:3, 3] = M, c - M @ c + shift
    fixed = blob_image(shape)
    inverse = torch.linalg.inv(A)
    moving = warp(fixed, affine_matrix_flow(inverse.numpy(), shape))    # moving(A p) = fixed(p)
    config = RefineConfig(similarity="mse", affine="affine", affine_levels=(2, 1), affine_iters=(150, 100),
                          deformable=False)
    result = register_pair(fixed, moving, config)
    p = identity_grid(shape).reshape(3, -1)
    found = torch.as_tensor(result.affine, dtype=torch.float32)
    error = ((found[:3, :3] @ p + found[:3, 3:]) - (A[:3, :3] @ p + A[:3, 3:])).norm(dim=0) * spacing
    inside = ((p - c[:, None]).norm(dim=0) < 14)                # the imaged region (blobs up to ~13 voxels out)
    assert float(error[inside].mean()) < 0.5, float(error[inside].mean())
    assert float(error[inside].max()) < 1.0, float(error[inside].max())


def true_pullback(w: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """``v`` with ``p + v(p) + w(p + v(p)) = p``: the registration of ``moving = warp(fixed, w)``."""
    v = -w.clone()
    for _ in range(iterations):
        v = -warp(w, v)
    return v


def smooth_field(shape, amplitude=2.0):
    p = identity_grid(shape)[0]
    n = shape[0]
    return amplitude * torch.stack([torch.sin(2 * math.pi * p[1] / n), torch.cos(2 * math.pi * p[2] / n),
                                    torch.sin(2 * math.pi * (p[0] + p[1]) / (2 * n))])[None]


def interior_epe(a, b, border=4):
    s = (slice(None), slice(None)) + (slice(border, -border),) * 3
    return float((a - b)[s].norm(dim=1).mean())


def test_deformable_stage_recovers_a_known_smooth_field():
    shape = (32, 32, 32)
    fixed = smooth_noise(shape, sigma=1.2)
    w = smooth_field(shape, 2.0)
    moving = warp(fixed, w)
    truth = true_pullback(w)
    config = RefineConfig(similarity="lncc", affine="none", levels=(2, 1), iters=(120, 80), reg_weight=0.1,
                          lncc_window=5, lr=0.3)
    result = register_pair(fixed, moving, config)
    assert interior_epe(result.flow, torch.zeros_like(truth)) > 1.5         # the field is not small
    assert interior_epe(result.flow, truth) < 0.5, interior_epe(result.flow, truth)


def test_refining_from_the_true_flow_stays_there():
    shape = (32, 32, 32)
    fixed = smooth_noise(shape, sigma=1.2, seed=3)
    w = smooth_field(shape, 1.5)
    moving = warp(fixed, w)
    truth = true_pullback(w)
    config = RefineConfig(affine="none")                      # the defaults of register.py --refine
    kept = interior_epe(register_pair(fixed, moving, config, init_flow=truth).flow, truth)
    found = interior_epe(register_pair(fixed, moving, config).flow, truth)
    # the start is kept to a fraction of a voxel (LNCC's optimum on the twice-interpolated image is
    # not exactly the truth), and closer than the same optimisation from identity gets
    assert kept < 0.2, kept
    assert kept < 0.6 * found, (kept, found)


def test_diffeomorphic_and_inverse_consistent_options_run_and_do_not_fold():
    shape = (24, 24, 24)
    fixed = smooth_noise(shape, sigma=1.2, seed=4)
    moving = warp(fixed, smooth_field(shape, 1.5))
    from network.metrics import jacobian_determinant
    for options in ({"diffeomorphic": True}, {"inverse_consistency": 1.0}):
        config = RefineConfig(affine="none", levels=(2, 1), iters=(20, 10), **options)
        result = register_pair(fixed, moving, config)
        assert torch.isfinite(result.flow).all()
        assert float((jacobian_determinant(result.flow) <= 0).float().mean()) == 0.0


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="similarity 'ssd'"):
        RefineConfig(similarity="ssd").check()
    with pytest.raises(ValueError, match="iters needs one count per level"):
        RefineConfig(levels=(4, 2), iters=(10,)).check()
    with pytest.raises(ValueError, match="grids differ"):
        register_pair(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 9))


# ---- register.py --refine ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("refine")
    return sd.make_pair(str(d / "pair"))


def test_register_refine_without_a_checkpoint_improves_dice_and_writes_every_output(pair, tmp_path):
    p = pair["paths"]
    r = run_script("register.py", "--fixed", p["fixed"], "--moving", p["moving"], "--fixed_label", p["fixed_label"],
                   "--moving_label", p["moving_label"], "-o", tmp_path / "out", "--refine", "10", "--spacing", "1.5",
                   "--no_figure", "--threads", "2")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("refine ") >= 4                    # one line per level (rigid, affine, 2 deformable)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["checkpoint"] is None
    assert report["dice_after"] > report["dice_before"] + 0.05, (report["dice_before"], report["dice_after"])
    assert report["folding_pct"] < 0.1
    assert {"affine_world_ras", "levels", "config"} <= set(report["refine"])
    assert set(report["seconds"]) >= {"load", "preprocess", "refine", "outputs", "write"}
    for name in ("warped.nii.gz", "warped_label.nii.gz", "displacement.nii.gz", "displacement_itk.nii.gz",
                 "jacobian.nii.gz"):
        assert (tmp_path / "out" / name).is_file(), name
    assert not leftovers(tmp_path)


def test_itk_transform_applied_by_simpleitk_reproduces_warped(pair, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    p = pair["paths"]
    r = run_script("register.py", "--fixed", p["fixed"], "--moving", p["moving"], "-o", tmp_path / "out",
                   "--refine", "5", "--spacing", "2", "--no_figure")
    assert r.returncode == 0, r.stderr[-2000:]
    field = sitk.ReadImage(str(tmp_path / "out" / "displacement_itk.nii.gz"), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    fixed = sitk.ReadImage(p["fixed"], sitk.sitkFloat32)
    moving = sitk.ReadImage(p["moving"], sitk.sitkFloat32)
    stats = sitk.StatisticsImageFilter()
    stats.Execute(moving)
    resampled = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, stats.GetMinimum())
    theirs = sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)        # ITK arrays are (z, y, x)
    ours = np.asarray(nib.load(str(tmp_path / "out" / "warped.nii.gz")).dataobj)
    # compare where the sample lies a voxel inside the moving image (ITK and scipy treat the last
    # half voxel at the border differently)
    fixed_nii, moving_nii = nib.load(p["fixed"]), nib.load(p["moving"])
    d = np.asarray(nib.load(str(tmp_path / "out" / "displacement.nii.gz")).dataobj)[:, :, :, 0, :]
    ijk = np.moveaxis(np.indices(fixed_nii.shape), 0, -1)
    mvox = nib.affines.apply_affine(np.linalg.inv(moving_nii.affine), nib.affines.apply_affine(fixed_nii.affine, ijk) + d)
    inside = ((mvox >= 1) & (mvox <= np.array(moving_nii.shape) - 2)).all(-1)
    assert inside.mean() > 0.5
    scale = float(np.abs(ours).max())
    error = np.abs(theirs - ours)[inside].max()
    assert error < 1e-3 * scale, float(error / scale)
    flipped = sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(                  # the RAS field is not it
        sitk.ReadImage(str(tmp_path / "out" / "displacement.nii.gz"), sitk.sitkVectorFloat64)),
        sitk.sitkLinear, stats.GetMinimum())
    assert np.abs(sitk.GetArrayFromImage(flipped).transpose(2, 1, 0) - ours)[inside].max() > 1e-2 * scale


@pytest.mark.parametrize("args, message", [
    ([], "give -c CHECKPOINT, or --refine"),
    (["--refine", "--refine_from", "affine"], "--refine_from needs -c"),
    (["--reg_weight", "0.5"], "--reg_weight needs --refine"),
    (["--refine", "--reg_weight", "-1"], "--reg_weight"),
    (["--refine", "--similarity", "ssd"], "--similarity"),
    (["--refine", "-1"], "--refine"),
    (["--refine", "--lncc_window", "4"], "--lncc_window must be odd"),
    (["--refine", "--fixed_mask", "EMPTY"], "the mask is empty"),
])
def test_refine_flag_errors_are_one_line(pair, tmp_path, args, message):
    p = pair["paths"]
    if "EMPTY" in args:
        img = nib.load(p["fixed"])
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), str(tmp_path / "empty.nii.gz"))
        args = [str(tmp_path / "empty.nii.gz") if a == "EMPTY" else a for a in args]
    r = run_script("register.py", "--fixed", p["fixed"], "--moving", p["moving"], "-o", tmp_path / "out", *args)
    assert_clean_error(r, message)
    assert r.returncode == 2 or "mask" in message
    assert not (tmp_path / "out").exists()
