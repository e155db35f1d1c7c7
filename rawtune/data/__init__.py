"""The data stage's public face: read a source, clean, tokenize, pack and split it.

:mod:`.files` reads local files and folders, :mod:`.hub` reads Hub datasets, :mod:`.prepare`
turns documents into the packed ``data/train.npy`` and ``data/heldout.npy`` blocks.
"""

from .files import Documents, is_local, read_documents
from .prepare import DataReport, clean, load_blocks, pack, prepare, preview, split_documents, tokenize

__all__ = ["DataReport", "Documents", "clean", "is_local", "load_blocks", "pack", "prepare", "preview",
           "read_documents", "split_documents", "tokenize"]
