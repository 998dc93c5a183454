"""Scale-out on Ray Data (ifseg_rt.distributed) on a local 2-CPU Ray: ``segment --ray`` writes byte for byte what
single-process ``segment`` writes plus a complete Parquet table, bad files become error rows, a re-run skips the
finished images; ``eval --ray`` equals ``eval``; without ray, ``--ray`` names the ``[ray]`` extra; the local Ray
listens on loopback only. Also the pieces both paths share: input lists, output names, label-map bytes, pool sizing."""

import contextlib
import importlib.util
import io
import json
import shutil
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the shared export
pytest.importorskip("onnxruntime")

from PIL import Image  # noqa: E402
from conftest import CATEGORIES, export_copy  # noqa: E402

from ifseg_rt import distributed  # noqa: E402
from ifseg_rt.cli.args import ray_address  # noqa: E402
from ifseg_rt.runtime import ImagePolicy  # noqa: E402
from ifseg_rt.runtime.inputs import list_images  # noqa: E402
from ifseg_rt.runtime.outputs import decode_label_png, encode_label_png, output_names  # noqa: E402

# ray is not imported here: ifseg_rt.distributed sets the loopback-only environment before the first import
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs pip install 'ifseg_rt[ray]'")
POLICY = ImagePolicy(short_side=64, max_long_side=256)  # 64 px scenes -> 4x4 cells: fast
SCENES = ["sky", "grass", "water", "sand", "ball"]  # label values 1..5 for the 5-category test model
BAD = ["corrupt.png", "empty.jpg", "text.png", "tiny.png", "truncated.jpg"]


