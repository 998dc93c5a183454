"""GPU check of the runtime on CUDA (step "e2e" of benchmarks/gpu_check.sh): the torch backend and the CUDA
post-processing inside ``Segmenter``, at OFA-base dims (random weights: no checkpoint can be downloaded), M = 15.

* **CUDA post-processing**: a CUDA engine's outputs are torch CUDA tensors, ``ifseg_rt.runtime.postprocess`` keeps
  them there (CUDA kNN, fused resize + arg-max), and the labels equal those of the CPU post-processing of the same
  outputs (numpy, C++ kernels) - through a model directory (torch backend) and through
  ``Segmenter.from_model(model, categories, device="cuda")``;
* **attention without S x S tables** (issue 21) on CUDA: the blocked real-image forward equals the materialised
  formulation (``src_tokens=`` runs it) on a landscape, a portrait and a both-axes-resized grid, and the peak GPU
  memory of one bf16 image at 512 x 512 and at the paper's widest 512 x 2048;
* **torch backend**, fp32 / bf16 / fp16, without and with CUDA graphs: labels equal to fp32's (eager) on >= 99 % of
  the pixels (issue 18's target; random weights have near-ties that real ones do not, so the check that fails the
  step is 90 %, which a broken path misses by far), engine throughput over a batch sweep at 512 x 512 against the
  card's measured bf16 matrix rate through the model's FLOPs (target >= 40 % for bf16 / fp16), and the kNN's share
  of the engine time per image at batch 1 (target <= 3 %).

The model directory is written without ONNX (``model.safetensors`` + ``ifseg.json`` through the model_dir schema's
own ``build_manifest``): an OFA-base ONNX export takes minutes and feeds no check that can run here.

    python3 benchmarks/gpu_e2e_check.py --out benchmarks/results/gpu_check [--dry-run]
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from gpu_common import Report, bf16_matmul_tflops, model_flops, run_main

M = 15  # COCO-Stuff's 15 unseen categories (the paper's headline setting)
AGREE_TARGET, AGREE_CHECK, POST_CHECK = 0.99, 0.90, 0.999
RATE_TARGET, KNN_SHARE_TARGET = 0.40, 0.03


def images(n, size, seed=0):
    """Smooth random RGB images (bilinear up-sampled noise: regions, not per-pixel noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
        out.append(np.asarray(Image.fromarray(small).resize(size[::-1], Image.BILINEAR)))
    return out


def write_model_dir(torch, config, root: Path, device: str, policy):
    """A random SegOFA with M categories on ``device`` and its weights-only model directory at ``root``."""
    from adapt import build  # benchmarks/adapt.py: a random SegOFA with a realistic prompt

    from ifseg_rt.checkpoint import save_checkpoint
    from ifseg_rt.files import file_record
    from ifseg_rt.knn import KnnSettings
    from ifseg_rt.runtime.model_dir import WEIGHTS_FILE, build_manifest, write_manifest

    with torch.device(device):
        model = build(config, M, dropout=0.0, drop_path=0.0, seed=0).eval()
    names = [f"class_{i}" for i in range(M)]
    save_checkpoint(model, root / WEIGHTS_FILE, categories=names)
    write_manifest(root, build_manifest(categories=names, config=model.config.to_dict(), policy=policy,
                                       knn=KnnSettings(), feature_dim=model.config.image_feature_dim,
                                       files={WEIGHTS_FILE: file_record(root / WEIGHTS_FILE)},
                                       provenance={"source": "benchmarks/gpu_e2e_check.py (random weights)"}))
    return model, names


def agreement(a, b) -> float:
    return float(np.mean([np.mean(x == y) for x, y in zip(a, b)]))


def postprocess_on_gpu(rep, torch, seg, imgs, name):
    """Engine outputs stay CUDA tensors; GPU post-processing gives the CPU post-processing's labels."""
    from ifseg_rt.runtime.postprocess import cell_scores

    outs = seg.infer(imgs)
    on_gpu = all(o.logits.is_cuda and o.features.is_cuda for o in outs)
    scores = cell_scores(outs[0].logits, outs[0].features, seg.knn)
    rep.check(f"{name}: engine outputs and cell scores are CUDA tensors", on_gpu and bool(scores.is_cuda),
              f"logits on {outs[0].logits.device}, scores on {scores.device}")
    gpu = [seg.finish(o).labels for o in outs]
    cpu = [seg.finish(dataclasses.replace(o, logits=o.logits.cpu().numpy(), features=o.features.cpu().numpy())
                      ).labels for o in outs]
    agree = agreement(gpu, cpu)
    rep.check(f"{name}: GPU post-processing labels = CPU post-processing labels", agree >= POST_CHECK,
              f"{agree:.5f} of the pixels equal (>= {POST_CHECK})")
    return gpu


def grid_attention_on_device(rep, torch, model, device, gpu):
    """Blocked attention = materialised biases on ``device``; peak memory of one image at 512^2 and 512 x 2048."""
    grids = [(32, 40), (40, 32), (12, 20)] if gpu else [(4, 6)]
    worst = 0.0
    for h, w in grids:
        x = torch.randn(1, 3, 16 * h, 16 * w, device=device, generator=torch.Generator(device).manual_seed(h))
        with torch.inference_mode():
            got, _ = model(x)
            want, _ = model(x, src_tokens=model.prompt_tokens)
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    rep.check("blocked attention = materialised biases (fp32, relative max error)", worst <= 1e-4,
              f"{worst:.2e} over grids {grids}")
    if not gpu:
        rep.skip("peak GPU memory at 512x512 and 512x2048", "dry run: no GPU")
        return
    bf = copy.deepcopy(model).to(torch.bfloat16)
    for h, w in [(512, 512), (512, 2048)]:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        x = torch.randn(1, 3, h, w, device=device, dtype=torch.bfloat16)
        with torch.inference_mode():
            t0 = time.perf_counter()
            bf(x)
            torch.cuda.synchronize()
            took = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        rep.facts[f"peak_mb_bf16_{h}x{w}"] = peak
        rep.note(f"bf16 {h}x{w}, batch 1: peak {peak:.0f} MiB above the weights, {took * 1e3:.0f} ms (first call)")
    del bf


def sweep(torch, seg, x1, batches, repeats, sync):
    """Engine images/s per batch size (backend.run on a preprocessed batch: the host-to-device copy included)."""
    rates = {}
    for b in batches:
        x = np.ascontiguousarray(np.repeat(x1[None], b, axis=0))
        for _ in range(2):  # warm-up (and the CUDA graph capture of this shape)
            seg.backend.run(x)
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            seg.backend.run(x)
        sync()
        rates[b] = b * repeats / (time.perf_counter() - t0)
    return rates


def main(args) -> Report:
    with Report("e2e", args, "torch backend on CUDA and the CUDA post-processing in Segmenter") as rep:
        import torch

        from ifseg_rt.runtime import ImagePolicy, Segmenter

        gpu = not args.dry_run
        if gpu and not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA GPU")
        device = "cuda" if gpu else "cpu"
        sync = torch.cuda.synchronize if gpu else (lambda: None)
        if gpu:
            config, policy, size, batches, repeats = "base", ImagePolicy(), (512, 512), args.batches, args.repeats
            configs = [(d, g) for d in ("fp32", "bf16", "fp16") for g in (False, True)]
            peak = bf16_matmul_tflops(torch)
            rep.note(f"{torch.cuda.get_device_name(0)}: measured bf16 matmul rate {peak:.0f} TFLOP/s "
                     f"(8192^3, median of 10, CUDA events)")
        else:  # the same walk at toy size on the CPU
            from ifseg_rt.model import OFAConfig

            config = OFAConfig(d_model=32, ffn_dim=64, heads=4, encoder_layers=2, decoder_layers=2,
                               resnet_layers=(1, 1, 1), resnet_width=8, vocab_size=300, max_positions=64,
                               token_bucket_size=16, patch_image_size=128, name="dry-run")
            policy, size, batches, repeats = ImagePolicy(mode="fixed", size=(64, 64)), (64, 64), [1, 2], 1
            configs, peak = [("fp32", False), ("bf16", False)], None
            rep.skip("fp16 and CUDA graphs", "dry run: no GPU")
        rep.facts["matmul_bf16_tflops"] = peak

        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            model, names = write_model_dir(torch, config, root, device, policy)
            imgs = images(2, size)
            load = lambda dtype, graphs: Segmenter.load(  # noqa: E731  (our own fresh directory: no sha256 pass)
                root, backend="torch", device=device, verify=False, dtype=dtype,
                **({"cuda_graphs": graphs} if gpu else {}))

            ref = load("fp32", False)
            ref_labels = [r.labels for r in ref.seg(imgs)]
            x1 = ref.preprocess(imgs[0])[0]
            xt = torch.from_numpy(x1[None]).to(device)
            with torch.inference_mode():
                ref.backend.forward(xt)  # tables computed outside the count
                flops = model_flops(torch, lambda: ref.backend.forward(xt))
            rep.facts["gflops_per_image"] = flops / 1e9
            rep.note(f"model FLOPs per {size[0]}x{size[1]} image: {flops / 1e9:.4g} GFLOP (torch FlopCounterMode: "
                     f"matmuls, convolutions, attention)")

            grid_attention_on_device(rep, torch, model, device, gpu)
            if gpu:
                postprocess_on_gpu(rep, torch, ref, imgs, "model directory, torch fp32")
                mem = Segmenter.from_model(model, names, device="cuda", policy=policy)
                labels = postprocess_on_gpu(rep, torch, mem, imgs, "Segmenter.from_model(device='cuda')")
                agree = agreement(labels, ref_labels)
                rep.check("from_model labels = model directory labels (fp32)", agree >= POST_CHECK,
                          f"{agree:.5f} of the pixels equal")
                del mem
            else:
                rep.skip("CUDA post-processing", "dry run: no GPU")
            del model

            rows, knn_share = [], None
            for dtype, graphs in configs:
                name = f"{dtype}{' + CUDA graphs' if graphs else ''}"
                try:
                    seg = ref if (dtype, graphs) == ("fp32", False) else load(dtype, graphs)
                    labels = [r.labels for r in seg.seg(imgs)]
                    agree = agreement(labels, ref_labels)
                    floor = POST_CHECK if dtype == "fp32" else AGREE_CHECK
                    rep.check(f"{name}: labels equal to fp32 eager", agree >= floor,
                              f"{agree:.5f} of the pixels (>= {floor})")
                    if dtype != "fp32":
                        rep.target(f"{name}: labels equal to fp32 on >= 99 % of the pixels", agree >= AGREE_TARGET,
                                   f"{agree:.5f} (random weights)")
                    rates = sweep(torch, seg, x1, batches, repeats, sync)
                    best_b = max(rates, key=rates.get)
                    row = {"torch backend": name, "labels = fp32": agree}
                    row.update({f"B={b} img/s": r for b, r in rates.items()})
                    row["best TFLOP/s"] = rates[best_b] * flops / 1e12
                    if peak:
                        row["of bf16 matmul"] = row["best TFLOP/s"] / peak
                        if dtype != "fp32":
                            rep.target(f"{name}: >= {RATE_TARGET:.0%} of the measured bf16 matmul rate",
                                       row["of bf16 matmul"] >= RATE_TARGET,
                                       f"{row['best TFLOP/s']:.0f} TFLOP/s at batch {best_b} = "
                                       f"{row['of bf16 matmul']:.1%} of {peak:.0f}")
                    rows.append(row)
                    if (dtype, graphs) == ("bf16", False):
                        res = [seg.seg(imgs[0]) for _ in range(5 if gpu else 1)]
                        knn_ms = float(np.median([r.timings["knn"] for r in res]))
                        eng_ms = float(np.median([r.timings["engine"] for r in res]))
                        knn_share = knn_ms / eng_ms
                        rep.facts.update(knn_ms=knn_ms, engine_ms_b1_bf16=eng_ms, knn_share=knn_share)
                        if gpu:
                            rep.target(f"kNN <= {KNN_SHARE_TARGET:.0%} of the engine time (bf16, batch 1)",
                                       knn_share <= KNN_SHARE_TARGET,
                                       f"kNN {knn_ms:.2f} ms, engine {eng_ms:.2f} ms: {knn_share:.1%}")
                    if seg is not ref:
                        del seg
                    if gpu:
                        torch.cuda.empty_cache()
                except Exception as e:  # one configuration failing must not hide the others' numbers
                    rep.check(f"{name}: ran", False, f"{type(e).__name__}: {str(e)[:300]}")
        rep.table(f"torch backend, {'OFA-base' if gpu else 'toy model'} {size[0]}x{size[1]}, M = {M}, engine "
                  f"images/s (backend.run on a preprocessed batch, host-to-device copy included)", rows)
        best = max((r for r in rows if not r["torch backend"].startswith("fp32")), default=None,
                   key=lambda r: r["best TFLOP/s"])
        if gpu and best is not None:
            rep.facts["best"] = best
            rep.summary = (f"best {best['torch backend']}: {best['best TFLOP/s']:.0f} TFLOP/s = "
                           f"{best.get('of bf16 matmul', float('nan')):.0%} of bf16 matmul; kNN share "
                           f"{knn_share if knn_share is not None else float('nan'):.1%} at batch 1")
        elif not gpu:
            rep.summary = f"dry run: {len(rows)} torch backend configurations on the CPU; GPU parts skipped"
        rep.skip("onnxruntime CUDA provider", "onnxruntime-gpu is not installed on the GPU machine: unverified")
    return rep


def _extra(p):
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="batch sizes of the sweep")
    p.add_argument("--repeats", type=int, default=5, help="timed batches per point")


if __name__ == "__main__":
    run_main(main, __doc__, _extra)
