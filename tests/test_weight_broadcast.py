"""workers.weight_broadcast: bucket plans, the wire format, a real gloo group of three ranks (threads), and dead or
hung peers (separate processes: SIGKILL, SIGSTOP) against the sync deadline, the abort key and the group timeout."""

import threading

import pytest
import torch

from workers.weight_broadcast import (
    Bucket,
    WeightGroupError,
    open_group,
    pack,
    plan_buckets,
    receive,
    send,
    tensor_spec,
    unpack,
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_plan_buckets_limits_size_and_splits_dtypes():
    specs = [("a", (256, 256), "float32"), ("b", (256, 256), "float32"), ("c", (10,), "float32"),
             ("d", (4,), "bfloat16"), ("e", (1024, 1024), "float32")]
    plan = plan_buckets(specs, bucket_mb=0.3)  # a and b are 0.25 MiB each: not together
    assert [b.names for b in plan] == [["a"], ["b", "c"], ["d"], ["e"]]
    assert [b.dtype for b in plan] == ["float32", "float32", "bfloat16", "float32"]
    assert plan[1].nbytes == (256 * 256 + 10) * 4 and plan[2].nbytes == 8
    assert [n for b in plan_buckets(specs, 1e6) for n in b.names] == list("abcde")


def test_pack_unpack_round_trip_and_shape_check():
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g), torch.randn(2, 1, 2, generator=g)]
    b = Bucket("float32", ["x", "y", "z"], [tuple(t.shape) for t in ts])
    flat = pack(b, ts, "cpu")
    assert flat.shape == (12 + 5 + 4,)
    back = dict(unpack(b, flat.clone()))
    assert all(torch.equal(back[n], t) for n, t in zip("xyz", ts, strict=True))
    with pytest.raises(ValueError, match="weight y: shape"):
        pack(b, [ts[0], ts[0], ts[2]], "cpu")


def test_gloo_broadcast_three_ranks():
    """Rank 0 sends a model's state in small buckets; two receivers rebuild it exactly."""
    g = torch.Generator().manual_seed(1)
    state = {f"layer{i}.w": torch.randn(64, 32, generator=g) for i in range(5)}
    state["half"] = torch.randn(7, generator=g).to(torch.bfloat16)
    layout = plan_buckets([tensor_spec(n, t) for n, t in state.items()], 0.01)
    assert len(layout) >= 5
    port, got, errors = _free_port(), {1: {}, 2: {}}, []

    def run(rank):
        try:
            group = open_group("gloo", "127.0.0.1", port, rank, 3, timeout_s=30)
            if rank == 0:
                for b in layout:
                    send(group, pack(b, [state[n] for n in b.names], "cpu"))
            else:
                got[rank] = {n: t.clone() for n, t in receive(group, layout)}
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(3)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert not errors, errors
    for r in (1, 2):
        assert got[r].keys() == state.keys()
        assert all(torch.equal(got[r][n], state[n]) and got[r][n].dtype == state[n].dtype for n in state)


def test_broadcast_to_a_silent_peer_times_out():
    """A peer that joined but never receives: the sender raises at the sync's deadline (2 s), well before the
    backend's own timeout (gloo: "Timed out waiting ... for send" after group_timeout_s), and sets the abort key."""
    port, errors, done = _free_port(), {}, threading.Event()

    def run(rank):
        try:
            group = open_group("gloo", "127.0.0.1", port, rank, 2, timeout_s=2)
            if rank == 0:
                send(group, torch.ones(1 << 22))  # 16 MiB: more than the socket buffers hold
            else:
                done.wait(30)  # alive, connected, never receives
        except Exception as e:
            errors[rank] = e
        finally:
            done.set()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert "did not complete within the sync's 2s deadline" in str(errors.get(0)), errors
    assert isinstance(errors[0], WeightGroupError)


# ------------------------------------------------------------------ dead or hung peers (separate processes)

BUCKET_FLOATS = 1 << 23  # 32 MiB per bucket: more than loopback socket buffers hold, so a hung peer blocks a send
N_BUCKETS = 6


def _rank_process(rank: int, port: int, timeout_s: float, resume, conn) -> None:
    """One rank of a 3-rank gloo group in its own process: rank 0 sends N_BUCKETS buckets, pausing after the
    first until ``resume`` is set (the test signals rank 1 meanwhile: mid-broadcast); ranks 1 and 2 receive.
    Reports through its own pipe ``conn`` (a queue shared with the victim could be locked by it forever)."""
    import os
    import time

    from workers.weight_broadcast import Bucket, open_group, receive, send, sync_deadline

    layout = [Bucket("float32", [f"w{i}"], [(BUCKET_FLOATS,)]) for i in range(N_BUCKETS)]
    group = open_group("gloo", "127.0.0.1", port, rank, 3, timeout_s)
    conn.send(("joined", os.getpid()))
    start = time.monotonic()
    try:
        if rank == 0:
            deadline = sync_deadline(group)
            for i, b in enumerate(layout):
                send(group, torch.full((b.numel,), float(i)), deadline)
                if i == 0:
                    resume.wait(60)
        else:
            for n, (_, t) in enumerate(receive(group, layout)):
                assert float(t[0]) == n
                if n == 0:
                    conn.send(("first", None))
        conn.send(("result", (start, time.monotonic(), "ok")))
    except Exception as e:  # noqa: BLE001 - reported to the test
        conn.send(("result", (start, time.monotonic(), f"{type(e).__name__}: {e}")))
    time.sleep(3600)  # the test kills this process (a torn-down gloo group may hold threads until its own timeout)


