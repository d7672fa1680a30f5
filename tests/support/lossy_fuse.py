"""A small LazyFS-like FUSE filesystem for power-loss tests: unsynced file data is lost.

``LossyMount(backing, mountpoint)`` mounts a passthrough view of ``backing`` at
``mountpoint``, served by a separate process (``python -m tests.support.lossy_fuse``,
binding: ``mfusepy`` over Debian's libfuse3, or libfuse2 when only that is installed).

Semantics (what a "disk" keeps, the backing directory being the disk):

- **File data** is durable only once fsynced. Every ``write``/``truncate`` since a file's
  last ``fsync``/``fdatasync`` is kept in a per-file overlay in the server's memory (dirty
  4 KiB blocks, the current size and the lowest size since the last sync); reads are served
  through the overlay, ``getattr`` reports the overlay's size. ``fsync`` (or ``fdatasync``,
  same thing here) applies that file's overlay to the backing file and forgets it. So the
  backing directory holds, at every moment, exactly each file's content as of its last
  sync (or as it was at mount time).
- **Directory entries** (create, mkdir, rename, unlink, rmdir, link, symlink) and metadata
  (mode, owner, times) go through to the backing directory at once: they are durable
  immediately and in order, like a metadata-journaling filesystem that commits each
  namespace operation. ``fsyncdir`` is accepted and is a no-op. A file created (or renamed
  into place) without an fsync of its data therefore survives a cut with its last synced
  content -- empty if it was never synced: the classic "zero-length file after rename"
  outcome. What this model does *not* produce: a create, rename or unlink that is *lost*
  because its directory was not fsynced. The agent's own seam (``edge_agent.fsio.LossyFS``)
  covers that case for the model store.
- **A power cut** (``LossyMount.cut``) tells the server, over a control socket, to drop
  every overlay at once and to fail every later operation with ``EIO`` (the disk is
  gone); then the mount is taken down. Because fsync applies an overlay under the same lock
  the cut takes, no cut lands in the middle of one; what is left in ``backing`` is what a
  disk would keep. ``LossyMount.mount()`` again is the reboot. ``cut(tear_seed=...)``
  first writes back a random part of the unsynced data, as a disk's own write-back may
  have done before the power went: each dirty 4 KiB block whole or not at all, in no
  order, and the file's size change or not (``Overlay.tear``).
- **mmap.** No ``direct_io``: the kernel page cache serves shared mappings (SQLite's WAL
  index, the ``-shm`` file), and dirty mapped pages reach the server as ordinary writes
  through the overlay. SQLite never syncs ``-shm`` (it is rebuilt from the WAL by the
  first connection after a crash), so a cut leaves it as it was last synced, which SQLite
  handles. POSIX locks are left to the kernel (no ``lock`` operation), which is right for
  one mount used by one machine.

The server is single-threaded for filesystem operations (``nothreads``); the control socket
has its own thread and shares one lock with them.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

BLOCK = 4096
_F = TypeVar("_F", bound=Callable[..., Any])


class Overlay:
    """The unsynced state of one file: dirty blocks over the backing file's content.

    ``size`` is the file's current size; ``floor`` the lowest size it had since the last
    sync: backing bytes at or beyond ``floor`` no longer belong to the file (they read as
    zeros unless a dirty block covers them). Bytes of a dirty block at or beyond ``size``
    are always zero."""

    __slots__ = ("blocks", "durable_size", "floor", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.floor = size
        self.durable_size = size
        self.blocks: dict[int, bytearray] = {}

    def read(self, fd: int, size: int, offset: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        out = bytearray(end - offset)
        base_end = min(end, self.floor)
        if base_end > offset:
            data = os.pread(fd, base_end - offset, offset)
            out[: len(data)] = data
        for index in range(offset // BLOCK, (end - 1) // BLOCK + 1):
            block = self.blocks.get(index)
            if block is None:
                continue
            start = index * BLOCK
            lo, hi = max(offset, start), min(end, start + BLOCK)
            out[lo - offset : hi - offset] = block[lo - start : hi - start]
        return bytes(out)

    def write(self, fd: int, data: bytes, offset: int) -> None:
        end = offset + len(data)
        for index in range(offset // BLOCK, (end - 1) // BLOCK + 1):
            start = index * BLOCK
            block = self.blocks.get(index)
            if block is None:
                block = bytearray(BLOCK)
                keep = min(BLOCK, self.floor - start)
                if keep > 0:
                    base = os.pread(fd, keep, start)
                    block[: len(base)] = base
                self.blocks[index] = block
            lo, hi = max(offset, start), min(end, start + BLOCK)
            block[lo - start : hi - start] = data[lo - offset : hi - offset]
        self.size = max(self.size, end)

    def truncate(self, length: int) -> None:
        if length < self.size:
            for index in [i for i in self.blocks if i * BLOCK >= length]:
                del self.blocks[index]
            index, cut = divmod(length, BLOCK)
            block = self.blocks.get(index)
            if block is not None:
                block[cut:] = bytes(BLOCK - cut)
        self.size = length
        self.floor = min(self.floor, length)

    def apply(self, fd: int) -> None:
        """Make the overlay the backing file's content (the sync)."""
        os.ftruncate(fd, self.floor)
        for index, block in sorted(self.blocks.items()):
            start = index * BLOCK
            count = min(BLOCK, self.size - start)
            if count > 0:
                os.pwrite(fd, bytes(block[:count]), start)
        os.ftruncate(fd, self.size)

    def tear(self, fd: int, rng: random.Random) -> int:
        """What a disk may also keep of unsynced writes: each dirty block written back or
        not (a coin each, in no order), and the size change or not. Returns the blocks
        kept. Blocks are 4 KiB and whole (no torn sector inside a block)."""
        new_size = rng.random() < 0.5
        if new_size:
            os.ftruncate(fd, self.floor)
        limit = self.size if new_size else self.durable_size
        kept = 0
        for index, block in self.blocks.items():
            start = index * BLOCK
            count = min(BLOCK, limit - start)
            if count > 0 and rng.random() < 0.5:
                os.pwrite(fd, bytes(block[:count]), start)
                kept += 1
        os.ftruncate(fd, self.size if new_size else self.durable_size)
        return kept

    def dirty_bytes(self) -> int:
        return len(self.blocks) * BLOCK


