"""Input pipeline throughput: images per second of the threaded loader, 1 vs 2 worker threads.

Writes ``--count`` JPEG photos of ``--width x --height`` pixels to a temporary directory, then
times a full pass of :class:`retrieval_jax.data.loader.BatchLoader` over them (decode, resize to a
long side of ``--max-size``, bucket, pad into ``uint8`` batches) with 1 worker thread (the
baseline), 2 worker threads, and inline in the calling thread. Each case runs ``--repeats``
times, round-robin, and reports its median wall time and how many cores it kept busy. Ratios to
the 1-thread baseline are what to compare across machines; images per second are printed for
context only (they depend on the CPU and the JPEG decoder build).

The synthetic benchmark's generation speed (single-threaded numpy, the `small` preset's test
database stream) is timed in the same loop, as images per second against the same baseline.

Run:  python benchmarks/data.py [--count 200] [--max-size 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import PIL
from PIL import Image

import harness
from retrieval_jax.data.loader import BatchLoader

BASELINE = "1 worker thread (baseline)"
QUICK = ["--count", "48", "--repeats", "3"]
FULL = ["--count", "400", "--repeats", "5"]


def write_photos(directory: pathlib.Path, count: int, height: int, width: int,
                 seed: int = 0) -> list[pathlib.Path]:
  """JPEG files (quality 90) with photo-like content: smooth gradients, edges and mild noise,
  so they compress and decode like photos rather than like white noise."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  paths = []
  for k in range(count):
    phase = rng.uniform(0, 2 * np.pi, 3)
    freq = rng.uniform(0.002, 0.02, 3)
    channels = [127 + 100 * np.sin(freq[c] * (x + (c + 1) * y) + phase[c]) for c in range(3)]
    pixels = np.stack(channels, -1) + rng.normal(0, 6, (height, width, 3))
    box = rng.integers(0, [height // 2, width // 2], 2)  # a hard-edged block
    pixels[box[0]:box[0] + height // 4, box[1]:box[1] + width // 4] = rng.uniform(0, 255, 3)
    path = directory / f"photo{k:04d}.jpg"
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    paths.append(path)
  return paths


def loader_case(paths: list[pathlib.Path], num_workers: int, args) -> Callable[[], int]:
  """One full pass of the loader; returns the number of images it delivered."""

  def run() -> int:
    loader = BatchLoader(paths, batch_size=args.batch, step=args.step, max_size=args.max_size,
                         num_workers=num_workers)
    return sum(len(batch.indices) for batch in loader)

  return run


def synthetic_case(args) -> Callable[[], int]:
  """Generation of ``args.count`` synthetic-benchmark photos (database stream of a preset's test
  split, long side ``--synthetic-size``), single-threaded numpy, as the TFDS builder does."""
  from retrieval_jax.data import synthetic

  def run() -> int:
    photos = synthetic.iter_database("small", seed=0, image_size=args.synthetic_size)
    return sum(1 for _, _ in zip(range(args.count), photos))

  return run


def extra_cases(args) -> dict[str, Callable[[], int]]:
  """More timed cases, each ``() -> number of images produced``, timed round-robin with the
  loader cases and reported against the same baseline."""
  return {f"synthetic generation ({args.synthetic_size} px)": synthetic_case(args)}


def run(args: argparse.Namespace) -> list[dict]:
  with tempfile.TemporaryDirectory(prefix="retrieval_jax_bench_") as tmp:
    paths = write_photos(pathlib.Path(tmp), args.count, args.height, args.width)
    args.megabytes = sum(p.stat().st_size for p in paths) / 1e6
    cases = {
        BASELINE: loader_case(paths, 1, args),
        "2 worker threads": loader_case(paths, 2, args),
        "inline (no threads)": loader_case(paths, 0, args),
        **extra_cases(args),
    }
    counts = {name: fn() for name, fn in cases.items()}  # warm up (file cache, imports)
    wall: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    # Round-robin, so machine drift hits every case alike; CPU time counts all threads.
    for _ in range(args.repeats):
      for name, fn in cases.items():
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall[name].append(time.perf_counter() - start)
        cpu[name].append(time.process_time() - start_cpu)
  seconds = {name: harness.median(t) for name, t in wall.items()}
  base = seconds[BASELINE] / counts[BASELINE]
  rows = []
  for name, t in seconds.items():
    per_image = t / counts[name]
    # Cores busy = CPU time / wall time: above 1 the threads really ran at once (decoding and
    # resizing release the GIL); on a shared machine it also shows how much CPU there was.
    busy = harness.median(cpu[name]) / t
    size = (f"{args.width}x{args.height} JPEG -> {args.max_size}"
            if not name.startswith("synthetic") else f"{args.synthetic_size} px")
    rows.append(harness.row(f"{name}, {size}", base / per_image, "img/s / 1 loader thread",
                            1 / per_image, "img/s", detail=f"{busy:.2f} cores busy",
                            name=name, seconds=t, images=counts[name], cores_busy=busy))
  return rows


def print_report(rows: list[dict], args: argparse.Namespace) -> None:
  print(f"{args.count} JPEGs {args.width}x{args.height} ({args.megabytes:.1f} MB) -> long side "
        f"{args.max_size}, buckets of {args.step} px, batch {args.batch}; {os.cpu_count()} CPUs; "
        f"Pillow {PIL.__version__}; median of {args.repeats} passes")
  print(f"{'case':<30} {'images/s':>9} {'speed-up vs 1 thread':>21} {'cores busy':>11}")
  for r in rows:
    print(f"{r['name']:<30} {r['value']:>9.1f} {r['ratio']:>21.2f} {r['cores_busy']:>11.2f}")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--count", type=int, default=200, help="number of JPEG files")
  parser.add_argument("--height", type=int, default=768)
  parser.add_argument("--width", type=int, default=1024)
  parser.add_argument("--max-size", type=int, default=512, help="long side after resizing")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--step", type=int, default=128, help="bucket step in pixels")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--synthetic-size", type=int, default=256,
                      help="long side of the generated synthetic photos")
  parser.add_argument("--json", help="also write the results to this file")
  return parser


def main(argv: list[str] | None = None) -> None:
  args = build_parser().parse_args(argv)
  rows = run(args)
  print_report(rows, args)
  harness.finish("data", rows, args)


if __name__ == "__main__":
  main(sys.argv[1:])
