"""The GPU engines' bookkeeping, checked on the CPU with stand-ins for what needs a GPU: torch backend CUDA graphs
(table lifetime, graph LRU, capture device), the onnxruntime CUDA provider check, and the TensorRT backend's device
guard and profile check (fake ``tensorrt``). The real GPU runs are in benchmarks/gpu_check.sh."""

import contextlib
import sys
import types
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from conftest import tiny_segofa  # noqa: E402
from conftest import CATEGORIES  # noqa: E402

from ifseg_rt.runtime import Segmenter  # noqa: E402
from ifseg_rt.runtime.backends import BackendUnavailable  # noqa: E402
from ifseg_rt.runtime.backends.torch_backend import MAX_GRAPHS  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(shared_export):
    return shared_export


class FakeStream:
    def __init__(self, device=None):
        self.device, self.cuda_stream = device, 1234

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass


class FakeCuda:
    """torch.cuda stand-ins that record on which device streams, graphs and engines are made. A fake graph replays
    what it captured (the backend's forward on the static input, written into the captured outputs), and holds the
    position tables the capture read only by weak reference, as a real graph holds only their addresses: replaying
    after they were freed fails the test instead of reading reused memory."""

    def __init__(self, monkeypatch):
        self.current = None  # the device torch.cuda.device() made current
        self.streams, self.graphs, self.capturing, self.replays = [], [], None, 0
        fake = self

        class Graph:
            def __init__(self):
                self.device, self.tables, self.fn, self.out = fake.current, [], None, None
                fake.graphs.append(self)

            def replay(self):
                dead = [r for r in self.tables if r() is None]
                assert not dead, "a CUDA graph was replayed after the position tables it reads were freed"
                fake.replays += 1
                for o, n in zip(self.out, self.fn()):
                    o.copy_(n)

        @contextlib.contextmanager
        def device(d):
            prev, fake.current = fake.current, torch.device(d)
            try:
                yield
            finally:
                fake.current = prev

        @contextlib.contextmanager
        def graph(g):
            fake.capturing = g
            try:
                yield
            finally:
                fake.capturing = None

        def stream_ctor(device=None):
            fake.streams.append((device, fake.current))
            return FakeStream(device)

        for name, value in {"device": device, "graph": graph, "CUDAGraph": Graph, "Stream": stream_ctor,
                            "stream": lambda s: contextlib.nullcontext(), "is_available": lambda: True,
                            "current_stream": lambda device=None: FakeStream(device), "current_device": lambda: 0,
                            "get_device_name": lambda d=None: "NVIDIA Fake GPU"}.items():
            monkeypatch.setattr(torch.cuda, name, value)

    def watch(self, monkeypatch, backend):
        """Record the tables and the computation a capture of ``backend`` reads (wrapping, not replacing, them)."""
        get, forward = backend.tables.get, backend.forward

        def tables(h, w):
            t = get(h, w)
            if self.capturing is not None:
                self.capturing.tables.append(weakref.ref(t))
            return t

        def captured_forward(x):
            out = forward(x)
            if self.capturing is not None:
                self.capturing.fn, self.capturing.out = (lambda: forward(x)), out
            return out

        monkeypatch.setattr(backend.tables, "get", tables)
        monkeypatch.setattr(backend, "forward", captured_forward)


def _eager(backend, x):
    with torch.inference_mode():
        lo, fo = backend.forward(torch.from_numpy(x))
    return lo.numpy(), fo.numpy()


