"""``Segmenter``: load a model once, segment many images (SAM's predictor pattern).

Pipeline per image (``ifseg.md`` §11-§12): load (EXIF orientation applied, grayscale/RGBA -> RGB) -> resize to the
policy size (OpenCV bilinear) -> normalise -> engine -> :mod:`~ifseg_rt.runtime.postprocess` (cell scores with the
model's kNN settings, then the bilinear resize straight to the original size + arg-max). Post-processing runs where
the engine's outputs live: numpy and the C++ kernels for CPU engines, torch/CUDA for GPU engines.

Every caller goes through this class: ``segment``/``bench``, ``eval``, the demo, adaptation validation (an in-memory
model: :meth:`Segmenter.from_model`), serving and Ray.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..knn import BACKENDS as KNN_BACKENDS
from ..knn.settings import KnnSettings
from ..system import MAX_THREADS, bf16_without_amx
from .backends import (BF16_BACKENDS, BackendUnavailable, create_backend, installed, resolve_backend,
                       resolve_device)
from .model_dir import ModelDirError, ModelSpec, PrecisionSpec, load_model_dir, spec_for_model
from .postprocess import cell_probabilities, cell_scores, is_torch, labels_from_scores
from .preprocess import ImageLike, ImagePolicy, load_image, network_input, token_grid

STAGES = ("preprocess", "engine", "knn", "resize_argmax", "total")  # ms per image; the engine time of a batch is shared


@dataclass
class SegmentationResult:
    """One image's segmentation.

    Attributes:
      labels (np.ndarray): H0xW0 int32 category index per pixel, at the original (EXIF-upright) size
      categories (tuple(str)): names; ``categories[labels[y, x]]``
      grid (tuple(int, int)): (h, w) token grid the model saw
      original_size (tuple(int, int)): (H0, W0)
      input_size (tuple(int, int)): (H, W) network input after the image policy
      probabilities (np.ndarray or None): hxwxM float32 cell probabilities when requested: kNN-averaged, or the
        softmax of the logits when kNN is disabled (low resolution, one row per 16x16 cell)
      timings (dict): milliseconds per stage (preprocess, engine, knn, resize_argmax, total); the engine time of a
        batch is divided by its size
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
        counts = self.pixel_counts()
        return [self.categories[i] for i in np.argsort(-counts, kind="stable") if counts[i] > 0]

    def pixel_counts(self) -> np.ndarray:
        """Pixels per category, ``M`` int64."""
        return np.bincount(self.labels.ravel(), minlength=len(self.categories))[:len(self.categories)]

    def plot(self, image: Optional[ImageLike] = None, *, alpha: float = 0.5, legend: bool = True) -> np.ndarray:
        """The picture: label colours blended over ``image`` (the segmented image: a path, PIL image or array; the
        colours alone when omitted) with a legend below naming the categories present. ``HxWx3`` uint8."""
        from .palette import plot

        img = None if image is None else load_image(image)
        if img is not None and img.shape[:2] != self.labels.shape:
            raise ValueError(f"image is {img.shape[0]}x{img.shape[1]} px but the labels are "
                             f"{self.labels.shape[0]}x{self.labels.shape[1]}: pass the image that was segmented")
        return plot(self.labels, self.categories, img, alpha=alpha, show_legend=legend)

    def save(self, path: Union[str, Path], image: Optional[ImageLike] = None, *, legend: bool = True) -> Path:
        """Write :meth:`plot` to ``path`` (PNG, JPEG, ... by its suffix)."""
        from PIL import Image

        path = Path(path)
        Image.fromarray(self.plot(image, legend=legend)).save(path)
        return path

    def save_labels(self, path: Union[str, Path]) -> Path:
        """Write the label map as a palette PNG: pixel values are category indices, colours those of :meth:`plot`."""
        from .palette import save_label_png

        return save_label_png(self.labels, path, len(self.categories))


