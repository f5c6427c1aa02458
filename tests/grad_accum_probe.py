"""A learner rank that reports the accumulated gradient instead of stepping, for tests/test_learner_accumulation.py
(a module of its own so that Ray workers import it as ``tests.grad_accum_probe``)."""

import torch

from workers.learner import LearnerWorker


class AccumulationProbe(LearnerWorker):
    def init(self, addr: str, port: int, model_dtype_accumulation: bool = False) -> int:
        """``model_dtype_accumulation``: the control, DeepSpeed's default (``grad_accum_dtype`` unset)."""
        if model_dtype_accumulation:
            import workers.learner as learner

            configure = learner.deepspeed_config

            def without_accumulation_dtype(cfg, dtype):
                out = configure(cfg, dtype)
                out.pop("data_types", None)
                return out

            learner.deepspeed_config = without_accumulation_dtype
        return super().init(addr, port)

    def accumulated_gradient(self, micro_batches, advantages, old) -> tuple[torch.Tensor, set[str]]:
        """The gradient DeepSpeed hands the client optimizer after accumulating ``micro_batches`` (float64,
        flattened over its parameters), and the dtypes of the buffers that accumulated it; the optimizer does
        not step."""
        captured, buffers = [], set()
        engine_step = self.engine.step

        def inspect_then_step(*args, **kwargs):  # after the last micro-batch, before DeepSpeed's boundary
            buffers.update(self.accumulation_buffers())
            return engine_step(*args, **kwargs)

        def capture(closure=None):
            for group in self.optimizer.param_groups:
                captured.extend(p.grad.detach().double().flatten() for p in group["params"] if p.grad is not None)

        self.optimizer.step, self.engine.step = capture, inspect_then_step
        try:
            self.train_mini_batch(micro_batches, advantages, old, None, 1.0, None)
        finally:
            del self.optimizer.step, self.engine.step
        return torch.cat(captured), buffers

    def accumulation_buffers(self) -> set[str]:
        """dtypes of DeepSpeed 0.19.8's gradient accumulation buffers between micro-batches (its internals,
        read for the record): ZeRO-3's flat partition buffer; ZeRO-2's accumulated gradients (with an fp32
        accumulation dtype its "compact" partition buffer) and, offloaded, its host accumulators."""
        opt, out = self.engine.optimizer, set()
        if hasattr(opt, "grad_partitions_flat_buffer"):  # ZeRO-3
            out.add(str(opt.grad_partitions_flat_buffer.dtype))
        for i in range(len(getattr(opt, "bit16_groups", []))):  # ZeRO-1/2
            if opt._use_compact_grad_partition_buffer(i):
                out.add(str(opt._get_compact_grad_partition_buffer(i).flat_partition.dtype))
            out |= {str(t.dtype) for t in (opt.all_grad_tensors.get(i) or [])}
        out |= {str(t.dtype) for t in getattr(opt, "accumulated_grads_in_cpu", {}).values()}
        return out
