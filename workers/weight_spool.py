"""A weight stream handed to an engine's worker processes through a spool of bucket files (no Ray, no vLLM).

Tensors nested in vLLM's ``collective_rpc`` arguments are not rebuilt in a multiprocess engine's workers (TP>1), so
a sync reaches them through files. Instead of one file of the whole model (host RAM about (2 + TP) x model per
engine), the writer cuts the stream into files of about ``file_mb`` as it arrives, with at most ``max_files``
(default 2) on disk at a time, and every reader (one per worker process) loads them in order, as its in-place reload
consumes the stream; a file is deleted as soon as every reader has loaded it. Host RAM: about
(max_files + 1 + readers) x file_mb, whatever the model's size.

    spool = SpoolWriter(readers=2, file_mb=256)
    threading.Thread(target=spool.run, args=(items,)).start()    # the engine's actor
    ... read_spool(spool.dir, rank, readers=2) ...                 # in each worker process, fed to the loader
    spool.cancel(); spool.cleanup()

Files in the spool directory: ``000000.safetensors``, ... (written under a temporary name, then renamed), an empty
``000000.read.<rank>`` per reader once it has loaded that file, ``END`` (the number of files) when the stream is
complete, ``ABORT`` (a reason) when the writer or a reader failed: every side then stops waiting and raises.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator

import torch

SPOOL_WAIT_S = 900.0  # longest a reader waits for the next file, or the writer for room (a stalled other side)
_END, _ABORT, _SUFFIX = "END", "ABORT", ".safetensors"


def _data(spool: str, i: int) -> str:
    return os.path.join(spool, f"{i:06d}{_SUFFIX}")


def _read_marker(spool: str, i: int, rank: int) -> str:
    return os.path.join(spool, f"{i:06d}.read.{rank}")


def _publish(path: str, text: str) -> None:
    """Write ``path`` atomically (a reader never sees it half written)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def _aborted(spool: str) -> str | None:
    try:
        with open(os.path.join(spool, _ABORT)) as f:
            return f.read() or "aborted"
    except FileNotFoundError:
        return None


def abort(spool: str, reason: str) -> None:
    """Make every side of ``spool`` stop waiting and raise (the first reason stays)."""
    if _aborted(spool) is None:
        with contextlib.suppress(OSError):
            _publish(os.path.join(spool, _ABORT), reason)


class SpoolWriter:
    """Writes a (name, tensor) stream into a new spool directory (in /dev/shm where there is one)."""

    def __init__(self, readers: int, file_mb: float = 256.0, max_files: int = 2, wait_s: float = SPOOL_WAIT_S):
        if readers < 1 or max_files < 1 or not file_mb > 0:
            raise ValueError(f"spool needs readers >= 1, max_files >= 1, file_mb > 0 (got {readers}, {max_files}, "
                             f"{file_mb})")
        self.readers, self.max_files, self.wait_s = readers, max_files, wait_s
        self.limit = int(file_mb * 2**20)
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = tempfile.mkdtemp(prefix="soft_rl_spool_", dir=shm)
        self.error: BaseException | None = None
        self.stats = {"files": 0, "tensors": 0, "bytes": 0, "max_file_bytes": 0, "peak_files": 0, "waited_s": 0.0}
        self._cancelled = False

    def files_present(self) -> int:
        """Data files on disk now (written, not yet loaded by every reader)."""
        return sum(1 for f in os.listdir(self.dir) if f.endswith(_SUFFIX))

    def run(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Write the whole stream (on the writer's thread); a failure is kept in ``error`` and published as ABORT."""
        try:
            batch, size, storages = {}, 0, set()
            for name, t in items:
                if self._cancelled:
                    return
                if name in batch:
                    raise ValueError(f"weight {name!r} appears twice in one sync")
                t = t.detach().to("cpu").contiguous()
                if t.untyped_storage().data_ptr() in storages:  # safetensors refuses tensors sharing memory
                    t = t.clone()
                batch[name] = t
                storages.add(t.untyped_storage().data_ptr())
                size += t.numel() * t.element_size()
                if size >= self.limit:
                    self._write(batch, size)
                    batch, size, storages = {}, 0, set()
            if batch:
                self._write(batch, size)
            _publish(os.path.join(self.dir, _END), str(self.stats["files"]))
        except BaseException as e:  # noqa: BLE001 - handed to the engine, which raises it
            self.error = e
            abort(self.dir, f"the weight spool's writer failed: {type(e).__name__}: {e}")

    def _write(self, batch: dict[str, torch.Tensor], size: int) -> None:
        from safetensors.torch import save_file

        t0, pause = time.monotonic(), 0.002
        while self.files_present() >= self.max_files:  # at most max_files on disk: wait for the readers
            if self._cancelled or (reason := _aborted(self.dir)) is not None:
                raise RuntimeError(f"weight spool stopped: {reason if not self._cancelled else 'cancelled'}")
            if time.monotonic() - t0 > self.wait_s:
                raise TimeoutError(f"the engine's worker processes loaded no weight file for {self.wait_s:g}s")
            time.sleep(pause)
            pause = min(2 * pause, 0.02)
        self.stats["waited_s"] += time.monotonic() - t0
        path = _data(self.dir, self.stats["files"])
        tmp = f"{path}.tmp"
        save_file(batch, tmp)
        os.rename(tmp, path)
        self.stats["files"] += 1
        self.stats["tensors"] += len(batch)
        self.stats["bytes"] += size
        self.stats["max_file_bytes"] = max(self.stats["max_file_bytes"], size)
        self.stats["peak_files"] = max(self.stats["peak_files"], self.files_present())

    def cancel(self) -> None:
        """Stop writing (the readers are gone or failed)."""
        self._cancelled = True

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def read_spool(spool: str, rank: int, readers: int, wait_s: float = SPOOL_WAIT_S) -> Iterator[tuple[str, torch.Tensor]]:
    """The stream written into ``spool``, for reader ``rank`` of ``readers``: files loaded in order, each marked
    read (and deleted by the last of the readers) as soon as it is loaded. A failure here (or the generator closed
    before the end) publishes ABORT, so that the writer and the other readers stop waiting."""
    from safetensors.torch import load_file

    done = False
    try:
        i = 0
        while True:
            path, t0, pause = _data(spool, i), time.monotonic(), 0.001
            while not os.path.exists(path):
                if (reason := _aborted(spool)) is not None:
                    raise RuntimeError(f"weight spool aborted: {reason}")
                with contextlib.suppress(FileNotFoundError), open(os.path.join(spool, _END)) as f:
                    if i >= int(f.read()):
                        done = True
                        return
                if time.monotonic() - t0 > wait_s:
                    raise TimeoutError(f"reader {rank}: weight file {i} did not arrive within {wait_s:g}s")
                time.sleep(pause)
                pause = min(2 * pause, 0.02)
            tensors = load_file(path)
            open(_read_marker(spool, i, rank), "w").close()
            if all(os.path.exists(_read_marker(spool, i, r)) for r in range(readers)):  # the last reader deletes
                for p in (path, *(_read_marker(spool, i, r) for r in range(readers))):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(p)
            while tensors:
                name = next(iter(tensors))
                yield name, tensors.pop(name)  # handed on: not kept here
            i += 1
    finally:
        if not done:
            abort(spool, f"reader {rank} stopped before the end of the stream")
