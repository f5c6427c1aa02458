"""Stand-ins for a hung or dead rollout worker and for learner rank 0, for tests/test_weight_sync.py
(a module of its own so that Ray workers can import them as ``tests.sync_stubs``)."""

import time

import torch


class StubWorker:
    """A rollout worker that is alive but never finishes (hang) or is killed (dead), for both transports."""

    def __init__(self, mode):
        self.mode = mode

    def load_weight_buckets(self, refs):
        if self.mode == "hang":
            time.sleep(3600)
        return len(refs)

    def num_ranks(self):
        return 1

    def join_weight_group(self, host, port, base_rank, world_size, backend, timeout_s):
        from workers.weight_broadcast import open_group

        self.group = open_group(backend, host, port, base_rank, world_size, timeout_s)
        return [base_rank]

    def receive_weights(self, layout):
        if self.mode == "hang":
            time.sleep(3600)
        from workers.weight_broadcast import receive

        return len(list(receive(self.group, layout)))

    def leave_weight_group(self):
        self.group = None


class StubLearner:
    """Learner rank 0's side of the broadcast, sending one 16 MiB tensor."""

    def address(self):
        from workers.learner import _free_port

        return "127.0.0.1", _free_port()

    def weight_specs(self):
        return [("w", (1 << 22,), "float32")]

    def join_weight_group(self, host, port, world_size, timeout_s):
        from workers.weight_broadcast import open_group

        self.group = open_group("gloo", host, port, 0, world_size, timeout_s)
        return 0

    def broadcast_weights(self, layout):
        from workers.weight_broadcast import pack, send

        for b in layout:
            send(self.group, pack(b, [torch.ones(1 << 22)], "cpu"))
        return 1

    def leave_weight_group(self):
        self.group = None
