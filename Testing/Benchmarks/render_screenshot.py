"""Render the Extensions Index screenshot, ``Resources/Screenshot01.png``, offscreen with VTK.

    python Testing/Benchmarks/render_screenshot.py [--ct PATH] [--out Resources/Screenshot01.png]

The picture is the real example CT (TotalSegmentator's public example scan, found
like the tests find it: ``$CTFM_TEST_DATA`` or ``../shared/data``) in a layout
like Slicer's "Four-Up" view: axial (red), 3D (volume rendering with a CT
bone-and-vessel transfer function, anterior view), sagittal (yellow) and coronal
(green). It shows the CT only: no model output is drawn, so nothing in it claims
a CT-FM result. Needs ``vtk`` (``pip install vtk``; offscreen through EGL or
OSMesa, no display needed), SimpleITK and numpy. The CT is read, never copied.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "Testing"))

PANEL = (540, 405)  # width, height of each of the four views, pixels
SLICE_COLORS = {"axial": (0.93, 0.33, 0.33), "sagittal": (0.93, 0.84, 0.31), "coronal": (0.43, 0.69, 0.38)}
WINDOW, LEVEL = 400.0, 40.0  # soft-tissue window, HU


def load_ct(path: Path):
    """The CT as an int16 array [S, P, L] (LPS index order reversed) and its spacing along L, P, S."""
    import SimpleITK as sitk

    image = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")
    return sitk.GetArrayFromImage(image).astype(np.int16), image.GetSpacing()


def to_vtk_image(array: np.ndarray, spacing):
    """A C-ordered [z, y, x] array as vtkImageData (x fastest)."""
    import vtk
    from vtk.util import numpy_support

    data = vtk.vtkImageData()
    data.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    data.SetSpacing(*spacing)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    data.GetPointData().SetScalars(scalars)
    return data


def slice_panel(image2d: np.ndarray, pixel_mm, color):
    """A renderer showing a 2-D slice (row 0 at the top) in the soft-tissue window, with a Slicer-coloured bar."""
    import vtk

    rgb = np.clip((image2d.astype(np.float32) - (LEVEL - WINDOW / 2)) / WINDOW, 0, 1)
    rgb = (rgb[::-1] * 255).astype(np.uint8)  # VTK's row 0 is the bottom
    data = to_vtk_image(rgb[np.newaxis], (pixel_mm[0], pixel_mm[1], 1.0))
    actor = vtk.vtkImageActor()
    actor.GetMapper().SetInputData(data)
    actor.GetProperty().SetInterpolationTypeToCubic()
    renderer = vtk.vtkRenderer()
    renderer.AddActor(actor)
    renderer.SetBackground(0, 0, 0)
    points = vtk.vtkPoints()  # the slice view's colour, as the bar of Slicer's view controller
    for x, y in ((0, 0.965), (1, 0.965), (1, 1), (0, 1)):  # normalized viewport coordinates
        points.InsertNextPoint(x, y, 0)
    cells = vtk.vtkCellArray()
    cells.InsertNextCell(4, [0, 1, 2, 3])
    poly = vtk.vtkPolyData()
    poly.SetPoints(points)
    poly.SetPolys(cells)
    coordinate = vtk.vtkCoordinate()
    coordinate.SetCoordinateSystemToNormalizedViewport()
    mapper = vtk.vtkPolyDataMapper2D()
    mapper.SetInputData(poly)
    mapper.SetTransformCoordinate(coordinate)
    bar = vtk.vtkActor2D()
    bar.SetMapper(mapper)
    bar.GetProperty().SetColor(*color)
    renderer.AddViewProp(bar)
    camera = renderer.GetActiveCamera()
    camera.ParallelProjectionOn()
    w, h = image2d.shape[1] * pixel_mm[0], image2d.shape[0] * pixel_mm[1]
    camera.SetFocalPoint(w / 2 - pixel_mm[0] / 2, h / 2 - pixel_mm[1] / 2, 0)
    camera.SetPosition(w / 2 - pixel_mm[0] / 2, h / 2 - pixel_mm[1] / 2, 1000)
    camera.SetViewUp(0, 1, 0)
    camera.SetParallelScale(max(h, w * PANEL[1] / PANEL[0]) / 2 * 1.1)
    return renderer


def volume_panel(ct: np.ndarray, spacing):
    """A renderer with the CT volume-rendered (bone and contrast vessels), seen from the front."""
    import vtk

    data = to_vtk_image(ct, spacing)
    mapper = vtk.vtkSmartVolumeMapper()
    mapper.SetInputData(data)
    mapper.SetAutoAdjustSampleDistances(0)
    mapper.SetSampleDistance(0.3)  # mm along each ray: less banding than the automatic distance
    color = vtk.vtkColorTransferFunction()  # after Slicer's "CT-AAA" preset
    for hu, rgb in ((-3024, (0, 0, 0)), (143, (0.62, 0.36, 0.18)), (166, (0.88, 0.60, 0.29)),
                    (214, (1.0, 1.0, 1.0)), (420, (1.0, 0.94, 0.95)), (3071, (0.83, 0.66, 1.0))):
        color.AddRGBPoint(hu, *rgb)
    opacity = vtk.vtkPiecewiseFunction()
    for hu, a in ((-3024, 0.0), (143, 0.0), (166, 0.69), (214, 0.70), (420, 0.83), (3071, 0.80)):
        opacity.AddPoint(hu, a)
    prop = vtk.vtkVolumeProperty()
    prop.SetColor(color)
    prop.SetScalarOpacity(opacity)
    prop.SetInterpolationTypeToLinear()
    prop.ShadeOn()
    prop.SetAmbient(0.2)
    prop.SetDiffuse(1.0)
    prop.SetSpecular(0.1)
    volume = vtk.vtkVolume()
    volume.SetMapper(mapper)
    volume.SetProperty(prop)
    renderer = vtk.vtkRenderer()
    renderer.AddVolume(volume)
    renderer.GradientBackgroundOn()  # Slicer's 3D view background
    renderer.SetBackground(0.76, 0.76, 0.90)
    renderer.SetBackground2(0.45, 0.45, 0.64)
    centre = [(n - 1) * s / 2 for n, s in zip((ct.shape[2], ct.shape[1], ct.shape[0]), spacing)]
    camera = renderer.GetActiveCamera()
    camera.SetFocalPoint(*centre)
    camera.SetPosition(centre[0] - 250, centre[1] - 900, centre[2] + 150)  # anterior, a little from the right and above
    camera.SetViewUp(0, 0, 1)
    camera.SetViewAngle(30)
    renderer.ResetCamera()
    camera.Zoom(1.3)
    renderer.ResetCameraClippingRange()
    return renderer


def main(argv=None) -> int:
    from ctfm_testing.data import shared_data_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_ct = (shared_data_dir() or Path("shared/data")) / "totalsegmentator_example" / "example_ct.nii.gz"
    parser.add_argument("--ct", type=Path, default=default_ct)
    parser.add_argument("--out", type=Path, default=ROOT / "Resources" / "Screenshot01.png")
    args = parser.parse_args(argv)
    if not args.ct.is_file():
        parser.error(f"CT not found: {args.ct} (set CTFM_TEST_DATA to the shared data folder)")

    import vtk

    ct, spacing = load_ct(args.ct)  # [S, P, L]
    s_mm, p_mm, l_mm = spacing[2], spacing[1], spacing[0]
    k, j, i = int(ct.shape[0] * 0.72), int(ct.shape[1] * 0.55), ct.shape[2] // 2
    # Radiological display: patient right on the image's left, anterior / superior at the top.
    axial = ct[k]                          # rows P (anterior at the top), columns L
    coronal = ct[::-1, j, :]               # rows S (superior at the top), columns L
    sagittal = ct[::-1, :, i]              # rows S, columns P (anterior on the left)

    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(PANEL[0] * 2 + 2, PANEL[1] * 2 + 2)
    window.SetMultiSamples(0)
    window.SetAlphaBitPlanes(0)
    # Slicer's Four-Up layout: red | 3D over yellow | green, with a 2-pixel gap.
    fx, fy = (PANEL[0] + 2) / window.GetSize()[0], (PANEL[1] + 2) / window.GetSize()[1]
    gx, gy = 2 / window.GetSize()[0], 2 / window.GetSize()[1]
    views = [
        (slice_panel(axial, (l_mm, p_mm), SLICE_COLORS["axial"]), (0, fy, fx - gx, 1)),
        (volume_panel(ct, spacing), (fx, fy, 1, 1)),
        (slice_panel(sagittal, (p_mm, s_mm), SLICE_COLORS["sagittal"]), (0, 0, fx - gx, fy - gy)),
        (slice_panel(coronal, (l_mm, s_mm), SLICE_COLORS["coronal"]), (fx, 0, 1, fy - gy)),
    ]
    background = vtk.vtkRenderer()  # the gap between the views
    background.SetBackground(0.2, 0.2, 0.2)
    window.AddRenderer(background)
    for renderer, viewport in views:
        renderer.SetViewport(*viewport)
        window.AddRenderer(renderer)
    window.Render()

    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    writer = vtk.vtkPNGWriter()
    writer.SetCompressionLevel(9)
    writer.SetFileName(str(args.out))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    print(f"{args.out}: {window.GetSize()[0]}x{window.GetSize()[1]}, {args.out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
