"""``todi`` with a look at the output head the fused loss receives; launched by tests/test_sharded.py.

    accelerate launch --config_file configs/accelerate/fsdp2.yaml tests/sharded_probe.py RECORD.json distill ...

Runs the ``todi`` command line in this process after wrapping the fused loss: the first call's student
head weight (its class, shape, element count, whether it is a DTensor) and the number of calls go to
RECORD.json. Under FSDP2 a parameter read outside its unit's unshard is a DTensor shard, and under ZeRO-3
a partitioned parameter is an empty tensor; the fused loss must see neither. ``SHARDED_PROBE_SLEEP``
seconds of sleep per call slow a run down so that a test can kill it between checkpoints (the arithmetic
is unchanged); each rank writes its process id to RECORD.json.pid<rank> for such a kill.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    record_path, argv = Path(sys.argv[1]), sys.argv[2:]
    import todi.losses.causal_lm as causal_lm
    from todi import cli

    original = causal_lm.fused_linear_distillation_loss
    pause = float(os.environ.get("SHARDED_PROBE_SLEEP", "0"))
    record: dict = {"calls": 0, "rank": int(os.environ.get("RANK", "0"))}
    # torchrun starts each worker in a session of its own: a test that kills the launcher's process group
    # must find the workers by these files
    record_path.with_name(f"{record_path.name}.pid{record['rank']}").write_text(str(os.getpid()))

    def probed(student_hidden, student_weight, *args, **kwargs):
        if record["calls"] == 0:
            try:
                from torch.distributed.tensor import DTensor
            except ImportError:  # torch < 2.5 names it under _tensor
                from torch.distributed._tensor import DTensor
            record.update(
                weight_class=type(student_weight).__name__,
                weight_is_dtensor=isinstance(student_weight, DTensor),
                weight_shape=list(student_weight.shape),
                weight_numel=student_weight.numel(),
                hidden_shape=list(student_hidden.shape),
                weight_device=str(student_weight.device),
            )
        record["calls"] += 1
        if pause:
            time.sleep(pause)
        return original(student_hidden, student_weight, *args, **kwargs)

    causal_lm.fused_linear_distillation_loss = probed
    try:
        return cli.main(argv)
    finally:
        causal_lm.fused_linear_distillation_loss = original  # in-process callers (a test) get it back
        if record["rank"] == 0:
            record_path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
