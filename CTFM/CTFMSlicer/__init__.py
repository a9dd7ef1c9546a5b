"""CTFMSlicer: the thin layer between 3D Slicer's MRML scene and CTFMLib.

Volume nodes to and from :class:`CTFMLib.image.Image` (:mod:`.nodes`), the
hub module's logic (:mod:`.logic`), a child-process runner for long work
(:mod:`.process`), the one job slot the modules share and the follower of a
running child (:mod:`.running`), the widgets' shared plumbing (:mod:`.widget`),
where the in-app tests are loaded from (:mod:`.inapp`) and the Python
dependency check (:mod:`.dependencies`).

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
