"""Reading and writing medical images: NIfTI files and DICOM series, with their world geometry.

Every image becomes a :class:`Volume`: a 3-D array indexed ``(i, j, k)`` plus a 4x4 ``affine`` that
maps voxel indices to world coordinates in millimetres, **RAS+** (x towards the patient's Right,
y Anterior, z Superior), nibabel's convention. DICOM's LPS+ patient coordinates are converted on
reading (x and y negated).

Errors are :class:`ImageError` with one line naming the file and the problem.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from struct import error as struct_error

import numpy as np

from network.errors import ToolkitError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class ImageError(ToolkitError):
    """An image, label map or landmark file that cannot be used (the message names the file)."""


@dataclass
class Volume:
    """A 3-D image on a world grid.

    ``data``: ``(X, Y, Z)`` array (float32 for images, int32 for label maps);
    ``affine``: ``(4, 4)`` voxel index -> world RAS+ mm; ``path``: where it came from;
    ``meta``: reader facts (``format``, DICOM ``modality``, the NIfTI header to copy into outputs).
    """
    data: np.ndarray
    affine: np.ndarray
    path: str
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each array axis."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(0))

    @property
    def axcodes(self) -> str:
        import nibabel as nib
        return "".join(nib.aff2axcodes(self.affine))

    def describe(self) -> str:
        return (f"{self.shape} voxels, spacing {tuple(round(float(v), 3) for v in self.spacing)} mm, "
                f"orientation {self.axcodes}")


def _is_nifti(path: str) -> bool:
    return path.lower().endswith(NIFTI_SUFFIXES)


def _to_3d(data: np.ndarray, path: str) -> np.ndarray:
    """Drop trailing singleton axes; refuse 2-D images and true 4-D series."""
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim < 3 or min(data.shape) < 2:
        raise ImageError(f"{path}: a 2-D image (shape {data.shape}); a 3-D volume is needed")
    if data.ndim > 3:
        raise ImageError(f"{path}: a {data.ndim}-D image (shape {data.shape}); a single 3-D volume is needed")
    return data


def _check_values(data: np.ndarray, path: str, label: bool) -> np.ndarray:
    if not np.isfinite(data).all():
        raise ImageError(f"{path}: contains {int((~np.isfinite(data)).sum())} NaN/Inf voxels")
    if not label:
        return data.astype(np.float32, copy=False)
    rounded = np.rint(data)
    if np.abs(rounded - data).max(initial=0) > 1e-3:
        raise ImageError(f"{path}: not a label map (non-integer values, e.g. {data[np.abs(rounded - data) > 1e-3][0]})")
    if rounded.min(initial=0) < 0:
        raise ImageError(f"{path}: label map has negative values")
    return rounded.astype(np.int32)


def load_nifti(path: str, label: bool = False) -> Volume:
    import nibabel as nib
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as e:
        raise ImageError(f"{path}: not a readable NIfTI file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ImageError(f"{path}: header has a degenerate voxel-to-world affine")
    data = _check_values(_to_3d(np.asarray(data), path), path, label)
    return Volume(data, affine, path, {"format": "nifti", "header": img.header.copy()})


def read_geometry(path: str) -> Volume:
    """A NIfTI file's shape and affine without reading its voxels (a zero-size stand-in array);
    other formats are read whole."""
    if not (os.path.isfile(path) and _is_nifti(path)):
        return load_image(path)
    import nibabel as nib
    try:
        img = nib.load(path)
    except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageError(f"{path}: not a readable NIfTI file ({reason})") from None
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ImageError(f"{path}: header has a degenerate voxel-to-world affine")
    data = _to_3d(np.broadcast_to(np.float32(0), img.shape), path)
    return Volume(data, affine, path, {"format": "nifti"})


# ---- DICOM ------------------------------------------------------------------------------------------

def _looks_like_dicom(path: str) -> bool:
    """A DICOM preamble (``DICM`` at byte 128) or a DICOM file name: a file meant to be a slice."""
    if path.lower().endswith((".dcm", ".dicom", ".ima")):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _is_image_slice(ds) -> bool:
    """True for a dataset that should carry pixel data: an image storage SOP class or slice geometry."""
    meta = getattr(ds, "file_meta", None)
    for uid in (meta.get("MediaStorageSOPClassUID") if meta is not None else None, ds.get("SOPClassUID")):
        if uid is not None and "Image Storage" in str(getattr(uid, "name", "")):
            return True
    return any(tag in ds for tag in ("ImagePositionPatient", "Rows", "Columns"))


def _pydicom(path: str):
    """The ``pydicom`` module, or :class:`ImageError` naming ``path`` and the extra to install."""
    try:
        import pydicom
        import pydicom.errors  # noqa: F401
    except ImportError:
        raise ImageError(f"{path}: reading DICOM needs pydicom (pip install -e \".[dicom]\")") from None
    return pydicom


def _dicom_files(folder: str):
    """Yield ``(path, dataset)`` for every DICOM image file directly in ``folder``. Files that are
    not DICOM at all (notes, ``.DS_Store``) are skipped; a file that looks like a DICOM slice but
    cannot be read, or a slice without pixel data (truncated), is refused: a silently dropped slice
    would shorten or distort the volume."""
    pydicom = _pydicom(folder)
    InvalidDicomError = pydicom.errors.InvalidDicomError
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError, AttributeError,
                IndexError, struct_error) as e:
            if _looks_like_dicom(path):
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ImageError(f"{path}: corrupt DICOM file in the series ({reason[:120]}); "
                                 "replace or remove it") from None
            continue
        if "PixelData" not in ds:
            if _is_image_slice(ds):
                raise ImageError(f"{path}: DICOM slice without pixel data (truncated or corrupt file); "
                                 "replace or remove it")
            continue
        yield path, ds


def load_dicom_series(folder: str, label: bool = False, series_uid: str | None = None) -> Volume:
    """Read one DICOM series from ``folder`` (its files directly in it), slices sorted along the normal.

    Array axes: ``i`` = column (along ImageOrientationPatient's row direction), ``j`` = row,
    ``k`` = slice. Pixel values get RescaleSlope/Intercept (CT in HU).
    """
    if not os.path.isdir(folder):
        raise ImageError(f"{folder}: not found")
    series = {}
    for path, ds in _dicom_files(folder):
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    if not series:
        raise ImageError(f"{folder}: no readable DICOM image files in this folder")
    if series_uid is None and len(series) > 1:
        raise ImageError(f"{folder}: holds {len(series)} DICOM series ({', '.join(sorted(series))}); "
                         "pass one series per folder")
    slices = series[series_uid] if series_uid is not None else next(iter(series.values()))
    if len(slices) < 2:
        raise ImageError(f"{folder}: a 2-D image (one DICOM slice); a 3-D series is needed")
    first_path, first = slices[0]
    for path, ds in slices:
        for tag in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
            if tag not in ds:
                raise ImageError(f"{path}: DICOM slice lacks {tag}; cannot place it in the world")
    iop = np.array(first.ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    positions = []
    shape = None
    for path, ds in slices:
        try:
            orientation = np.array(ds.ImageOrientationPatient, dtype=np.float64)
            position = np.array(ds.ImagePositionPatient, dtype=np.float64)
        except (TypeError, ValueError):
            raise ImageError(f"{path}: unreadable ImageOrientationPatient / ImagePositionPatient") from None
        if orientation.shape != (6,) or position.shape != (3,) or not (np.isfinite(orientation).all()
                                                                     and np.isfinite(position).all()):
            raise ImageError(f"{path}: invalid ImageOrientationPatient / ImagePositionPatient")
        if not np.allclose(orientation, iop, atol=1e-4):
            raise ImageError(f"{path}: slice orientation differs from the rest of the series")
        size = (ds.get("Rows"), ds.get("Columns"))
        if shape is not None and size != shape:
            raise ImageError(f"{path}: slice size {size} differs from the rest of the series {shape}")
        shape = size
        positions.append(position)
    order = np.argsort([p @ normal for p in positions])
    positions = np.array(positions)[order]
    slices = [slices[k] for k in order]
    gaps = np.diff(positions @ normal)
    if gaps.min() < 1e-3:
        raise ImageError(f"{folder}: two slices share one position; the series has duplicates")
    if gaps.max() - gaps.min() > 0.01 * gaps.mean() + 1e-3:
        raise ImageError(f"{folder}: uneven slice spacing ({gaps.min():.3f} to {gaps.max():.3f} mm); "
                         "resample the series first")
    try:
        planes = []
        for path, ds in slices:
            pixels = ds.pixel_array.astype(np.float64)
            slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
            planes.append(pixels.T * slope + intercept)            # (rows, cols) -> (i=col, j=row)
        data = np.stack(planes, axis=-1)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError) as e:
        raise ImageError(f"{path}: cannot decode the pixel data ({str(e).splitlines()[0]})") from None
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_spacing
    affine_lps[:3, 1] = col_dir * row_spacing
    affine_lps[:3, 2] = (positions[-1] - positions[0]) / (len(positions) - 1)
    affine_lps[:3, 3] = positions[0]
    data = _check_values(data, folder, label)
    return Volume(data, LPS_TO_RAS @ affine_lps, folder,
                  {"format": "dicom", "modality": str(first.get("Modality", "")).upper()})


def load_image(path: str, label: bool = False) -> Volume:
    """Load a NIfTI file (``.nii``/``.nii.gz``), a DICOM series folder, or the series of one DICOM file."""
    if os.path.isdir(path):
        return load_dicom_series(path, label)
    if not os.path.exists(path):
        raise ImageError(f"{path}: file not found")
    if _is_nifti(path):
        return load_nifti(path, label)
    pydicom = _pydicom(path)
    InvalidDicomError = pydicom.errors.InvalidDicomError
    try:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).get("SeriesInstanceUID", ""))
    except (InvalidDicomError, OSError, EOFError, ValueError):
        raise ImageError(f"{path}: neither NIfTI (.nii/.nii.gz) nor a DICOM file or series folder") from None
    return load_dicom_series(os.path.dirname(os.path.abspath(path)), label, series_uid=uid)


def same_grid(a: Volume, b: Volume, tol: float = 1e-3) -> bool:
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=tol * max(1.0, float(a.spacing.min())))


def load_label_for(image: Volume, path: str) -> Volume:
    """Load a label map and require it to lie on ``image``'s grid (same shape and affine)."""
    label = load_image(path, label=True)
    if not same_grid(image, label):
        raise ImageError(f"{path}: label map is on a different grid than {image.path} "
                         f"(label {label.describe()}; image {image.describe()})")
    return label


# ---- writing ----------------------------------------------------------------------------------------

def _atomic_nibabel_save(img, path: str) -> None:
    import nibabel as nib
    from network.outputs import atomic_output
    with atomic_output(path) as tmp:
        nib.save(img, tmp)


def save_nifti(path: str, data: np.ndarray, reference: Volume, intent: str | None = None,
               description: str = "") -> None:
    """Write ``data`` (``(X, Y, Z, ...)``) on ``reference``'s grid: its affine, and its NIfTI header's
    orientation codes when it came from a NIfTI file. Written to a temporary file, then renamed."""
    import nibabel as nib
    if tuple(data.shape[:3]) != reference.shape:
        raise ValueError(f"data shape {data.shape[:3]} is not the reference grid {reference.shape}")
    header = None
    if reference.meta.get("format") == "nifti":
        header = reference.meta["header"].copy()
        header.set_data_dtype(data.dtype)
    img = nib.Nifti1Image(data, reference.affine, header=header)
    qcode = int(header["qform_code"]) if header is not None else 0
    scode = int(header["sform_code"]) if header is not None else 0
    img.set_qform(reference.affine, code=qcode or 1)
    img.set_sform(reference.affine, code=scode or 1)
    img.header.set_data_dtype(data.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    if intent:
        img.header.set_intent(intent)
    if description:
        img.header["descrip"] = description[:79].encode()
    _atomic_nibabel_save(img, path)


def read_landmarks(path: str, volume: Volume | None = None, units: str = "mm", far=(1.0, 100.0)) -> np.ndarray:
    """Landmarks ``(N, 3)`` in world RAS+ mm from a text/CSV file of three numbers per row.

    A first line that is not numeric is taken as a header; a row ``nan,nan,nan`` marks a missing
    landmark (kept, so rows of two files still correspond). ``units="voxel"`` reads voxel indices
    of ``volume`` and maps them through its affine. With ``volume``, present landmarks must be
    finite and within ``max(far[0] * extent, far[1])`` mm of its field of view
    (:func:`check_landmarks_in_view`).
    """
    if not os.path.isfile(path):
        raise ImageError(f"{path}: landmark file not found")
    rows, line_numbers = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = [v for v in line.replace(",", " ").replace(";", " ").split() if v]
            try:
                values = [float(v) for v in fields]
            except ValueError:
                if not rows and n == 0:
                    continue
                raise ImageError(f"{path}: line {n + 1} is not three numbers: {line[:60]!r}") from None
            if len(values) != 3 or not (np.isfinite(values).all() or np.isnan(values).all()):
                raise ImageError(f"{path}: line {n + 1}: three finite numbers (or nan,nan,nan for a "
                                 f"missing landmark) expected, got {line[:60]!r}")
            rows.append(values)
            line_numbers.append(n + 1)
    if not rows:
        raise ImageError(f"{path}: no landmarks in the file")
    points = np.array(rows, dtype=np.float64)
    if units == "voxel":
        if volume is None:
            raise ValueError("voxel landmarks need their volume")
        with np.errstate(all="ignore"):
            points = apply_affine(volume.affine, points)
    elif units != "mm":
        raise ValueError(f"units must be 'mm' or 'voxel', got {units!r}")
    if volume is not None:
        check_landmarks_in_view(points, volume, path, line_numbers, units, far)
    return points


def check_landmarks_in_view(points: np.ndarray, volume: Volume, path: str, line_numbers=None,
                            units: str = "mm", far=(1.0, 100.0)) -> None:
    """Refuse present landmarks (rows not all NaN) that are not finite or lie far outside
    ``volume``'s field of view: further from its box than ``max(far[0] * its largest extent,
    far[1])`` mm (a typo, wrong units or a file of another scan). Rows all NaN mark missing
    landmarks and pass."""
    line_numbers = list(line_numbers) if line_numbers is not None else list(range(1, len(points) + 1))
    from_corners = np.asarray(volume.shape, dtype=np.float64) - 1
    ijk = np.array([[a, b, c] for a in (0, from_corners[0]) for b in (0, from_corners[1])
                    for c in (0, from_corners[2])])
    box = apply_affine(volume.affine, ijk)
    low, high = box.min(0), box.max(0)
    allowed = float(max(far[0] * (high - low).max(), far[1]))   # mm beyond the field of view still accepted
    for row, point in enumerate(points):
        if np.isnan(point).all():
            continue
        where = f"{path}: line {line_numbers[row]} (landmark {row + 1})"
        if not np.isfinite(point).all():
            raise ImageError(f"{where}: not a finite position ({units} -> {point.tolist()})")
        outside = float(np.max(np.maximum(low - point, point - high)))
        if outside > allowed:
            raise ImageError(f"{where}: at {np.round(point, 2).tolist()} mm, {outside:.4g} mm outside the "
                             f"field of view of {volume.path} (wrong units or another scan's file?)")


def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``(N, 3)`` points through a 4x4 affine."""
    return points @ affine[:3, :3].T + affine[:3, 3]
