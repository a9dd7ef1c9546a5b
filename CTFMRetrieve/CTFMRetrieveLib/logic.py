"""What the CT-FM Retrieve module can already do: check inputs, show results as a table.

Searching an index of embeddings arrives in a later version; until then
:data:`RETRIEVAL_AVAILABLE` is False and the module says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from CTFMLib.image import ImageError
from CTFMSlicer.nodes import check_scalar_volume, table_node_from_rows

RETRIEVAL_AVAILABLE = False
NOT_AVAILABLE_MESSAGE = (
    "Similar-case retrieval is not available yet in this version of CT-FM. "
    "The inputs are checked, but no index is searched."
)
RESULT_COLUMNS = ("rank", "case", "similarity")


class CTFMRetrieveLogic:
    """Input checks and the results table of the CT-FM Retrieve module."""

    def inputProblems(self, indexPath, volumeNode) -> list:
        """Everything that keeps a search from running; empty when the inputs are usable."""
        problems = []
        if indexPath is None or str(indexPath) in ("", "."):
            problems.append("Choose an index of embedded cases.")
        elif not Path(indexPath).exists():
            problems.append(f"The index {indexPath} does not exist.")
        try:
            check_scalar_volume(volumeNode)
        except ImageError as e:
            problems.append(f"Query volume: {e}.")
        return problems

    def resultsTableNode(self, results: Iterable, tableNode=None, name: str = "CT-FM similar cases", scene=None):
        """``(case, similarity)`` pairs as a table ranked by decreasing similarity (rank 1 = most similar)."""
        ranked = sorted(((str(case), float(score)) for case, score in results), key=lambda r: -r[1])
        rows = [(rank, case, score) for rank, (case, score) in enumerate(ranked, start=1)]
        return table_node_from_rows(rows, name=name, columns=RESULT_COLUMNS, scene=scene, node=tableNode)
