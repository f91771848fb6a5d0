"""Uploads of jobs, kept in a directory until their job ends.

The ingress replica that accepts a job writes the upload here and the runner replica that runs it
reads it back, so on a cluster of several nodes the directory must be storage every node mounts
at the same path (`JobSettings.data_dir`). A file is written under a temporary name and renamed
once complete: a runner never opens half an upload.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import BinaryIO

_NAME = re.compile(r"^job_[0-9a-f]{20}$")


class MediaDir:
    def __init__(self, path: str):
        self.root = Path(path)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        # Names come from the job store, which the service alone writes; checked all the same,
        # so that no record can point the demuxer at a file outside the directory.
        if not _NAME.match(name):
            raise ValueError(f"Got {name!r} as a media name.")
        return self.root / name

    def save(self, name: str, upload: BinaryIO) -> int:
        """Copies `upload` (from its start) to the file `name`; returns its size in bytes."""
        final = self.path(name)
        partial = final.with_suffix(".partial")
        upload.seek(0)
        with open(partial, "wb") as out:
            shutil.copyfileobj(upload, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, final)
        return final.stat().st_size

    def remove(self, name: str) -> None:
        for path in (self.path(name), self.path(name).with_suffix(".partial")):
            path.unlink(missing_ok=True)
