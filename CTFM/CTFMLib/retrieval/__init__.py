"""Similar-case retrieval: an embedded, crash-safe index of CT-FM scan and patch vectors.

:class:`VectorIndex` stores one vector per scan and one per patch (with its LPS centre) of one
model's weights, and searches them exactly (numpy) or with FAISS when it is installed.
"""

from .index import AlreadyIndexedError, CheckReport, Hit, IndexError_, RetrievalIndexError, ScanRecord, VectorIndex

__all__ = ["AlreadyIndexedError", "CheckReport", "Hit", "IndexError_", "RetrievalIndexError", "ScanRecord",
           "VectorIndex"]
