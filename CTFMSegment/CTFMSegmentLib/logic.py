"""What the CT-FM Segment module can already decide: which inputs are usable.

Running the segmentation itself arrives in a later version (whole-body and
tumour models, issue 3); until then :data:`SEGMENTATION_AVAILABLE` is False and
the module says so instead of pretending.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from CTFMLib.image import ImageError
from CTFMSlicer.nodes import check_scalar_volume

MODELS = ("whole-body", "folder")
QUALITIES = ("full", "fast")
SEGMENTATION_AVAILABLE = False
NOT_AVAILABLE_MESSAGE = (
    "Segmentation is not available yet in this version of CT-FM. "
    "The inputs are checked, but no model is run and no segmentation is created."
)

# The published model layout (CTFMLib.weights.CONFIG_NAME / WEIGHTS_NAME), repeated
# here because CTFMLib.weights imports torch, which the panel must not need.
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def path_is_set(path) -> bool:
    """A parameter-node path counts as unset when empty (``Path()`` reads back as ``.``)."""
    return path is not None and str(path) not in ("", ".")


def model_folder_problem(folder) -> Optional[str]:
    """Why ``folder`` is not a CT-FM model folder, or None."""
    if not path_is_set(folder):
        return "Choose the folder of a CT-FM segmentation model."
    folder = Path(folder)
    if not folder.is_dir():
        return f"The model folder {folder} does not exist."
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
    if missing:
        return f"The model folder {folder} lacks {' and '.join(missing)} (a CT-FM model folder holds {CONFIG_NAME} and {WEIGHTS_NAME})."
    return None


class CTFMSegmentLogic:
    """Input checks of the CT-FM Segment module."""

    def inputProblems(self, volumeNode, model: str, modelFolder=None, quality: str = "full") -> list:
        """Everything that keeps these inputs from being segmented; empty when they are usable."""
        problems = []
        try:
            check_scalar_volume(volumeNode)
        except ImageError as e:
            problems.append(f"Input volume: {e}.")
        if model not in MODELS:
            problems.append(f"Unknown model '{model}'; choose one of {', '.join(MODELS)}.")
        elif model == "folder":
            problem = model_folder_problem(modelFolder)
            if problem:
                problems.append(problem)
        if quality not in QUALITIES:
            problems.append(f"Unknown quality '{quality}'; choose one of {', '.join(QUALITIES)}.")
        return problems
