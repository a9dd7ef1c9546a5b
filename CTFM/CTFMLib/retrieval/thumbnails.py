"""Small axial pictures of a retrieval hit: the slice through the matched place, as PNG.

A thumbnail is sampled in patient space, not in the scan's voxel grid, so every hit looks the
same way up whatever its orientation or spacing: an axial plane through ``centre_lps``, shown
as radiologists read axial CT (patient's right on the image's left, anterior at the top), i.e.
image column +1 = LPS +x (towards the left), row +1 = LPS +y (towards the back). ``size``
pixels of ``pixel_mm`` each, linear interpolation, air (-1024 HU) outside the scan, a
soft-tissue window, and a red cross on the matched point (the image centre).

PNG is written here (zlib, no imaging library): the retrieval child process needs nothing
beyond CTFMLib's own dependencies, and Slicer's Qt shows PNG as it is. Files are written
atomically through :mod:`CTFMLib.files` (never half a picture under the final name; with
``overwrite=False`` never over an existing file).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .. import files
from ..image import Image, to_sitk

SIZE = 128  # pixels per side
PIXEL_MM = 1.5  # 192 mm across: a patch (128 mm) with context around it
WINDOW = (40.0, 400.0)  # level, width in HU: soft tissue
AIR = -1024.0
MARK_RGB = (255, 40, 40)


def axial_slice(image: Image, centre_lps: Sequence[float], size: int = SIZE, pixel_mm: float = PIXEL_MM) -> np.ndarray:
    """HU values (``size`` x ``size``, float32, [row, column]) on the axial plane through ``centre_lps``.

    Pixel (r, c) is the LPS point ``centre + ((c - (size-1)/2) * pixel_mm, (r - (size-1)/2) * pixel_mm, 0)``.
    """
    import SimpleITK as sitk

    centre = np.asarray(centre_lps, dtype=np.float64).reshape(3)
    if not np.all(np.isfinite(centre)):
        raise ValueError(f"the thumbnail centre {list(centre)} is not a point")
    half = (size - 1) / 2.0 * pixel_mm
    reference = sitk.Image([size, size, 1], sitk.sitkFloat32)
    reference.SetSpacing([pixel_mm, pixel_mm, 1.0])
    reference.SetOrigin([float(centre[0] - half), float(centre[1] - half), float(centre[2])])
    reference.SetDirection([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    source = sitk.Cast(to_sitk(image), sitk.sitkFloat32)
    plane = sitk.Resample(source, reference, sitk.Transform(), sitk.sitkLinear, AIR, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(plane)[0]  # [z=0][row=y][column=x]


def window_rgb(hu: np.ndarray, window: Sequence[float] = WINDOW, mark: bool = True) -> np.ndarray:
    """``uint8`` RGB (rows, columns, 3) of ``hu`` in the window (level, width), with a cross at the centre."""
    level, width = float(window[0]), float(window[1])
    grey = np.clip((np.asarray(hu, dtype=np.float64) - (level - width / 2)) / width, 0.0, 1.0)
    grey = np.nan_to_num(grey, nan=0.0)
    rgb = np.repeat(np.round(grey * 255).astype(np.uint8)[..., None], 3, axis=2)
    if mark:
        rows, cols = rgb.shape[:2]
        r, c, arm = rows // 2, cols // 2, max(2, min(rows, cols) // 16)
        gap = max(1, arm // 3)  # the matched voxel itself stays visible
        for d in range(gap, arm + 1):
            for rr, cc in ((r - d, c), (r + d, c), (r, c - d), (r, c + d)):
                if 0 <= rr < rows and 0 <= cc < cols:
                    rgb[rr, cc] = MARK_RGB
    return rgb


def write_png(rgb: np.ndarray, path, overwrite: bool = True) -> Path:
    """Write ``uint8`` RGB (rows, columns, 3) as an 8-bit truecolour PNG (no filtering, zlib level 6).

    Atomic (:func:`CTFMLib.files.atomic_write_bytes`); ``overwrite=False`` refuses an existing ``path``.
    """
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape[:2]:
        raise ValueError(f"a PNG thumbnail needs a (rows, columns, 3) array, got shape {rgb.shape}")
    height, width = rgb.shape[:2]
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, width * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, deflate, no interlace
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b""))
    return files.atomic_write_bytes(Path(path), data, overwrite=overwrite)


def scan_centre_lps(image: Image) -> np.ndarray:
    """The LPS point at the middle of the scan's voxel grid (where a whole-scan hit is shown)."""
    return image.index_to_physical((np.asarray(image.shape, dtype=np.float64) - 1) / 2.0)


def write_thumbnail(image: Image, path, centre_lps: Optional[Sequence[float]] = None, size: int = SIZE,
                    pixel_mm: float = PIXEL_MM, overwrite: bool = True) -> Path:
    """The axial thumbnail of ``image`` around ``centre_lps`` (the scan's centre when None) as a PNG file."""
    centre = scan_centre_lps(image) if centre_lps is None else centre_lps
    return write_png(window_rgb(axial_slice(image, centre, size, pixel_mm)), path, overwrite=overwrite)
