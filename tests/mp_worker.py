"""One process of the two-process training test (run by test_multiprocess.py)."""
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(process_id, port, workdir, out, num_steps, clock_skew_s=0.0):
  from flax import traverse_util
  import numpy as np
  from configs import mnist
  from scoreflow_jax import distributed, trainer, train_step as ts
  distributed.maybe_initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=2, process_id=process_id)
  config = mnist.get_config("tiny")
  # a fitted base (two components per class): process 0's fit is broadcast
  config.model.score_flow.update(gaussian_base=True, gaussian_components=2, gaussian_rank=4)
  config.training.update(num_steps=num_steps, log_every=3, checkpoint_every=3,
                         image_every=0, time_limit_s=3600)
  # this process reads its start clock_skew_s early (as if it had started
  # that much sooner): past the time limit from the first step if > 3600
  clock, reads = trainer._time_limit_clock, []
  def skewed():
    reads.append(None)
    return clock() - (clock_skew_s if len(reads) == 1 else 0.0)
  trainer._time_limit_clock = skewed
  result = trainer.train_and_evaluate(config, workdir, log=print)
  params = traverse_util.flatten_dict(ts.host(result["state"].params), sep="/")
  np.savez(f"{out}.{process_id}.npz", **params)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]),
       float(sys.argv[6]))
