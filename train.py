#!/usr/bin/env python
"""Train a ternary-weight network with TGA. ``python train.py --help`` lists every option.

With no options this is the demo: the small CNN on Fashion-MNIST, every layer
ternary, sequential update (a few minutes on 2 CPU cores).

Multi-host: run the same command on every host with ``--coordinator-address
HOST:PORT --num-processes N --process-id I`` (or set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID; on TPU pods/SLURM jax detects them). Each
host reads its own shard of every global batch.
"""
import sys

from tgq_jax.training import configs


def main(argv=None) -> int:
  cfg = configs.from_args(argv)
  from tgq_jax.training import checkpoints, harness, parallel, workdir  # after parsing: --help stays fast
  try:
    parallel.initialize_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    harness.train_and_evaluate(cfg)
  except (harness.DivergenceError, workdir.WriteFailure, checkpoints.CheckpointWriteError) as e:
    print(f"error: {e}", file=sys.stderr)  # the run stopped; what it saved before is intact
    return 1
  except ValueError as e:  # bad options or inputs: one line, no traceback
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:  # Ctrl-C before training started, or twice (once: saves, see harness)
    print("error: interrupted (SIGINT) before a checkpoint could be saved", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
