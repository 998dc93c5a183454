"""Triton model repositories: configs built and validated with Triton's own schema (tritonclient's
model_config.proto), ``export --format triton``, and the exported ensemble loaded by the bundled tritonserver with
the ONNX step's python-backend stand-in (the stock onnxruntime backend is not installable here)."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")

from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402

from ifseg_rt import Segmenter  # noqa: E402
from ifseg_rt.runtime.model_dir import load_model_dir  # noqa: E402
from ifseg_rt.serve import protocol as P  # noqa: E402
from ifseg_rt.serve.repository import (CONFIG, RepositoryError, check_repository, export_repository,  # noqa: E402
                                       parse_config, validate_repository, write_serving_repository)

PHOTO = Path(__file__).parent / "data" / "photo_stm32f3discovery.jpg"


@pytest.fixture(scope="module")
def repo(quick_nano_model, tmp_path_factory):
    """The stock repository (onnxruntime backend, GPU instances, TensorRT accelerator)."""
    return export_repository(quick_nano_model, tmp_path_factory.mktemp("repo") / "triton", tensorrt=True,
                             trt_cache="/cache/trt", instances=2, max_batch_size=4)


def configs(root: Path):
    return {p.parent.name: parse_config(p.read_text(), str(p)) for p in root.glob(f"*/{CONFIG}")}


def test_exported_configs_parse_with_tritons_schema(repo, quick_nano_model):
    spec = load_model_dir(quick_nano_model)
    cfg = configs(repo)
    assert sorted(cfg) == ["ifseg", "ifseg_onnx", "ifseg_post", "ifseg_pre"]
    assert validate_repository(repo) == []
    onnx = cfg["ifseg_onnx"]
    assert onnx.platform == "onnxruntime_onnx" and onnx.max_batch_size == 4
    assert list(onnx.input[0].dims) == [3, -1, -1] and onnx.input[0].data_type == mc.TYPE_FP32
    assert [list(o.dims) for o in onnx.output] == [[-1, spec.num_categories], [-1, spec.feature_dim]]
    assert onnx.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU and onnx.instance_group[0].count == 2
    trt = onnx.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
    assert trt.parameters["trt_engine_cache_enable"] == "1" and trt.parameters["trt_engine_cache_path"] == "/cache/trt"
    assert onnx.dynamic_batching.default_queue_policy.max_queue_size == 64
    assert [list(w.inputs["image"].dims) for w in onnx.model_warmup] == [[3, 64, 64], [3, 64, 85]]
    assert (repo / "ifseg_onnx" / "1" / "model.onnx").read_bytes() == (quick_nano_model / "model.onnx").read_bytes()
    ens = cfg["ifseg"]
    assert ens.platform == "ensemble" and [s.model_name for s in ens.ensemble_scheduling.step] == [
        "ifseg_pre", "ifseg_onnx", "ifseg_post"]
    assert {o.name for o in ens.output} == set(P.OUTPUTS) - {P.LABELS_PNG} and ens.input[0].data_type == mc.TYPE_STRING
    assert json.loads(ens.parameters["categories"].string_value) == list(spec.categories)
    assert (repo / "ifseg" / "labels.txt").read_text().split("\n")[:-1] == list(spec.categories)
    for name in ("ifseg_pre", "ifseg_post"):
        assert cfg[name].backend == "python" and (repo / name / "1" / "model.py").is_file()
        assert json.loads((repo / name / "1" / "ifseg.json").read_text()) == spec.raw
    assert cfg["ifseg_pre"].model_warmup[0].inputs["image"].input_data_file == "image"


@pytest.mark.parametrize("break_it, match", [
    (lambda r: _edit(r / "ifseg_onnx" / CONFIG, "max_batch_size: 4", "max_batch_size: 4\noptimisation {}"),
     'has no field named "optimisation"'),
    (lambda r: _edit(r / "ifseg_onnx" / CONFIG, "TYPE_FP32", "TYPE_FLOAT32"), 'no value named TYPE_FLOAT32'),
    (lambda r: _edit(r / "ifseg" / CONFIG, 'model_name: "ifseg_post"', 'model_name: "ifseg_postt"'),
     "step 2 (ifseg_postt): no such model in the repository"),
    (lambda r: _edit(r / "ifseg" / CONFIG, 'value: "_features"\n    }\n    input_map',
                     'value: "_feature"\n    }\n    input_map'),
     "tensor '_feature' is not produced before this step"),
    (lambda r: (r / "ifseg_pre" / "1" / "model.py").unlink(), "1/model.py is missing"),
    (lambda r: (r / "ifseg_pre" / "warmup" / "image").unlink(), "warm-up file warmup/image is missing"),
    (lambda r: _edit(r / "ifseg_post" / CONFIG, 'name: "ifseg_post"', 'name: "post"'), "differs from its directory"),
    (lambda r: _edit(r / "ifseg_post" / CONFIG, "max_batch_size: 4", "max_batch_size: 2"),
     "max_batch_size 2 < the ensemble's 4"),
])
def test_validation_names_each_problem(repo, tmp_path, break_it, match):
    broken = tmp_path / "broken"
    shutil.copytree(repo, broken)
    break_it(broken)
    problems = validate_repository(broken)
    assert any(match in p for p in problems), problems
    with pytest.raises(RepositoryError, match="is invalid"):
        check_repository(broken)


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def test_export_repository_refuses_bad_options_and_overwrites_only_with_force(repo, quick_nano_model, tmp_path):
    with pytest.raises(FileExistsError, match="not empty"):
        export_repository(quick_nano_model, repo)
    with pytest.raises(ValueError, match="TensorRT accelerator needs GPU instances"):
        export_repository(quick_nano_model, tmp_path / "a", tensorrt=True, instance_kind="cpu")
    with pytest.raises(ValueError, match="instance_kind must be one of"):
        export_repository(quick_nano_model, tmp_path / "b", instance_kind="tpu")
    (tmp_path / "c" / "mine").mkdir(parents=True)
    out = export_repository(quick_nano_model, tmp_path / "c", force=True, name="seg")
    assert sorted(p.name for p in out.iterdir()) == ["mine", "seg", "seg_onnx", "seg_post", "seg_pre"]
    # model names become folder names: nothing may escape the repository, nothing may be unnamed
    for bad in ("../evil", "", "a b", "a/b", "..", "x" * 65, "\u00effseg"):
        with pytest.raises(ValueError, match="model names are 1-64 letters"):
            export_repository(quick_nano_model, tmp_path / "d" / "repo", name=bad)
    assert not (tmp_path / "d").exists()
    from ifseg_rt.serve.server import ServeOptions, start_server

    with pytest.raises(ValueError, match="model names are 1-64 letters"):
        start_server(quick_nano_model, tmp_path / "w", ServeOptions(name="../evil"))
    with pytest.raises(ValueError, match=r"instances must be in \[1, \d+\] here"):
        start_server(quick_nano_model, tmp_path / "w", ServeOptions(instances=100_000))
    assert not (tmp_path / "w").exists()  # refused before anything was written or started


def test_export_cli_format_triton(quick_nano_model, tmp_path, capsys):
    from ifseg_rt.cli.export import main

    out = tmp_path / "repo"
    assert main([str(quick_nano_model), "--out", str(out), "--format", "triton", "--instance-kind", "cpu",
                 "--max-batch-size", "2", "--model-name", "nano"]) == 0
    assert "tritonserver --model-repository" in capsys.readouterr().out
    cfg = configs(out)
    assert cfg["nano_onnx"].instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert cfg["nano"].max_batch_size == 2
    with pytest.raises(SystemExit):  # a name that would leave the repository
        main([str(quick_nano_model), "--out", str(tmp_path / "z"), "--format", "triton", "--model-name", "../up"])
    assert "--model-name: model names are 1-64 letters" in capsys.readouterr().err
    assert not (tmp_path / "up").exists()
    with pytest.raises(SystemExit):  # a Triton option for another format
        main([str(quick_nano_model), "--out", str(tmp_path / "x"), "--instances", "2"])
    assert "--instances" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a model-export option for an already exported directory
        main([str(quick_nano_model), "--out", str(tmp_path / "y"), "--format", "triton", "--short-side", "256"])
    assert "--short-side applies only when exporting" in capsys.readouterr().err


def test_serving_repository_is_valid(quick_nano_model, tmp_path):
    spec = load_model_dir(quick_nano_model)
    root = write_serving_repository(tmp_path / "models", spec, instances=3, max_queue_size=5, max_pixels=1000)
    assert validate_repository(root) == []
    cfg = configs(root)["ifseg"]
    assert cfg.backend == "python" and cfg.instance_group[0].count == 3
    assert cfg.dynamic_batching.default_queue_policy.max_queue_size == 5
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params[P.PARAM_MODEL_DIR] == str(quick_nano_model.resolve()) and params[P.PARAM_MAX_PIXELS] == "1000"
    with pytest.raises(ValueError, match="max_queue_size must be an integer >= 1"):
        write_serving_repository(tmp_path / "m2", spec, max_queue_size=0)


def test_bundled_tritonserver_layout():
    """Fails loudly when an nvidia-pytriton release moves the parts we run."""
    pytest.importorskip("pytriton")
    from ifseg_rt.serve.tritonserver import bundled_tritonserver, server_environment

    b = bundled_tritonserver()
    assert b.executable.is_file() and (b.python_backend / "libtriton_python.so").is_file()
    assert (b.python_backend / "triton_python_backend_utils.py").is_file() and b.stub.is_file() and b.libs.is_dir()
    env = server_environment(b, {"LD_LIBRARY_PATH": "/x", "PATH": "/usr/bin"})
    assert env["LD_LIBRARY_PATH"].split(":") == [sysconfig.get_config_var("LIBDIR"), str(b.libs), "/x"]
    assert env["PATH"].split(":")[1:] == ["/usr/bin"]


def test_bundled_server_runs_the_exported_ensemble(quick_nano_model, tmp_path):
    """pre (python) -> ONNX (python-backend stand-in) -> post (python), wired by the ensemble, on the bundled
    tritonserver: labels equal ``Segmenter.seg``; a bad image fails its own request."""
    pytest.importorskip("pytriton")
    from ifseg_rt.runtime.segmenter import ImageError
    from ifseg_rt.serve import Client
    from ifseg_rt.serve.tritonserver import TritonServer

    root = export_repository(quick_nano_model, tmp_path / "repo", onnx_stand_in=True, threads=1)
    assert (root / "ifseg_onnx" / CONFIG).read_text().startswith("# STAND-IN")
    seg = Segmenter.load(quick_nano_model, threads=1)
    from ifseg_rt.world import render_scene

    scene = render_scene(7, (90, 140)).image
    with TritonServer(root, http_port=0, grpc_port=0, metrics_port=0, exit_timeout_s=5) as server:
        for url in (server.http_url, "grpc://" + server.grpc_url):
            client = Client(url)
            assert all(client.is_ready(m) for m in ("ifseg", "ifseg_pre", "ifseg_onnx", "ifseg_post"))
            for image in (PHOTO, scene):
                got, want = client.seg(image, return_probabilities=True), seg.seg(image, return_probabilities=True)
                np.testing.assert_array_equal(got.labels, want.labels)
                np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=0, atol=1e-6)
                assert (got.grid, got.input_size) == (want.grid, want.input_size)
            bad = client.seg([b"not an image", PHOTO], return_exceptions=True)
            assert isinstance(bad[0], ImageError) and "in ensemble 'ifseg'" in bad[0].reason
            np.testing.assert_array_equal(bad[1].labels, seg.seg(PHOTO).labels)
            client.close()
        assert server.is_alive()
    assert not server.is_alive()


def test_server_start_failure_names_the_cause(quick_nano_model, tmp_path):
    """A model that cannot load: tritonserver exits, and the error carries the model's own message (not a timeout);
    a busy port is refused before anything starts."""
    pytest.importorskip("pytriton")
    import shutil
    import socket

    from ifseg_rt.serve.tritonserver import ServerError, TritonServer

    model = tmp_path / "model"
    shutil.copytree(quick_nano_model, model)
    root = write_serving_repository(tmp_path / "models", load_model_dir(model), threads=1)
    (model / "ifseg.json").unlink()  # the instances cannot load it now
    server = TritonServer(root, http_port=0, grpc_port=0, metrics_port=0)
    with pytest.raises(ServerError, match=r"exited with code .* before it was ready:(.|\n)*ifseg.json is missing"):
        server.start(timeout_s=120)
    assert not server.is_alive()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = TritonServer(root, http_port=busy.getsockname()[1], grpc_port=0, metrics_port=0)
        with pytest.raises(ServerError, match=r"cannot listen on 127.0.0.1: http port \d+"):
            server.start(timeout_s=120)
    assert not server.is_alive()
