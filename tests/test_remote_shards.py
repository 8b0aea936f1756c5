"""Shards read through webdataset.gopen: `pipe:` commands (the user's, opted in), `file:` URLs and http from a
local server read exactly like local files, indexes may live behind a URL or point at a base URL or subfolder,
and unreadable remote shards are skipped and counted like corrupt local ones."""

from __future__ import annotations

import functools
import json
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from nativetok.config.schema import DataConfig
from nativetok.data import DatasetIndex, ImageShardsDataModule
from nativetok.data.shards import resolve_shard
from nativetok.data.stream import DataError, ShardSpec, ShardStream, read_shard
from nativetok.data.transforms import ImageDecoder

SHARD = "fmnist-val-000000.tar"


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def http_root(fmnist_index, monkeypatch):
    """The URL of the embedded data folder, served by http.server on 127.0.0.1 in a thread."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # curl must not send a local request to a proxy
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    handler = functools.partial(QuietHandler, directory=str(fmnist_index.parent))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


def raw_samples(url: str, limit=None) -> list:
    spec = ShardSpec(url, limit=limit, pipe_allowed=True)  # the user's own command, opted in
    return [{k: v for k, v in s.items() if k != "__url__"} for s in read_shard(spec)]


@pytest.mark.parametrize("kind", ["pipe", "file", "http"])
def test_a_shard_reads_the_same_through_a_pipe_a_file_url_and_http(fmnist_index, http_root, kind):
    path = fmnist_index.parent / SHARD
    url = {"pipe": f"pipe:cat {path}", "file": path.as_uri(), "http": http_root + SHARD}[kind]
    local = raw_samples(str(path))
    assert len(local) == 2000
    assert raw_samples(url) == local
    assert raw_samples(url, limit=5) == local[:5]  # leaving a stream early is no error


def test_an_index_behind_a_url_streams_the_same_batches(fmnist_index, http_root):
    def batches(index: str) -> list:
        module = ImageShardsDataModule(DataConfig(index=index, batch_size=32, val_samples=3000, num_workers=0))
        stream = module.make_stream(False)
        assert len(stream) == 94  # counts come from the index, wherever the shards are
        return list(stream)

    remote, local = batches(http_root + "index.json"), batches(str(fmnist_index))
    assert DatasetIndex.load(http_root + "index.json").shard_paths("val")[1] == http_root + "fmnist-val-000001.tar"
    assert len(remote) == len(local)
    for a, b in zip(remote, local):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"]) and a["key"] == b["key"]


def test_index_entries_resolve_against_a_base_url_or_subfolder(tmp_path, fmnist_index, http_root):
    body = json.loads(fmnist_index.read_text())
    body["base"] = http_root
    (tmp_path / "index.json").write_text(json.dumps(body))
    index = DatasetIndex.load(tmp_path / "index.json")
    paths = index.shard_paths("val")
    assert paths[0] == http_root + "fmnist-val-000000.tar"
    assert raw_samples(paths[0], limit=3) == raw_samples(str(fmnist_index.parent / SHARD), limit=3)
    assert DatasetIndex.load(index.save(tmp_path)).base == body["base"]  # a saved copy keeps pointing there

    assert resolve_shard("a.tar", None, "https://host/data") == "https://host/data/a.tar"
    assert resolve_shard("a.tar", None, "https://host/{}?part=1") == "https://host/a.tar?part=1"
    assert resolve_shard("a.tar", tmp_path, "shards") == str(tmp_path / "shards" / "a.tar")
    for base in ("pipe:cat {}", "../shards", "/data", "file:///data/", "https://host/'$(id)'/"):
        body["base"] = base
        (tmp_path / "index.json").write_text(json.dumps(body))
        with pytest.raises(DataError, match="index.json: base"):
            DatasetIndex.load(tmp_path / "index.json")


def test_unreadable_remote_shards_are_skipped_and_counted_or_stop_strict_mode(fmnist_index, http_root):
    path = fmnist_index.parent / SHARD
    with tarfile.open(path) as tar:  # where the third sample starts: a cut there leaves a tar that looks whole
        members = tar.getmembers()
    keys = sorted({m.name.split(".")[0] for m in members})
    cut = min(m.offset for m in members if m.name.startswith(keys[2] + "."))
    good = ShardSpec(f"pipe:cat {path}", limit=4, pipe_allowed=True)
    short = ShardSpec(f"pipe:head -c {cut} {path}", samples=2000, pipe_allowed=True)
    bad = [ShardSpec(http_root + "missing.tar"), ShardSpec("pipe:false", pipe_allowed=True), short]
    decoder = ImageDecoder(32, 1, train=False)
    stream = ShardStream([*bad, good], decoder, batch_size=8)
    batches = list(stream)
    assert [len(b["label"]) for b in batches] == [2 + 4]  # the cut-off shard's two samples are kept
    assert stream.skips.as_dict() == {"skipped_shards": 3, "skipped_samples": 0}
    for spec, message in ((bad[0], "missing.tar"), (short, "ends after 2 of the 2000 samples")):
        with pytest.raises(DataError, match=message):
            list(ShardStream([spec, good], decoder, batch_size=8, strict=True))