@pytest.fixture(scope="module")
def model_dir(shared_export, tmp_path_factory):
    return export_copy(shared_export, tmp_path_factory, "distributed", POLICY)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """40 scenes (images/ + labels/) and extra/: five unusable files and a good JPEG whose stem repeats a scene's."""
    from ifseg_rt.world import write_dataset

    root = tmp_path_factory.mktemp("ray_data")
    pairs = write_dataset(root, range(40), SCENES, size=64)
    extra = root / "extra"
    extra.mkdir()
    (extra / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (extra / "empty.jpg").write_bytes(b"")
    (extra / "text.png").write_text("not an image")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(extra / "tiny.png")  # below one 16 px patch
    with Image.open(pairs[1][0]) as im:
        im.convert("RGB").save(extra / "0001.jpg", quality=95)  # output name 0001_1
        im.convert("RGB").save(extra / "truncated.jpg", quality=95)
    (extra / "truncated.jpg").write_bytes((extra / "truncated.jpg").read_bytes()[:300])
    return root, pairs


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray (2 CPUs, loopback only) for every Ray test of this module, stopped after them (its daemons
    would otherwise idle through the rest of the suite)."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("needs pip install 'ifseg_rt[ray]'")
    started = distributed.init_ray("local", num_cpus=2, quiet=True)
    yield
    if started:
        distributed.shutdown_ray()


def _cli(args):
    """Run ``python -m ifseg_rt ...`` in-process: (exit code, stdout, stderr)."""
    from ifseg_rt.cli import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli(args)
        except SystemExit as e:  # argparse errors (2) and `raise SystemExit("error: ...")` (1)
            rc = e.code if isinstance(e.code, int) else 1
            if isinstance(e.code, str):
                err.write(e.code + "\n")
    return rc, out.getvalue(), err.getvalue()


def _segment_args(data, model_dir, out):
    root, _ = data
    return ["segment", str(root / "images"), str(root / "extra"), "--model", str(model_dir), "--out", str(out),
            "--overlay", "--batch-size", "2", "--quiet"]


def _errors(stderr):
    return sorted(line for line in stderr.splitlines() if line.startswith("error: "))


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture(scope="module")
def single(data, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    rc, stdout, stderr = _cli(_segment_args(data, model_dir, out) + ["--threads", "2"])
    assert rc == 1 and "wrote 41 label map(s)" in stdout and "5 failed" in stdout, (stdout, stderr)
    return out, _errors(stderr)


@pytest.fixture(scope="module")
def on_ray(ray_local, data, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("on_ray") / "out"
    rc, stdout, stderr = _cli(_segment_args(data, model_dir, out) + ["--ray", "--threads", "1"])
    assert rc == 1, (stdout, stderr)
    return out, stdout, _errors(stderr)


def _table(path):
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    return t, t.to_pandas().sort_values("index").reset_index(drop=True)


# --- segment --ray ---------------------------------------------------------------------------------------------
@needs_ray
def test_segment_on_ray_writes_what_segment_writes(single, on_ray, data):
    single_out, single_errors = single
    ray_out, stdout, ray_errors = on_ray
    assert "2 actor(s) x 1 thread(s)" in stdout and "wrote 41 label map(s)" in stdout and "5 failed" in stdout
    ray_files = _files(ray_out)
    table = ray_files.pop(distributed.TABLE_NAME)
    assert table[:4] == b"PAR1"
    single_files = _files(single_out)
    assert len(single_files) == 2 * 41 and "0001_1.png" in single_files  # label maps + overlays; repeated stem
    assert sorted(ray_files) == sorted(single_files)
    for name, content in single_files.items():
        assert ray_files[name] == content, name  # byte for byte
    assert ray_errors == single_errors and len(ray_errors) == len(BAD)  # the same messages, each file once
    for bad in BAD:
        assert sum(bad in line for line in ray_errors) == 1, (bad, ray_errors)


@needs_ray
def test_parquet_table_is_complete(on_ray, data):
    root, _ = data
    ray_out = on_ray[0]
    t, df = _table(ray_out / distributed.TABLE_NAME)
    sources = list_images([str(root / "images"), str(root / "extra")])
    assert json.loads(t.schema.metadata[b"ifseg_rt.categories"]) == CATEGORIES
    assert list(df["index"]) == list(range(46)) and list(df["path"]) == sources
    assert list(df["name"]) == output_names(sources)
    pixels = [f"pixels_{c}" for c in CATEGORIES]
    stages = ["preprocess_ms", "engine_ms", "knn_ms", "resize_argmax_ms", "total_ms"]
    assert set(pixels + stages + ["height", "width", "skipped", "error"]) <= set(df.columns)
    bad = df[df["error"].notna()]
    assert sorted(p.split("/")[-1] for p in bad["path"]) == sorted(BAD)
    assert all(src in err for src, err in zip(bad["path"], bad["error"]))
    assert bad[pixels + stages + ["height", "width"]].isna().all().all()
    ok = df[df["error"].isna()]
    assert len(ok) == 41 and not ok["skipped"].any()
    assert not ok[pixels + stages].isna().any().any() and (ok[stages] >= 0).all().all()
    for _, row in ok.iterrows():
        labels = decode_label_png((ray_out / f"{row['name']}.png").read_bytes())
        assert (row["height"], row["width"]) == labels.shape == (64, 64)
        np.testing.assert_array_equal(row[pixels].to_numpy(np.int64), np.bincount(labels.ravel(), minlength=5))


@needs_ray
def test_rerun_skips_finished_images_and_redoes_the_rest(on_ray, single, data, model_dir, tmp_path):
    """A crash left some outputs missing: the re-run segments exactly those (and the bad files again), leaves the
    others untouched, and its table still has every image (counts of skipped ones read back from their label maps)."""
    root, _ = data
    first = on_ray[0]
    out = tmp_path / "out"
    shutil.copytree(first, out)
    gone = ["0003.png", "0017.png", "0017.overlay.jpg", "0030.png", "0001_1.png", "0039.overlay.jpg"]
    redone = {"0003", "0017", "0030", "0001_1", "0039"}
    for name in gone:
        (out / name).unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()
              if p.name != distributed.TABLE_NAME and p.name.split(".")[0] not in redone}
    errors = []
    summary = distributed.segment_dataset([str(root / "images"), str(root / "extra")], str(model_dir), str(out),
                                          overlay=True, batch_size=2, threads=1, progress=False,
                                          on_error=errors.append)
    assert (summary.written, summary.skipped, len(summary.failed)) == (5, 36, 5)
    assert sorted(errors) == sorted(summary.failed)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in mtimes} == mtimes  # not rewritten
    single_files = _files(single[0])
    ray_files = _files(out)
    ray_files.pop(distributed.TABLE_NAME)
    assert ray_files == single_files
    _, df = _table(out / distributed.TABLE_NAME)
    _, df1 = _table(first / distributed.TABLE_NAME)
    assert set(df.loc[~df["skipped"] & df["error"].isna(), "name"]) == redone
    assert df["skipped"].sum() == 36 and df["total_ms"][df["skipped"]].isna().all()
    pixels = [f"pixels_{c}" for c in CATEGORIES] + ["height", "width"]
    ok = df["error"].isna()
    np.testing.assert_array_equal(df.loc[ok, pixels].to_numpy(), df1.loc[ok, pixels].to_numpy())


# --- eval --ray ----------------------------------------------------------------------------------------------
@needs_ray
def test_eval_on_ray_equals_eval(ray_local, data, model_dir, tmp_path):
    root, _ = data
    args = ["eval", "--model", str(model_dir), "--images", str(root / "images"), "--labels", str(root / "labels"),
            "--no-progress", "--device", "cpu"]
    rc, stdout, stderr = _cli(args + ["--threads", "2", "--json", str(tmp_path / "single.json")])
    assert rc == 0, stderr
    rc, stdout, stderr = _cli(args + ["--ray", "--json", str(tmp_path / "ray.json")])
    assert rc == 0, stderr
    single, ray = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("single", "ray"))
    assert single["images"] == ray["images"] == 40
    assert ray["metrics"] == single["metrics"] and set(ray["metrics"]) == {"raw", "knn"}
    assert ray["knn"] == single["knn"] and ray["categories"] == CATEGORIES


