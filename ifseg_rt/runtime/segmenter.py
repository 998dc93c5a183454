"""``Segmenter``: load a model directory once, segment many images (SAM's predictor pattern).

Pipeline per image (``ifseg.md`` §11-§12): load (grayscale/RGBA -> RGB) -> resize to the policy size (OpenCV
bilinear) -> normalise -> engine -> [softmax / T -> kNN averaging over ResNet features] -> bilinear resize of the
cell scores straight to the original size -> arg-max. Post-processing runs where the engine's outputs live: numpy
(and the C++ kNN kernel) for CPU engines, torch/CUDA for GPU engines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .backends import create_backend, resolve_backend
from .model_dir import ModelSpec, load_model_dir
from .postprocess import labels_from_scores, softmax
from .preprocess import ImageLike, load_image, normalize, resize_bilinear

STAGES = ("preprocess", "engine", "knn", "resize_argmax", "total")  # ms per image; engine/knn amortised over a batch


@dataclass
class SegmentationResult:
    """One image's segmentation.

    Attributes:
      labels (np.ndarray): H0xW0 int32 category index per pixel, at the original size
      categories (tuple(str)): names; ``categories[labels[y, x]]``
      grid (tuple(int, int)): (h, w) token grid the model saw
      original_size (tuple(int, int)): (H0, W0)
      input_size (tuple(int, int)): (H, W) network input after the image policy
      probabilities (np.ndarray or None): hxwxM float32 cell scores when requested: kNN-averaged probabilities, or
        the softmax of the logits when kNN is disabled (low resolution, one row per 16x16 cell)
      timings (dict): milliseconds per stage (preprocess, engine, knn, resize_argmax, total); the engine and kNN
        times of a batch are divided by its size
    """

    labels: np.ndarray
    categories: Tuple[str, ...]
    grid: Tuple[int, int]
    original_size: Tuple[int, int]
    input_size: Tuple[int, int]
    probabilities: Optional[np.ndarray] = None
    timings: Dict[str, float] = field(default_factory=dict)

    def names(self) -> List[str]:
        """Category names present in the label map, by decreasing area."""
        counts = np.bincount(self.labels.ravel(), minlength=len(self.categories))
        return [self.categories[i] for i in np.argsort(-counts, kind="stable") if counts[i] > 0]


class Segmenter:
    """Load once, query many.

    Use :meth:`load`; ``seg(image)`` for a path, PIL image or HxWx3 uint8 array (grayscale/RGBA converted) returns a
    :class:`SegmentationResult`; ``seg([images...])`` returns a list, batching images whose network input size is
    equal (up to ``batch_size`` per forward).
    """

    def __init__(self, spec: ModelSpec, backend, *, knn: Optional[bool] = None, knn_backend: str = "auto"):
        self.spec = spec
        self.backend = backend
        self.categories = spec.categories
        self.knn = spec.knn.enabled if knn is None else bool(knn)
        self.knn_backend = knn_backend

    @classmethod
    def load(cls, model_dir: Union[str, Path], backend: str = "auto", device: str = "cpu", *, verify: bool = True,
             knn: Optional[bool] = None, knn_backend: str = "auto", **backend_options) -> "Segmenter":
        """Read and validate ``ifseg.json``, verify the sha256 of the files the backend uses, build the engine.

        Parameters
        ----------
        model_dir : directory written by ``python -m ifseg_rt.export``
        backend : "auto" | "onnxruntime" | "tensorrt" | "torch"
        device : "cpu" | "cuda" | "cuda:N"
        verify : check sizes and sha256s before loading (a tampered or truncated file raises ``ModelDirError``)
        knn : override ``ifseg.json``'s kNN switch
        backend_options : e.g. ``threads=2`` (onnxruntime/torch CPU), ``dtype="bf16"``, ``cuda_graphs=True`` (torch),
            ``precision="fp16"`` (tensorrt)
        """
        spec = load_model_dir(model_dir)
        name = resolve_backend(backend, device, spec)
        if name == "tensorrt":
            backend_options.pop("threads", None)  # a CPU-thread count means nothing to a TensorRT engine
        if verify:
            if name == "onnxruntime":
                spec.verify([f for f in spec.files if f == spec.onnx_file or f == spec.onnx_file + ".data"])
            elif name == "torch":
                spec.verify(["model.safetensors"] if spec.has_file("model.safetensors") else [])
            else:
                spec.verify([e.file for e in spec.engines])
        return cls(spec, create_backend(name, spec, device=device, **backend_options), knn=knn,
                   knn_backend=knn_backend)

    # --- public -------------------------------------------------------------------------------------------------
    def __call__(self, image, **kw):
        return self.seg(image, **kw)

    def seg(self, image: Union[ImageLike, Sequence[ImageLike]], *, return_probabilities: bool = False,
            batch_size: int = 8) -> Union[SegmentationResult, List[SegmentationResult]]:
        """Segment one image (-> result) or a list/tuple of images (-> list of results, input order)."""
        if isinstance(image, (list, tuple)):
            return self._seg_many(list(image), return_probabilities, batch_size)
        return self._seg_many([image], return_probabilities, 1)[0]

    def preprocess(self, image: ImageLike) -> Tuple[np.ndarray, Tuple[int, int]]:
        """-> (3xHxW float32 network input, (H0, W0))."""
        img = load_image(image)
        h0, w0 = img.shape[:2]
        h, w = self.spec.policy.target_size(h0, w0)
        self.spec.check_grid(-(-h // 16), -(-w // 16))
        return normalize(resize_bilinear(img, h, w)), (h0, w0)

    # --- pipeline -----------------------------------------------------------------------------------------------
    def _seg_many(self, images: List[ImageLike], probs: bool, batch_size: int) -> List[SegmentationResult]:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        results: List[Optional[SegmentationResult]] = [None] * len(images)
        # A window of inputs at a time, so that a long list never holds every preprocessed image in memory;
        # within a window, same-size inputs are batched together.
        window = 4 * batch_size
        for w0 in range(0, len(images), window):
            pre = {}
            for i in range(w0, min(w0 + window, len(images))):
                t0 = time.perf_counter()
                x, size = self.preprocess(images[i])
                pre[i] = (x, size, (time.perf_counter() - t0) * 1e3)
            groups: Dict[Tuple[int, int], List[int]] = {}
            for i, (x, _, _) in pre.items():
                groups.setdefault(x.shape[1:], []).append(i)
            for idx in groups.values():
                for s in range(0, len(idx), batch_size):
                    chunk = idx[s:s + batch_size]
                    batch = np.stack([pre[i][0] for i in chunk])
                    for i, r in zip(chunk, self._run_batch(batch, [pre[i][1] for i in chunk], probs)):
                        r.timings["preprocess"] = pre[i][2]
                        r.timings["total"] = sum(r.timings[k] for k in STAGES[:-1])
                        results[i] = r
        return results

    def _run_batch(self, batch: np.ndarray, sizes: List[Tuple[int, int]], want_probs: bool):
        B, _, H, W = batch.shape
        grid = (-(-H // 16), -(-W // 16))
        t0 = time.perf_counter()
        logits, feats = self.backend.run(batch)
        if getattr(self.backend, "on_gpu", False):
            import torch

            torch.cuda.synchronize(logits.device)
        t_engine = (time.perf_counter() - t0) * 1e3 / B
        if getattr(self.backend, "on_gpu", False):
            return self._post_torch(logits, feats, grid, sizes, want_probs, t_engine, (H, W))
        return self._post_numpy(logits, feats, grid, sizes, want_probs, t_engine, (H, W))

    def _scores_numpy(self, logits: np.ndarray, feats: np.ndarray) -> np.ndarray:
        """kNN on: softmax probabilities, averaged when iters > 0 (ifseg.md §12). kNN off: the logits."""
        k = self.spec.knn
        if not self.knn:
            return np.asarray(logits, dtype=np.float32)
        probs = softmax(logits, temperature=k.temperature)
        if k.iters == 0:
            return probs
        from ..knn import knn_average

        return knn_average(feats, probs, k=min(k.k, logits.shape[1]), iters=k.iters, backend=self.knn_backend)

    def _post_numpy(self, logits, feats, grid, sizes, want_probs, t_engine, input_size):
        t0 = time.perf_counter()
        scores = self._scores_numpy(logits, feats)
        t_knn = (time.perf_counter() - t0) * 1e3 / len(sizes)
        out = []
        for i, size in enumerate(sizes):
            t1 = time.perf_counter()
            labels = labels_from_scores(scores[i], grid, size)
            t_res = (time.perf_counter() - t1) * 1e3
            p = None
            if want_probs:
                p = scores[i] if self.knn else softmax(scores[i], temperature=self.spec.knn.temperature)  # probs
                p = np.ascontiguousarray(p.reshape(*grid, -1), dtype=np.float32)
            out.append(SegmentationResult(labels=labels, categories=self.categories, grid=grid, original_size=size,
                                          input_size=input_size, probabilities=p,
                                          timings={"engine": t_engine, "knn": t_knn, "resize_argmax": t_res}))
        return out

    def _post_torch(self, logits, feats, grid, sizes, want_probs, t_engine, input_size):  # CUDA path
        import torch

        from .torch_post import labels_from_scores_torch

        k = self.spec.knn
        t0 = time.perf_counter()
        scores = logits.float()
        with torch.cuda.device(scores.device):  # cuda:N, whatever the current device is
            if self.knn:
                scores = torch.softmax(scores / k.temperature, dim=-1)
                if k.iters > 0:
                    from ..knn import knn_average

                    backend = "cuda" if self.knn_backend == "auto" else self.knn_backend
                    scores = knn_average(feats, scores, k=min(k.k, scores.shape[1]), iters=k.iters, backend=backend)
            torch.cuda.synchronize(scores.device)
        t_knn = (time.perf_counter() - t0) * 1e3 / len(sizes)
        out = []
        for i, size in enumerate(sizes):
            t1 = time.perf_counter()
            labels = labels_from_scores_torch(scores[i], grid, size).cpu().numpy()
            t_res = (time.perf_counter() - t1) * 1e3
            p = None
            if want_probs:
                s = scores[i] if self.knn else torch.softmax(scores[i] / k.temperature, dim=-1)
                p = s.reshape(*grid, -1).float().cpu().numpy()
            out.append(SegmentationResult(labels=labels, categories=self.categories, grid=grid, original_size=size,
                                          input_size=input_size, probabilities=p,
                                          timings={"engine": t_engine, "knn": t_knn, "resize_argmax": t_res}))
        return out