@dataclass
class CellOutputs:
    """The engine's outputs for one image, before post-processing (:meth:`Segmenter.finish`)."""

    logits: Any  # NxM (numpy, or a torch CUDA tensor)
    features: Any  # NxC, same kind
    grid: Tuple[int, int]
    original_size: Tuple[int, int]
    input_size: Tuple[int, int]
    timings: Dict[str, float] = field(default_factory=dict)  # preprocess, engine


def _check_cell_outputs(out: "CellOutputs", m: int) -> None:
    """``out`` as :meth:`Segmenter.infer` makes it: N x M logits and N x C features for a grid of N cells."""
    if not isinstance(out, CellOutputs):
        raise TypeError(f"finish takes the CellOutputs of Segmenter.infer, got {type(out).__name__}")
    try:
        n = int(out.grid[0]) * int(out.grid[1])
        shapes = tuple(out.logits.shape), tuple(out.features.shape)
    except (TypeError, ValueError, IndexError, AttributeError):
        raise ValueError(f"CellOutputs need array logits and features and a (rows, columns) grid, got grid "
                         f"{out.grid!r}") from None
    if shapes[0] != (n, m) or len(shapes[1]) != 2 or shapes[1][0] != n:
        raise ValueError(f"CellOutputs of a {out.grid[0]}x{out.grid[1]} grid need logits of shape ({n}, {m}) and "
                         f"features of shape ({n}, C), got {shapes[0]} and {shapes[1]}")


def _check_threads(threads) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                or not 1 <= threads <= MAX_THREADS):
        raise ValueError(f"threads must be an integer >= 1 and <= {MAX_THREADS} (or None: the cores available), got "
                         f"{threads!r}")


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def _check_knn_backend(name: str) -> str:
    if name not in KNN_BACKENDS:
        raise ValueError(f"knn_backend must be one of {KNN_BACKENDS}, got {name!r}")
    return name


class ImageError(ValueError):
    """An input of a list that could not be segmented (unreadable, wrong shape, too small, ...).

    Attributes: ``index`` (position in the list), ``source`` (its path, or a description), ``reason`` (the message).
    """

    def __init__(self, index: int, source: str, reason: str):
        self.index, self.source, self.reason = index, source, reason
        super().__init__(f"image {index} ({source}): {reason}")


def describe(image: Any) -> str:
    """How errors name an input: its path, or its kind and shape."""
    if isinstance(image, (str, Path)):
        return str(image)
    shape = getattr(image, "shape", None)
    if shape is not None:
        return f"{type(image).__name__} of shape {tuple(shape)}"
    size = getattr(image, "size", None)
    return f"{type(image).__name__}" + (f" of size {size}" if isinstance(size, tuple) else "")


