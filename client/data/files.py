"""The one way the data layer opens a site's files: inside the data root, regular files only, bounded.

Every path a layout lists (images, reports, masks) comes from data the site did not write itself
(a manifest, a CSV, a folder tree), so it is checked here before anything reads it:

- it must resolve, symlinks followed, inside the folder it is listed under (the data root, or the
  reports folder given on the command line), unless the site opted into data outside it;
- it must be a regular file: a FIFO would block the reader forever, a device (/dev/zero behind a
  symlink) would never end; both are refused after `stat`, before any byte is read;
- its size is checked before reading and reads stop at the limit, so a file that grows while read
  cannot exhaust memory either.

The check and the open are one step: the file is opened without following a final symlink and
without blocking, then `fstat` of the open descriptor decides, so a file swapped for a pipe or a
link between the check and the read is still refused.
"""
from __future__ import annotations

import errno
import os
import stat as stat_module
from pathlib import Path
from typing import BinaryIO

from client.data.errors import Rejected

_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW


def resolve_inside(base: Path, listed: str, allow_outside: bool = False, folders: dict | None = None) -> Path:
    """The real path of `listed` (relative to `base`, or absolute) when it stays inside `base` (the site's one
    containment check: its data files here, its state_dir through `client.policy.inside`).

    Raises Rejected("outside_root") for `..` that climbs out, an absolute path elsewhere, or a
    symlink anywhere on the way that leads out; `allow_outside` lifts this (shared storage).
    A path that does not exist resolves as far as it can: the open reports it missing.
    `folders` caches the real path of each folder for one pass over a layout (thousands of images
    share a folder); what is then read is checked again on the open descriptor (open_regular).
    """
    if "\x00" in listed:
        raise Rejected("nul_bytes", f"the path {listed!r} contains a NUL byte")
    folders = folders if folders is not None else {}
    base = os.fspath(base)
    base = folders.get(base) or folders.setdefault(base, os.path.realpath(base))
    path = listed if os.path.isabs(listed) else os.path.join(base, listed.replace("\\", "/"))
    # `..` and `.` are resolved by realpath itself, symlink by symlink, never by cutting the text.
    real = os.path.realpath(path) if "/." in path else _realpath(path, folders)
    if allow_outside or real == base or real.startswith(base.rstrip("/") + "/"):
        return Path(real)
    raise Rejected("outside_root", f"{listed} resolves to {real}, outside {base}; list files inside the data "
                                   "folder, or pass --allow-outside-root if the data lives on shared storage")


def _realpath(path: str, folders: dict) -> str:
    """os.path.realpath, with the real path of the folder taken from `folders` when known."""
    folder, name = os.path.split(path)
    if name in ("", ".", "..") or not folder:
        return os.path.realpath(path)
    real_folder = folders.get(folder)
    if real_folder is None:         # one lstat a new folder: its parents are known already
        real_folder = folders[folder] = _realpath(folder, folders)
    real = os.path.join(real_folder, name)
    return os.path.realpath(real) if os.path.islink(real) else real


def check_regular(path: Path, max_bytes: int | None = None, too_large: str = "too_large") -> os.stat_result:
    """`stat` of `path` when it is a regular file no larger than `max_bytes`; never opens it."""
    try:
        info = os.stat(path)
    except OSError as error:
        raise _open_rejection(path, error) from None
    _check_stat(path, info, max_bytes, too_large)
    return info


def open_regular(path: Path, max_bytes: int | None = None, too_large: str = "too_large",
                 inside: Path | None = None) -> BinaryIO:
    """An open binary handle on `path`, refused unless it is a regular file (checked on the open
    descriptor) no larger than `max_bytes`, and, given `inside`, still inside that folder.

    Symlinks are followed (resolve_inside has judged where they lead); the resolved name is opened
    without following a link, so one swapped in after the check fails the open instead.
    """
    path = Path(os.path.realpath(path))
    check_regular(path, max_bytes, too_large)      # devices are refused before they are ever opened
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as error:
        raise _open_rejection(path, error) from None
    try:
        _check_stat(path, os.fstat(fd), max_bytes, too_large)
        if inside is not None:
            _check_opened_inside(fd, path, Path(os.path.realpath(inside)))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: Path, max_bytes: int, too_large: str = "too_large", inside: Path | None = None) -> bytes:
    """The whole of a regular file of at most `max_bytes` bytes (also if it grows while read)."""
    with open_regular(path, max_bytes, too_large, inside) as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise Rejected(too_large, f"{path}: grew past the limit of {max_bytes} bytes while being read")
    return data


def _check_stat(path: Path, info: os.stat_result, max_bytes: int | None, too_large: str) -> None:
    if not stat_module.S_ISREG(info.st_mode):
        raise Rejected("not_a_regular_file", f"{path}: {_kind(info.st_mode)}, not a regular file; "
                                             "replace it with the file itself")
    if max_bytes is not None and info.st_size > max_bytes:
        raise Rejected(too_large, f"{path}: {info.st_size} bytes, over the limit of {max_bytes}")


def _check_opened_inside(fd: int, path: Path, base: Path) -> None:
    """What was opened, not what the name pointed at a moment earlier (Linux's /proc names the inode's path)."""
    try:
        opened = Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return  # no /proc (not Linux): resolve_inside's check stands alone
    if not (opened == base or opened.is_relative_to(base)):
        raise Rejected("outside_root", f"{path} was replaced while being opened and now leads to {opened}, "
                                       f"outside {base}")


def _kind(mode: int) -> str:
    for test, name in ((stat_module.S_ISDIR, "a folder"), (stat_module.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat_module.S_ISCHR, "a character device"), (stat_module.S_ISBLK, "a block device"),
                       (stat_module.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"


def _open_rejection(path: Path, error: OSError) -> Rejected:
    if isinstance(error, FileNotFoundError):
        return Rejected("file_not_found", f"{path} does not exist")
    if error.errno == errno.ELOOP:
        return Rejected("unreadable_path", f"{path}: a symlink loop, or a symlink swapped in while it was opened")
    if error.errno in (errno.ENXIO, errno.EISDIR):
        return Rejected("not_a_regular_file", f"{path}: not a regular file ({error.strerror})")
    return Rejected("unreadable_path", f"{path}: {error.strerror or error}")