@needs_ray
def test_eval_on_ray_reports_an_unusable_image(ray_local, data, model_dir):
    from ifseg_rt.evaluate import evaluate, load_segmenter

    root, pairs = data
    seg = load_segmenter(model_dir, device="cpu", threads=1)
    reference = evaluate(seg, pairs[:10])
    bad = (root / "extra" / "corrupt.png", pairs[0][1])
    out = distributed.evaluate_dataset(pairs[:10] + [bad], str(model_dir), progress=False)
    assert out.result.num_images == 10 and len(out.failed) == 1 and "corrupt.png" in out.failed[0]
    for name in ("raw", "knn"):
        a, b = reference.metrics[name], out.result.metrics[name]
        np.testing.assert_array_equal(a.intersection, b.intersection)
        np.testing.assert_array_equal(a.union, b.union)
        assert a.miou == b.miou


@needs_ray
def test_model_options_are_refused_on_the_driver(ray_local, data, model_dir, tmp_path):
    """A precision or backend every actor would refuse is refused once, on the driver, before any actor starts: one
    error line, no actor traceback (it used to print ~200 lines of Ray's before the cause)."""
    root, pairs = data
    for args, message in (
            (_segment_args(data, model_dir, tmp_path / "o") + ["--ray", "--precision", "int8"],
             "offers the CPU precisions ['fp32'], not 'int8'"),
            (_segment_args(data, model_dir, tmp_path / "o") + ["--ray", "--backend", "tensorrt"],
             "the tensorrt backend runs on device='cuda' only"),
            (["eval", "--model", str(model_dir), "--images", str(root / "images"), "--labels", str(root / "labels"),
              "--no-progress", "--ray", "--precision", "int8"], "offers the CPU precisions ['fp32'], not 'int8'")):
        rc, stdout, stderr = _cli(args)
        assert rc == 2 and _errors(stderr) == [f"error: {message}"] or message in _errors(stderr)[0], stderr
        assert len(_errors(stderr)) == 1 and "Traceback" not in stderr and "RayTaskError" not in stderr, stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    with pytest.raises(ValueError, match="no image/label pairs to evaluate"):
        distributed.evaluate_dataset([], str(model_dir), progress=False)


