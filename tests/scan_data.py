"""Test scans made on the fly: a smooth phantom in world coordinates, written as NIfTI (any affine)
or as a DICOM series, and a known deformation between a fixed and a moving scan."""
from __future__ import annotations

import os

import numpy as np

BLOBS = (((0.0, 0.0, 0.0), (30.0, 24.0, 26.0), 1.0),       # body (centre mm, radii mm, weight)
         ((-9.0, 5.0, 4.0), (10.0, 8.0, 9.0), 1.5),
         ((10.0, -6.0, -5.0), (7.0, 9.0, 6.0), -0.6),
         ((3.0, 10.0, -10.0), (5.0, 5.0, 7.0), 2.0))


def affine_of(orientation: str, spacing, shape, center=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A voxel -> world RAS+ affine with axes pointing ``orientation`` (e.g. 'LAS'), centred on ``center``."""
    from data_util.preprocess import orientation_matrix
    a = np.eye(4)
    a[:3, :3] = orientation_matrix(orientation) * np.asarray(spacing, float)
    a[:3, 3] = np.asarray(center, float) - a[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return a


def world_points(affine: np.ndarray, shape) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(3, -1).astype(float)
    return (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape(3, *shape)


def phantom(world: np.ndarray) -> np.ndarray:
    """Smooth intensity (0..~4) at world points ``(3, ...)`` mm."""
    out = np.zeros(world.shape[1:])
    for centre, radii, weight in BLOBS:
        r2 = sum(((world[c] - centre[c]) / radii[c]) ** 2 for c in range(3))
        out += weight / (1 + np.exp(8 * (np.sqrt(r2) - 1)))
    return out


def phantom_labels(world: np.ndarray) -> np.ndarray:
    """Label 1 inside the second blob, 2 inside the fourth."""
    out = np.zeros(world.shape[1:], dtype=np.int16)
    for label, (centre, radii, _) in ((1, BLOBS[1]), (2, BLOBS[3])):
        r2 = sum(((world[c] - centre[c]) / radii[c]) ** 2 for c in range(3))
        out[r2 <= 1] = label
    return out


def true_displacement(world: np.ndarray) -> np.ndarray:
    """A smooth pull-back displacement (mm): fixed(x) = moving(x + d(x))."""
    x, y, z = world
    return np.stack([2.0 + 1.5 * np.sin(y / 12.0), -1.0 + 1.5 * np.cos(z / 15.0), 1.0 + 1.0 * np.sin(x / 10.0)])


def save(path: str, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    nib.save(img, path)


def make_pair(folder: str, fixed_orientation="LAS", fixed_spacing=(1.2, 0.9, 1.6), fixed_shape=(40, 52, 30),
              moving_orientation="RPI", moving_spacing=(1.0, 1.4, 1.1), moving_shape=(50, 36, 46)) -> dict:
    """A fixed/moving NIfTI pair (+ labels) with ``fixed(x) = moving(x + d(x))``, ``d`` =
    :func:`true_displacement`. Moving is the plain phantom; fixed reads it through ``d``."""
    os.makedirs(folder, exist_ok=True)
    fa = affine_of(fixed_orientation, fixed_spacing, fixed_shape, center=(1.0, -2.0, 0.5))
    ma = affine_of(moving_orientation, moving_spacing, moving_shape, center=(-1.0, 1.0, 0.0))
    fw = world_points(fa, fixed_shape)
    mw = world_points(ma, moving_shape)
    mapped = fw + true_displacement(fw)
    paths = {k: os.path.join(folder, f"{k}.nii.gz") for k in ("fixed", "moving", "fixed_label", "moving_label")}
    save(paths["fixed"], (100 * phantom(mapped)).astype(np.float32), fa)
    save(paths["moving"], (100 * phantom(mw)).astype(np.float32), ma)
    save(paths["fixed_label"], phantom_labels(mapped), fa)
    save(paths["moving_label"], phantom_labels(mw), ma)
    return {"paths": paths, "fixed_affine": fa, "moving_affine": ma}


def write_dicom_series(folder: str, data: np.ndarray, affine_ras: np.ndarray, modality: str = "CT",
                       slope: float = 1.0, intercept: float = -1024.0) -> None:
    """Write ``data`` ``(cols, rows, slices)`` as one DICOM series (one file per slice, shuffled
    names) whose geometry is ``affine_ras`` (voxel -> RAS+ mm; its k column is the slice step)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    os.makedirs(folder, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
    col_step, row_step = lps[:3, 0], lps[:3, 1]
    col_spacing, row_spacing = np.linalg.norm(col_step), np.linalg.norm(row_step)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    stored = np.rint((data - intercept) / slope).astype(np.uint16)
    order = np.random.default_rng(0).permutation(data.shape[2])
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = modality
        ds.PatientName, ds.PatientID = "Phantom^Test", "0"
        ds.InstanceNumber = int(order[k]) + 1
        ds.ImageOrientationPatient = [float(v) for v in np.concatenate([col_step / col_spacing, row_step / row_spacing])]
        ds.ImagePositionPatient = [float(v) for v in lps[:3, 3] + k * lps[:3, 2]]
        ds.PixelSpacing = [float(row_spacing), float(col_spacing)]
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.save_as(os.path.join(folder, f"IM{order[k]:04d}.dcm"), enforce_file_format=True)
