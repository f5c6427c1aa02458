"""workers.weight_spool: a weight stream through bucket files, with threads standing in for the engine's actor (the
writer) and its worker processes (the readers): every reader gets every tensor exactly, at most two files exist at a
time (the writer's record and an independent sampler agree), files are deleted once all readers loaded them, and a
failure on either side makes the others raise instead of waiting."""

import os
import threading
import time

import pytest
import torch

from workers.weight_spool import SpoolWriter, read_spool


def _stream(n: int = 12, numel: int = 40_000, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {f"layer{i}.w": torch.randn(numel, generator=g) for i in range(n)}
    out["half"] = torch.randn(7, generator=g).to(torch.bfloat16)
    return out


def _run(spool: SpoolWriter, items, readers: int, consume=lambda rank, name, t: None):
    got, errors = {r: {} for r in range(readers)}, {}

    def reader(rank):
        try:
            for name, t in read_spool(spool.dir, rank, readers, wait_s=30):
                consume(rank, name, t)
                got[rank][name] = t.clone()
        except Exception as e:  # noqa: BLE001 - checked by the test
            errors[rank] = e

    threads = [threading.Thread(target=spool.run, args=(items,))]
    threads += [threading.Thread(target=reader, args=(r,)) for r in range(readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return got, errors


def test_every_reader_gets_the_stream_with_at_most_two_files_on_disk():
    state = _stream()
    spool = SpoolWriter(readers=2, file_mb=0.3)  # 160 kB tensors: one or two per file
    peak, stop = [0], threading.Event()

    def sample():  # independent of the writer's own record
        while not stop.is_set():
            peak[0] = max(peak[0], spool.files_present())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        # the readers are slower than the writer, so it has to wait for room
        got, errors = _run(spool, iter(state.items()), 2, consume=lambda rank, name, t: time.sleep(0.01))
        stop.set()
        sampler.join()
        assert not errors and spool.error is None, (errors, spool.error)
        for r in (0, 1):
            assert got[r].keys() == state.keys()
            assert all(torch.equal(got[r][n], state[n]) and got[r][n].dtype == state[n].dtype for n in state)
        assert spool.stats["files"] >= 6 and spool.stats["tensors"] == len(state)
        assert spool.stats["peak_files"] <= 2 and peak[0] <= 2, (spool.stats, peak)
        assert spool.stats["waited_s"] > 0  # backpressure did hold the writer back
        assert sorted(os.listdir(spool.dir)) == ["END"]  # every file deleted once both readers loaded it
    finally:
        stop.set()
        spool.cleanup()
    assert not os.path.exists(spool.dir)


def test_a_failed_reader_stops_the_writer_and_the_other_reader():
    spool = SpoolWriter(readers=2, file_mb=0.1)

    def consume(rank, name, t):
        if rank == 1 and name == "layer3.w":
            raise RuntimeError("loader failed")
        time.sleep(0.005)

    try:
        t0 = time.monotonic()
        _, errors = _run(spool, iter(_stream().items()), 2, consume)
        assert "loader failed" in str(errors[1])
        assert "aborted" in str(errors.get(0)), errors  # reader 0 waits for files the writer cannot write
        assert "stopped" in str(spool.error), spool.error
        assert time.monotonic() - t0 < 25  # not the 30 s wait of a reader, nor the writer's
    finally:
        spool.cleanup()


def test_a_failed_stream_reaches_every_reader():
    def items():
        yield from list(_stream().items())[:3]
        raise ConnectionError("object store fetch failed")

    spool = SpoolWriter(readers=2, file_mb=0.1)
    try:
        _, errors = _run(spool, items(), 2)
        assert isinstance(spool.error, ConnectionError)
        assert all("object store fetch failed" in str(errors.get(r)) for r in (0, 1)), errors
    finally:
        spool.cleanup()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="readers >= 1"):
        SpoolWriter(readers=0)
