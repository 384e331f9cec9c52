"""Which files of a folder are data, and in what order they are listed: what forms a dataset
(conversion's classes and images, prediction's folder, what a download keeps).

Kept out of pipeline.storage, which only moves bytes and enters no version: the rule here decides
which images a stage reads, so a change to it makes new versions of the stages that list data.
"""
from __future__ import annotations

import os

from pipeline import storage

# Names that operating systems and archivers leave beside data (.DS_Store, AppleDouble ._*, __MACOSX).
_HIDDEN_PREFIXES = (".", "__MACOSX")


def visible(file_name: str) -> bool:
    """Whether a file or folder name is data rather than something an OS or archiver left."""
    return not file_name.startswith(_HIDDEN_PREFIXES)


def visible_keys(folder: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of every file below `folder`, leaving out hidden files and anything in
    hidden folders; sorted by path components, whichever order the storage lists them in."""
    return sorted(storage.keys_below(folder, visible), key=lambda key: key.split("/"))
