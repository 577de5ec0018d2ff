"""Reading the files the harness loads from disk (case files, matrix summaries, the corpus index), with bounds.

Every read goes through :func:`read_regular_file`: the path is opened once (non-blocking, so a FIFO
cannot hang the open), the *open handle* is checked to be a regular file (a FIFO, a device such as a
symlink to ``/dev/zero``, or a directory is refused), and at most ``max_bytes`` are read from that
handle (a size from ``stat`` is never trusted: ``/dev/zero`` reports 0).  :func:`read_json` adds a
bound on nesting depth (:data:`MAX_JSON_DEPTH`) so a deeply nested file is one clear error, not a
``RecursionError``.

:func:`pid_alive` says whether the owner of a stale temp file may still run.
:func:`atomic_write_text` is the one way the harness replaces a file it writes (reports, summaries,
contracts, claims tables): a uniquely named temp file in the same folder, then ``os.replace``.

Torch-free, so report rendering can use it.  The caller names its own error type and wording.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_MAX_BYTES", "MAX_JSON_DEPTH", "json_depth_exceeds", "read_json", "read_regular_file"]

#: Largest JSON file read when the caller names no cap (a case file is a few kB; a summary well under 1 MB).
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
#: Deepest nesting accepted in a JSON file (case files nest 5 levels; summaries 6).
MAX_JSON_DEPTH = 64

_CHUNK = 1 << 20


def _kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_regular_file(
    path: str | os.PathLike, error: type[Exception], *, label: str, max_bytes: int, kind: str = ""
) -> bytes:
    """The bytes of ``path``, which must be a regular file (symlinks are followed) of at most ``max_bytes``.

    Raises ``error`` with one line starting with ``label``: missing, unreadable, not a regular file
    ("... is a FIFO (named pipe), not <kind>"), or larger than ``max_bytes`` (counted while reading).
    """
    what = kind or "a file the harness reads"
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{label} does not exist") from None
    except IsADirectoryError:
        raise error(f"{label} is a directory, not {what}") from None
    except OSError as e:
        raise error(f"{label} cannot be opened: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{label} is {_kind_of(mode)}, not {what}")
        chunks: list[bytes] = []
        got = 0
        while got <= max_bytes:
            try:
                b = os.read(fd, min(_CHUNK, max_bytes + 1 - got))
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise error(f"{label} cannot be read: {e.strerror or e}") from None
            if not b:
                break
            chunks.append(b)
            got += len(b)
        if got > max_bytes:
            raise error(f"{label} is larger than {max_bytes} bytes; not {what}")
        return b"".join(chunks)
    finally:
        os.close(fd)


def json_depth_exceeds(obj: Any, limit: int) -> bool:
    """True when ``obj`` (decoded JSON) nests containers more than ``limit`` levels deep (iterative: no recursion)."""
    stack = [(obj, 1)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, (dict, list)):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (x.values() if isinstance(x, dict) else x))
    return False


def read_json(
    path: Path,
    error: type[Exception],
    *,
    label: str,
    kind: str = "",
    max_bytes: int | None = None,
    max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    """The decoded JSON of ``path``, raising ``error`` with one line that starts with ``label``.

    ``max_bytes`` (default :data:`DEFAULT_MAX_BYTES`) and ``max_depth`` bound what is read; the file
    must be a regular file (see :func:`read_regular_file`).
    """
    raw = read_regular_file(
        path, error, label=label, kind=kind, max_bytes=DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    )
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{label} is not valid JSON: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{label} is not valid JSON: {e}") from None
    except RecursionError:
        raise error(f"{label} nests deeper than {max_depth} levels; not {kind or 'a file the harness reads'}") from None
    except ValueError as e:  # e.g. an integer literal longer than Python's int-string conversion limit
        raise error(f"{label} is not valid JSON: {e}") from None
    if json_depth_exceeds(data, max_depth):
        raise error(f"{label} nests deeper than {max_depth} levels; not {kind or 'a file the harness reads'}")
    return data


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a uniquely named temp file in the same folder and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` may still be running (the owner of a temp file or folder named after it): another
    user's process, or a number no pid can be, counts as alive -- not ours to clean up."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
