"""Times the PyTorch peer's train step on any torch device (e.g. a GPU).

python bench/torch_peer_device.py --peer path/to/torch_scoreflow.py \
  --parameterization preconditioned --batch 128 --device cuda [--steps 50]

The peer (``shared/peers/torch_scoreflow.py``) builds its tensors without a
device argument, so it runs on the CPU only; this loads its ``Model``
unchanged, makes ``--device`` torch's default device and times the same step
(Adam, eager mode, double backward), synchronising the device around each
step. The last line printed is one JSON object, like bench/train_throughput.py.
"""
import argparse
import importlib.util
import json
import statistics
import time


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--peer", required=True, help="path of torch_scoreflow.py")
  p.add_argument("--parameterization", default="preconditioned",
                 choices=("seed", "preconditioned"))
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--device", default="cuda")
  args = p.parse_args(argv)
  import torch
  spec = importlib.util.spec_from_file_location("torch_scoreflow", args.peer)
  peer = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(peer)
  torch.set_default_device(args.device)
  torch.manual_seed(0)
  model = peer.Model(model_channels=128, n_flows=3, parameterization=args.parameterization)
  opt = torch.optim.Adam(model.parameters(), lr=1e-4)
  x = torch.rand(args.batch, 1, 28, 28) * 2 - 1
  y = torch.randint(0, 10, (args.batch,))
  sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = model.loss(x, y)
    loss.backward()
    opt.step()
    return loss

  for _ in range(args.warmup):
    step()
  sync()
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    step()
    sync()
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
  result = {"images_per_s": round(args.batch / median, 1), "median_step_s": round(median, 5),
            "parameterization": args.parameterization, "batch": args.batch,
            "device": name, "torch_version": torch.__version__}
  print(f"torch eager {args.parameterization} batch {args.batch} on {name}: "
        f"median step {median * 1e3:.2f} ms | {result['images_per_s']:.0f} img/s")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
