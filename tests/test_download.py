"""``python -m ifseg_rt download`` against a loopback HTTP server: a complete download (checked as OFA-tiny with the
English vocabulary), a resumed one after an interrupted transfer (only onto the same version of the file, at the held
byte), corrupt / truncated / wrong files refused, and unusable arguments refused (exit 2) before any download."""

import argparse
import dataclasses
import hashlib
import json
import os
import pickle
import sys
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

torch = pytest.importorskip("torch")

from ifseg_rt.cli.download import main  # noqa: E402
from ifseg_rt.download import BPE_FILES, DownloadError, download, fetch  # noqa: E402


class Files(BaseHTTPRequestHandler):
    """Serves ``files`` with HTTP Range support; ``cut`` = {name: n} sends only n bytes (announcing the full size)
    and drops the connection, once. ``etag`` = {name: ETag} (a Range with another ``If-Range`` gets the whole file,
    unless ``honour_if_range`` is off); ``from_zero`` = {name: with Content-Range?}: a broken server answering a Range
    with 206 from byte 0; ``length`` = {name: raw Content-Length}; ``no_length`` / ``chunked``: names sent without a
    Content-Length (the body ends when the connection closes) / chunked. Reset before each test."""

    files: dict = {}
    cut: dict = {}
    ranges: list = []
    if_range: list = []
    etag: dict = {}
    honour_if_range = True
    from_zero: dict = {}
    length: dict = {}
    no_length: set = set()
    chunked: set = set()

    def do_GET(self):  # noqa: N802
        name = self.path.rsplit("/", 1)[-1]
        data = self.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        self.ranges.append((name, rng))
        self.if_range.append(self.headers.get("If-Range"))
        if rng and self.honour_if_range and self.headers.get("If-Range") not in (None, self.etag.get(name)):
            rng = None  # another version of the file: send the whole of this one
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            if name in self.from_zero:
                body = data[:len(data) - start]
                if self.from_zero[name]:
                    self.send_header("Content-Range", f"bytes 0-{len(body) - 1}/{len(data)}")
            else:
                body = data[start:]
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
            body = data
        if name in self.etag:
            self.send_header("ETag", self.etag[name])
        if name in self.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif name not in self.no_length:
            self.send_header("Content-Length", self.length.get(name, str(len(body))))
        self.end_headers()
        n = self.cut.pop(name, None)
        if name in self.chunked:  # 4 KiB chunks
            body = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in
                            (body[i:i + 4096] for i in range(0, len(body), 4096))) + b"0\r\n\r\n"
            n = None if n is None else n + 8 * (n // 4096 + 1)  # n bytes of the file, with the chunk framing
        self.wfile.write(body if n is None else body[:n])
        if n is not None:
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(autouse=True)
def _reset_files():
    Files.files, Files.cut, Files.ranges, Files.if_range, Files.etag = {}, {}, [], [], {}
    Files.honour_if_range, Files.from_zero, Files.length, Files.no_length, Files.chunked = True, {}, {}, set(), set()


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
    Files.etag = {"ofa_tiny.pt": '"tiny-1"'}
    with pytest.raises(DownloadError, match=r"cut short.*run the same command again to resume"):
        download("ofa-tiny", tmp_path, url_base=server, bpe=False, progress=False, log=lambda *_: None)
    part = tmp_path / "ofa_tiny.pt.part"
    assert 0 < part.stat().st_size <= half and not (tmp_path / "ofa_tiny.pt").exists()
    have = part.stat().st_size
    path = download("ofa-tiny", tmp_path, url_base=server, bpe=False, progress=False, log=lambda *_: None)
    assert Files.ranges == [("ofa_tiny.pt", None), ("ofa_tiny.pt", f"bytes={have}-")]  # only the rest was sent
    assert Files.if_range == [None, '"tiny-1"']  # ... of the same version of the file
    assert path.read_bytes() == tiny_bytes and not (tmp_path / "ofa_tiny.pt.part.json").exists()


DATA = bytes(range(256)) * 400  # a small file for fetch-level tests
OTHER = bytes(reversed(range(256))) * 500


@pytest.mark.parametrize("case", ["if-range-honoured", "if-range-ignored", "size-changed", "no-record"])
def test_a_part_of_another_file_is_not_resumed(server, tmp_path, case):
    """A ``.part`` of another version of the file: the result is the server's file, never a mix of the two."""
    Files.files = {"f.bin": DATA}
    Files.etag = {} if case == "size-changed" else {"f.bin": '"v2"'}
    Files.honour_if_range = case != "if-range-ignored"
    (tmp_path / "f.bin.part").write_bytes(OTHER[:5000])
    if case != "no-record":
        etag = None if case == "size-changed" else '"v1"'
        (tmp_path / "f.bin.part.json").write_text(json.dumps({"etag": etag, "total": len(OTHER)}))
    notes = []
    path = fetch(server + "f.bin", tmp_path / "f.bin", progress=False, log=notes.append)
    assert path.read_bytes() == DATA
    assert not (tmp_path / "f.bin.part").exists() and not (tmp_path / "f.bin.part.json").exists()
    assert len(notes) == 1 and "from the start" in notes[0]
    if case == "if-range-honoured":
        assert Files.if_range == ['"v1"'] and Files.ranges == [("f.bin", "bytes=5000-")]  # one request
    if case == "no-record":
        assert Files.ranges == [("f.bin", None)]


@pytest.mark.parametrize("content_range", [True, False])
def test_a_range_answered_from_byte_zero_starts_over(server, tmp_path, content_range):
    Files.files = {"f.bin": DATA}
    Files.cut = {"f.bin": 1000}
    with pytest.raises(DownloadError, match="cut short"):
        fetch(server + "f.bin", tmp_path / "f.bin", progress=False)
    assert (tmp_path / "f.bin.part").stat().st_size == 1000
    Files.from_zero = {"f.bin": content_range}
    notes = []
    assert fetch(server + "f.bin", tmp_path / "f.bin", progress=False, log=notes.append).read_bytes() == DATA
    assert [r for _, r in Files.ranges] == [None, "bytes=1000-", None]
    assert "cannot resume" in notes[0] and ("not from byte 1000" if content_range else "no Content-Range") in notes[0]


def test_a_chunked_transfer_cut_short_is_kept_and_resumed(server, tmp_path):
    Files.files = {"f.bin": DATA}
    Files.chunked = {"f.bin"}
    Files.cut = {"f.bin": 10000}  # two whole 4 KiB chunks, then a cut one
    with pytest.raises(DownloadError, match=r"f\.bin: the transfer was cut short after 8192 bytes .*IncompleteRead.*"
                                            r"run the same command again to resume"):
        fetch(server + "f.bin", tmp_path / "f.bin", progress=False)
    assert (tmp_path / "f.bin.part").read_bytes() == DATA[:8192]
    assert fetch(server + "f.bin", tmp_path / "f.bin", progress=False).read_bytes() == DATA
    assert [r for _, r in Files.ranges] == [None, "bytes=8192-"]


def test_no_content_length_and_a_connection_closed_early(server, tiny_bytes, tmp_path):
    """Without a size, a body cut short ends like a complete one: the file is kept as .part (to resume), not called
    a bad checkpoint and moved aside."""
    half = len(tiny_bytes) // 2
    Files.files = {"ofa_tiny.pt": tiny_bytes}
    Files.no_length = {"ofa_tiny.pt"}
    Files.cut = {"ofa_tiny.pt": half}
    with pytest.raises(DownloadError, match=r"did not announce the file's size.*cut short.*run the same command "
                                            r"again to resume"):
        download("ofa-tiny", tmp_path, url_base=server, bpe=False, progress=False, log=lambda *_: None)
    assert (tmp_path / "ofa_tiny.pt.part").stat().st_size == half
    assert not (tmp_path / "ofa_tiny.pt").exists() and not (tmp_path / "ofa_tiny.pt.corrupt").exists()
    path = download("ofa-tiny", tmp_path, url_base=server, bpe=False, progress=False, log=lambda *_: None)
    assert path.read_bytes() == tiny_bytes and [r for _, r in Files.ranges] == [None, f"bytes={half}-"]
    assert not (tmp_path / "ofa_tiny.pt.part").exists() and not (tmp_path / "ofa_tiny.pt.part.json").exists()


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
    assert main(["ofa-tiny", "--to", str(tmp_path / "file"), "--no-progress"]) == 2
    assert "--to " in capsys.readouterr().err
    Files.files = {}
    with pytest.raises(DownloadError) as e:  # a mirror that was given and failed: no advice to give one
        download("ofa-tiny", tmp_path / "x", url_base="http://127.0.0.1:9/", bpe=False, progress=False)
    assert "--url-base" not in str(e.value)


def _one_error_line(capsys, *words):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


@pytest.mark.parametrize("base", ["http://127.0.0.1:abc/", "http://[::1/", "ftp://127.0.0.1/ofa/", "http:///ofa/",
                                  "http://127.0.0.1/a b/"])
def test_malformed_mirror_urls_exit_2_before_any_download(server, tmp_path, capsys, monkeypatch, base):
    Files.files = {"ofa_tiny.pt": b"x" * 100}
    to = tmp_path / "dl"
    assert main(["ofa-tiny", "--to", str(to), "--url-base", base, "--no-bpe", "--no-progress"]) == 2
    _one_error_line(capsys, "--url-base", base)
    monkeypatch.setenv("IFSEG_RT_DOWNLOAD_BASE", base)
    assert main(["ofa-tiny", "--to", str(to), "--no-bpe", "--no-progress"]) == 2
    _one_error_line(capsys, "IFSEG_RT_DOWNLOAD_BASE")
    monkeypatch.delenv("IFSEG_RT_DOWNLOAD_BASE")
    assert main(["ofa-tiny", "--to", str(to), "--url-base", server, "--bpe-base", base, "--no-progress"]) == 2
    _one_error_line(capsys, "--bpe-base")
    assert Files.ranges == [] and not to.exists()  # nothing fetched, nothing created


def test_a_malformed_content_length_is_a_clear_error(server, tmp_path, capsys):
    Files.files = {"ofa_tiny.pt": b"x" * 100}
    Files.length = {"ofa_tiny.pt": "abc"}
    assert main(["ofa-tiny", "--to", str(tmp_path), "--url-base", server, "--no-bpe", "--no-progress"]) == 1
    _one_error_line(capsys, f"{server}ofa_tiny.pt: the server sent a malformed Content-Length header ('abc')")


def test_unusable_destinations_and_mirror_folders_exit_2_before_any_download(server, tmp_path, capsys):
    Files.files = {"ofa_tiny.pt": b"x" * 100}
    args = ["ofa-tiny", "--url-base", server, "--no-bpe", "--no-progress", "--to"]
    assert main(args[:1] + ["--url-base", str(tmp_path / "no-mirror"), "--to", str(tmp_path / "a")]) == 2
    _one_error_line(capsys, "mirror folder not found", "no-mirror")
    assert main(args[:1] + ["--url-base", (tmp_path / "no-mirror").as_uri(), "--to", str(tmp_path / "a")]) == 2
    _one_error_line(capsys, "mirror folder not found", "file://")
    (tmp_path / "file").write_text("x")
    assert main(args + [str(tmp_path / "file" / "sub")]) == 2  # a folder that cannot be created
    _one_error_line(capsys, f"--to {tmp_path / 'file' / 'sub'} is not a writable folder")
    (tmp_path / "b" / "ofa_tiny.pt").mkdir(parents=True)  # the destination file is a folder
    assert main(args + [str(tmp_path / "b")]) == 2
    err = _one_error_line(capsys, f"{tmp_path / 'b' / 'ofa_tiny.pt'} is a folder")
    assert ".part" not in err
    if sys.platform.startswith("linux") and os.path.isdir("/sys"):
        assert main(args + ["/sys/ifseg-rt-download-test"]) == 2  # sysfs: not even root creates folders there
        _one_error_line(capsys, "--to /sys/ifseg-rt-download-test is not a writable folder")
    assert Files.ranges == []


def test_a_pickle_mirror_file_is_refused_without_torch_warnings(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "ofa_tiny.pt").write_bytes(pickle.dumps({"model": {}}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DownloadError, match="is not a usable OFA checkpoint"):
            download("ofa-tiny", tmp_path / "ck", url_base=str(mirror), bpe=False, progress=False,
                     log=lambda *_: None)
    assert [str(w.message) for w in caught if "pickle" in str(w.message)] == []
