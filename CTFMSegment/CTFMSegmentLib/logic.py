"""The CT-FM Segment module's logic, usable without its widget (and without Qt).

:meth:`CTFMSegmentLogic.startSegmentation` runs ``ctfm segment`` in a child
process on a temporary NRRD copy of the volume, so Slicer never blocks and
Cancel kills the whole process tree; once the child succeeded it reads the
label map back (:mod:`.output`) and
:meth:`CTFMSegmentLogic.segmentationNodeFromLabels` (:mod:`.segmentation`)
makes the segmentation node; :meth:`CTFMSegmentLogic.statisticsTableNode`
(:mod:`.statistics_table`) the table of its organ statistics. Until then the scene is not touched, so a
cancelled or failed run leaves no partial output. Model choices and input
checks live in :mod:`.models`.

``CTFMSegment.py`` subclasses :class:`CTFMSegmentLogic` together with
Slicer's ``ScriptedLoadableModuleLogic``.

:meth:`CTFMSegmentLogic.segmentationPlan` is what ``ctfm segment --plan`` would
print for the same inputs (:mod:`.plan`: no torch, so the panel can show it).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from CTFMLib.image import ImageError
from CTFMLib.model_store import folder_problem
from CTFMSlicer.nodes import check_scalar_volume, image_from_volume_node
from CTFMSlicer.process import DEVICES, ProcessRunner, ctfm_cli_command, remove_work_folder, work_folder

from .dicom_export import export_problem
from .models import (  # noqa: F401  (WHOLE_BODY: the module's public name)
    CHOOSE_FOLDER,
    DEFAULT_QUALITY,
    FOLDER,
    MODELS,
    QUALITIES,
    SPACINGS,
    WHOLE_BODY,
    catalog_model_problem,
    model_argument,
    model_label_names,
    parse_structures,
    structures_problem,
)
from .output import failure_message, read_output, read_statistics
from .plan import PlanCache
from .segmentation import segmentation_node_from_labels
from .statistics_table import statistics_table_node

LOG_LINES = 2000  # lines of the child's output kept for the error report
_OPEN_DATABASE = object()  # startDicomSegExport's default: Slicer's DICOM database, when open


@dataclass
class DicomSegExport:
    """Where an exported DICOM SEG went: ``path`` (the file the caller named, else the SEG in the work folder, which
    exists only during ``on_done``) and whether it was added to Slicer's DICOM database."""

    path: Path
    in_database: bool



def line_recorder(on_line: Optional[Callable] = None) -> tuple:
    """``(log, on_line)`` for a runner: the last LOG_LINES output lines kept for a failure message, each line
    passed on to ``on_line`` too."""
    log = collections.deque(maxlen=LOG_LINES)

    def line(stream, text):
        log.append(text)
        if on_line:
            on_line(stream, text)

    return log, line

