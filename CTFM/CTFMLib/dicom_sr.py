"""Organ measurements as a DICOM Structured Report: a TID 1500 Measurement Report beside a DICOM SEG.

A PACS or research archive reads measurements from an SR, not from stats.json. :func:`write_dicom_sr`
writes a Comprehensive 3D SR (highdicom) whose Measurement Report holds one volumetric group (TID 1411)
per structure of a DICOM SEG written by :mod:`CTFMLib.dicom_seg`:

- the group references the SEG instance and the structure's segment number (and the CT series the SEG
  was computed on), its finding type and category are the segment's own codes;
- its measurements are the structure's volume (mL, UCUM ``ml``) and mean attenuation (``[hnsf'U]``,
  derivation Mean), the numbers :mod:`CTFMLib.statistics` computed (the ones stats.json holds);
- the observer is the device "CT-FM"; the algorithm (name, version, model sha256) is named in each group.

Segments are matched to structures by the SEG's rule (segment numbers 1..n in ascending label value), and
the SEG's segment labels are checked against the structure names, so a report never points at another
structure's segment. highdicom and pydicom are imported only when a report is written; torch-free.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_dicom_sr", "segment_numbers", "SR_SERIES_DESCRIPTION"]

SR_SERIES_DESCRIPTION = "CT-FM measurements"
SERIES_NUMBER_STEP = 1  # the SR's SeriesNumber: the SEG's plus this
# (scheme, value, meaning) of the concepts TID 1500 / TID 300 use for these measurements
VOLUME = ("SCT", "118565006", "Volume")
MILLILITER = ("UCUM", "ml", "milliliter")
ATTENUATION = ("DCM", "112031", "Attenuation Coefficient")
MEAN = ("SCT", "373098007", "Mean")
HOUNSFIELD = ("UCUM", "[hnsf'U]", "Hounsfield unit")
CT_PROCEDURE = ("LN", "25045-6", "CT unspecified body region")


def _concept(hd, code) -> object:
    return hd.sr.CodedConcept(value=code[1], scheme_designator=code[0], meaning=code[2])


def _item_concept(hd, item) -> object:
    return hd.sr.CodedConcept(value=item.CodeValue, scheme_designator=item.CodingSchemeDesignator,
                              meaning=item.CodeMeaning)


def segment_numbers(seg, statistics: dict) -> dict:
    """``{structure name: segment number}`` of a SEG written by :func:`CTFMLib.dicom_seg.write_dicom_seg` from the
    label map ``statistics`` describes (segments 1..n in ascending label value); ValueError in one line when the
    SEG's segments are not those structures (another SEG, or statistics of another label map)."""
    segments = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence if int(s.SegmentNumber) != 0}
    names = sorted(statistics, key=lambda name: int(statistics[name]["label"]))
    if sorted(segments) != list(range(1, len(names) + 1)):
        raise ValueError(f"the DICOM SEG holds {len(segments)} segments for {len(names)} structures measured: the "
                         "report must be written from the statistics of the same label map")
    numbers = {}
    for number, name in enumerate(names, start=1):
        label = segments[number]
        if not (label == name or (label.endswith("...") and name.startswith(label[:-3]))):
            raise ValueError(f"segment {number} of the DICOM SEG is {label!r}, not {name!r}: the report must be "
                             "written from the statistics of the same label map")
        numbers[name] = number
    return numbers


def write_dicom_sr(seg_file, statistics: dict, out, *, algorithm: tuple, overwrite: bool = False) -> Path:
    """Write a TID 1500 Measurement Report at ``out`` for the DICOM SEG ``seg_file``: one volumetric group per
    structure of ``statistics`` (:func:`CTFMLib.statistics.structure_statistics` of the SEG's label map, on the
    CT's grid) with its volume and mean HU, referencing the SEG's segment. ``algorithm`` is ``(name, version,
    model sha256 or None)``. Returns ``out``; a refusal is one line and leaves nothing behind."""
    from .dicom_seg import derived_series_number, import_highdicom
    from .files import atomic_output

    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; choose another name or allow overwriting")
    if not statistics:
        raise ValueError("no structure to report: a measurement report needs at least one measured structure")
    hd = import_highdicom("DICOM SR")
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    seg = pydicom.dcmread(str(seg_file), stop_before_pixels=True)
    numbers = segment_numbers(seg, statistics)
    by_number = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    name, version, sha256 = algorithm
    algorithm_id = hd.sr.AlgorithmIdentification(name=str(name)[:64], version=str(version)[:64],
                                                 parameters=[f"model_sha256={sha256}"] if sha256 else None)
    source_series = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) if "ReferencedSeriesSequence" in seg else None
    groups = []
    for structure, number in numbers.items():
        s, segment = statistics[structure], by_number[number]
        referenced = hd.sr.ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID), segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(source_series) if source_series else None)
        measurements = [
            hd.sr.Measurement(name=_concept(hd, VOLUME), value=float(s["volume_ml"]), unit=_concept(hd, MILLILITER),
                              algorithm_id=algorithm_id),
            hd.sr.Measurement(name=_concept(hd, ATTENUATION), value=float(s["hu_mean"]),
                              unit=_concept(hd, HOUNSFIELD), derivation=_concept(hd, MEAN), algorithm_id=algorithm_id),
        ]
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=structure[:64]),
            referenced_segment=referenced,
            finding_type=_item_concept(hd, segment.SegmentedPropertyTypeCodeSequence[0]),
            finding_category=_item_concept(hd, segment.SegmentedPropertyCategoryCodeSequence[0]),
            algorithm_id=algorithm_id,
            measurements=measurements,
        ))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name="CT-FM", manufacturer_name="CT-FM", model_name=str(name)[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_concept(hd, CT_PROCEDURE),
        imaging_measurements=groups,
    )
    series_number = derived_series_number(seg, SERIES_NUMBER_STEP)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg],
        content=report,
        series_instance_uid=generate_uid(),
        series_number=series_number if 0 < series_number < 2**31 else SERIES_NUMBER_STEP,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="CT-FM",
        is_complete=True,
        series_description=SR_SERIES_DESCRIPTION,
    )

    def verify(tmp: Path) -> None:
        pydicom.dcmread(str(tmp))  # a complete, parseable object

    with atomic_output(out, overwrite=overwrite, verify=verify) as tmp:
        sr.save_as(str(tmp), enforce_file_format=True)
    return out
