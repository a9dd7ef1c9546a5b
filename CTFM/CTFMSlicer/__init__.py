"""CTFMSlicer: the thin layer between 3D Slicer's MRML scene and CTFMLib.

Shared by every CT-FM module (CT-FM Segment and CT-FM Retrieve import only these, and
:data:`CITATION`; ``Testing/core/test_package_layers.py`` checks it):

- :mod:`.nodes`: volume, table and markups nodes to and from CTFMLib types; the ROI box,
  the crosshair and the observer of both.
- :mod:`.process`: the child-process runner for long work, the ``--device`` choices, and
  reading a child's output (its result line, its error sentence).
- :mod:`.jobs`: a volume staged to a file and a ``ctfm`` command started on it.
- :mod:`.running`: the one job slot the modules share, and the follower of a running child.
- :mod:`.widget`: the widgets' shared plumbing (parameter node, job controls, reload).
- :mod:`.inapp`: where the in-app tests are loaded from; :mod:`.dependencies`: the Python
  dependency check.

The hub module's sections (only CT-FM itself imports them): :mod:`.logic`, :mod:`.models`,
:mod:`.triage`, :mod:`.saliency`, :mod:`.overlay` (heat maps and the triage table) and
:mod:`.train`.

Nothing here imports ``qt``, ``ctk`` or ``slicer.ScriptedLoadableModule``: the
package runs on ``slicer-core`` (MRML without the application), which is how
the test suite exercises it. It sits in a sub-folder of the module folder, so
Slicer's module scanner, which only looks at top-level ``*.py`` files, does not
mistake it for a module.
"""

CITATION = (
    "S. Pai, I. Hadzic, D. Bontempi, K. Bressem, B. H. Kann, A. Fedorov, R. H. Mak, H. J. W. L. Aerts: "
    "Vision Foundation Models for Computed Tomography (CT-FM). arXiv:2501.09001, 2025."
)