def _group_with_a_victim(how: str, timeout_s: float, abort_after_s: float | None = None) -> dict:
    """Run ``_rank_process`` x 3, signal rank 1 (``how``: "kill" = SIGKILL, "stop" = SIGSTOP, hung) once ranks 1
    and 2 hold the first bucket, optionally set the abort key ``abort_after_s`` later (as the driver does);
    returns {rank: (sync start, end, outcome)} of ranks 0 and 2 plus the signal and abort times."""
    import multiprocessing as mp
    import os
    import signal
    import time
    from multiprocessing.connection import wait

    from workers.weight_broadcast import request_abort

    ctx = mp.get_context("spawn")
    resume, port = ctx.Event(), _free_port()
    pipes = [ctx.Pipe(duplex=False) for _ in range(3)]
    procs = [ctx.Process(target=_rank_process, args=(r, port, timeout_s, resume, pipes[r][1]), daemon=True)
             for r in range(3)]
    for p in procs:
        p.start()
    readers = {pipes[r][0]: r for r in range(3)}
    out: dict = {}

    def messages(until: float):
        while time.monotonic() < until:
            for c in wait([c for c, r in readers.items() if r != 1 or "signal" not in out], timeout=1.0):
                yield readers[c], *c.recv()
        raise TimeoutError(f"no answer from the ranks (so far: {out})")

    try:
        pids, first = {}, set()
        for rank, kind, value in messages(time.monotonic() + 120):
            pids[rank] = value if kind == "joined" else pids.get(rank)
            first |= {rank} if kind == "first" else set()
            if first == {1, 2}:
                break
        os.kill(pids[1], signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        out["signal"] = time.monotonic()
        resume.set()
        if abort_after_s is not None:
            time.sleep(abort_after_s)
            out["abort"] = time.monotonic()
            assert request_abort("127.0.0.1", port, "the driver: rollout worker 0 died")
        for rank, kind, value in messages(time.monotonic() + timeout_s + 60):
            if kind == "result":
                out[rank] = value
            if {0, 2} <= out.keys():
                break
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(10)
    return out


@pytest.mark.slow
def test_dead_peer_fails_the_others_promptly():
    """A receiver SIGKILLed mid-broadcast: the survivors' watchers see its process gone (same machine; gloo's own
    connection error, when it comes, is only sometimes first) and set the abort key; the sender and the other
    receiver, blocked on the next bucket, raise long before the deadline."""
    from workers.weight_broadcast import ABORT_POLL_S, group_timeout_s

    timeout_s = 60.0
    out = _group_with_a_victim("kill", timeout_s)
    for rank in (0, 2):
        _, end, outcome = out[rank]
        assert outcome.startswith("WeightGroupError"), (rank, outcome)
        # an error model, not a timing: the news travels by one liveness check or socket error and one poll of the
        # key (each ABORT_POLL_S), plus slack for a loaded machine; the deadline is far beyond
        assert end - out["signal"] < 10 * ABORT_POLL_S + 5.0 < timeout_s < group_timeout_s(timeout_s), (rank, outcome)
        assert "deadline" not in outcome, outcome


@pytest.mark.slow
def test_hung_peer_fails_at_the_deadline_not_the_group_timeout():
    """A receiver SIGSTOPped (alive, silent) mid-broadcast: nobody can tell it from a slow one, so the sender and
    the other receiver raise at the sync's deadline: not earlier, and not at the backend's own (longer) timeout."""
    from workers.weight_broadcast import group_timeout_s

    timeout_s = 8.0
    out = _group_with_a_victim("stop", timeout_s)
    first_start = min(out[0][0], out[2][0])  # each rank's deadline runs from its own start; the first one aborts all
    for rank in (0, 2):
        start, end, outcome = out[rank]
        assert outcome.startswith("WeightGroupError"), (rank, outcome)
        assert end - first_start >= timeout_s - 0.1, (rank, end - start, outcome)
        assert end - start < timeout_s + 5.0 < group_timeout_s(timeout_s), (rank, end - start, outcome)
    assert "deadline" in out[0][2], out[0]


@pytest.mark.slow
def test_abort_key_releases_blocked_ranks():
    """The driver's abort key (set when Ray reports an actor of the sync dead) makes the ranks blocked on a hung
    peer raise within about a poll interval instead of at the deadline."""
    from workers.weight_broadcast import ABORT_POLL_S

    timeout_s = 60.0
    out = _group_with_a_victim("stop", timeout_s, abort_after_s=1.0)
    for rank in (0, 2):
        _, end, outcome = out[rank]
        assert "the driver: rollout worker 0 died" in outcome, (rank, outcome)
        assert end - out["abort"] < 10 * ABORT_POLL_S + 5.0 < timeout_s, (rank, end - out["abort"])