class Segmenter:
    """Load once, query many.

    Use :meth:`load` (a model directory) or :meth:`from_model` (an in-memory SegOFA). ``seg(image)`` for a path, PIL
    image or HxWx3 uint8 array returns a :class:`SegmentationResult`; ``seg([images...])`` returns a list, batching
    images whose network input size is equal (up to ``batch_size`` per forward).

    Arguments:
      spec (ModelSpec): the model's validated description (categories, image policy, kNN settings, ...)
      backend: an engine from :mod:`ifseg_rt.runtime.backends`
      knn (bool, KnnSettings or None): override the model's kNN post-processing (a bool switches it on/off)
      knn_backend (str): ``ifseg_rt.knn`` backend for the averaging ("auto", "cpu", "numpy", "cuda")
    """

    def __init__(self, spec: ModelSpec, backend, *, knn: Union[None, bool, KnnSettings] = None,
                 knn_backend: str = "auto"):
        self.spec = spec
        self.backend = backend
        self.categories = spec.categories
        self.knn = self._knn(knn)
        self.knn_backend = _check_knn_backend(knn_backend)
        self.threads: Optional[int] = getattr(backend, "threads", None)  # CPU threads of engine and post-processing
        self.precision: str = getattr(backend, "precision", None) or "fp32"  # the compute precision the engine runs
        self.agreement: Optional[Dict[str, Any]] = None  # its measured label agreement with fp32 (ifseg.json;
        # fp32 itself: pixels 1.0; None for a precision run without a recorded measurement)

    def _knn(self, knn: Union[None, bool, KnnSettings]) -> KnnSettings:
        if knn is None:
            return self.spec.knn
        if isinstance(knn, KnnSettings):
            return knn
        if isinstance(knn, bool):
            return self.spec.knn.replace(enabled=knn)
        raise TypeError(f"knn must be None, a bool or a KnnSettings, got {type(knn).__name__}")

    @classmethod
    def load(cls, model_dir: Union[str, Path, ModelSpec], backend: str = "auto", device: str = "cpu", *,
             precision: Optional[str] = None, verify: bool = True, knn: Union[None, bool, KnnSettings] = None,
             knn_backend: str = "auto", **backend_options) -> "Segmenter":
        """Read and validate ``ifseg.json``, verify the sha256 of the files the backend uses, build the engine and
        check its output widths against ``ifseg.json``.

        Parameters
        ----------
        model_dir : directory written by ``python -m ifseg_rt.export`` (or its parsed :class:`ModelSpec`)
        backend : "auto" | "onnxruntime" | "openvino" | "tensorrt" | "torch"
        device : "cpu" | "cuda" | "cuda:N" | "auto" (cuda when torch sees a GPU)
        precision : on the CPU, one of the directory's precisions ("fp32", "int8", "bf16"; default: the one it was
            exported for, ``spec.precision``, except a bf16 default on a CPU without AMX, where bf16 runs slower than
            fp32: then int8 where the directory offers it, else fp32, with a warning); ``seg.agreement`` then
            reports its measured label agreement with fp32.
            On a GPU: the torch compute dtype / TensorRT engine precision ("fp32", "fp16", "bf16")
        verify : check sizes and sha256s before loading (a tampered or truncated file raises ``ModelDirError``)
        knn : override ``ifseg.json``'s kNN settings (a bool switches them on/off)
        backend_options : e.g. ``threads=2`` (onnxruntime/openvino/torch CPU), ``dtype="bf16"``, ``cuda_graphs=True``
            (torch), ``precision="fp16"`` (tensorrt), ``cache_dir=DIR`` (openvino: reuse compiled graphs across loads)

        Raises
        ------
        ModelDirError for a missing, malformed, tampered or unloadable model directory (the message names the field
        or file); BackendUnavailable when the backend cannot run here
        """
        spec, device, name, precision = cls._plan(model_dir, backend, device, precision, knn_backend, backend_options)
        on_gpu = device.startswith("cuda")
        if name == "tensorrt":
            backend_options.pop("threads", None)  # a CPU-thread count means nothing to a TensorRT engine
        if precision is not None:
            backend_options.setdefault("dtype" if name == "torch" else "precision", precision)
        if verify:
            spec.verify(spec.files_for(name, backend_options.get("precision", "fp32"), gpu=on_gpu))
        seg = cls(spec, create_backend(name, spec, device=device, **backend_options), knn=knn,
                  knn_backend=knn_backend)
        seg.precision = precision or getattr(seg.backend, "precision", None) or "fp32"
        rec = spec.precisions.get(seg.precision)
        seg.agreement = rec.agreement if rec is not None and rec.backend == seg.backend.name else None
        if seg.agreement is None and seg.precision == "fp32":  # the reference itself
            seg.agreement = {"pixels": 1.0, "reference": "fp32", "images": 0, "backend": seg.backend.name}
        return seg

    @classmethod
    def check_load(cls, model_dir: Union[str, Path, ModelSpec], backend: str = "auto", device: str = "cpu", *,
                   precision: Optional[str] = None, knn_backend: str = "auto", **backend_options) -> str:
        """What :meth:`load` checks before it builds an engine, without building one (a driver that will load the
        model on other machines, e.g. ``segment --ray``): the model directory, the precision and backend choice, the
        device, and that the backend's library is installed here. Raises the same errors; returns the backend's
        name."""
        _, device, name, _ = cls._plan(model_dir, backend, device, precision, knn_backend, dict(backend_options))
        if name == "tensorrt" and not device.startswith("cuda"):
            raise BackendUnavailable("the tensorrt backend runs on device='cuda' only")
        if name == "openvino" and device != "cpu":
            raise BackendUnavailable(f"the openvino backend runs on the CPU only, not {device!r}")
        if not installed(name):
            raise BackendUnavailable(f"the {name} backend needs `pip install {name}`, which is not installed here")
        return name

    @classmethod
    def _plan(cls, model_dir, backend: str, device: str, precision: Optional[str], knn_backend: str,
              backend_options: Dict[str, Any]) -> Tuple[ModelSpec, str, str, Optional[str]]:
        """(spec, device, backend name, precision) of a :meth:`load`, every argument checked."""
        _check_threads(backend_options.get("threads"))
        _check_knn_backend(knn_backend)
        spec = model_dir if isinstance(model_dir, ModelSpec) else load_model_dir(model_dir)
        device = resolve_device(device)
        on_gpu = device.startswith("cuda")
        if not on_gpu:
            if precision is None:  # the directory's default, unless the caller chose a backend that cannot run it
                default = spec.precisions.get(spec.precision)
                precision = spec.precision if default is not None and backend in ("auto", default.backend) \
                    else "fp32"
                if precision == "bf16" and default.backend == "openvino" and backend == "auto" \
                        and not installed("openvino"):
                    warnings.warn(f"{spec.source} defaults to bf16 on OpenVINO, which is not installed here: running "
                                  f"fp32 on onnxruntime (pip install openvino for bf16)", RuntimeWarning, stacklevel=3)
                    precision = "fp32"
                elif precision == "bf16" and backend == "auto" and (slow := bf16_without_amx(default.backend)):
                    # bf16 pays only with AMX: without it int8 (where offered) or fp32 is the faster choice
                    faster = "int8" if "int8" in spec.precisions else "fp32"
                    warnings.warn(f"{spec.source} defaults to bf16; {slow}: running "
                                  f"{faster} on {spec.precisions[faster].backend} (pass precision='bf16' to insist)",
                                  RuntimeWarning, stacklevel=3)
                    precision = faster
            # torch runs any weights in bfloat16 on request, OpenVINO any split graph (the agreement is recorded
            # only for the engine the export measured)
            on_request = precision == "bf16" and backend in BF16_BACKENDS
            if precision not in spec.precisions and not on_request:
                how = ("fp16 runs on a GPU only (device='cuda')" if precision == "fp16" else
                       f"re-export it with --precision {precision}")
                raise ModelDirError(f"{spec.source} offers the CPU precisions {sorted(spec.precisions)}, not "
                                    f"{precision!r}; {how}")
            rec = spec.precisions.get(precision) or PrecisionSpec(precision, backend)
            if backend == "auto" and precision != "fp32":
                backend = rec.backend
            elif backend not in ("auto", rec.backend) and precision != "fp32" and not on_request:
                raise ValueError(f"precision {precision!r} runs on the {rec.backend} backend, not {backend!r}")
        return spec, device, resolve_backend(backend, device, spec), precision

    @classmethod
    def from_model(cls, model, categories: Optional[Sequence[str]] = None, *, policy=None,
                   knn: Union[None, bool, KnnSettings] = None, device: str = "cpu", dtype: Optional[str] = None,
                   threads: Optional[int] = None, knn_backend: str = "auto") -> "Segmenter":
        """Wrap an in-memory :class:`~ifseg_rt.model.SegOFA` (with its prompt set) without exporting it: the torch
        backend runs it as it is (the caller's model is only switched to eval mode while it runs). Used by ``eval``
        on checkpoints and by validation during adaptation.

        Parameters
        ----------
        categories : names (default ``class_0 ...``)
        policy : :class:`~ifseg_rt.runtime.ImagePolicy` (default: the paper's short side 512)
        knn : kNN settings (default: the paper's K = 3, 25 iterations; a bool switches them on/off)
        dtype : "fp32" (default), or "bf16"/"fp16" autocast
        """
        from .backends.torch_backend import TorchBackend

        _check_threads(threads)
        if isinstance(categories, str):
            raise TypeError(f"categories must be a list of names, e.g. {categories.split(',')[:2]!r}, not one string")
        if policy is not None and not isinstance(policy, ImagePolicy):
            raise TypeError(f"policy must be an ImagePolicy (e.g. ImagePolicy(short_side=512)), got "
                            f"{type(policy).__name__}")
        if isinstance(knn, bool):  # as load() takes it: the default settings, switched on or off
            knn = KnnSettings(enabled=knn)
        elif knn is not None and not isinstance(knn, KnnSettings):
            raise TypeError(f"knn must be None, a bool or a KnnSettings (e.g. KnnSettings(k=5)), got "
                            f"{type(knn).__name__}")
        names = list(categories) if categories is not None else [f"class_{i}" for i in range(model.num_categories)]
        if len(names) != model.num_categories:
            raise ValueError(f"{len(names)} category names for a model of {model.num_categories} categories")
        spec = spec_for_model(names, model.config.to_dict(), feature_dim=model.config.image_feature_dim,
                              policy=policy, knn=knn)
        backend = TorchBackend.from_model(model, spec, device=resolve_device(device), dtype=dtype, threads=threads)
        return cls(spec, backend, knn_backend=knn_backend)

    # --- public -------------------------------------------------------------------------------------------------
    def __call__(self, image, **kw):
        return self.seg(image, **kw)

    def seg(self, image: Union[ImageLike, Sequence[ImageLike]], *, return_probabilities: bool = False,
            batch_size: int = 8, return_exceptions: bool = False
            ) -> Union[SegmentationResult, List[Union[SegmentationResult, ImageError]]]:
        """Segment one image (-> result) or a list/tuple of images (-> list of results, input order).

        For a list, an input that cannot be read or used raises :class:`ImageError` naming it, or, with
        ``return_exceptions=True``, takes its place in the returned list while every other image is segmented.
        A single image raises the underlying error (``ValueError``, ``FileNotFoundError``, ``TypeError``).
        """
        if not isinstance(image, (list, tuple)):
            _check_batch_size(batch_size)
            out = next(self._stream([image], 1, single=True))[1]
            return self.finish(out, return_probabilities=return_probabilities)
        results: List[Any] = [None] * len(image)
        for i, out in self._stream(list(image), batch_size):
            if isinstance(out, ImageError):
                if not return_exceptions:
                    raise out
                results[i] = out
            else:
                results[i] = self.finish(out, return_probabilities=return_probabilities)
        return results

    def infer(self, images: Sequence[ImageLike], *, batch_size: int = 8, return_exceptions: bool = False
              ) -> List[Union[CellOutputs, ImageError]]:
        """The engine's per-image outputs (before post-processing), input order; errors as in :meth:`seg`.

        Holds every image's outputs at once: for long lists prefer :meth:`seg`, which post-processes as it goes.
        """
        if isinstance(images, (str, bytes, bytearray, memoryview, np.ndarray, Path)) or hasattr(images, "getpixel"):
            raise TypeError(f"infer takes a list of images; for one {type(images).__name__}, pass [image]")
        images = list(images)  # any iterable of images (a generator too)
        out: List[Any] = [None] * len(images)
        for i, o in self._stream(images, batch_size):
            if isinstance(o, ImageError) and not return_exceptions:
                raise o
            out[i] = o
        return out

    def finish(self, out: CellOutputs, *, knn: Union[None, bool, KnnSettings] = None,
               return_probabilities: bool = False) -> SegmentationResult:
        """Post-process one image's :class:`CellOutputs` (with the segmenter's kNN settings, or ``knn``)."""
        settings = self.knn if knn is None else self._knn(knn)
        _check_cell_outputs(out, self.spec.num_categories)
        on_gpu = is_torch(out.logits) and out.logits.is_cuda
        t0 = time.perf_counter()
        with _device_of(out.logits):
            scores = cell_scores(out.logits, out.features, settings, knn_backend=self.knn_backend,
                                 num_threads=self.threads)
            _sync(scores, on_gpu)
            t1 = time.perf_counter()
            labels = labels_from_scores(scores, out.grid, out.original_size, threads=self.threads)
            probs = None
            if return_probabilities:
                probs = cell_probabilities(scores, settings).reshape(*out.grid, -1)
            if on_gpu:
                labels = labels.cpu().numpy()
                probs = None if probs is None else probs.float().cpu().numpy()
        t2 = time.perf_counter()
        timings = dict(out.timings)
        timings["knn"] = (t1 - t0) * 1e3
        timings["resize_argmax"] = (t2 - t1) * 1e3
        timings["total"] = sum(timings.get(k, 0.0) for k in STAGES[:-1])
        if probs is not None:
            probs = np.ascontiguousarray(probs, dtype=np.float32)
        return SegmentationResult(labels=labels, categories=self.categories, grid=out.grid,
                                  original_size=out.original_size, input_size=out.input_size, probabilities=probs,
                                  timings=timings)

    def preprocess(self, image: ImageLike) -> Tuple[np.ndarray, Tuple[int, int]]:
        """-> (3xHxW float32 network input, (H0, W0)). Raises ``ValueError`` for unusable images."""
        img = load_image(image)
        return network_input(img, self.spec.policy, self.spec.check_grid), (img.shape[0], img.shape[1])

    # --- pipeline -----------------------------------------------------------------------------------------------
    def _stream(self, images: List[ImageLike], batch_size: int, single: bool = False
                ) -> Iterator[Tuple[int, Union[CellOutputs, ImageError]]]:
        """(index, outputs or ImageError) for every input, a window of inputs at a time (a long list never holds
        every preprocessed image), same-size inputs batched within a window."""
        _check_batch_size(batch_size)
        window = 4 * batch_size
        for w0 in range(0, len(images), window):
            pre: Dict[int, Tuple[np.ndarray, Tuple[int, int], float]] = {}
            for i in range(w0, min(w0 + window, len(images))):
                t0 = time.perf_counter()
                try:
                    x, size = self.preprocess(images[i])
                except (ValueError, FileNotFoundError, TypeError) as e:
                    if single:
                        raise
                    yield i, ImageError(i, describe(images[i]), str(e))
                    continue
                pre[i] = (x, size, (time.perf_counter() - t0) * 1e3)
            groups: Dict[Tuple[int, int], List[int]] = {}
            for i, (x, _, _) in pre.items():
                groups.setdefault(x.shape[1:], []).append(i)
            for idx in groups.values():
                for s in range(0, len(idx), batch_size):
                    chunk = idx[s:s + batch_size]
                    outs = self._run_batch(np.stack([pre[i][0] for i in chunk]), [pre[i][1] for i in chunk])
                    for i, o in zip(chunk, outs):
                        o.timings["preprocess"] = pre[i][2]
                        yield i, o

    def _run_batch(self, batch: np.ndarray, sizes: List[Tuple[int, int]]) -> List[CellOutputs]:
        B, _, H, W = batch.shape
        grid = token_grid(H, W)
        t0 = time.perf_counter()
        logits, feats = self.backend.run(batch)
        on_gpu = getattr(self.backend, "on_gpu", False)
        _sync(logits, on_gpu)
        t_engine = (time.perf_counter() - t0) * 1e3 / B
        n, m = grid[0] * grid[1], self.spec.num_categories
        if tuple(logits.shape) != (B, n, m) or (feats is not None and tuple(feats.shape[:2]) != (B, n)):
            raise RuntimeError(f"the {self.backend.name} engine returned logits {tuple(logits.shape)} and features "
                               f"{None if feats is None else tuple(feats.shape)} for a {B}x3x{H}x{W} batch; expected "
                               f"({B}, {n}, {m}) and ({B}, {n}, C)")
        return [CellOutputs(logits=logits[i], features=None if feats is None else feats[i], grid=grid,
                            original_size=size, input_size=(H, W), timings={"engine": t_engine})
                for i, size in enumerate(sizes)]


def _device_of(x):
    """``torch.cuda.device(x.device)`` for CUDA tensors (kernels launch on cuda:N whatever the current device is)."""
    if is_torch(x) and x.is_cuda:
        import torch

        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _sync(x, on_gpu: bool) -> None:
    if on_gpu and is_torch(x):
        import torch

        torch.cuda.synchronize(x.device)
