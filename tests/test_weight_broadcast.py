"""workers.weight_broadcast: bucket plans, the wire format, and a real gloo group of three ranks (threads)."""

import threading

import pytest
import torch

from workers.weight_broadcast import Bucket, open_group, pack, plan_buckets, receive, send, tensor_spec, unpack


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
    assert "Timed out" in str(errors.get(0)), errors
