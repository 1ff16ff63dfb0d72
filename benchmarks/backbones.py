"""Descriptor extraction throughput: our jitted Flax backbone + GeM vs PyTorch eager.

For ResNet-50 and EfficientNet-Lite0 at 224 and 512 px, measures images/second of the whole
global descriptor (last conv map -> GeM, p = 3 -> L2) under ``jax.jit`` (float32, batch
``--batch``) and, when torch is installed, the same network and pooling in PyTorch eager mode
(``inference_mode``) in the same process, in torch's default NCHW layout and in channels_last.
Each figure is ours / torch's images per second (> 1: we are faster). The ResNet-50 peer is
torchvision's; torchvision has no EfficientNet-Lite, so that peer is the same network written
with ``torch.nn`` layers here (conv / batch norm / ReLU6 MBConv blocks without squeeze-excite,
the paper's stage table; symmetric instead of TF "same" padding, which costs the same).
Weights are random (speed does not depend on them). The implementations of one case are timed
in turns, so a busy machine's load drift hits them alike. Same threads for both frameworks:
XLA's CPU client and ``torch.set_num_threads(os.cpu_count())`` use every core; ``--torch-threads
0 1`` also times torch on one thread. That matters on a shared machine: torch's OpenMP team
waits at a barrier after every operator, so when the cores are oversubscribed one descheduled
thread stalls the others, and 1 thread can beat all of them by 3-5x (measured on the busy 2-core
machine, 2026-11-22), while XLA's work-stealing pool degrades gracefully.

On a GPU the torch peer runs there too (``--torch-device auto``: CUDA tensors, cuDNN autotuned,
every batch synchronised), so the ratio compares XLA with cuDNN eager on the same device.

Run:  python benchmarks/backbones.py [--batch 8] [--sizes 224 512] [--seconds 4] [--json out]
      XLA_FLAGS=... python benchmarks/backbones.py   # to try XLA CPU flags
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import harness
from retrieval_jax import models
from retrieval_jax.models.efficientnet_lite import efficientnet_lite_stages

MODELS = ("resnet50", "efficientnet_lite0")
TORCH_MODES = ("NCHW", "channels_last")
QUICK = ["--batch", "2", "--seconds", "0", "--repeats", "3", "--torch-threads", "0", "1"]
FULL = ["--batch", "16", "--seconds", "10", "--bfloat16"]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
  parser.add_argument("--seconds", type=float, default=4.0, help="timing time per case")
  parser.add_argument("--repeats", type=int, default=3, help="at least this many timed batches")
  parser.add_argument("--bfloat16", action="store_true", help="also time bfloat16 compute")
  parser.add_argument("--torch-threads", type=int, nargs="+", default=[0],
                      help="torch thread counts to time (0: every core, as XLA uses)")
  parser.add_argument("--torch-device", default="auto", choices=("auto", "cpu", "cuda"),
                      help="where torch runs (auto: cuda when jax runs on a GPU and torch sees "
                           "one, so both frameworks use the same device)")
  parser.add_argument("--json", help="also write the results to this file")
  return parser


def _ours(name: str, x: np.ndarray, dtype):
  """``() -> None``: one blocking batch of our jitted backbone + GeM + L2."""
  backbone = models.build_backbone(name, dtype=dtype)
  head = models.GlobalPoolHead("gem")
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(backbone.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  variables = jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape).astype(np.float32)), shapes)
  if "batch_stats" in variables:  # positive variances keep the activations finite
    variables["batch_stats"] = jax.tree_util.tree_map(jnp.abs, variables["batch_stats"])
  feature = jax.eval_shape(backbone.apply, variables, jnp.zeros((1, 64, 64, 3)))
  head_vars = head.init(jax.random.PRNGKey(1), jnp.zeros(feature.shape, jnp.float32))

  @jax.jit
  def describe(images):
    return head.apply(head_vars, backbone.apply(variables, images))

  xs = jnp.asarray(x)
  return lambda: describe(xs).block_until_ready()


def _torch_lite0(torch):
  """EfficientNet-Lite0 features (stem, 16 MBConv blocks, 1x1 head to 1280) in ``torch.nn``."""
  nn = torch.nn

  def conv_bn(cin, cout, k, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout, eps=1e-3)]
    return layers + [nn.ReLU6(inplace=True)] if act else layers

  class MBConv(nn.Module):
    def __init__(self, cin, cout, k, stride, expand):
      super().__init__()
      hidden = cin * expand
      layers = conv_bn(cin, hidden, 1) if expand != 1 else []
      layers += conv_bn(hidden, hidden, k, stride, groups=hidden)
      layers += conv_bn(hidden, cout, 1, act=False)
      self.body = nn.Sequential(*layers)
      self.residual = stride == 1 and cin == cout

    def forward(self, x):
      y = self.body(x)
      return x + y if self.residual else y

  layers, cin = conv_bn(3, 32, 3, 2), 32
  for spec in efficientnet_lite_stages(0):
    for b in range(spec.repeats):
      layers.append(MBConv(cin, spec.channels, spec.kernel, spec.stride if b == 0 else 1,
                           spec.expand))
      cin = spec.channels
  layers += conv_bn(cin, 1280, 1)
  return nn.Sequential(*layers)


def _torch_device(torch, choice: str) -> str:
  if choice != "auto":
    return choice
  return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def _torch_cases(torch, name: str, x: np.ndarray, threads: list[int], device: str) -> dict:
  """``{label: () -> None}``: one batch of the torch network + GeM + L2 in each layout, with
  each thread count on a CPU (the label says which: ``NCHW``, ``channels_last, 1 thread``, ...);
  on ``cuda`` one case per layout, cuDNN autotuned, each batch synchronised."""
  import torch.nn.functional as F

  if name == "resnet50":
    import torchvision
    model = torchvision.models.resnet50(weights=None)
    trunk = torch.nn.Sequential(*list(model.children())[:-2])  # up to layer4: the last conv map
  else:
    trunk = _torch_lite0(torch)
  trunk = trunk.eval().to(device)
  all_cores = os.cpu_count() or 1

  def describe(net, images, n_threads):
    torch.set_num_threads(n_threads)
    with torch.inference_mode():
      maps = net(images)
      gem = maps.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1.0 / 3)
      out = F.normalize(gem, dim=1, eps=1e-6)
    if device == "cuda":  # kernels run asynchronously: time the finished batch, as jax's block
      torch.cuda.synchronize()
    return out

  nchw = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device)
  trunk_cl = _copy(trunk).to(memory_format=torch.channels_last)
  cl = nchw.contiguous(memory_format=torch.channels_last)
  if device == "cuda":
    torch.backends.cudnn.benchmark = True
    return {"cuda NCHW": lambda: describe(trunk, nchw, all_cores),
            "cuda channels_last": lambda: describe(trunk_cl, cl, all_cores)}
  cases = {}
  for t in threads:
    n = t or all_cores
    suffix = "" if n == all_cores else f", {n} thread{'s' if n > 1 else ''}"
    cases[f"NCHW{suffix}"] = lambda n=n: describe(trunk, nchw, n)
    cases[f"channels_last{suffix}"] = lambda n=n: describe(trunk_cl, cl, n)
  return cases


def _copy(module):
  import copy
  return copy.deepcopy(module)


def _peer_name(name: str) -> str:
  return "torchvision" if name == "resnet50" else "torch.nn"


def run(args: argparse.Namespace) -> list[dict]:
  torch = harness.optional_import("torch")
  torchvision = harness.optional_import("torchvision") if torch is not None else None
  rows = []
  for size in args.sizes:
    x = np.random.default_rng(0).normal(size=(args.batch, size, size, 3)).astype(np.float32)
    for name in args.models:
      cases = {"ours": _ours(name, x, jnp.float32)}
      if args.bfloat16:
        cases["ours bfloat16"] = _ours(name, x, jnp.bfloat16)
      missing = None
      if torch is None:
        missing = harness.missing("torch")
      elif name == "resnet50" and torchvision is None:
        missing = harness.missing("torchvision")
      else:
        modes = _torch_cases(torch, name, x, args.torch_threads,
                             _torch_device(torch, args.torch_device))
        cases.update({f"torch {mode}": fn for mode, fn in modes.items()})
      print(f"  {name} {size} px: timing {', '.join(cases)}", flush=True)
      times = harness.round_robin(cases, repeats=args.repeats, seconds=args.seconds)
      rate = {k: args.batch / harness.median(t) for k, t in times.items()}
      label = f"{name} GeM {size}px b{args.batch}"
      peer = _peer_name(name)
      if missing:
        rows += [harness.skipped(f"{label}: ours vs {peer} {mode}", missing, model=name, px=size)
                 for mode in TORCH_MODES]
      for key in (k for k in rate if k.startswith("torch ")):
        mode = key[len("torch "):]
        ratio = rate["ours"] / rate[key]
        rows.append(harness.row(
            f"{label}: ours vs {peer} {mode}", ratio, "img/s ours / torch eager", rate["ours"],
            "img/s", detail=f"torch {rate[key]:.3g} img/s", peer_ratio=ratio, model=name,
            px=size, implementation=f"{peer} {mode}", peer_key=key,
            images_per_second=dict(rate)))
      if args.bfloat16:
        best = max((v for k, v in rate.items() if k.startswith("torch")), default=None)
        rows.append(harness.row(
            f"{label}: ours bfloat16", rate["ours bfloat16"] / rate["ours"],
            "img/s bfloat16 / float32", rate["ours bfloat16"], "img/s",
            detail=f"{rate['ours bfloat16'] / best:.2f}x best torch" if best else "",
            model=name, px=size, implementation="ours bfloat16",
            images_per_second=dict(rate)))
  return rows


def print_report(rows: list[dict], args: argparse.Namespace) -> None:
  print(f"backend {jax.default_backend()}, {os.cpu_count()} CPU threads, batch {args.batch}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; GeM descriptors")
  print(f"{'model':<20} {'px':>4} {'peer':<34} {'ours img/s':>10} {'peer img/s':>10} "
        f"{'ours / peer':>11}")
  for r in rows:
    if r.get("skipped"):
      print(f"{r['model']:<20} {r['px']:>4} skipped: {r['skipped']}")
      continue
    impl = r["implementation"]
    peer = r["images_per_second"].get(r.get("peer_key", ""))
    peer_text = f"{peer:>10.2f}" if peer else f"{'':>10}"
    print(f"{r['model']:<20} {r['px']:>4} {impl:<34} {r['value']:>10.2f} {peer_text} "
          f"{r['ratio']:>10.2f}x")


def main(argv: list[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  rows = run(args)
  print_report(rows, args)
  harness.finish("backbones", rows, args)


if __name__ == "__main__":
  main(sys.argv[1:])
