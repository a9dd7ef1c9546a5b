"""The segmentation plan the CT-FM Segment panel shows before the user clicks, without torch.

The plan is :func:`CTFMLib.segment_plan.plan_segmentation`, the code ``ctfm segment --plan``
runs, given what the child process would be given:

- the volume as an :class:`~CTFMLib.image.Image` in world LPS, as
  :func:`CTFMSlicer.nodes.image_from_volume_node` makes it for the child (a linear parent
  transform folded in), but with the voxels a view of the node's memory, not a copy
  (:func:`volume_image_view`);
- the model's facts (spacing, window, classes, width) from its ``config.json`` and the
  catalogue (:func:`CTFMSegmentLib.models.segmentation_model_facts`);
- the device, precision and threads as the child resolves them
  (:func:`CTFMLib.segment_plan.planned_run`; the panel's ``auto`` is taken as the
  accelerator this computer appears to have, :func:`guess_auto_device`).

Reading the voxels (the foreground box and the all-air windows) is the costly part: about
0.5 s per preset for a 512x512x300 CT. :class:`PlanCache` therefore keeps the plans per
(volume voxels and world geometry, model, spacing, device, this computer's timings), and
the panel computes a missing one on demand only (see ``CTFMSegmentWidget._refreshPlan``).
"""

from __future__ import annotations

import collections
import os
import platform
import shutil
import sys
from typing import Optional

import numpy as np

from CTFMLib.costs import duration
from CTFMLib.image import Image
from CTFMLib.segment_plan import (
    DEFAULT_QUALITY,
    QUALITIES,
    Foreground,
    SegmentationPlan,
    Timings,
    plan_segmentation,
    planned_run,
)
from CTFMSlicer.nodes import RAS_TO_LPS, check_scalar_volume, ijk_to_world_ras, image_from_volume_node

from .models import FOLDER, model_config_path, segmentation_model_facts

# The same tolerance as CTFMSlicer.nodes.image_from_volume_node (a sheared world grid is refused there).
PLAN_CACHE_SIZE = 12  # plans kept (three presets of four input combinations)


def _slicer():
    import slicer  # deferred so that importing this module never needs a running Slicer

    return slicer


def world_lps_matrix(volumeNode) -> np.ndarray:
    """4x4 IJK -> world LPS matrix of a volume node (a linear parent transform included)."""
    return RAS_TO_LPS @ ijk_to_world_ras(volumeNode)


def volume_image_view(volumeNode) -> Image:
    """The volume as :func:`CTFMSlicer.nodes.image_from_volume_node` gives it, with its voxels not copied.

    The array is a view of the node's VTK memory (indexed ``[i, j, k]``): use it at once, while the
    node's voxels stay as they are, and never write to it.
    """
    return image_from_volume_node(volumeNode, copy=False)


def guess_auto_device() -> str:
    """What ``--device auto`` will most likely pick here, without torch: a GPU where its driver is seen.

    ``cuda`` where an NVIDIA driver is installed, ``mps`` on Apple silicon, else ``cpu``. Only the
    estimate depends on it (the child decides with torch): a PyTorch built without CUDA on a computer
    with an NVIDIA GPU runs on the CPU, slower than planned.
    """
    if sys.platform == "darwin":
        return "mps" if platform.machine() == "arm64" else "cpu"
    if sys.platform.startswith("linux"):
        return "cuda" if os.path.exists("/proc/driver/nvidia/version") else "cpu"
    if sys.platform.startswith("win"):
        return "cuda" if shutil.which("nvidia-smi") else "cpu"
    return "cpu"


def resolved_run(device: str = "auto") -> tuple:
    """``(device, precision, threads)`` the plan assumes for the panel's device choice."""
    return planned_run(guess_auto_device() if device in (None, "", "auto") else device, "auto", None)


def _mtime(path) -> Optional[int]:
    try:
        return os.stat(path).st_mtime_ns
    except (OSError, TypeError, ValueError):
        return None