def test_cuda_graphs_keep_their_tables_and_stay_bounded(monkeypatch):
    seg = Segmenter.from_model(tiny_segofa(len(CATEGORIES)), CATEGORIES)
    backend = seg.backend
    cuda = FakeCuda(monkeypatch)
    cuda.watch(monkeypatch, backend)
    backend.cuda_graphs = True  # graphs on the CPU: torch.cuda is faked, the backend's bookkeeping is real
    backend.tables.max_bytes = 0  # the table cache keeps only the most recent grid
    rng = np.random.default_rng(0)
    grids = [(h, w) for h in range(1, 6) for w in range(1, 6)][:MAX_GRAPHS + 3]
    image = lambda g: rng.standard_normal((1, 3, 16 * g[0], 16 * g[1])).astype(np.float32)  # noqa: E731

    captured = grids[:MAX_GRAPHS]
    for g in captured:
        x = image(g)
        for got, want in zip(backend.run(x), _eager(backend, x)):
            np.testing.assert_allclose(got, want, atol=1e-6)
    assert len(cuda.graphs) == MAX_GRAPHS and cuda.replays == MAX_GRAPHS
    # capture on the backend's device: the side stream is made for it, and while it is current (issue 17, item 3)
    assert all(d == backend.device and cur == backend.device for d, cur in cuda.streams)
    assert all(g.device == backend.device and g.tables for g in cuda.graphs)

    # other grids push every captured grid's tables out of the table cache ...
    for g in grids[MAX_GRAPHS:MAX_GRAPHS + 2]:
        _eager(backend, image(g))
    assert len(backend.tables) == 1
    # ... yet each graph still replays on its own tables, with the new pixels (issue 17, item 2)
    for g in captured:
        x = image(g)
        for got, want in zip(backend.run(x), _eager(backend, x)):
            np.testing.assert_allclose(got, want, atol=1e-6)
    assert len(cuda.graphs) == MAX_GRAPHS and cuda.replays == 2 * MAX_GRAPHS

    # the graphs are an LRU of MAX_GRAPHS: a new shape evicts the least recently used (captured[0]) ...
    backend.run(image(grids[-1]))
    assert len(cuda.graphs) == MAX_GRAPHS + 1
    backend.run(image(captured[-1]))  # ... not the most recent one
    assert len(cuda.graphs) == MAX_GRAPHS + 1
    backend.run(image(captured[0]))  # captured again
    assert len(cuda.graphs) == MAX_GRAPHS + 2


def test_onnxruntime_cuda_provider_must_load(model_dir, monkeypatch):
    import onnxruntime as ort

    real = ort.InferenceSession
    asked, loaded = [], []

    class Session:  # a real CPU session that reports the providers it "loaded"
        def __init__(self, path, so=None, providers=None):
            asked.append(providers)
            self._session = real(path, so, providers=["CPUExecutionProvider"])

        def get_providers(self):
            return list(loaded)

        def __getattr__(self, name):
            return getattr(self._session, name)

    import ifseg_rt.runtime.backends as backends

    monkeypatch.setattr(ort, "InferenceSession", Session)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(backends, "_no_nvidia_driver", lambda: False)  # as on a machine with a GPU driver
    loaded[:] = ["CPUExecutionProvider"]  # available is not loaded: e.g. cuDNN missing, the session fell back
    with pytest.raises(BackendUnavailable, match=r"could not start its CUDA provider .*'CPUExecutionProvider'"):
        Segmenter.load(model_dir, backend="onnxruntime", device="cuda:1")
    assert asked[-1][0] == ("CUDAExecutionProvider", {"device_id": 1})
    loaded[:] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    seg = Segmenter.load(model_dir, backend="onnxruntime", device="cuda:1")
    assert seg.backend.on_gpu and seg.backend.device_id == 1


