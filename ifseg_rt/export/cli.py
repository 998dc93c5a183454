"""Command line of the exporter: ``python -m ifseg_rt.export SOURCE --out DIR [options]``."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Optional, Sequence

from .._argtypes import non_negative_int, positive_int
from ..runtime.preprocess import PATCH


def _hw(s: str):
    import re

    parts = [p for p in re.split(r"[x,\s]+", s.strip()) if p]
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 512x512), got {s!r}") from None
    if min(h, w) < PATCH:
        raise argparse.ArgumentTypeError(f"{s!r}: both sides must be >= {PATCH} px (one patch)")
    return h, w


def _format(s: str) -> str:
    from .exporter import resolve_format

    try:
        return resolve_format(s)["arg"]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ifseg_rt.export", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Export an adaptation run directory or a checkpoint to a self-describing model directory "
                    "(ifseg.json + model.onnx [+ model.safetensors] [+ TensorRT engines]).")
    p.add_argument("source", help="adaptation run directory (model.safetensors + run.json) or checkpoint file "
                                  "(.safetensors, fairseq .pt, HF pytorch_model.bin)")
    p.add_argument("--out", required=True, help="model directory to create")
    p.add_argument("--format", type=_format, default="onnx",
                   help="onnx, or engine (aliases trt, tensorrt: builds a TensorRT engine from the ONNX; needs a GPU)")
    p.add_argument("--force", action="store_true", help="overwrite an existing model directory")
    g = p.add_argument_group("categories (un-adapted checkpoints only)")
    g.add_argument("--categories", help="comma-separated category names; required for an un-adapted OFA checkpoint "
                                        "(the zero-shot baseline), checked against an adapted model's own list")
    g.add_argument("--bpe-dir", help="OFA BPE directory (encoder.json, vocab.bpe, dict.txt) to tokenise the prompt")
    g.add_argument("--prompt-prefix", help="task text of the prompt (default: IFSeg's)")
    g = p.add_argument_group("image policy and post-processing (written to ifseg.json)")
    g.add_argument("--short-side", type=positive_int, default=512, help="paper policy: resize the short side to this")
    g.add_argument("--max-long-side", type=positive_int, default=2048, help="paper policy: cap for the long side")
    g.add_argument("--image-size", type=_hw, help="fixed network input HxW instead of the paper policy")
    g.add_argument("--knn-k", type=positive_int, default=None,
                   help="kNN neighbours, the cell itself included (default: the source's setting, else 3)")
    g.add_argument("--knn-iters", type=non_negative_int, default=None,
                   help="kNN averaging iterations (default: the source's setting, else 25)")
    g.add_argument("--temperature", type=float, default=None,
                   help="softmax temperature before kNN averaging (default: the source's setting, else 1.0)")
    g.add_argument("--no-knn", action="store_true", help="disable kNN post-processing (plain logits arg-max)")
    g = p.add_argument_group("ONNX")
    g.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17 for LayerNormalization)")
    g.add_argument("--static-shape", type=_hw, help="export a fixed HxW graph (position tables constant-folded); "
                                                  "sets a fixed image policy of that size")
    g.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                   help="torch.onnx exporter: torch.export-based (default) or the legacy tracer")
    g.add_argument("--normalize-features", action="store_true",
                   help="L2-normalise the features output in the graph (kept fp32 in TensorRT)")
    g.add_argument("--no-weights", action="store_true",
                   help="do not write model.safetensors (the torch backend then cannot load the directory)")
    g.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch parity check")
    g = p.add_argument_group("TensorRT (--format engine)")
    g.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None,
                   help="engine precision (default fp16; norms/softmax/L2 norm stay fp32)")
    g.add_argument("--workspace-gb", type=float, help="builder workspace limit in GiB (default 8)")
    g.add_argument("--min-shape", help="profile minimum BxHxW (default 1x256x256)")
    g.add_argument("--opt-shape", help="profile optimum BxHxW (default 1x512x688)")
    g.add_argument("--max-shape", help="profile maximum BxHxW (default 4x2048x2048)")
    g.add_argument("--timing-cache", help="timing cache file to load and update (default DIR/engines/timing.cache)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..knn.settings import KnnSettings
    from ..runtime.preprocess import ImagePolicy
    from .exporter import export, resolve_format, validate_args

    fmt = resolve_format(args.format)
    try:
        validate_args(fmt, {"precision": args.precision, "workspace_gb": args.workspace_gb,
                            "min_shape": args.min_shape, "opt_shape": args.opt_shape, "max_shape": args.max_shape,
                            "timing_cache": args.timing_cache})
    except ValueError as e:
        parser.error(str(e))
    if args.image_size and args.static_shape and args.image_size != args.static_shape:
        parser.error("--image-size and --static-shape disagree; --static-shape alone fixes the image size")
    knn = {"k": args.knn_k, "iters": args.knn_iters, "temperature": args.temperature,
           "enabled": False if args.no_knn else None}
    try:
        KnnSettings().replace(**knn)  # bounds, before minutes of export work
    except ValueError as e:
        parser.error(str(e))
    if args.opset < 17:
        parser.error(f"--opset must be >= 17 (LayerNormalization), got {args.opset}")
    if args.image_size:
        policy = ImagePolicy(mode="fixed", size=args.image_size)
    elif args.static_shape:
        policy = None
    else:
        try:
            policy = ImagePolicy(short_side=args.short_side, max_long_side=args.max_long_side)
        except ValueError as e:
            parser.error(str(e))
    try:
        spec = export(args.source, args.out, format=fmt["arg"], categories=args.categories, bpe_dir=args.bpe_dir,
                      prompt_prefix=args.prompt_prefix, image_policy=policy, knn=knn,
                      save_weights=not args.no_weights, force=args.force, opset=args.opset,
                      static_shape=args.static_shape, exporter=args.exporter,
                      normalize_features=args.normalize_features, check=not args.no_check,
                      precision=args.precision or "fp16", workspace_gb=args.workspace_gb, min_shape=args.min_shape,
                      opt_shape=args.opt_shape, max_shape=args.max_shape, timing_cache=args.timing_cache)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ver = spec.provenance.get("verification") or {}
    err = ver.get("max_abs_error")
    print(f"exported {spec.num_categories} categories to {spec.root} "
          f"({', '.join(sorted(spec.files))}; opset {spec.opset}, "
          f"{'static ' + 'x'.join(map(str, spec.static_shape)) if spec.static_shape else 'dynamic B/H/W'})")
    if err:
        print(f"onnxruntime vs PyTorch: max |logits| error {err['logits']:.2e}, |features| {err['features']:.2e} "
              f"at {ver['shapes']} (BxHxW)")
    print("segment images with:\n  " + " ".join(
        ["python", "-m", "ifseg_rt", "segment", "--model", shlex.quote(str(spec.root)), "IMAGES...", "--out",
         "OUT_DIR", "--overlay"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