def _make_ops(root: str) -> Any:
    """The mfusepy operations object (built lazily: only the server imports mfusepy)."""
    import mfusepy as fuse

    def locked(method: _F) -> _F:
        def wrapper(self: Any, *args: Any) -> Any:
            with self.mutex:
                if self.frozen:
                    raise fuse.FuseOSError(errno.EIO)
                try:
                    return method(self, *args)
                except OSError as exc:
                    if isinstance(exc, fuse.FuseOSError):
                        raise
                    raise fuse.FuseOSError(exc.errno or errno.EIO) from exc

        wrapper.__name__ = method.__name__
        return wrapper  # type: ignore[return-value]

    class LossyOps(fuse.Operations):  # type: ignore[misc]
        use_ns = True

        def __init__(self) -> None:
            self.root = root
            self.mutex = threading.Lock()
            self.frozen = False
            self.pending: dict[int, Overlay] = {}
            self.pending_fd: dict[int, int] = {}  # ino -> our own backing descriptor
            self.fd_ino: dict[int, int] = {}
            self.names: dict[int, str] = {}  # ino -> last path it was opened under
            self.stats = {"writes": 0, "fsyncs": 0, "fsyncdirs": 0, "synced_bytes": 0}

        def _full(self, path: str) -> str:
            return os.path.join(self.root, path.lstrip("/"))  # noqa: PTH118 (raw paths)

        def _open_count(self, ino: int) -> int:
            return sum(1 for i in self.fd_ino.values() if i == ino)

        def _overlay(self, ino: int, fd: int | None, path: str | None) -> Overlay:
            overlay = self.pending.get(ino)
            if overlay is None:
                own = (os.dup(fd) if fd is not None
                       else os.open(self._full(path or "/"), os.O_RDWR))
                overlay = self.pending[ino] = Overlay(os.fstat(own).st_size)
                self.pending_fd[ino] = own  # to sync or tear it without a caller's handle
            return overlay

        def _drop(self, ino: int) -> Overlay | None:
            overlay = self.pending.pop(ino, None)
            own = self.pending_fd.pop(ino, None)
            if own is not None:
                os.close(own)
            return overlay

        def _forget_if_gone(self, st: os.stat_result) -> None:
            # The last name of an inode went away and nothing holds it open: its unsynced
            # data can never be reached again (and its number may be reused).
            if st.st_nlink <= 1 and not self._open_count(st.st_ino):
                self._drop(st.st_ino)

        # ---- control ---------------------------------------------------------------

        def cut(self, tear_seed: int | None = None) -> dict[str, Any]:
            """Drop every unsynced write (``tear_seed``: keep a random part of them
            first, see ``Overlay.tear``), then fail every later operation."""
            with self.mutex:
                files, kept = {}, 0
                rng = random.Random(tear_seed)
                for ino in sorted(self.pending):
                    overlay = self.pending[ino]
                    files[self.names.get(ino, f"ino:{ino}")] = overlay.dirty_bytes()
                    if tear_seed is not None:
                        kept += overlay.tear(self.pending_fd[ino], rng)
                    self._drop(ino)
                self.frozen = True
                return {"dropped": files, "kept_blocks": kept, **self.stats}

        # ---- attributes and directories (write-through: durable at once) ------------

        @locked
        def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
            st = os.fstat(fh) if fh is not None else os.lstat(self._full(path or "/"))
            attrs: dict[str, Any] = {
                key: getattr(st, key)
                for key in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_ino")
            }
            attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns,
                         st_ctime=st.st_ctime_ns)
            overlay = self.pending.get(st.st_ino)
            if overlay is not None:
                attrs["st_size"] = overlay.size
            return attrs

        @locked
        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *os.listdir(self._full(path))]  # noqa: PTH208

        @locked
        def readlink(self, path: str) -> str:
            return os.readlink(self._full(path))  # noqa: PTH115

        @locked
        def mkdir(self, path: str, mode: int) -> int:
            os.mkdir(self._full(path), mode)  # noqa: PTH102
            return 0

        @locked
        def rmdir(self, path: str) -> int:
            os.rmdir(self._full(path))  # noqa: PTH106
            return 0

        @locked
        def unlink(self, path: str) -> int:
            st = os.lstat(self._full(path))
            os.unlink(self._full(path))  # noqa: PTH108
            self._forget_if_gone(st)
            return 0

        @locked
        def rename(self, old: str, new: str) -> int:
            try:
                replaced: os.stat_result | None = os.lstat(self._full(new))
            except FileNotFoundError:
                replaced = None
            os.rename(self._full(old), self._full(new))  # noqa: PTH104
            if replaced is not None:
                self._forget_if_gone(replaced)
            return 0

        @locked
        def link(self, target: str, source: str) -> int:
            os.link(self._full(source), self._full(target))
            return 0

        @locked
        def symlink(self, target: str, source: str) -> int:
            os.symlink(source, self._full(target))  # noqa: PTH211
            return 0

        @locked
        def chmod(self, path: str, mode: int) -> int:
            os.chmod(self._full(path), mode)  # noqa: PTH101
            return 0

        @locked
        def chown(self, path: str, uid: int, gid: int) -> int:
            os.chown(self._full(path), uid, gid)
            return 0

        @locked
        def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
            if times is None:
                os.utime(self._full(path))
            else:
                os.utime(self._full(path), ns=times)
            return 0

        @locked
        def access(self, path: str, amode: int) -> int:
            if not os.access(self._full(path), amode):
                raise fuse.FuseOSError(errno.EACCES)
            return 0

        @locked
        def statfs(self, path: str) -> dict[str, int]:
            sv = os.statvfs(self._full(path))
            return {
                key: getattr(sv, key)
                for key in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                            "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")
            }

        @locked
        def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
            self.stats["fsyncdirs"] += 1  # entries are durable already
            return 0

        # ---- file data (the overlay) ---------------------------------------------------

        def _track(self, fd: int, path: str) -> int:
            ino = os.fstat(fd).st_ino
            self.fd_ino[fd] = ino
            self.names[ino] = path
            return fd

        @locked
        def open(self, path: str, flags: int) -> int:
            full = self._full(path)
            try:  # O_RDWR always: a sync through a read-only handle writes the backing file
                fd = os.open(full, os.O_RDWR)
            except IsADirectoryError:
                fd = os.open(full, os.O_RDONLY)
            self._track(fd, path)
            if flags & os.O_TRUNC:
                self._overlay(self.fd_ino[fd], fd, None).truncate(0)
            return fd

        @locked
        def create(self, path: str, mode: int, flags: int) -> int:
            full = self._full(path)
            existed = os.path.lexists(full)
            fd = os.open(full, os.O_RDWR | os.O_CREAT | (flags & os.O_EXCL), mode)
            self._track(fd, path)
            ino = self.fd_ino[fd]
            if not existed:
                self._drop(ino)  # a new inode: nothing pending can be its
            elif flags & os.O_TRUNC:
                self._overlay(ino, fd, None).truncate(0)
            return fd

        @locked
        def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
            overlay = self.pending.get(self.fd_ino[fh])
            if overlay is None:
                return os.pread(fh, size, offset)
            return overlay.read(fh, size, offset)

        @locked
        def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
            if data:
                self._overlay(self.fd_ino[fh], fh, None).write(fh, bytes(data), offset)
            self.stats["writes"] += 1
            return len(data)

        @locked
        def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
            ino = self.fd_ino[fh] if fh is not None else os.lstat(self._full(path or "/")).st_ino
            self._overlay(ino, fh, path).truncate(length)
            return 0

        @locked
        def fsync(self, path: str | None, datasync: int, fh: int) -> int:
            ino = self.fd_ino[fh]
            overlay = self.pending.get(ino)
            if overlay is not None:
                overlay.apply(fh)
                self._drop(ino)
                self.stats["synced_bytes"] += overlay.dirty_bytes()
            self.stats["fsyncs"] += 1
            return 0

        @locked
        def flush(self, path: str | None, fh: int) -> int:
            return 0

        def release(self, path: str | None, fh: int) -> int:
            with self.mutex:  # also after a cut: close the backing descriptor
                ino = self.fd_ino.pop(fh, None)
                try:
                    st = os.fstat(fh)
                    if ino is not None and st.st_nlink == 0 and not self._open_count(ino):
                        self._drop(ino)
                finally:
                    os.close(fh)
            return 0

    return LossyOps()


