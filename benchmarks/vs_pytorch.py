"""Our TGA-sequential train step against the same step written in PyTorch, side by side in one run.

    pip install -e '.[bench]'          # torch and torchvision (CPU is enough)
    python benchmarks/vs_pytorch.py [--cases resnet18 small_cnn] [--threads 2] [--steps 5] [--rounds 3]

The PyTorch side is what a user of the authors' code runs: torchvision's
ResNet-18 (or the demo's small CNN) with every conv and linear layer
(first and last included) through a TGA autograd function as in the authors'
``tern_threshold_trainable_5.py`` (codes by a straight-through function whose
gradient is scaled by 1/alpha, alpha = mu + sigma * pdf(a) / (1 - cdf(a)) by
ordinary autograd, so gradients reach mu, sigma and delta), their two optimizers
(``main_dc.py``: Adam with weight decay for the weights, SGD momentum 0.9
Nesterov for the thresholds, whose gradients a hook clamps to +-0.001) and the
sequential step (forward/backward, threshold step; forward/backward, weight
step), float32, ``torch.set_num_threads(--threads)``. Our side is the trainer's
own jitted step (``imagenet_resnet18`` recipe) on one device. Both run on the
same resident random batch; the two are timed round-robin ``--rounds`` times,
``--steps`` steps each, and the median gives images/s. Prints ours / PyTorch
(goal >= 1.0).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from step_time import build_step, time_steps  # noqa: E402

from tgq_jax.training import xla_cpu  # noqa: E402

CASES = {  # batch, (H, W, C), classes
  "resnet18": (8, (224, 224, 3), 1000),
  "small_cnn": (128, (28, 28, 1), 10),
}


# --- the PyTorch side ----------------------------------------------------------


def torch_step(case: str, threads: int):
  import torch
  import torch.nn as tnn
  import torch.nn.functional as F
  import torchvision

  torch.set_num_threads(threads)

  class TernarySTE(torch.autograd.Function):
    """Codes in {-1, 0, 1}; backward: the gradient straight through, divided by alpha."""

    @staticmethod
    def forward(ctx, w, mu, t, alpha):
      ctx.save_for_backward(alpha)
      return (w > mu + t).to(w.dtype) - (w < mu - t).to(w.dtype)

    @staticmethod
    def backward(ctx, g):
      (alpha,) = ctx.saved_tensors
      return g / alpha, None, None, None

  def tga(w, delta):
    mu, sigma = w.mean(), w.std()
    t = torch.clamp(delta.abs(), max=3 * sigma.item())  # hardtanh(|delta|, -3 sigma, 3 sigma)
    a = t / sigma
    lam = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi) / (0.5 * torch.erfc(a / math.sqrt(2)))
    alpha = mu + sigma * lam
    return alpha * TernarySTE.apply(w, mu.item(), t.item(), alpha.detach())

  class TConv(tnn.Conv2d):
    def __init__(self, *a, **k):
      super().__init__(*a, **k)
      self.delta_th = tnn.Parameter(0.05 * self.weight.detach().abs().max().reshape(1))

    def forward(self, x):
      return F.conv2d(x, tga(self.weight, self.delta_th), self.bias, self.stride, self.padding,
                      self.dilation, self.groups)

  class TLinear(tnn.Linear):
    def __init__(self, *a, **k):
      super().__init__(*a, **k)
      self.delta_th = tnn.Parameter(0.05 * self.weight.detach().abs().max().reshape(1))

    def forward(self, x):
      return F.linear(x, tga(self.weight, self.delta_th), self.bias)

  def ternarize_modules(module):
    for name, child in module.named_children():
      if isinstance(child, tnn.Conv2d):
        new = TConv(child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                    bias=child.bias is not None)
      elif isinstance(child, tnn.Linear):
        new = TLinear(child.in_features, child.out_features, bias=child.bias is not None)
      else:
        ternarize_modules(child)
        continue
      setattr(module, name, new)

  batch, (h, w, c), classes = CASES[case]
  if case == "resnet18":
    model = torchvision.models.resnet18(num_classes=classes)
  else:  # the demo's small CNN (tgq_jax.models.small_cnn): 4 x (conv3x3-BN-ReLU), pools, dense
    layers, cin = [], c
    for i, width in enumerate((16, 32, 64, 128)):
      layers += [tnn.Conv2d(cin, width, 3, padding=1, bias=False), tnn.BatchNorm2d(width), tnn.ReLU()]
      if i < 3:
        layers.append(tnn.MaxPool2d(2))
      cin = width
    model = tnn.Sequential(*layers, tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(cin, classes))
  ternarize_modules(model)
  model.train()
  deltas = [p for n, p in model.named_parameters() if n.endswith("delta_th")]
  weights = [p for n, p in model.named_parameters() if not n.endswith("delta_th")]
  for d in deltas:
    d.register_hook(lambda g: g.clamp(-0.001, 0.001))
  opt_thr = torch.optim.SGD(deltas, lr=1e-4, momentum=0.9, nesterov=True, weight_decay=0)
  opt_w = torch.optim.Adam(weights, lr=1e-4, weight_decay=5e-6)
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.normal(size=(batch, c, h, w)).astype(np.float32))
  y = torch.from_numpy(rng.integers(0, classes, batch))

  def step():
    loss = F.cross_entropy(model(x), y)
    opt_thr.zero_grad()
    loss.backward()
    opt_thr.step()
    loss = F.cross_entropy(model(x), y)
    opt_w.zero_grad()
    loss.backward()
    opt_w.step()
    return loss

  def run(n):
    start = time.perf_counter()
    for _ in range(n):
      step()
    return (time.perf_counter() - start) / n

  return run


# --- our side ---------------------------------------------------------------------


def jax_step(case: str):
  batch, shape, classes = CASES[case]
  step, state, data = build_step(case, "tga", "sequential", batch, shape, classes, optimizer="adam",
                                 lr=1e-4, weight_decay=5e-6)
  holder = [state]

  def run(n):
    t, holder[0] = time_steps(step, holder[0], data, n)
    return t

  return run


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
  parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine's cores)")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  xla_cpu.configure()  # XLA:CPU convolutions on the thread pool, as train.py runs them
  import jax
  import torch
  print(f"torch {torch.__version__} ({args.threads} threads), jax {jax.__version__} on "
        f"{jax.devices()[0].platform} ({os.cpu_count()} cores)", flush=True)
  for case in args.cases:
    runs = {"pytorch": torch_step(case, args.threads), "ours": jax_step(case)}
    for run in runs.values():
      run(2)  # warm-up (and compilation)
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
      for name, run in runs.items():
        times[name].append(run(args.steps))
    batch = CASES[case][0]
    ips = {name: batch / statistics.median(t) for name, t in times.items()}
    print(f"{case} (batch {batch}, TGA-sequential, float32): PyTorch {ips['pytorch']:.2f} images/s, "
          f"ours {ips['ours']:.2f} images/s; ours / PyTorch = {ips['ours'] / ips['pytorch']:.2f} (goal >= 1.0)",
          flush=True)


if __name__ == "__main__":
  main()
