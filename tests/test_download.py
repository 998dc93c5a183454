"""``python -m ifseg_rt download`` against a loopback HTTP server: a complete download (checked as OFA-tiny with the
English vocabulary), a resumed one after an interrupted transfer, and corrupt / truncated / wrong files refused."""

import argparse
import dataclasses
import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

torch = pytest.importorskip("torch")

from ifseg_rt.cli.download import main  # noqa: E402
from ifseg_rt.download import BPE_FILES, DownloadError, download  # noqa: E402


class Files(BaseHTTPRequestHandler):
    """Serves ``files`` with HTTP Range support; ``cut`` = {name: n} sends only n bytes (announcing the full size)
    and drops the connection, once."""

    files: dict = {}
    cut: dict = {}
    ranges: list = []

    def do_GET(self):  # noqa: N802
        name = self.path.rsplit("/", 1)[-1]
        data = self.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        self.ranges.append((name, rng))
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        n = self.cut.pop(name, None)
        self.wfile.write(data[start:] if n is None else data[start:start + n])
        if n is not None:
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/"
    finally:
        srv.shutdown()
        srv.server_close()


def _state(vocab_size=None):
    """An OFA-tiny-shaped fairseq checkpoint (fp16 zeros: only the layout matters here), as bytes."""
    import io

    from ifseg_rt.model import build_model, get_config

    cfg = get_config("tiny") if vocab_size is None else dataclasses.replace(get_config("tiny"), vocab_size=vocab_size)
    with torch.device("meta"):
        layout = build_model(cfg).state_dict()
    state = {k: torch.zeros(v.shape, dtype=torch.float16 if v.is_floating_point() else v.dtype)
             for k, v in layout.items()}
    buf = io.BytesIO()
    torch.save({"model": state, "cfg": {"task": argparse.Namespace(bpe="gpt2")}}, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_bytes():
    return _state()


def test_complete_download_and_the_next_command(server, tiny_bytes, tmp_path, capsys):
    Files.files = {"ofa_tiny.pt": tiny_bytes}
    assert main(["ofa-tiny", "--to", str(tmp_path), "--url-base", server, "--no-bpe", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "ofa_tiny.pt").read_bytes() == tiny_bytes and not (tmp_path / "ofa_tiny.pt.part").exists()
    assert "OFA-tiny, 59457-symbol English vocabulary" in out
    assert f"python -m ifseg_rt adapt --checkpoint {tmp_path / 'ofa_tiny.pt'} --bpe-dir {tmp_path / 'ofa-bpe'}" in out


def test_interrupted_transfer_resumes(server, tiny_bytes, tmp_path):
    half = len(tiny_bytes) // 2
    Files.files = {"ofa_tiny.pt": tiny_bytes}
    Files.cut = {"ofa_tiny.pt": half}
    Files.ranges = []
    with pytest.raises(DownloadError, match=r"(interrupted|stopped early).*run the same command again to resume"):
        download("ofa-tiny", tmp_path, url_base=server, bpe=False, progress=False, log=lambda *_: None)
    part = tmp_path / "ofa_tiny.pt.part"
    assert 0 < part.stat().st_size <= half and not (tmp_path / "ofa_tiny.pt").exists()
    have = part.stat().st_size
    path = download("ofa-tiny", tmp_path, url_base=server, bpe=False, progress=False, log=lambda *_: None)
    assert Files.ranges == [("ofa_tiny.pt", None), ("ofa_tiny.pt", f"bytes={have}-")]  # only the rest was sent
    assert path.read_bytes() == tiny_bytes


@pytest.mark.parametrize("kind", ["truncated", "corrupt", "chinese-vocabulary"])
def test_bad_files_are_refused_and_moved_aside(server, tiny_bytes, tmp_path, kind):
    data = {"truncated": lambda: tiny_bytes[:len(tiny_bytes) // 3],
            "corrupt": lambda: bytes(range(256)) * 1000,
            "chinese-vocabulary": lambda: _state(vocab_size=21128 + 1000 + 8192)}[kind]()
    Files.files = {"ofa_tiny.pt": data}
    match = "Chinese OFA" if kind == "chinese-vocabulary" else "is not a usable OFA checkpoint"
    with pytest.raises(DownloadError, match=match):
        download("ofa-tiny", tmp_path, url_base=server, bpe=False, progress=False, log=lambda *_: None)
    assert not (tmp_path / "ofa_tiny.pt").exists() and (tmp_path / "ofa_tiny.pt.corrupt").read_bytes() == data


def test_bpe_files_are_md5_checked(server, tiny_bytes, tmp_path):
    real = {}
    from conftest import BPE_DIR

    for name, md5 in BPE_FILES.items():  # the real files when the shared data is here, else stand-ins
        p = BPE_DIR / name
        real[name] = p.read_bytes() if p.is_file() else b"stand-in " + name.encode()
    Files.files = {"ofa_tiny.pt": tiny_bytes, **real}
    if all(hashlib.md5(real[n]).hexdigest() == md5 for n, md5 in BPE_FILES.items()):
        download("ofa-tiny", tmp_path, url_base=server, bpe_base=server, progress=False, log=lambda *_: None)
        assert sorted(p.name for p in (tmp_path / "ofa-bpe").iterdir()) == sorted(BPE_FILES)
    Files.files = {"ofa_tiny.pt": tiny_bytes, **{n: b"not the OFA file" for n in BPE_FILES}}
    with pytest.raises(DownloadError, match=r"encoder.json: md5 [0-9a-f]{32}, expected dffec25a"):
        download("ofa-tiny", tmp_path / "other", url_base=server, bpe_base=server, progress=False,
                 log=lambda *_: None)
    assert (tmp_path / "other" / "ofa-bpe" / "encoder.json.corrupt").exists()


def test_unknown_name_and_no_network(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["ofa-gigantic", "--to", str(tmp_path)])
    assert "invalid choice" in capsys.readouterr().err
    # a closed port on loopback stands for "no network": a clear error, exit 1
    assert main(["ofa-tiny", "--to", str(tmp_path), "--url-base", "http://127.0.0.1:9/", "--no-progress"]) == 1
    assert "ofa_tiny.pt" in capsys.readouterr().err


def test_a_local_folder_is_a_mirror(tiny_bytes, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "ofa_tiny.pt").write_bytes(tiny_bytes)
    path = download("ofa-tiny", tmp_path / "ck", url_base=str(mirror), bpe=False, progress=False,
                    log=lambda *_: None)
    assert path.read_bytes() == tiny_bytes
    with pytest.raises(DownloadError, match="mirror folder not found"):
        download("ofa-tiny", tmp_path / "ck2", url_base=str(tmp_path / "nope"), bpe=False, progress=False)


def test_download_errors_point_the_right_way(server, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["ofa-tiny", "--to", str(tmp_path / "file"), "--no-progress"]) == 1
    assert "--to " in capsys.readouterr().err
    Files.files = {}
    with pytest.raises(DownloadError) as e:  # a mirror that was given and failed: no advice to give one
        download("ofa-tiny", tmp_path / "x", url_base="http://127.0.0.1:9/", bpe=False, progress=False)
    assert "--url-base" not in str(e.value)
