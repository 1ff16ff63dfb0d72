"""Last-conv feature extraction throughput: our jitted Flax backbones vs torchvision eager.

For ResNet-50 and EfficientNet-Lite0 at 224 and 512 px, prints images/second of the last conv
map under ``jax.jit`` (float32, batch ``--batch``) and, when torch and torchvision are
installed, torchvision's ResNet-50 in the same process in its default NCHW layout and in
channels_last, with the ratio ours / torch's best mode. torchvision has no EfficientNet-Lite,
so Lite0 is reported against our own ResNet-50 only. Weights are random (throughput does not
depend on them). Same threads for both frameworks: XLA's CPU client and ``torch.set_num_threads``
both use every core by default.

Run:  python benchmarks/backbones.py [--batch 8] [--sizes 224 512] [--seconds 4]
      XLA_FLAGS=... python benchmarks/backbones.py   # to try XLA CPU flags
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from retrieval_jax import models


def _images_per_second(run, batch: int, seconds: float) -> float:
  """Runs ``run()`` (one batch, blocking) for about ``seconds``; returns the median rate."""
  run()  # compile / warm up
  rates, start = [], time.perf_counter()
  while time.perf_counter() - start < seconds or len(rates) < 3:
    t = time.perf_counter()
    run()
    rates.append(batch / (time.perf_counter() - t))
  return float(np.median(rates))


def _ours(name: str, x: np.ndarray, dtype, seconds: float) -> float:
  module = models.build_backbone(name, dtype=dtype)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape).astype(np.float32)), shapes)
  if "batch_stats" in variables:  # positive variances keep the activations finite
    variables["batch_stats"] = jax.tree_util.tree_map(jnp.abs, variables["batch_stats"])
  apply = jax.jit(module.apply)
  xs = jnp.asarray(x)
  return _images_per_second(lambda: apply(variables, xs).block_until_ready(), len(x), seconds)


def _torch_resnet50(x: np.ndarray, seconds: float) -> dict[str, float] | None:
  try:
    import torch
    import torchvision
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count() or 1)
  model = torchvision.models.resnet50(weights=None).eval()
  trunk = torch.nn.Sequential(*list(model.children())[:-2])  # up to layer4: the last conv map
  nchw = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  out = {}
  with torch.inference_mode():
    out["torchvision NCHW"] = _images_per_second(lambda: trunk(nchw), len(x), seconds)
    trunk_cl = trunk.to(memory_format=torch.channels_last)
    cl = nchw.contiguous(memory_format=torch.channels_last)
    out["torchvision channels_last"] = _images_per_second(lambda: trunk_cl(cl), len(x), seconds)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
  parser.add_argument("--seconds", type=float, default=4.0, help="timing time per case")
  parser.add_argument("--bfloat16", action="store_true", help="also time bfloat16 compute")
  parser.add_argument("--json", help="also write the results to this file")
  args = parser.parse_args()

  rows = []
  for size in args.sizes:
    x = np.random.default_rng(0).normal(size=(args.batch, size, size, 3)).astype(np.float32)
    ours = _ours("resnet50", x, jnp.float32, args.seconds)
    peers = _torch_resnet50(x, args.seconds)
    best = max(peers.values()) if peers else None
    rows.append(("resnet50", size, "ours (jax.jit, float32)", ours, ours / best if best else None))
    for mode, rate in (peers or {}).items():
      rows.append(("resnet50", size, mode, rate, None))
    if args.bfloat16:
      rate = _ours("resnet50", x, jnp.bfloat16, args.seconds)
      rows.append(("resnet50", size, "ours (jax.jit, bfloat16)", rate,
                   rate / best if best else None))
    lite = _ours("efficientnet_lite0", x, jnp.float32, args.seconds)
    rows.append(("efficientnet_lite0", size, "ours (jax.jit, float32)", lite, None))

  print(f"backend {jax.default_backend()}, {os.cpu_count()} CPU threads, batch {args.batch}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  if not any(r[2].startswith("torchvision") for r in rows):
    print("torch/torchvision not installed: no torchvision comparison "
          "(pip install 'retrieval-jax[torch]')")
  print(f"{'model':<20} {'px':>4} {'implementation':<28} {'img/s':>8} {'ours / best torch':>18}")
  for model, size, impl, rate, ratio in rows:
    ratio_text = f"{ratio:.2f}x" if ratio is not None else ""
    print(f"{model:<20} {size:>4} {impl:<28} {rate:>8.2f} {ratio_text:>18}")
  if args.json:
    report = {"machine": platform.platform(), "jax": jax.__version__,
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "batch": args.batch,
              "rows": [dict(zip(("model", "px", "implementation", "images_per_second",
                                 "ratio_to_best_torch"), r)) for r in rows]}
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  main()