def test_a_failed_ray_job_names_the_cause():
    """A job that fails inside an actor (a full disk, a read-only folder) is reported with the innermost error's own
    words, found under Ray's wrappers, not Ray's 'UDF failed to process a data block'."""
    import types

    from ifseg_rt.distributed.cluster import RayRun

    class RayError(Exception):  # stands for ray.exceptions.RayError
        pass

    ctx = types.SimpleNamespace(enable_progress_bars=True)
    ray = types.SimpleNamespace(exceptions=types.SimpleNamespace(RayError=RayError),
                                data=types.SimpleNamespace(DataContext=types.SimpleNamespace(get_current=lambda: ctx)))
    disk = OSError(28, "No space left on device", "/out/0001.png")
    with pytest.raises(RuntimeError, match=r"^the Ray job failed: OSError: \[Errno 28\] No space left on device: "
                                           r"'/out/0001.png'$"):
        with RayRun(ray, False):
            try:
                raise disk
            except OSError as e:
                raise RayError("ray.exceptions.UserCodeException: UDF failed to process a data block.") from e
    with pytest.raises(RuntimeError, match=r"^the Ray job failed: ValueError: bad model$"):
        with RayRun(ray, False):
            raise RayError("Traceback ...\nValueError: bad model\n")
    assert ctx.enable_progress_bars is True  # restored


def test_outputs_and_table_stay_apart_from_the_inputs(tmp_path):
    """file:// URIs are local paths for the check, and the --ray table may neither be an input nor lack the .parquet
    ending (it replaced an input photo with a Parquet file before)."""
    from ifseg_rt.runtime.inputs import check_outputs_apart

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(b"")
    inputs = [f"file://{photos / 'a.png'}", str(photos / "a.png")]
    for out in (f"file://{photos}", str(photos), f"file://{tmp_path}"):
        with pytest.raises(ValueError, match="holds the input"):
            check_outputs_apart(inputs[:1], out)
    with pytest.raises(ValueError, match=r"--table .*a.png: the table is a Parquet file; give a name ending in "
                                         r"\.parquet"):
        check_outputs_apart(inputs, tmp_path / "out", table=photos / "a.png")
    with pytest.raises(ValueError, match=r"--table .*t.parquet is the input"):
        check_outputs_apart(inputs + [str(photos / "t.parquet")], tmp_path / "out", table=photos / "t.parquet")
    check_outputs_apart(inputs, tmp_path / "out", table=photos / "t.parquet")  # beside the inputs is fine
    check_outputs_apart(["s3://bucket/a.png"], "s3://bucket/out", table="s3://bucket/t.parquet")


def test_segment_checks_its_outputs_before_any_work(model_dir, data, tmp_path):
    import os

    if os.geteuid() == 0:
        ro = "/proc/ifseg_rt_out"  # root writes anywhere except such file systems
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
    for args, message in ((["--out", str(ro)], "cannot write there"),
                          (["--out", str(tmp_path / "o"), "--ray", "--table", str(tmp_path)], "is a folder"),
                          (["--out", str(data[1][0][0])], "is a file, not a folder")):
        rc, _, stderr = _cli(["segment", str(data[0] / "images"), "--model", str(model_dir), *args])
        assert rc == 2 and message in stderr, stderr