def volume_key(volumeNode) -> tuple:
    """What the plan reads of a volume: its voxels (the image data's modification time) and world grid."""
    check_scalar_volume(volumeNode)
    image_data = volumeNode.GetImageData()
    matrix = world_lps_matrix(volumeNode)
    # VTK's modification times come from one global counter: new or modified voxels (even in another
    # vtkImageData put in the node) have a time no earlier key holds. (Python's id() of a VTK object
    # would not do: each call may wrap the same C++ object anew.)
    node = volumeNode.GetID() or getattr(volumeNode, "__this__", "")
    return (node, image_data.GetMTime(), image_data.GetDimensions(), image_data.GetScalarType(),
            tuple(np.round(matrix[:3].ravel(), 9).tolist()))


def model_key(model: str, modelFolder=None) -> tuple:
    """A Model choice, with its config.json's modification time where the choice is a folder."""
    if model == FOLDER:
        path = model_config_path(model, modelFolder)
        return (model, str(modelFolder or ""), _mtime(path) if path else None)
    return (model,)


class PlanCache:
    """Segmentation plans by their inputs; a plan is computed only when asked for and missing."""

    def __init__(self, size: int = PLAN_CACHE_SIZE):
        self.size = size
        self._plans = collections.OrderedDict()
        self._foreground = (None, None)  # (volume key, CTFMLib.segment_plan.Foreground): one read for every preset

    def key(self, volumeNode, model: str, modelFolder=None, spacing: str = "model", device: str = "auto") -> tuple:
        """Cheap (no voxels read): raises :class:`ImageError` for an unusable volume."""
        return (volume_key(volumeNode), model_key(model, modelFolder), str(spacing), str(device),
                _mtime(Timings().path))  # what this computer measured by earlier runs

    def get(self, key: tuple, quality: str):
        """The cached plan (or the ValueError planning raised), or None when not computed yet."""
        found = self._plans.get((key, quality))
        if found is not None:
            self._plans.move_to_end((key, quality))
        return found

    def compute(self, key: tuple, volumeNode, model: str, modelFolder, quality: str, spacing: str, device: str):
        """Plan one preset (reads the voxels) and keep it; returns the plan, or the error that refused it.

        A ValueError says why these inputs cannot be planned (an all-air volume, a sheared grid); any
        other error is kept too, so that a panel asking again does not fail again on every refresh.
        """
        try:
            if self._foreground[0] != key[0]:
                self._foreground = (key[0], Foreground.of(volume_image_view(volumeNode)))
            result = plan_volume(volumeNode, model, modelFolder, quality, spacing, device, self._foreground[1])
        except Exception as e:  # a plan is a courtesy: what it raises is shown, never thrown at the panel
            result = e
        self._plans[(key, quality)] = result
        while len(self._plans) > self.size:
            self._plans.popitem(last=False)
        return result

    def clear(self) -> None:
        self._plans.clear()
        self._foreground = (None, None)


def plan_volume(volumeNode, model: str, modelFolder=None, quality: str = DEFAULT_QUALITY, spacing: str = "model",
                device: str = "auto", foreground=True) -> SegmentationPlan:
    """:func:`CTFMLib.segment_plan.plan_segmentation` for the panel's inputs (reads the voxels unless given the
    volume's :class:`CTFMLib.segment_plan.Foreground`; no cache)."""
    facts = segmentation_model_facts(model, modelFolder)
    run_device, precision, threads = resolved_run(device)
    return plan_segmentation(
        volume_image_view(volumeNode), quality=quality, spacing=spacing, model_spacing=facts["spacing"],
        roi=facts["roi"], classes=facts["classes"], filters=facts["filters"], parameters=facts["parameters"],
        device=run_device, precision=precision, threads=threads, foreground=foreground)


# --- what the panel shows -------------------------------------------------------------------------------


# ``40 s``, ``4 min``, ``1.5 h``: the presets' times side by side, worded as ``ctfm`` words them.
short_duration = duration