class CTFMSegmentLogic:
    """Input checks, ``ctfm segment`` in a child process, and segmentation nodes from its labels."""

    def inputProblems(self, volumeNode, model: str, modelFolder=None, quality: str = DEFAULT_QUALITY, device: str = "auto",
                      structures=None, spacing: str = "model") -> list:
        """Everything that keeps these inputs from being segmented; empty when they are usable."""
        problems = []
        try:
            check_scalar_volume(volumeNode)
        except ImageError as e:
            problems.append(f"Input volume: {e}.")
        if model not in MODELS:
            problems.append(f"Unknown model '{model}'; choose one of {', '.join(MODELS)}.")
        else:
            problem = (folder_problem(modelFolder, choose=CHOOSE_FOLDER) if model == FOLDER
                       else catalog_model_problem(model))
            if problem:
                problems.append(problem)
        if quality not in QUALITIES:
            problems.append(f"Unknown quality '{quality}'; choose one of {', '.join(QUALITIES)}.")
        if spacing not in SPACINGS:
            problems.append(f"Unknown spacing '{spacing}'; choose one of {', '.join(SPACINGS)}.")
        if device not in DEVICES:
            problems.append(f"Unknown device '{device}'; choose one of {', '.join(DEVICES)}.")
        if model in MODELS:
            problem = structures_problem(structures, model, modelFolder)
            if problem:
                problems.append(problem)
        return problems

    # --- the plan (no torch: the panel shows it before the user clicks) -------------------------------

    @property
    def planCache(self) -> PlanCache:
        cache = getattr(self, "_planCache", None)
        if cache is None:
            cache = self._planCache = PlanCache()
        return cache

    def planKey(self, volumeNode, model: str = WHOLE_BODY, modelFolder=None, spacing: str = "model",
                device: str = "auto") -> tuple:
        """What the plans of these inputs are cached under (cheap: reads no voxels); ImageError for no usable volume."""
        return self.planCache.key(volumeNode, model, modelFolder, spacing, device)

    def cachedPlans(self, volumeNode, model: str = WHOLE_BODY, modelFolder=None, spacing: str = "model",
                    device: str = "auto") -> tuple:
        """``(key, {quality: plan, or the ValueError that refused it, or None when not computed yet})``."""
        key = self.planKey(volumeNode, model, modelFolder, spacing, device)
        return key, {q: self.planCache.get(key, q) for q in QUALITIES}

    def segmentationPlan(self, volumeNode, model: str = WHOLE_BODY, modelFolder=None, quality: str = DEFAULT_QUALITY,
                         spacing: str = "model", device: str = "auto"):
        """The :class:`CTFMLib.segment_plan.SegmentationPlan` of these inputs (``ctfm segment --plan``), cached.

        Computed from the volume's voxels the first time (about 0.5 s for a 512x512x300 CT), then
        kept until the voxels, the world geometry, the model, spacing, device or this computer's
        measured timings change. Raises ValueError where the inputs cannot be planned (e.g. an
        all-air volume). No torch is imported.
        """
        key = self.planKey(volumeNode, model, modelFolder, spacing, device)
        found = self.planCache.get(key, quality)
        if found is None:
            found = self.planCache.compute(key, volumeNode, model, modelFolder, quality, spacing, device)
        if isinstance(found, Exception):
            raise found
        return found

    def expectedSeconds(self, volumeNode, quality: str = DEFAULT_QUALITY, device: str = "auto", model: str = WHOLE_BODY,
                        modelFolder=None, spacing: str = "model") -> Optional[float]:
        """How long segmenting the volume should take (the plan's estimate), or None where there is no plan."""
        try:
            return self.segmentationPlan(volumeNode, model, modelFolder, quality, spacing, device).expected_seconds
        except Exception:  # no volume, an all-air volume, ...: an estimate is a courtesy
            return None

    def startSegmentation(
        self,
        volumeNode,
        model: str = WHOLE_BODY,
        modelFolder=None,
        quality: str = DEFAULT_QUALITY,
        device: str = "auto",
        structures=None,
        on_progress: Optional[Callable] = None,
        on_done: Optional[Callable] = None,
        on_line: Optional[Callable] = None,
        spacing: str = "model",
        statistics: bool = False,
    ) -> ProcessRunner:
        """Segment the volume in a child process (``ctfm segment``); returns its runner.

        ``on_done(output_or_None, message, log)`` is called from
        :meth:`ProcessRunner.poll` once the child has ended: a
        :class:`SegmentationOutput` on success; on failure None, a message
        quoting the child's last output lines, and ``log``, all of the child's
        output lines. ``on_line(stream, text)`` receives each line as it comes
        (the panel's log), ``on_progress(fraction_or_None, message)`` the
        progress reports. The temporary files are removed when the run ends.
        Nothing is added to the scene: :meth:`segmentationNodeFromLabels` does
        that with the output. With ``statistics`` the child also writes organ
        statistics (``--statistics``), which arrive as the output's
        ``statistics`` (:meth:`statisticsTableNode` makes their table).
        """
        problems = self.inputProblems(volumeNode, model, modelFolder, quality, device, structures, spacing)
        if problems:
            raise ValueError("\n".join(problems))
        names = parse_structures(structures)
        from CTFMLib.image import write_image

        image = image_from_volume_node(volumeNode)
        grid = image.geometry
        work = work_folder("ctfm-segment-")
        try:
            source = write_image(image, work / "input.nrrd", compress=False)
        except BaseException:
            remove_work_folder(work)
            raise
        del image  # the child reads the file; no second copy of the voxels stays in Slicer
        # NRRD keeps the geometry in double precision (NIfTI would round it to float32).
        out = work / "labels.nrrd"
        args = ["segment", source, "--model", model_argument(model, modelFolder), "--out", out, "--device", device,
                "--quality", quality, "--spacing", spacing]
        if names:
            args += ["--structures", ",".join(names)]
        stats_path = work / "stats.json" if statistics else None
        if stats_path is not None:
            args += ["--statistics", stats_path]
        log, line = line_recorder(on_line)

        def finished(result):
            output = None
            try:
                if result.ok:
                    try:
                        output = read_output(out, grid, model, modelFolder)
                        if stats_path is not None:
                            output.statistics = read_statistics(stats_path)
                        output.seconds = result.seconds
                        message = result.describe()
                    except (OSError, ValueError) as e:  # ImageError is a ValueError
                        message = f"The segmentation finished but its result cannot be read: {e}"
                else:
                    message = failure_message(result, list(log))
            finally:
                remove_work_folder(work)
            if on_done:
                on_done(output, message, "\n".join(log))

        return ProcessRunner(ctfm_cli_command(*args), on_progress=on_progress, on_line=line, on_done=finished)

    def exportProblem(self, segmentationNode, volumeNode) -> str:
        """Why "Export DICOM SEG" cannot run for these nodes (a sentence), or "" (cheap: for the button's state)."""
        return export_problem(segmentationNode, volumeNode)

    def startDicomSegExport(self, segmentationNode, volumeNode, out=None, segType: str = "labelmap",
                            overwrite: bool = False, database=_OPEN_DATABASE, on_progress: Optional[Callable] = None,
                            on_line: Optional[Callable] = None, on_done: Optional[Callable] = None) -> ProcessRunner:
        """Write ``segmentationNode`` as a DICOM SEG referencing the series ``volumeNode`` was loaded from, in a child
        process (``ctfm export-seg``: highdicom never loads into Slicer's Python); returns its runner.

        The series' files are found through the volume's ``DICOM.instanceUIDs`` and ``database.fileForInstance``
        (``database``: Slicer's DICOM database by default) and staged, with the segmentation as a ``.seg.nrrd`` on
        the volume's grid, in a work folder; a volume not loaded from DICOM is refused (ValueError, one line) before
        anything is written. With ``out`` the child writes the SEG there (``overwrite`` allows replacing it);
        without, it is added to the database (``on_done`` gets ``in_database`` False where that failed, and the
        SEG's temporary path to copy elsewhere, e.g. with :func:`CTFMSegmentLib.dicom_export.copy_seg`).
        ``on_done(DicomSegExport or None, message, log)`` as for :meth:`startSegmentation`; the work folder is
        removed after it.
        """
        from CTFMLib.labels import write_seg_nrrd

        from .dicom_export import (
            check_seg_type,
            dicom_database,
            import_into_database,
            segmentation_label_map,
            source_files,
            stage_series,
        )

        check_seg_type(segType)
        problem = export_problem(segmentationNode, volumeNode)
        if problem:
            raise ValueError(problem)
        if database is _OPEN_DATABASE:
            database = dicom_database()
        files = source_files(volumeNode, database)
        image, infos = segmentation_label_map(segmentationNode, volumeNode)
        work = work_folder("ctfm-dicom-seg-")
        try:
            series = stage_series(files, work / "series")
            labels = write_seg_nrrd(image, infos, work / "labels.seg.nrrd", overwrite=False)
        except BaseException:
            remove_work_folder(work)
            raise
        del image
        seg = Path(out) if out else work / "seg" / "seg.dcm"
        if not out:
            seg.parent.mkdir()
        args = ["export-seg", labels, "--reference", series, "--out", seg, "--seg-type", segType]
        if overwrite:
            args.append("--overwrite")
        log, line = line_recorder(on_line)

        def finished(result):
            output = None
            try:
                if result.ok and seg.is_file():
                    in_database = False if out else import_into_database(seg, database)
                    output = DicomSegExport(seg, in_database)
                    message = result.describe()
                else:
                    message = failure_message(result, list(log), "The DICOM SEG export")
                if on_done:
                    on_done(output, message, "\n".join(log))
            finally:
                remove_work_folder(work)

        return ProcessRunner(ctfm_cli_command(*args), on_progress=on_progress, on_line=line, on_done=finished)

    def segmentationNodeFromLabels(self, labelsImage, labelInfos, referenceVolumeNode, name: str = "CT-FM segmentation",
                                   scene=None, node=None, show3D: bool = True):
        """A segmentation node of the labels (see :func:`CTFMSegmentLib.segmentation.segmentation_node_from_labels`)."""
        return segmentation_node_from_labels(labelsImage, labelInfos, referenceVolumeNode, name, scene, node, show3D)

    def statisticsTableNode(self, statistics: dict, volumeNode, scene=None, node=None):
        """The organ statistics table of ``volumeNode``, made or updated (see
        :func:`CTFMSegmentLib.statistics_table.statistics_table_node`)."""
        return statistics_table_node(statistics, volumeNode, scene, node)

    def modelLabelNames(self, model: str, modelFolder=None) -> Optional[dict]:
        """``{value: name}`` of what the model segments, or None where unknown."""
        return model_label_names(model, modelFolder)
