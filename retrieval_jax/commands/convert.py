"""``retrieval-jax convert``: PyTorch / Keras weights -> a saved Retriever (or a variables dir).

    retrieval-jax convert resnet50-0676ba61.pth --format torchvision --backbone resnet50 \\
        --pooling gem --out models/resnet50-gem
    retrieval-jax convert vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 --format keras \\
        --backbone vgg16 --pooling rmac --out models/vgg16-rmac
    retrieval-jax convert lite0.pth --format efficientnet-pytorch --backbone efficientnet-lite0 \\
        --variables-only --out models/lite0-variables

Formats: ``torchvision`` (ResNet, ResNeXt, VGG, AlexNet state dicts; read without torch and
without executing the pickle), ``keras`` (HDF5 of VGG16 and ResNet50/101/152V2; needs h5py),
``efficientnet-pytorch`` (EfficientNet-Lite0..4 in the efficientnet_pytorch layout). The output
is a Retriever directory (``Retriever.load``, ``--retriever`` of the other commands) with the
converted backbone and a fresh head (``--pooling``), or with ``--variables-only`` the backbone
variables alone (``models.load_variables``). Keras VGG16 weights get ``caffe`` preprocessing.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

from retrieval_jax.commands import _common

NAME = "convert"
FORMATS = ("torchvision", "keras", "efficientnet-pytorch")


def build_parser() -> argparse.ArgumentParser:
  parser = _common.make_parser(NAME, __doc__)
  parser.add_argument("file", metavar="FILE", help="the weights file (.pth / .h5)")
  parser.add_argument("--format", required=True, choices=FORMATS, help="the file's layout")
  parser.add_argument("--backbone", required=True, metavar="NAME",
                      help="architecture of the weights, e.g. resnet50, vgg16, "
                           "efficientnet-lite0")
  parser.add_argument("--pooling", default="gem",
                      help="head: gem (default), mac, spoc, rmac, rgac, darac, remap")
  parser.add_argument("--max-size", type=_common.positive_int, metavar="PX",
                      help="the Retriever's default long side for extraction (default 1024)")
  parser.add_argument("--preprocessing",
                      choices=("torchvision", "efficientnet_lite", "caffe", "inception"),
                      help="input normalisation (default: the format's: torchvision, caffe for "
                           "Keras VGG16, inception for Keras ResNet v2, efficientnet_lite)")
  parser.add_argument("--variables-only", action="store_true",
                      help="save only the backbone variables (models.save_variables)")
  parser.add_argument("--out", required=True, metavar="DIR", help="directory to create")
  return parser


def convert_file(path: str, fmt: str, backbone: str) -> dict[str, Any]:
  """The backbone variables of a weights file (``retrieval_jax.models.convert``)."""
  from retrieval_jax.models import convert  # noqa: PLC0415

  converters = {"torchvision": convert.from_torchvision, "keras": convert.from_keras_h5,
                "efficientnet-pytorch": convert.from_efficientnet_pytorch}
  try:
    return converters[fmt](path, backbone)
  except ImportError as err:
    raise _common.CommandError(f"--format {fmt} needs the missing package {err.name!r} "
                               f"(pip install {err.name}).") from None


def build_retriever(variables: dict[str, Any], backbone: str, pooling: str,
                    preprocessing: str | None, max_size: int | None):
  """A Retriever with converted backbone ``variables`` and a freshly initialised head."""

  from retrieval_jax import retriever as retriever_lib  # noqa: PLC0415

  cfg = retriever_lib.default_config()
  cfg.update({"backbone": backbone, "pretrained": False, "pooling": pooling,
              "preprocessing": preprocessing})
  if max_size is not None:
    cfg.max_size = max_size
  if pooling not in retriever_lib.POOLINGS:
    raise _common.CommandError(f"--pooling must be one of {', '.join(retriever_lib.POOLINGS)}; "
                               f"got {pooling!r}.")
  return retriever_lib.Retriever.from_backbone_variables(cfg, variables)


def _run(args: argparse.Namespace) -> int:
  from retrieval_jax.models import BACKBONES  # noqa: PLC0415

  source = pathlib.Path(args.file)
  if not source.is_file():
    raise _common.CommandError(f"{source}: no such file.")
  out = pathlib.Path(args.out)
  if out.exists():
    raise _common.CommandError(f"--out {out}: already exists; choose a new directory.")
  backbone = args.backbone.replace("-", "_")
  if backbone not in BACKBONES:
    raise _common.CommandError(f"unknown --backbone {args.backbone!r}; available: "
                               f"{', '.join(sorted(BACKBONES))}.")
  variables = convert_file(str(source), args.format, backbone)
  if args.variables_only:
    from retrieval_jax.models import save_variables  # noqa: PLC0415

    save_variables(out, variables)
    print(f"converted {source} ({args.format}, {backbone}) -> variables {out}")
    return 0
  preprocessing = args.preprocessing
  if preprocessing is None and args.format == "keras" and backbone == "vgg16":
    preprocessing = "caffe"  # Keras VGG16 weights expect BGR mean subtraction
  retriever = build_retriever(variables, backbone, args.pooling, preprocessing, args.max_size)
  retriever.save(out)
  print(f"converted {source} ({args.format}, {backbone}) -> Retriever {out} (pooling "
        f"{args.pooling}, preprocessing {retriever.preprocessing})")
  return 0


def main(argv: list[str] | None = None) -> int:
  """Runs ``retrieval-jax convert``; returns the exit status."""
  return _common.run(NAME, build_parser, _run, argv)


if __name__ == "__main__":
  sys.exit(main())