def _serve_control(ops: Any, sock_path: str) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(4)
    while True:
        conn, _ = server.accept()
        with conn:
            command = conn.recv(64).decode().strip()
            if command == "cut":
                reply: dict[str, Any] = ops.cut()
            elif command.startswith("tear "):
                reply = ops.cut(int(command.split()[1]))
            elif command == "ping":
                reply = {"ok": True}
            else:
                reply = {"error": f"unknown command {command!r}"}
            conn.sendall(json.dumps(reply).encode())


def serve(backing: str, mountpoint: str, control: str) -> None:
    """The server process: mount in the foreground until unmounted."""
    if not os.environ.get("FUSE_LIBRARY_PATH"):
        from ctypes.util import find_library

        lib3 = find_library("fuse3")
        if lib3:  # prefer libfuse3 when both are installed (CI installs fuse3)
            os.environ["FUSE_LIBRARY_PATH"] = lib3
    import mfusepy as fuse

    ops = _make_ops(str(Path(backing).resolve()))
    threading.Thread(target=_serve_control, args=(ops, control), daemon=True).start()
    fuse.FUSE(ops, mountpoint, foreground=True, nothreads=True, hard_remove=True,
              fsname="lossyfuse")


class LossyMount:
    """Mount, cut and unmount the lossy filesystem from a test (see the module docstring).

    ``mount()`` raises ``RuntimeError`` with the server's output when FUSE cannot mount:
    tests fail loudly, never skip."""

    def __init__(self, backing: Path, mountpoint: Path, *, timeout: float = 20.0) -> None:
        self.backing, self.mountpoint, self.timeout = backing, mountpoint, timeout
        self.control = str(mountpoint.parent / f".{mountpoint.name}.ctl")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = mountpoint.parent / f".{mountpoint.name}.log"
        self.cuts: list[dict[str, Any]] = []

    def __enter__(self) -> LossyMount:
        self.mount()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()

    def mount(self) -> None:
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        Path(self.control).unlink(missing_ok=True)
        repo = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.support.lossy_fuse", str(self.backing),
                 str(self.mountpoint), self.control],
                stdout=log, stderr=subprocess.STDOUT, cwd=repo, env=env,
            )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self.mounted() and self._ready():
                return
            time.sleep(0.02)
        output = self.log.read_text(errors="replace")[-3000:]
        self.unmount()
        raise RuntimeError(
            f"lossy FUSE filesystem did not mount at {self.mountpoint} (needs /dev/fuse, "
            f"libfuse3 or libfuse2 and the Python package mfusepy, installed by .ci/run; "
            f"root or fusermount3): server output:\n{output}"
        )

    def _ready(self) -> bool:
        try:
            return "ok" in self._command("ping")
        except OSError:
            return False

    def _command(self, command: str) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(self.timeout)
            conn.connect(self.control)
            conn.sendall(command.encode())
            conn.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        reply: dict[str, Any] = json.loads(data)
        return reply

    def cut(self, tear_seed: int | None = None) -> dict[str, Any]:
        """Power cut: drop every unsynced write, then take the mount down. Returns the
        server's report: ``dropped`` (path -> dirty bytes dropped) and its counters.
        ``tear_seed``: first write back a random part of them (``Overlay.tear``)."""
        report = self._command("cut" if tear_seed is None else f"tear {tear_seed}")
        self.cuts.append(report)
        self.unmount()
        return report

    def unmount(self) -> None:
        """Take the mount down and stop the server, whatever state they are in (a frozen
        server answers EIO, a dead one leaves ENOTCONN: /proc/self/mounts decides)."""
        for cmd in (["fusermount3", "-u", "-q"], ["fusermount3", "-u", "-z", "-q"],
                    ["umount", "-l"]):
            if not self.mounted():
                break
            if shutil.which(cmd[0]) is not None:
                subprocess.run([*cmd, str(self.mountpoint)], capture_output=True,
                               timeout=30, check=False)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(timeout=10)
            self.proc = None
        if self.mounted():
            raise RuntimeError(f"could not unmount {self.mountpoint}")

    def mounted(self) -> bool:
        target = str(self.mountpoint.absolute())
        with Path("/proc/self/mounts").open(encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                point = fields[1].replace("\\040", " ").replace("\\011", "\t")
                if point == target:
                    return True
        return False


if __name__ == "__main__":
    serve(*sys.argv[1:4])
