"""Reading a file a user named: only a regular file (a FIFO would block forever, `/dev/zero` never
ends), only up to a size, and every failure one line that names the file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import UserError


def read_file(path: str | Path, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of the regular file `path`, at most `max_bytes` of them."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting
    except OSError as e:
        raise UserError(f"cannot read the {what} {path}: {e.strerror}") from None
    except ValueError:  # a NUL byte or a lone surrogate: no file can have that name
        raise UserError(f"{ascii(str(path))[:200]}: not a file name; give the {what}'s path") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{path}: not a regular file; give the {what} as a file")
        if info.st_size > max_bytes:
            raise UserError(f"{path}: {info.st_size} bytes is larger than a {what} may be ({max_bytes} bytes)")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew while we read
        raise UserError(f"{path}: larger than a {what} may be ({max_bytes} bytes)")
    return data