def _mm(values, axes: str = "") -> str:
    """``1.5 mm`` (isotropic), else ``2x1.5x1.5 mm`` followed by ``axes`` (e.g. `` (S, P, L)``)."""
    values = [f"{float(v):g}" for v in values]
    return f"{values[0]} mm" if len(set(values)) == 1 else "x".join(values) + " mm" + axes


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _where(plan: SegmentationPlan) -> str:
    if plan.device.startswith("cuda"):
        return f"GPU (CUDA), {plan.precision}"
    if plan.device.startswith("mps"):
        return f"Apple GPU (MPS), {plan.precision}"
    return f"CPU, {plan.precision}, {_plural(plan.threads, 'thread')}"


def plan_summary(plans: dict, quality: str) -> tuple:
    """``(text, tooltip)`` the panel shows for ``plans`` (``{quality: plan or ValueError}``, the chosen one in it).

    Example text::

        At 1.5 mm (the model's spacing): 45 windows run, 9 all air (skipped)
        Expected time: about 6 min (full 8 min · standard 6 min · fast 54 s)
        Peak memory about 3.5 GB · CPU, fp32, 2 threads
    """
    chosen = plans.get(quality)
    if chosen is None:
        return "Planning...", ""
    if isinstance(chosen, Exception):
        return f"No plan: {chosen}", ""
    plan = chosen
    if plan.working_spacing is None:  # as the volume's own axes list it (what the Volumes module shows)
        grid = f"At the input's spacing ({_mm(plan.input_spacing)})"
    elif quality == "fast":
        grid = f"At {_mm(plan.working_spacing, ' (S, P, L)')} (fast)"
    elif plan.model_spacing is not None and tuple(plan.working_spacing) == tuple(plan.model_spacing):
        grid = f"At {_mm(plan.working_spacing, ' (S, P, L)')} (the model's spacing)"
    else:
        grid = f"At {_mm(plan.working_spacing, ' (S, P, L)')}"
    windows = _plural(plan.windows_run, "window")
    if plan.windows_skipped:
        windows += f" run, {plan.windows_skipped} all air (skipped)"
    presets = []
    for name in QUALITIES:
        other = plans.get(name)
        if isinstance(other, SegmentationPlan):
            presets.append(f"{name} {short_duration(other.expected_seconds)}")
        elif other is None:
            presets.append(f"{name} ...")
    seconds = f"Expected time: about {short_duration(plan.expected_seconds)}"
    if len(presets) > 1:
        seconds += " (" + " · ".join(presets) + ")"
    memory = f"Peak memory about {plan.expected_peak_bytes / 2**30:.1f} GB · {_where(plan)}"
    text = "\n".join((f"{grid}: {windows}", seconds, memory))
    facts = plan.to_dict()
    working = facts["working"]
    tooltip = "\n".join((
        f"What ctfm segment --plan reports for these inputs ({quality} quality):",
        f"input grid {'x'.join(map(str, facts['input']['shape']))} voxels of {_mm(facts['input']['spacing'])}",
        (f"working grid {'x'.join(map(str, working['grid']))} voxels of {_mm(working['spacing_mm'])} "
         f"(axes {working['axes']}; {'resampled' if working['resampled'] else 'not resampled'})"),
        f"model spacing: {_mm(working['model_spacing_mm']) if working['model_spacing_mm'] else 'not recorded'}",
        (f"windows of {'x'.join(map(str, facts['roi']))}, overlap {facts['overlap']:g}: {facts['windows']['total']} "
         f"({facts['windows']['run']} run, {facts['windows']['skipped']} all air)"),
        f"device {facts['device']}, {facts['precision']}, {_plural(facts['threads'], 'thread')}",
        f"expected {facts['expected_seconds']:g} s, peak {facts['expected_peak_gb']:g} GB ({facts['estimate']})",
    ))
    return text, tooltip