def _fake_tensorrt(cuda, profile_max):
    """Runtime, engine and context of TensorRT 10, recording the current device when each is made or run."""
    log = types.SimpleNamespace(made={}, ran=[], profiles=[])

    class Context:
        shape = None

        profile = 0

        def set_optimization_profile_async(self, index, stream):
            log.profiles.append(index)
            self.profile = index

        def set_input_shape(self, name, shape):
            if any(s > m for s, m in zip(shape, profile_max[self.profile])):
                return False
            self.shape = shape
            return True

        def get_tensor_shape(self, name):
            b, _, h, w = self.shape
            return (b, -(-h // 16) * -(-w // 16), 5 if name == "logits" else 128)

        def set_tensor_address(self, name, ptr):
            pass

        def execute_async_v3(self, stream):
            log.ran.append(cuda.current)
            return True

    class Engine:
        def get_tensor_shape(self, name):
            return (-1, -1, 5 if name == "logits" else 128)

        def create_execution_context(self):
            log.made["context"] = cuda.current
            return Context()

    class Runtime:
        def __init__(self, logger):
            log.made["runtime"] = cuda.current

        def deserialize_cuda_engine(self, data):
            log.made["engine"] = cuda.current
            return Engine()

    logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    return types.SimpleNamespace(__version__="10.3.0", Logger=logger, Runtime=Runtime), log


def test_tensorrt_backend_device_guard_and_profile(monkeypatch, tmp_path):
    from ifseg_rt.runtime.backends.tensorrt import TensorRTBackend
    from ifseg_rt.runtime.model_dir import EngineSpec

    cuda = FakeCuda(monkeypatch)
    trt, log = _fake_tensorrt(cuda, [(2, 3, 64, 64), (2, 3, 96, 32)])
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    eng = EngineSpec(file="engines/nvidia-fake-gpu-fp16.engine", gpu="NVIDIA Fake GPU", precision="fp16",
                     tensorrt_version="10.3.0", profiles=({"min": [1, 3, 16, 16], "max": [2, 3, 64, 64]},
                                                          {"min": [1, 3, 16, 16], "max": [2, 3, 96, 32]}))
    (tmp_path / "engines").mkdir()
    (tmp_path / eng.file).write_bytes(b"engine")
    checked = []
    spec = types.SimpleNamespace(engines=(eng,), source=str(tmp_path), path=lambda f: tmp_path / f,
                                 check_outputs=lambda m, c, f: checked.append((m, c, f)))
    backend = TensorRTBackend(spec, device="cuda:1")
    cuda1 = torch.device("cuda", 1)
    assert log.made == {"runtime": cuda1, "engine": cuda1, "context": cuda1}  # made on cuda:1, not the current GPU
    assert cuda.streams == [(cuda1, cuda1)]
    assert checked == [(5, 128, eng.file)]

    backend.device = torch.device("cpu")  # run on CPU memory: the fake engine reads no pointers
    logits, feats = backend.run(np.zeros((2, 3, 48, 64), np.float32))
    assert tuple(logits.shape) == (2, 12, 5) and tuple(feats.shape) == (2, 12, 128)
    assert log.ran == [backend.device] and log.profiles == []  # executed under the device guard, on profile 0
    logits, _ = backend.run(np.zeros((1, 3, 80, 32), np.float32))  # portrait: the second profile holds it
    assert tuple(logits.shape) == (1, 10, 5) and log.profiles == [1]
    backend.run(np.zeros((1, 3, 80, 32), np.float32))
    backend.run(np.zeros((1, 3, 32, 64), np.float32))  # back to the first: switched once each way
    assert log.profiles == [1, 0] and len(log.ran) == 4
    with pytest.raises(ValueError, match=r"input shape \(1, 3, 80, 64\) is outside the optimisation profiles of "
                                         r"engines/nvidia-fake-gpu-fp16.engine \(min \[1, 3, 16, 16\], max "
                                         r"\[2, 3, 64, 64\]; min \[1, 3, 16, 16\], max \[2, 3, 96, 32\]\)"):
        backend.run(np.zeros((1, 3, 80, 64), np.float32))
    assert len(log.ran) == 4


@pytest.mark.requires_cuda
def test_segmenter_on_cuda_matches_the_cpu(model_dir):
    import copy
    import dataclasses

    from ifseg_rt.runtime import ImagePolicy

    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA GPU")
    policy = ImagePolicy(mode="fixed", size=(96, 128))
    imgs = [np.random.default_rng(s).integers(0, 256, size=(90, 120, 3), dtype=np.uint8) for s in range(2)]
    model = tiny_segofa(len(CATEGORIES))
    want = [r.labels for r in Segmenter.from_model(model, CATEGORIES, policy=policy).seg(imgs)]
    gpu = Segmenter.from_model(copy.deepcopy(model).cuda(), CATEGORIES, policy=policy, device="cuda")
    outs = gpu.infer(imgs)
    assert all(o.logits.is_cuda and o.features.is_cuda for o in outs)  # post-processing then runs on the GPU
    for o, w in zip(outs, want):
        assert np.mean(gpu.finish(o).labels == w) >= 0.99
    ref = Segmenter.load(model_dir, backend="torch")
    ref.spec = dataclasses.replace(ref.spec, policy=policy)
    want = [r.labels for r in ref.seg(imgs)]
    for graphs in (False, True):
        seg = Segmenter.load(model_dir, backend="torch", device="cuda", dtype="fp32", cuda_graphs=graphs)
        seg.spec = dataclasses.replace(seg.spec, policy=policy)
        for _ in range(2):  # with graphs: capture, then replay
            for r, w in zip(seg.seg(imgs), want):
                assert np.mean(r.labels == w) >= 0.99
