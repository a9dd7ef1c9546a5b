"""Saliency heatmaps: which voxels of a CT drive a CT-FM output, on the CT's own voxel grid.

Targets (what is explained) and the scalar each one's heat measures:

- ``embedding``: the scan embedding, the global average of the encoder's deepest map, after
  the model card's preprocessing (SPL, HU -1024..2048 -> 0..1, foreground crop) resampled to
  3 mm isotropic, as upstream's saliency maps (``notebooks/generate_saliency_maps.py``) did;
  ``spacing=None`` keeps the native grid (``ctfm embed --mode volume``). Similarity
  ``cos(e(x), e(.))`` to the input's own embedding.
- ``point``: the embedding of the 24 x 128 x 128 patch at 3 x 1 x 1 mm around an LPS point
  (:func:`CTFMLib.embed.patch_at_point`); the same similarity.
- ``class``: a segmentation model's (SegResNetDS) softmax probability of one class, averaged
  over the region (or the whole network input without one). The network sees the region
  grown to its training window (model card's 96 x 160 x 160) at native spacing.
- ``triage``: a :class:`~CTFMLib.triage_model.TriageModel`'s probability, through
  :func:`CTFMLib.triage.triage_preprocess`; the four HU-window copies of a voxel are occluded
  together and their gradients summed, so the map lives on one ``(S, P, L)`` grid.

Methods (:mod:`CTFMLib.saliency.methods`):

- ``occlusion``: MONAI's ``OcclusionSensitivity`` as upstream ran it (``mask_size=10``,
  ``overlap=0.25``, ``n_batch=12``, Gaussian occlusion, ``activate=False``; triage: a 4 x 10 x 10
  cube, 20 mm on its 5 x 2 x 2 mm grid): heat = drop of the similarity / probability when a cube
  is occluded, averaged over the cubes covering a voxel; for embeddings ``1 - cos(e(x), m(v))``
  with ``m(v)`` the per-voxel weighted mean of the occluded embeddings, exactly upstream's
  arithmetic (``blend="objective"``: mean of the per-cube ``1 - cos`` instead).
- ``gradient``: integrated gradients of the same similarity / probability from a baseline of 0
  (-1024 HU, the value occlusion pushes voxels towards; 0 of each HU window for triage), 4 steps.
  The plain gradient of ``cos(e(x_ref), e(x))`` vanishes at ``x = x_ref`` (its maximum), and the
  embedding norm is a different objective; integrated gradients explain the very quantity
  occlusion measures, ``1 - cos(e(x), e(air))`` in total (completeness), at 4 forward+backward
  passes instead of one forward pass per cube (a few hundred for a head at 3 mm).

Output: the heat, negative values (occlusion that made the output MORE like the input's, or a
higher probability) set to 0, mapped onto the input voxel grid with linear interpolation
(:meth:`Preprocessed.to_input`; 0 outside what the network saw), set to 0 outside the region,
then divided by its maximum there: [0, 1], ``scale`` records the raw value of 1.0. A region is an
LPS box; only the occlusion cubes that touch it are evaluated (on the unrestricted run's layout,
so the heat inside equals the unrestricted heat there).

Precision (``precision=``, ``ctfm saliency --precision``): fp32 by default; ``bf16`` runs the network's
forward passes under bf16 autocast (:class:`CTFMLib.runtime.Runner`), ``auto`` resolves as
:func:`CTFMLib.runtime.resolve_precision` does for embed, index and segment. Gradients are taken of the
float32 input, and the heat map is float32 whatever the precision.

The implementation lives in :mod:`CTFMLib.saliency.maps` (the pipeline), :mod:`~CTFMLib.saliency.targets`,
:mod:`~CTFMLib.saliency.methods` and :mod:`~CTFMLib.saliency.budget`; this package re-exports its public API.
"""

from .maps import (
    EMBEDDING_SPACING,
    GRADIENT_STEPS,
    MASK_SIZE,
    METHODS,
    OCCLUSION_BATCH,
    OVERLAP,
    TARGETS,
    TRIAGE_MASK,
    SaliencyResult,
    parse_box,
    parse_target,
    saliency_image,
    sidecar_json,
    write_saliency,
)

__all__ = ["saliency_image", "SaliencyResult", "TARGETS", "METHODS", "MASK_SIZE", "TRIAGE_MASK", "OVERLAP",
           "OCCLUSION_BATCH", "GRADIENT_STEPS", "EMBEDDING_SPACING", "parse_target", "parse_box", "sidecar_json",
           "write_saliency"]
