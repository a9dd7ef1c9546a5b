"""Does an image look like a CT in Hounsfield units? One cheap check on the voxel values, no torch.

CT-FM's networks learned from CT in HU. An MR volume (intensities 0..1000, no air), a PET volume, or a
CT whose stored values never got their rescale (air at 0 instead of -1000 HU) runs through every command
just the same and gives embeddings, structures and scores that mean nothing. :func:`check_ct` tells such
an input from a CT by what every CT holds and those images do not:

- **Air, lung or fat.** Air outside the body reads about -1000 HU, lung -900..-500, fat -150..-50. A CT
  of a body region holds some of them: the air around the patient, and when the field of view lies
  inside the body (a cropped or small-field reconstruction, with no air around it), fat and gas,
  which every region of a body has (under the skin, around organs, along the spine, in the bowel).
  So the test is on the share of voxels from :data:`AIR_LOW` to :data:`FAT_HIGH` (-1150 to -30 HU):
  at least :data:`MIN_CT_EVIDENCE` (1 %). Measured on the example CT of ``shared/data``: 58 % of the
  voxels in the whole scan, 30 % in the central quarter of the body, and from 3.7 % (the box around
  the spinal canal) to 51 % (the pancreas) in the bounding box of each of its 31 largest structures.
  An MR magnitude image, a PET image and a CT stored without its rescale have no voxel there (0 %).
- **A range HU can have.** Nothing in a patient is below air: more than :data:`MAX_BELOW_AIR` (1 %) of
  the voxels below :data:`AIR_LOW` means another unit (a rescale applied twice puts air at -2048), once
  the padding is left out. Padding is the one value a scanner writes outside its circular field of view
  (-1024, -2000, -3024, ...): the most frequent value below :data:`AIR_LOW`, when it holds at least half
  of those voxels and 0.1 % of all (a stray voxel of noise in the air is no padding). Nor is a sizeable part of a patient denser than :data:`BONE_HIGH` (4000 HU; cortical
  bone reads up to ~2000, enamel ~3000): more than :data:`MAX_ABOVE_BONE` (5 %) is another unit (metal
  fills a small part of a scan).

Values are judged as read: every reader of CT-FM applies the file's rescale (DICOM Rescale
Slope/Intercept, NIfTI ``scl_slope``/``scl_inter``), so an image stored with the rescale already applied
(HU in the file, no rescale) and one stored raw with its rescale are the same here. A large volume is
judged on an even subsample of about :data:`SAMPLE_VOXELS` voxels (a few tens of milliseconds).

The check only warns (``ctfm`` commands print :func:`warning_for`); pretraining and ``ctfm index add``
leave such scans out and list them, unless told to take them (``--allow-non-ct``,
``data.allow_non_ct``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

AIR_LOW = -1150.0  # HU: below this nothing in a patient (air is -1000; noise in air reaches about -1100)
AIR_HIGH = -850.0  # HU: air and the lightest lung
FAT_HIGH = -30.0  # HU: fat (-150..-50), lung and gas up to here; water is 0, soft tissue 20..80
BONE_HIGH = 4000.0  # HU: denser than any tissue (cortical bone ~2000, enamel ~3000)
MIN_CT_EVIDENCE = 0.01  # share of voxels from AIR_LOW to FAT_HIGH a CT has at least
MAX_BELOW_AIR = 0.01  # share of voxels below AIR_LOW (padding left out) a CT in HU has at most
MAX_ABOVE_BONE = 0.05  # share of voxels above BONE_HIGH a CT in HU has at most
PADDING_SHARE = 0.5  # the most frequent value below AIR_LOW is padding when it holds this share of them
MIN_PADDING_SHARE = 0.001  # ... and this share of all voxels (a stray voxel of noise is no padding)
SAMPLE_VOXELS = 2 ** 22


@dataclass(frozen=True)
class CTCheck:
    """What :func:`check_ct` measured. Shares are of the voxels judged (finite, padding left out).

    ``ct_like``: the values look like a CT in HU. ``problem``: why not (``None`` when they do), a phrase
    that names the numbers. ``air``: share from -1150 to -850 HU; ``fat_lung``: from -850 to -30 HU;
    ``below_air``: below -1150 HU; ``above_bone``: above 4000 HU; ``padding``: the value taken as padding
    (``None``: none); ``p1``/``p99``: the 1st and 99th percentiles; ``lowest``/``highest``; ``judged``:
    voxels judged (a subsample of large volumes).
    """

    ct_like: bool
    problem: Optional[str]
    air: float
    fat_lung: float
    below_air: float
    above_bone: float
    padding: Optional[float]
    p1: float
    p99: float
    lowest: float
    highest: float
    judged: int

    @property
    def evidence(self) -> float:
        """The share of voxels from -1150 to -30 HU (air, lung, fat)."""
        return self.air + self.fat_lung

    def as_dict(self) -> dict:
        return asdict(self)


def _sample(array: np.ndarray) -> np.ndarray:
    """An even subsample of about :data:`SAMPLE_VOXELS` voxels (the whole array when it is smaller)."""
    if array.size <= SAMPLE_VOXELS or array.ndim == 0:
        return array
    step = max(1, math.ceil((array.size / SAMPLE_VOXELS) ** (1.0 / array.ndim)))
    return array[(slice(None, None, step),) * array.ndim]


def _g(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.3g}"


def _pct(share: float) -> str:
    return f"{100 * share:.1f} %" if share >= 0.001 or share == 0 else "<0.1 %"


def check_ct(image) -> CTCheck:
    """Measure whether ``image`` (an :class:`~CTFMLib.image.Image` or an array of values as read) looks like
    a CT in Hounsfield units; see the module's rules. Never raises for an array of numbers; an empty
    array or one without finite values is judged not CT-like."""
    array = np.asarray(getattr(image, "array", image))
    if array.dtype.kind not in "iuf" or array.size == 0:
        return CTCheck(False, f"it holds no numbers ({array.dtype}, {array.size} voxels)", 0.0, 0.0, 0.0, 0.0,
                       None, math.nan, math.nan, math.nan, math.nan, 0)
    values = np.asarray(_sample(array), dtype=np.float32).ravel()
    if array.dtype.kind == "f":
        values = values[np.isfinite(values)]
    if values.size == 0:
        return CTCheck(False, "it has no finite value", 0.0, 0.0, 0.0, 0.0, None, math.nan, math.nan, math.nan,
                       math.nan, 0)
    padding = None
    below = values < AIR_LOW
    n_below = int(np.count_nonzero(below))
    if n_below:
        found, counts = np.unique(values[below], return_counts=True)
        top = int(np.argmax(counts))
        # padding: one value, most of those below air, and enough of them to matter (not a stray noise voxel)
        if counts[top] >= PADDING_SHARE * n_below and counts[top] >= MIN_PADDING_SHARE * values.size:
            padding = float(found[top])
            values = values[values != np.float32(padding)]
            n_below -= int(counts[top])
    n = values.size
    if n == 0:  # nothing but padding
        return CTCheck(False, f"every voxel holds {_g(padding)}", 0.0, 0.0, 0.0, 0.0, padding, padding, padding,
                       padding, padding, 0)
    air = int(np.count_nonzero((values >= AIR_LOW) & (values <= AIR_HIGH))) / n
    fat_lung = int(np.count_nonzero((values > AIR_HIGH) & (values <= FAT_HIGH))) / n
    above = int(np.count_nonzero(values > BONE_HIGH)) / n
    below_air = n_below / n
    p1, p99 = (float(v) for v in np.percentile(values, [1, 99]))
    lowest, highest = float(values.min()), float(values.max())
    span = f"values {_g(lowest)} to {_g(highest)}, 1st-99th percentile {_g(p1)} to {_g(p99)}"
    problem = None
    if below_air > MAX_BELOW_AIR:
        problem = (f"{_pct(below_air)} of its voxels are below air ({_g(AIR_LOW)} HU), where no tissue is; {span} "
                   "(another unit, or a rescale applied twice?)")
    elif above > MAX_ABOVE_BONE:
        problem = (f"{_pct(above)} of its voxels are above {_g(BONE_HIGH)} HU, denser than bone; {span} "
                   "(another unit?)")
    elif air + fat_lung < MIN_CT_EVIDENCE:
        hint = " (MR or PET? or a CT whose values were not rescaled to HU, with air near 0?)" if p1 > AIR_HIGH else ""
        problem = (f"no air, lung or fat: {_pct(air + fat_lung)} of its voxels lie from {_g(AIR_LOW)} to "
                   f"{_g(FAT_HIGH)} HU, a CT has at least {_pct(MIN_CT_EVIDENCE)}; {span}{hint}")
    return CTCheck(problem is None, problem, air, fat_lung, below_air, above, padding, p1, p99, lowest, highest,
                   int(n))


def _refused_anyway(image) -> bool:
    """Whether :func:`CTFMLib.preprocess.validate_ct` refuses ``image`` (NaN voxels, values spanning under 50,
    0..1 intensities, a broken grid): every command then stops with that one line, so no warning is added."""
    from .image import Image, ImageError
    from .preprocess import validate_ct

    if not isinstance(image, Image):
        return False
    try:
        validate_ct(image)
    except ImageError:
        return True
    return False


def not_ct_reason(image) -> Optional[str]:
    """Why ``image`` does not look like a CT in HU (a phrase starting "not CT-like: "), or ``None`` when it does.

    The reason pretraining (``skipped.csv``) and ``ctfm index add`` give for leaving a scan out. An image
    whose DICOM modality is another than CT is named by its modality. ``None`` too for an
    :class:`~CTFMLib.image.Image` that :func:`CTFMLib.preprocess.validate_ct` refuses: the commands refuse
    it with their own, more precise line (e.g. "NaN voxels", "values span [0, 1]").
    """
    metadata = getattr(image, "metadata", None) or {}
    modality = str(metadata.get("modality") or "").strip().upper()
    if modality and modality != "CT":
        return f"not CT: modality {modality}"
    result = check_ct(image)
    if result.ct_like or _refused_anyway(image):
        return None
    return f"not CT-like: {result.problem}"


def warning_for(image, name=None) -> Optional[str]:
    """One line for a command to print (after ``ctfm: warning: ``) when ``image`` does not look like a CT in HU;
    ``None`` when it does (or when the command refuses it anyway, see :func:`not_ct_reason`). ``name``: how
    to call the image (its path); default "the image"."""
    reason = not_ct_reason(image)
    if reason is None or reason.startswith("not CT: modality"):  # refused by every command, naming the modality
        return None
    what = str(name) if name else "the image"
    return (f"{what} does not look like a CT in Hounsfield units: {reason.split(': ', 1)[1]}; CT-FM learned "
            "from CT, so its results for this image mean little")
