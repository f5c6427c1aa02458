"""Stand-ins for learner rank 0 and rollout workers on the broadcast transport, for tests/test_broadcast_faults.py
(a module of its own so that Ray workers import them as ``tests.broadcast_stubs``): real gloo groups and real
buckets, no models. Each records how its last call ended (``outcome``)."""

import torch

from tests.sync_stubs import StubWorker

BUCKET_FLOATS = 1 << 22  # 16 MiB: more than loopback socket buffers hold, so a silent receiver blocks the sender
N_BUCKETS = 4


class BroadcastLearner:
    def __init__(self):
        self.group, self.outcome = None, None

    def address(self):
        from workers.learner import _free_port

        return "127.0.0.1", _free_port()

    def weight_specs(self):
        return [(f"w{i}", (BUCKET_FLOATS,), "float32") for i in range(N_BUCKETS)]

    def join_weight_group(self, host, port, world_size, timeout_s):
        from workers.weight_broadcast import open_group

        self.group = open_group("gloo", host, port, 0, world_size, timeout_s)
        return 0

    def broadcast_weights(self, layout):
        from workers.weight_broadcast import pack, send, sync_deadline

        deadline = sync_deadline(self.group)
        try:
            for i, b in enumerate(layout):
                send(self.group, pack(b, [torch.full((BUCKET_FLOATS,), float(i))], "cpu"), deadline)
        except Exception as e:
            self.outcome = f"{type(e).__name__}: {e}"
            raise
        self.outcome = "ok"
        return len(layout)

    def leave_weight_group(self):
        from workers.weight_broadcast import close_group

        close_group(self.group)
        self.group = None

    def last_outcome(self):
        return self.outcome


class BroadcastWorker(StubWorker):
    """``mode``: "ok" receives; "fail" joins the group but its receive call raises before receiving anything (the
    group never hears of it: only the driver does, from Ray). Joins the group as ``StubWorker`` does."""

    def __init__(self, mode):
        self.mode, self.group, self.outcome = mode, None, None

    def receive_weights(self, layout):
        from workers.weight_broadcast import receive

        if self.mode == "fail":
            self.outcome = "failed on purpose"
            raise RuntimeError("this engine failed before receiving")
        try:
            n = sum(1 for _ in receive(self.group, layout))
        except Exception as e:
            self.outcome = f"{type(e).__name__}: {e}"
            raise
        self.outcome = "ok"
        return n

    def leave_weight_group(self):
        from workers.weight_broadcast import close_group

        close_group(self.group)
        self.group = None

    def last_outcome(self):
        return self.outcome
