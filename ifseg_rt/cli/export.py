"""Command line of the exporter: ``python -m ifseg_rt.export SOURCE --out DIR [options]``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..export.exporter import MAX_OPSET, MIN_OPSET, export, resolve_format, validate_args
from ..export.precision import BF16_ENGINES, PrecisionGateError
from ..knn.settings import KnnSettings
from ..runtime.model_dir import MANIFEST, PRECISIONS
from ..runtime.preprocess import ImagePolicy
from ..serve.repository import RepositoryError, export_repository
from .args import (HelpFormatter, examples, image_size, model_name, non_negative_int, positive_int,
                   positive_thread_count)


def _precisions(s: str):
    items = [t.strip() for t in s.split(",") if t.strip()]
    bad = [t for t in items if t not in PRECISIONS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"expected precisions from {', '.join(PRECISIONS)}, got {s!r}")
    return items


def _format(s: str) -> str:
    try:
        return resolve_format(s)["arg"]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ifseg_rt.export", formatter_class=HelpFormatter,
        description="Export an adaptation run directory or a checkpoint to a self-describing model directory "
                    "(ifseg.json + model.onnx + the runtime's split graph [+ model.safetensors] [+ int8 / bf16 "
                    "variants] [+ TensorRT engines]), or a Triton model repository.",
        epilog=examples("python -m ifseg_rt.export runs/street --out models/street",
                        "python -m ifseg_rt.export runs/street --out models/street-int8 --precision int8 "
                        "--calibration val/images",
                        'python -m ifseg_rt.export ofa_base.pt --categories "sky, road" --bpe-dir ofa-bpe '
                        "--out models/zero-shot",
                        "python -m ifseg_rt.export models/street --format triton --out triton-repo",
                        "python -m ifseg_rt.export runs/street --out models/street --format engine     # on a GPU"))
    p.add_argument("source", help="adaptation run directory (model.safetensors + run.json) or checkpoint file "
                                  "(.safetensors, fairseq .pt, HF pytorch_model.bin)")
    p.add_argument("--out", required=True, help="model directory to create")
    p.add_argument("--format", type=_format, default="onnx",
                   help="onnx, or engine (aliases trt, tensorrt: builds a TensorRT engine from the ONNX; needs a GPU), "
                        "or triton (a Triton model repository at --out; SOURCE may be an exported model directory)")
    p.add_argument("--overwrite", "--force", dest="force", action="store_true",
                   help="replace an existing model directory (as a whole, once the new one is complete)")
    p.add_argument("--threads", type=positive_thread_count, default=None,
                   help="CPU threads of the export's PyTorch and onnxruntime work (default: the available cores)")
    g = p.add_argument_group("categories (un-adapted checkpoints only)")
    g.add_argument("--categories", help="comma-separated category names; required for an un-adapted OFA checkpoint "
                                        "(the zero-shot baseline), checked against an adapted model's own list")
    g.add_argument("--bpe-dir", help="OFA BPE directory (encoder.json, vocab.bpe, dict.txt) to tokenise the prompt")
    g.add_argument("--prompt-prefix", help="task text of the prompt (default: IFSeg's)")
    g = p.add_argument_group("image policy and post-processing (written to ifseg.json)")
    g.add_argument("--short-side", type=positive_int, default=None,
                   help="paper policy: resize the short side to this (default: the run's own policy from its "
                        "run.json, else 512)")
    g.add_argument("--max-long-side", type=positive_int, default=None,
                   help="paper policy: cap for the long side (default: the run's, else 2048)")
    g.add_argument("--image-size", type=image_size, help="fixed network input HxW instead of the paper policy")
    g.add_argument("--knn-k", type=positive_int, default=None,
                   help="kNN neighbours, the cell itself included (default: the source's setting, else 3)")
    g.add_argument("--knn-iters", type=non_negative_int, default=None,
                   help="kNN averaging iterations (default: the source's setting, else 25)")
    g.add_argument("--temperature", type=float, default=None,
                   help="softmax temperature before kNN averaging (default: the source's setting, else 1.0)")
    g.add_argument("--no-knn", action="store_true", help="disable kNN post-processing (plain logits arg-max)")
    g = p.add_argument_group("ONNX")
    g.add_argument("--opset", type=int, default=18,
                   help=f"ONNX opset (>= {MIN_OPSET} for LayerNormalization; <= {MAX_OPSET}, the torch exporter's "
                        "highest)")
    g.add_argument("--static-shape", type=image_size, help="export a fixed HxW graph (positions constant-folded); "
                                                  "sets a fixed image policy of that size")
    g.add_argument("--normalize-features", action="store_true",
                   help="L2-normalise the features output in the graph (kept fp32 in TensorRT)")
    g.add_argument("--no-weights", action="store_true",
                   help="do not write model.safetensors (the torch backend then cannot load the directory)")
    g.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch parity check")
    g.add_argument("--no-split", action="store_true",
                   help="do not write the runtime's split graph (tables.onnx + body.onnx; recomputing the position "
                        "tables every call is slower)")
    g = p.add_argument_group("precision")
    g.add_argument("--precision", type=_precisions, default=None,
                   help="ONNX: CPU precision(s) to offer besides fp32, comma-separated, the first being the runtime's "
                        "default: int8 (onnxruntime, int8 MatMul weights), bf16 (OpenVINO or torch, --bf16-backend); "
                        "fp32 only when omitted. "
                        "engine: the TensorRT precision fp32, fp16 or bf16, fp16 when omitted (norms, softmax and the "
                        "L2 norm stay fp32)")
    g.add_argument("--calibration", help="folder of images for the low-precision accuracy gate (default: 8 synthetic "
                                         "scenes; real images of your domain are better)")
    g.add_argument("--min-agreement", type=float, default=0.99,
                   help="the gate: fraction of pixels whose label must equal fp32's")
    g.add_argument("--bf16-backend", choices=BF16_ENGINES, default="auto",
                   help="the engine of --precision bf16: openvino (the split graph in bfloat16: AMX / AVX512-BF16), "
                        "torch (the weights); auto: openvino when installed")
    g = p.add_argument_group("TensorRT (--format engine)")
    g.add_argument("--workspace-gb", type=float, help="builder workspace limit in GiB (default 8)")
    g.add_argument("--min-shape", help="profile minimum BxHxW (default 1x16x16). Without any of the three shapes "
                                       "the engine gets two profiles covering the paper policy: up to 4x512x2048 "
                                       "and up to 4x2048x512")
    g.add_argument("--opt-shape", help="profile optimum BxHxW (default 1x512x688)")
    g.add_argument("--max-shape", help="profile maximum BxHxW (default 4x512x2048; TensorRT caps a tensor at 2^31 "
                                       "elements, checked before the build)")
    g.add_argument("--timing-cache", help="timing cache file to load and update (default DIR/engines/timing.cache)")
    g = p.add_argument_group("Triton model repository (--format triton; needs the [serve] extra)")
    g.add_argument("--model-name", type=model_name,
                   help="the ensemble's model name (default ifseg; its steps: NAME_pre, NAME_onnx, NAME_post)")
    g.add_argument("--max-batch-size", type=positive_int, help="max_batch_size of every model (default 8)")
    g.add_argument("--instances", type=positive_int,
                   help="instances of each model (default 1; of the ONNX model per GPU with --instance-kind gpu)")
    g.add_argument("--instance-kind", choices=("gpu", "cpu"), help="where the ONNX model runs (default gpu)")
    g.add_argument("--tensorrt", action="store_const", const=True, default=None,
                   help="onnxruntime's TensorRT accelerator on the GPU instances (engine cache; unverified here)")
    g.add_argument("--trt-precision", choices=("fp16", "fp32"), help="the accelerator's precision (default fp16)")
    g.add_argument("--trt-cache", help="TensorRT engine cache directory on the Triton host "
                                       "(default /tmp/ifseg_trt_cache/NAME)")
    g.add_argument("--onnx-stand-in", action="store_const", const=True, default=None,
                   help="run the ONNX step with onnxruntime in a python-backend model: a STAND-IN for a Triton "
                        "without the onnxruntime backend, such as the one nvidia-pytriton bundles")
    return p


_TRITON_ARGS = {"model_name": "name", "max_batch_size": "max_batch_size", "instances": "instances",
                "instance_kind": "instance_kind", "tensorrt": "tensorrt", "trt_precision": "precision",
                "trt_cache": "trt_cache", "onnx_stand_in": "onnx_stand_in"}  # flag -> export_repository keyword


def _triton_repository(args, model_dir) -> int:
    """--format triton: the repository for an exported model directory (ifseg_rt.serve.repository)."""
    opts = {kw: getattr(args, flag) for flag, kw in _TRITON_ARGS.items() if getattr(args, flag) is not None}
    try:
        repo = export_repository(model_dir, args.out, force=args.force, **opts)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError, RepositoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote the Triton model repository {repo} ({', '.join(sorted(p.name for p in repo.iterdir()))}); every "
          f"config.pbtxt checked against Triton's schema")
    print("serve it with Triton (ifseg_rt installed in the python backend's environment):\n  tritonserver "
          f"--model-repository {shlex.quote(str(Path(repo).resolve()))}\nthen: "
          f"Client('localhost:8000', model='{opts.get('name', 'ifseg')}').seg('image.jpg')  (ifseg_rt.serve)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    import warnings

    # a user-facing tool: warnings as one line each ("warning: ..."), not with the source line that raised them
    saved = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *_a, **_k: f"warning: {message}\n"
    try:
        return _run(argv)
    finally:
        warnings.formatwarning = saved


def _run(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fmt = resolve_format(args.format)
    try:
        validate_args(fmt, {"workspace_gb": args.workspace_gb, "calibration": args.calibration,
                            "min_shape": args.min_shape, "opt_shape": args.opt_shape, "max_shape": args.max_shape,
                            "timing_cache": args.timing_cache,
                            **{flag: getattr(args, flag) for flag in _TRITON_ARGS}})
    except ValueError as e:
        parser.error(str(e))
    triton_work = None
    if fmt["arg"] == "triton":
        out = Path(args.out)
        if out.exists() and any(out.iterdir()) and not args.force:
            parser.error(f"--out {out} is not empty; pass --overwrite to replace its models")
        if (Path(args.source) / MANIFEST).is_file():  # an exported model directory: no model export needed
            defaults = vars(parser.parse_args([args.source, "--out", args.out, "--format", "triton"]))
            extra = sorted(k for k, v in vars(args).items() if v != defaults[k] and k not in _TRITON_ARGS
                           and k != "force")
            if extra:
                flags = ", ".join("--" + k.replace("_", "-") for k in extra)
                parser.error(f"{args.source} is an exported model directory; {flags} applies only when exporting a "
                             f"run directory or checkpoint")
            return _triton_repository(args, Path(args.source))
        if args.precision is not None:
            parser.error("--precision does not apply to --format triton: the repository runs model.onnx in fp32 "
                         "(--tensorrt --trt-precision fp16 on GPU instances)")
        # export the model directory into a temporary directory first, then build the repository from it
        triton_work = tempfile.TemporaryDirectory(prefix="ifseg_triton_export_")
        fmt, args.repository = resolve_format("onnx"), args.out
        args.out = str(Path(triton_work.name) / "model")
    precision = args.precision
    if fmt["arg"] == "engine":
        if precision is not None and (len(precision) != 1 or precision[0] not in ("fp32", "fp16", "bf16")):
            parser.error("--format engine takes one --precision of fp32, fp16, bf16")
        precision = precision[0] if precision else None
    elif precision is not None and "fp16" in precision:
        parser.error("fp16 is a GPU precision (--format engine); the CPU engines offer fp32, int8, bf16")
    if not 0.0 <= args.min_agreement <= 1.0:
        parser.error(f"--min-agreement must be a fraction in [0, 1], got {args.min_agreement}")
    if args.image_size and args.static_shape and args.image_size != args.static_shape:
        parser.error("--image-size and --static-shape disagree; --static-shape alone fixes the image size")
    fixed = "--image-size" if args.image_size else "--static-shape" if args.static_shape else None
    paper = ("--short-side" if args.short_side is not None else
             "--max-long-side" if args.max_long_side is not None else None)
    if fixed and paper:
        parser.error(f"{paper} and {fixed} contradict each other: {fixed} fixes the network input size, {paper} "
                     f"sets the paper policy's resize; pass one of them")
    knn = {"k": args.knn_k, "iters": args.knn_iters, "temperature": args.temperature,
           "enabled": False if args.no_knn else None}
    try:
        KnnSettings().replace(**knn)  # bounds, before minutes of export work
    except ValueError as e:
        parser.error(str(e))
    if args.opset < MIN_OPSET:
        parser.error(f"--opset must be >= {MIN_OPSET} (LayerNormalization), got {args.opset}")
    if args.opset > MAX_OPSET:
        parser.error(f"--opset must be <= {MAX_OPSET}, the highest the torch {torch.__version__} ONNX exporter "
                     f"supports, got {args.opset}")
    if args.image_size:
        try:
            policy = ImagePolicy(mode="fixed", size=args.image_size)
        except ValueError as e:
            parser.error(str(e))
    elif args.static_shape:
        policy = None
    elif args.short_side is None and args.max_long_side is None:
        policy = None  # the run's own (run.json), else the paper's
    else:
        d = ImagePolicy()
        short = args.short_side or d.short_side
        try:
            policy = ImagePolicy(short_side=short, max_long_side=args.max_long_side or max(d.max_long_side, short))
        except ValueError as e:
            parser.error(str(e))
    try:
        spec = export(args.source, args.out, format=fmt["arg"], categories=args.categories, bpe_dir=args.bpe_dir,
                      prompt_prefix=args.prompt_prefix, image_policy=policy, knn=knn,
                      save_weights=not args.no_weights, force=args.force, opset=args.opset,
                      static_shape=args.static_shape,
                      normalize_features=args.normalize_features, check=not args.no_check,
                      precision=precision, calibration=args.calibration, min_agreement=args.min_agreement,
                      split=not args.no_split, bf16_backend=args.bf16_backend, workspace_gb=args.workspace_gb,
                      min_shape=args.min_shape, opt_shape=args.opt_shape, max_shape=args.max_shape,
                      timing_cache=args.timing_cache,
                      log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except PrecisionGateError as e:  # the work ran: the fp32 directory is there, the variant was refused
        print(f"error: {e}\nthe fp32 model directory was written to {args.out}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the work ran and failed (parity check, TensorRT build)
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if triton_work is not None and not Path(args.out).is_dir():
            triton_work.cleanup()  # a failed export leaves no temporary folder behind
    if triton_work is not None:
        args.out = args.repository
        with triton_work:
            return _triton_repository(args, spec.root)
    ver = spec.provenance.get("verification") or {}
    err = ver.get("max_abs_error")
    print(f"exported {spec.num_categories} categories to {spec.root} "
          f"({', '.join(sorted(spec.files))}; opset {spec.opset}, "
          f"{'static ' + 'x'.join(map(str, spec.static_shape)) if spec.static_shape else 'dynamic B/H/W'})")
    if err:
        print(f"onnxruntime vs PyTorch: max |logits| error {err['logits']:.2e}, |features| {err['features']:.2e} "
              f"at {ver['shapes']} (BxHxW)")
    records = json.loads((spec.root / MANIFEST).read_text(encoding="utf-8")).get("precisions", {})
    for name, rec in spec.precisions.items():
        if rec.agreement:
            a = rec.agreement
            record = records.get(name, {})
            kept = record.get("fp32_matmuls")
            if "resnet" in record:
                print(f"{name}: the ResNet runs in {record['resnet']}"
                      + (" (static: calibrated activation ranges)" if record["resnet"] == "int8" else
                         " (int8 missed the gate)" if len(record.get("search", ())) > 1 else ""))
            if kept:
                print(f"{name}: the {len(kept)} most sensitive MatMuls stay fp32 "
                      f"({record.get('int8_matmuls')} run in int8): {', '.join(kept[:4])}"
                      + (", ..." if len(kept) > 4 else ""))
            print(f"{name} ({rec.backend}): labels equal fp32's on {100 * a['pixels']:.2f} % of the pixels of "
                  f"{a.get('images')} calibration image(s) ({a.get('calibration', '')}; worst image "
                  f"{100 * a.get('worst_image', a['pixels']):.2f} %), gate {100 * args.min_agreement:.2f} %"
                  + ("; the runtime's default" if name == spec.precision else ""))
    print("segment images with:\n  " + " ".join(
        ["python", "-m", "ifseg_rt", "segment", "--model", shlex.quote(str(spec.root)), "IMAGES...", "--out",
         "OUT_DIR", "--overlay"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
