"""The filesystem seam: every mutating call the store and chunk assembler make.

``FileSystem`` performs real I/O. Every mutating primitive first calls
``_mutating(op, path)``, the single hook fault-injection subclasses override:

- ``CrashingFS(crash_at=k)`` raises ``SimulatedCrash`` at the k-th mutating call
  (before it happens) and counts calls, for crash-point tests;
- ``LossyFS`` keeps a model of what is durable (file contents after ``fsync``,
  directory entries after ``fsync_dir`` of their parent) and ``power_loss()``
  rewrites the tree to only that, like LazyFS does for Jepsen.

Reads are not part of the seam: they do not change state.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["CrashingFS", "FileSystem", "LossyFS", "SimulatedCrash"]

# A symlink planted where a model file is written must not redirect the write.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class SimulatedCrash(BaseException):
    """Raised by ``CrashingFS``; a BaseException so ``except Exception`` cannot swallow it."""


class FileSystem:
    """Real filesystem operations behind one overridable hook."""

    def _mutating(self, op: str, path: Path) -> None:
        """Called before each mutating primitive; the default does nothing."""

    def write_bytes(self, path: Path, data: bytes) -> None:
        """Create or truncate ``path`` and write ``data`` (not durable until ``fsync``)."""
        self._mutating("write_bytes", path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)

    def write_at(self, path: Path, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset``, creating the file if needed (gaps read as zeros)."""
        self._mutating("write_at", path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | _NOFOLLOW, 0o644)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def fsync(self, path: Path) -> None:
        self._mutating("fsync", path)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def fsync_dir(self, path: Path) -> None:
        """Make entries created, renamed or removed in directory ``path`` durable."""
        self._mutating("fsync_dir", path)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def replace(self, src: Path, dst: Path) -> None:
        """Atomically rename ``src`` over ``dst`` (durable after ``fsync_dir``)."""
        self._mutating("replace", dst)
        src.replace(dst)

    def unlink(self, path: Path) -> None:
        self._mutating("unlink", path)
        path.unlink(missing_ok=True)

    def mkdir(self, path: Path) -> None:
        """Create ``path`` and missing parents; existing directories are fine."""
        self._mutating("mkdir", path)
        path.mkdir(parents=True, exist_ok=True)

    def rmtree(self, path: Path) -> None:
        self._mutating("rmtree", path)
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)

    # Composite operations: built from primitives so every step is a crash point.

    def atomic_write(self, path: Path, data: bytes) -> None:
        """Replace ``path`` with ``data``: temp file, fsync, rename, fsync directory."""
        tmp = path.with_name(f".{path.name}.tmp")
        self.write_bytes(tmp, data)
        self.fsync(tmp)
        self.replace(tmp, path)
        self.fsync_dir(path.parent)


class CrashingFS(FileSystem):
    """Counts mutating calls and raises ``SimulatedCrash`` at call number ``crash_at``."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.crash_at = crash_at
        self.calls = 0
        self.log: list[tuple[str, Path]] = []

    def _mutating(self, op: str, path: Path) -> None:
        self.calls += 1
        if self.crash_at is not None and self.calls >= self.crash_at:
            raise SimulatedCrash(f"crash at call {self.calls}: {op} {path}")
        self.log.append((op, path))


class LossyFS(FileSystem):
    """Tracks durability under ``root``; ``power_loss()`` drops everything not synced.

    Model: a file's contents survive as of its last ``fsync`` (a file never
    synced, or truncated since, comes back empty); a directory entry (file
    created, renamed, removed; directory made) survives only after
    ``fsync_dir`` of its parent. Directory renames are not modelled.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._next = 0
        self._live: dict[Path, int] = {}  # file path -> inode
        self._content: dict[int, bytes] = {}  # inode -> durable contents
        self._entries: dict[Path, int] = {}  # durable file entries
        self._live_dirs: set[Path] = set()
        self._dirs: set[Path] = set()  # durable directories
        for p in sorted(root.rglob("*")):
            if p.is_dir():
                self._live_dirs.add(p)
                self._dirs.add(p)
            else:
                ino = self._new_inode()
                self._live[p] = self._entries[p] = ino
                self._content[ino] = p.read_bytes()

    def _new_inode(self) -> int:
        self._next += 1
        return self._next

    def write_bytes(self, path: Path, data: bytes) -> None:
        super().write_bytes(path, data)
        if path in self._live:
            self._content[self._live[path]] = b""  # truncated; new data not yet durable
        else:
            self._live[path] = ino = self._new_inode()
            self._content[ino] = b""

    def write_at(self, path: Path, offset: int, data: bytes) -> None:
        super().write_at(path, offset, data)
        if path not in self._live:
            self._live[path] = ino = self._new_inode()
            self._content[ino] = b""

    def fsync(self, path: Path) -> None:
        super().fsync(path)
        self._content[self._live[path]] = path.read_bytes()

    def fsync_dir(self, path: Path) -> None:
        super().fsync_dir(path)
        for p in [p for p in self._entries if p.parent == path]:
            del self._entries[p]
        self._entries.update({p: i for p, i in self._live.items() if p.parent == path})
        self._dirs = {d for d in self._dirs if d.parent != path}
        self._dirs |= {d for d in self._live_dirs if d.parent == path}

    def replace(self, src: Path, dst: Path) -> None:
        if src.is_dir():
            raise NotImplementedError("LossyFS does not model directory renames")
        super().replace(src, dst)
        self._live[dst] = self._live.pop(src)

    def unlink(self, path: Path) -> None:
        super().unlink(path)
        self._live.pop(path, None)

    def mkdir(self, path: Path) -> None:
        super().mkdir(path)
        p = path
        while p != self.root and p not in self._live_dirs:
            self._live_dirs.add(p)
            p = p.parent

    def rmtree(self, path: Path) -> None:
        super().rmtree(path)
        self._live = {p: i for p, i in self._live.items() if not p.is_relative_to(path)}
        self._live_dirs = {d for d in self._live_dirs if not d.is_relative_to(path)}

    def _survives(self, path: Path) -> bool:
        parent = path.parent
        return parent == self.root or (parent in self._dirs and self._survives(parent))

    def power_loss(self) -> None:
        """Rewrite the tree under ``root`` to its durable state."""
        for child in self.root.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
        dirs = sorted(d for d in self._dirs if self._survives(d))
        for d in dirs:
            d.mkdir()
        entries = {p: i for p, i in self._entries.items() if self._survives(p)}
        for p, ino in entries.items():
            p.write_bytes(self._content[ino])
        self._live, self._entries = dict(entries), dict(entries)
        self._live_dirs, self._dirs = set(dirs), set(dirs)
