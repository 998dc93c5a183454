"""GPU check of the fused resize + arg-max kernel (step "resize" of benchmarks/gpu_check.sh):
``resize_argmax(..., backend="cuda")`` (``csrc/resize/resize_argmax_cuda.cu``) against the CPU kernel on the same
scores, then its speed against the CPU kernel and the unfused torch code on the same card (``F.interpolate`` to the
full size, then ``argmax``).

Cases: OFA-base 512 x 512 (32 x 32 cells) and a 4:3 image (32 x 43 -> 512 x 683), M = 15 and 171, batch 2, float32
and float16 scores, plus a down-sampling case. The two kernels share ``resize_argmax.h``; labels may differ only
where two classes' resized scores tie to within float32 rounding, so >= 99.9 % of the pixels must be equal.

    python3 benchmarks/gpu_resize_check.py --out benchmarks/results/gpu_check [--dry-run]
"""

from __future__ import annotations

import numpy as np

from gpu_common import Report, run_main, timer

AGREE = 0.999


def main(args) -> Report:
    with Report("resize", args, "fused resize + arg-max: CUDA kernel vs the CPU kernel") as rep:
        from ifseg_rt.runtime.resize_argmax import resize_argmax

        gpu = not args.dry_run
        rng = np.random.default_rng(0)
        if gpu:
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError("torch sees no CUDA GPU")
            cases = [((32, 32), (512, 512), 15), ((32, 32), (512, 512), 171), ((32, 43), (512, 683), 171),
                     ((64, 64), (100, 120), 5)]
            backends = ("cuda", "cpu")
        else:  # the same walk with the CPU kernel against the numpy path
            torch = None
            cases, backends = [((4, 6), (37, 50), 5), ((8, 8), (5, 7), 3)], ("cpu", "numpy")
            rep.skip("CUDA kernel", "dry run: no GPU (the CPU kernel is compared with the numpy path instead)")
        test, ref_backend = backends
        rows = []
        for grid, size, m in cases:
            s = rng.standard_normal((2, grid[0] * grid[1], m)).astype(np.float32)
            for dt in (np.float32, np.float16):
                x = s.astype(dt)
                want = resize_argmax(x, grid, size, backend=ref_backend)
                got = resize_argmax(torch.from_numpy(x).cuda() if gpu else x, grid, size, backend=test)
                got = got.cpu().numpy() if gpu else got
                agree = float((got == want).mean())
                name = f"{test} vs {ref_backend}: {grid[0]}x{grid[1]} -> {size[0]}x{size[1]}, M={m}, {np.dtype(dt)}"
                rep.check(name, got.dtype == np.int32 and got.shape == want.shape and agree >= AGREE,
                          f"{agree:.6f} of the pixels equal (>= {AGREE})")
                rows.append({"grid": f"{grid[0]}x{grid[1]}", "size": f"{size[0]}x{size[1]}", "M": m,
                             "scores": str(np.dtype(dt)), "labels equal": agree})
        rep.table(f"Labels, {test} kernel vs {ref_backend}, batch 2", rows)

        if gpu:
            import torch.nn.functional as F

            ms = timer(torch, True)
            speed = []
            for grid, size, m in cases[:3]:
                s = torch.randn(1, grid[0] * grid[1], m, device="cuda")
                host = s.cpu().numpy()

                def unfused():
                    g = s[0].T.reshape(1, m, *grid)
                    return F.interpolate(g, size=size, mode="bilinear", align_corners=False)[0].argmax(0)

                row = {"case": f"{grid[0]}x{grid[1]} -> {size[0]}x{size[1]}, M={m}",
                       "cuda kernel (ms)": ms(lambda: resize_argmax(s[0], grid, size, backend="cuda",
                                                                    check_finite=False)),
                       "torch interpolate + argmax (ms)": ms(unfused),
                       "cpu kernel, all cores (ms)": timer(torch, False)(
                           lambda: resize_argmax(host[0], grid, size, backend="cpu", check_finite=False), 5, 1)}
                row["vs torch"] = row["torch interpolate + argmax (ms)"] / row["cuda kernel (ms)"]
                speed.append(row)
            rep.table("Speed, one image (median; CUDA events on the GPU)", speed)
            at = speed[1]
            rep.facts = dict(at)
            rep.summary = (f"{len(rows)} cases equal; 512x512 M=171: {at['cuda kernel (ms)']:.3f} ms vs torch "
                           f"{at['torch interpolate + argmax (ms)']:.3f} ms, "
                           f"CPU {at['cpu kernel, all cores (ms)']:.1f} ms")
        else:
            rep.skip("speed on the GPU", "dry run: no GPU")
            rep.summary = f"dry run: {len(rows)} cases, cpu kernel vs numpy; CUDA kernel skipped"
    return rep


if __name__ == "__main__":
    run_main(main, __doc__)
