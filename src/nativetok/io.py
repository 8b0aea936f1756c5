"""Files and folders that readers see whole or not at all: written under another name, then renamed into place.

A rename within one folder is atomic, so a reader (or a run resumed after a kill) finds the old file or the
complete new one, never a prefix of it. Files are fsynced before the rename: after a crash the new name
never points at data that was still only in memory. A write that fails (a full disk: ENOSPC) names the file.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Optional


@contextmanager
def naming_the_file(path: str | os.PathLike) -> Iterator[None]:
    """An OSError of the block that names no file (a write or flush on a full disk) is raised again naming `path`:
    "[Errno 28] No space left on device: '<path>'" rather than a message that leaves the user guessing."""
    try:
        yield
    except OSError as error:
        if error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error


@contextmanager
def atomic_path(path: str | os.PathLike, staging: Optional[Path] = None) -> Iterator[Path]:
    """Yield the path to write `path`'s new content to (`staging`, by default `<path>.tmp` beside it); when the
    block ends normally the file there is fsynced and renamed over `path`, when it raises it is removed.

    For writers that take a file name (urlretrieve, torch.save); `atomic_open` hands out the open file."""
    path = Path(path)
    tmp = Path(staging) if staging is not None else path.with_name(path.name + ".tmp")
    try:
        with naming_the_file(path):
            yield tmp
            with open(tmp, "rb+") as written:
                os.fsync(written.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", staging: Optional[Path] = None) -> Iterator[IO]:
    """`open(path, mode)` for writing, through `atomic_path`: `path` changes only once the block has ended."""
    with atomic_path(path, staging) as tmp, open(tmp, mode) as file:
        yield file


def replace_folder(complete: Path, out: Path, aside: Path) -> None:
    """Move the finished folder `complete` to `out`. A folder already at `out` is first moved to `aside` and
    removed only once the new one is in place, so `out` is never a half-written or half-deleted folder."""
    shutil.rmtree(aside, ignore_errors=True)  # a killed swap's leftovers
    if out.exists():
        out.rename(aside)
    complete.rename(out)
    shutil.rmtree(aside, ignore_errors=True)