def test_a_list_file_with_a_byte_order_mark(data, tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_bytes("\ufeff".encode() + f"{data[1][0][0]}\n{data[1][1][0]}\n".encode())  # as Notepad saves it
    assert list_images([str(lst)]) == [str(data[1][0][0]), str(data[1][1][0])]


# --- the local Ray -----------------------------------------------------------------------------------------------
@needs_ray
def test_local_ray_listens_on_loopback_only(ray_local):
    import psutil
    import ray

    assert distributed.is_loopback(ray.util.get_node_ip_address())
    assert all(distributed.is_loopback(n["NodeManagerAddress"]) for n in ray.nodes())
    ours = {p.pid for p in psutil.Process().children(recursive=True)}
    listening = [c for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert listening  # the GCS, raylet and workers
    for c in listening:
        assert distributed.is_loopback(c.laddr.ip.removeprefix("::ffff:")), c


def test_ray_flag_without_ray_names_the_extra(monkeypatch, data, model_dir, tmp_path):
    root, pairs = data
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    monkeypatch.setitem(sys.modules, "ray.data", None)
    rc, _, stderr = _cli(["segment", str(pairs[0][0]), "--model", str(model_dir), "--out", str(tmp_path / "o"),
                          "--ray"])
    assert rc == 2 and "pip install 'ifseg_rt[ray]'" in stderr and "Traceback" not in stderr
    rc, _, stderr = _cli(["eval", "--model", str(model_dir), "--images", str(root / "images"), "--labels",
                          str(root / "labels"), "--ray"])
    assert rc == 2 and "pip install 'ifseg_rt[ray]'" in stderr  # the same error, the same exit code
    with pytest.raises(distributed.RayUnavailable, match=r"\[ray\]"):
        distributed.require_ray()


def test_ray_flags_are_checked(model_dir, tmp_path):
    for args, message in (
            (["segment", "--ray", str(tmp_path), "--model", str(model_dir), "--out", "o"], "--ray=local"),
            (["segment", str(tmp_path), "--model", str(model_dir), "--out", "o", "--actors", "2"],
             "--actors only apply with --ray")):
        rc, _, stderr = _cli(args)
        assert rc == 2 and message in stderr, stderr
    for ok in ("local", "auto", "ray://head:10001", "10.0.0.5:6379", "[::1]:6379"):
        assert ray_address(ok) == ok


# --- the pool ----------------------------------------------------------------------------------------------------
def test_plan_pool():
    plan = distributed.plan_pool
    two = dict(cluster_cpus=2, cluster_gpus=0, node_cpus=2)
    assert plan(device="cpu", **two) == distributed.PoolPlan(actors=2, threads=1, num_gpus=0.0, device="cpu")
    assert plan(device="cpu", actors=1, **two).threads == 2  # a node's cores / actors
    assert plan(device="auto", threads=2, **two) == distributed.PoolPlan(1, 2, 0.0, "cpu")
    with pytest.raises(ValueError, match="3 actor.* need 3 CPUs; the Ray cluster has 2"):
        plan(device="cpu", actors=3, **two)
    with pytest.raises(ValueError, match="no GPUs"):
        plan(device="cuda", **two)
    with pytest.raises(ValueError, match="use --device cuda"):
        plan(device="cuda:1", **two)
    gpus = dict(cluster_cpus=64, cluster_gpus=4, node_cpus=32)  # two nodes of 32 cores and 2 GPUs
    assert plan(device="cuda", **gpus) == distributed.PoolPlan(4, 8, 1.0, "cuda")
    assert plan(device="auto", gpus_per_actor=0.5, **gpus) == distributed.PoolPlan(8, 4, 0.5, "cuda")
    assert plan(device="cpu", actors=4, **gpus).threads == 8  # never more than a node's cores per actor...
    assert plan(device="cpu", actors=1, **gpus).threads == 32
    with pytest.raises(ValueError, match="5 actor.* 1 GPU.* need 5 GPUs"):
        plan(device="cuda", actors=5, **gpus)


# --- what both paths share ---------------------------------------------------------------------------------------
def test_output_names_are_decided_from_the_whole_list():
    assert output_names(["a/x.png", "b/x.png", "c/x_1.png", "x.jpg", "s3://b/y.png?region=eu", "y.tif"]) == \
        ["x", "x_1", "x_1_1", "x_2", "y", "y_1"]
    assert output_names(["d/x?y=1.png", "s3://b/x?y=1.png"]) == ["x?y=1", "x"]  # '?' is part of a local name


def test_ctrl_c_on_ray_says_how_far_it_got(monkeypatch, data, model_dir, tmp_path):
    def interrupted(*a, on_progress=None, **k):
        on_progress(7)
        raise KeyboardInterrupt

    monkeypatch.setattr(distributed, "segment_dataset", interrupted)
    rc, _, stderr = _cli(["segment", str(data[0] / "images"), "--model", str(model_dir), "--out", str(tmp_path / "o"),
                          "--ray"])
    assert rc == 130 and "interrupted: 7 images done in" in stderr and "run the same command again" in stderr, stderr


def test_an_unreachable_cluster_address_fails_at_once():
    """Ray retries an address nobody listens on for minutes; the driver checks it first (a TCP connection)."""
    import socket

    from ifseg_rt.distributed.cluster import check_reachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    for address in (f"127.0.0.1:{closed}", f"ray://127.0.0.1:{closed}"):
        with pytest.raises(RuntimeError, match=rf"cannot reach the Ray cluster at --ray {address} \("):
            check_reachable(address, timeout_s=5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        check_reachable(f"ray://127.0.0.1:{s.getsockname()[1]}")


def test_list_images(tmp_path):
    img = np.zeros((20, 20, 3), np.uint8)
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("b.png", "a.jpg", "c.PNG", "sub/e.png"):
        Image.fromarray(img).save(tmp_path / "d" / name)
    (tmp_path / "d" / "notes.txt").write_text("not an image list entry")
    d = str(tmp_path / "d")
    assert list_images([d]) == [f"{d}/a.jpg", f"{d}/b.png", f"{d}/c.PNG"]  # sorted, not recursive
    assert list_images([f"{d}/*.png", f"{d}/**/e.png"]) == [f"{d}/b.png", f"{d}/sub/e.png"]
    lst = tmp_path / "list.txt"
    lst.write_text(f"# two images\nd/b.png\n\n{d}/sub/e.png\n")
    assert list_images([str(lst)]) == [f"{tmp_path}/d/b.png", f"{d}/sub/e.png"]
    with pytest.raises(FileNotFoundError, match="input not found: .*nope.png"):
        list_images([d, f"{d}/nope.png"])
    with pytest.raises(FileNotFoundError, match=r"no images match .*\*.gif"):
        list_images([f"{d}/*.gif"])
    with pytest.raises(ValueError, match="add --ray"):
        list_images([f"file://{d}"])
    pytest.importorskip("pyarrow")
    assert list_images([f"file://{d}", f"file://{d}/sub/*.png"], allow_uris=True) == \
        [f"file://{d}/a.jpg", f"file://{d}/b.png", f"file://{d}/c.PNG", f"file://{d}/sub/e.png"]
    with pytest.raises(FileNotFoundError, match="input not found: file://"):
        list_images([f"file://{d}/nope"], allow_uris=True)


@pytest.mark.parametrize("m", [5, 300])
def test_label_png_bytes(m, tmp_path):
    """The one encoder both paths use: lossless, and the same bytes runtime.palette.save_label_png writes."""
    from ifseg_rt.runtime.palette import save_label_png

    labels = np.random.default_rng(m).integers(0, m, size=(37, 53)).astype(np.int32)
    data = encode_label_png(labels, m)
    np.testing.assert_array_equal(decode_label_png(data), labels)
    assert save_label_png(labels, tmp_path / "l.png", m).read_bytes() == data
