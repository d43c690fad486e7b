"""Shard sets read through webdataset's openers: a web server on 127.0.0.1 and `pipe:cat` give the local folder's
batches for the same seed and resume exactly; transient failures are retried, lasting ones and missing files are
one line; a shard that differs from its manifest is named."""

from __future__ import annotations

import random
import shutil
from itertools import islice
from pathlib import Path

import pytest
import torch

from megapixel.checkpoint.files import tag_name
from megapixel.cli import main
from megapixel.data.shards.format import open_shard, read_manifest
from megapixel.data.shards.remote import Location, parse_location
from megapixel.data.stream import make_loader
from megapixel.engine.loop import train
from megapixel.errors import DataError
from tests.harness.runs import losses, tiny
from tests.harness.serve import serving

pytestmark = [
    pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http(s) through curl"),
    pytest.mark.usefixtures("one_thread"),
]

# The digits set of conftest: 1,617 training images in shards of 500 (train-000000..000003), 180 val in one.
TRAIN_PATTERN = "train-{000000..000003}.tar"


def tokens_of(loader, batches: int) -> torch.Tensor:
    return torch.cat([batch["tokens"] for batch in islice(loader, batches)])


def stream_error(loader) -> str:
    """The message a stream stops with. Caught here, so that the stream and its data-loader workers end before the
    caller stops the server their next fetch would wait for."""
    try:
        tokens_of(loader, 30)
    except DataError as err:
        return str(err)
    raise AssertionError("the stream did not stop")


@pytest.fixture(scope="module")
def server(digits_shards):
    with serving(digits_shards) as server:
        yield server


@pytest.mark.parametrize(
    ("text", "prefix", "suffix", "remote", "names"),
    [
        ("data/set", "data/set/", "", False, None),
        ("data/set/", "data/set/", "", False, None),
        ("file:///data/set", "/data/set/", "", False, None),
        ("data/set/train-{0..2}.tar", "data/set/", "", False, ("train-0.tar", "train-1.tar", "train-2.tar")),
        ("https://host/set", "https://host/set/", "", True, None),
        ("https://host/set/", "https://host/set/", "", True, None),
        ("https://host/set/val-0.tar", "https://host/set/", "", True, ("val-0.tar",)),
        ("https://host/set/train-{0..1}.tar", "https://host/set/", "", True, ("train-0.tar", "train-1.tar")),
        ("pipe:aws s3 cp s3://b/set/x-{0..1}.tar -", "pipe:aws s3 cp s3://b/set/", " -", True, ("x-0.tar", "x-1.tar")),
        ("pipe:gsutil cat gs://b/set/", "pipe:gsutil cat gs://b/set/", "", True, None),
        ("pipe:curl -s 'https://h/s/train-0.tar'", "pipe:curl -s 'https://h/s/", "'", True, ("train-0.tar",)),
    ],
)
def test_a_location_names_each_file_of_the_set(text, prefix, suffix, remote, names):
    location = parse_location(text)
    assert location == Location(text, prefix, suffix, remote, names)
    assert location.file("manifest.json") == f"{prefix}manifest.json{suffix}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("s3://bucket/set/", "webdataset opens no s3:// URLs .* pipe:aws s3 cp s3://bucket/set/"),
        ("pipe:cat a/ b/", "2 of its words name the shards in 'pipe:cat a/ b/'"),
        ("pipe:cat manifest.json", "no word of it names the shards"),
        ("https://h/{a,b}/train-0.tar", "names shards in 2 folders: a shard set is one folder"),
    ],
)
def test_a_location_that_names_no_one_shard_set_is_refused_in_one_line(text, message):
    with pytest.raises(DataError, match=message):
        parse_location(text)


def remote_forms(server, digits_shards: Path) -> list[str]:
    return [
        server.url,
        server.url.rstrip("/"),
        server.url + TRAIN_PATTERN,
        f"pipe:cat {digits_shards}/{TRAIN_PATTERN}",
        f"pipe:cat {digits_shards}/",
    ]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_set_read_over_http_or_a_pipe_gives_the_local_folders_batches(server, digits_shards, num_workers):
    # 40 batches of 64: one and a half epochs of 1,617 images, reshuffled, flipped, over 2 ranks.
    for rank in range(2):
        options = dict(rank=rank, world_size=2, seed=3, flip=True, num_workers=num_workers)
        local = tokens_of(make_loader(str(digits_shards), "train", 64, **options), 40)
        for where in remote_forms(server, digits_shards):
            assert torch.equal(tokens_of(make_loader(where, "train", 64, **options), 40), local), where
    # An evaluation pass too: the val split of the same location, in its stored order.
    local_val = tokens_of(make_loader(str(digits_shards), "val", 50, infinite=False), 10)
    assert torch.equal(tokens_of(make_loader(server.url, "val", 50, infinite=False), 10), local_val)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_remote_stream_stopped_and_resumed_continues_exactly(server, digits_shards, num_workers):
    straight = tokens_of(make_loader(server.url, "train", 48, seed=5, num_workers=num_workers), 50)
    first = make_loader(server.url, "train", 48, seed=5, num_workers=num_workers)
    head = tokens_of(first, 20)
    # Resumed from another location of the same set, with another worker count: the position is the set's.
    again = make_loader(f"pipe:cat {digits_shards}/", "train", 48, seed=5, num_workers=2 - num_workers)
    again.load_state_dict(first.state_dict())
    assert torch.equal(torch.cat([head, tokens_of(again, 30)]), straight)


def test_a_reader_fetches_each_remote_shard_at_most_once_an_epoch(digits_shards):
    with serving(digits_shards) as server:
        loader = make_loader(server.url, "train", 77, seed=1)
        tokens_of(loader, 3 * 1617 // 77)  # three epochs
        # One read of each shard's head when the set is opened, then at most one fetch per epoch (a shard last in
        # one epoch's order and first in the next's is kept across the boundary).
        fetches = [server.requests[f"train-00000{i}.tar"] - 1 for i in range(4)]
        assert all(1 <= count <= 3 for count in fetches) and sum(fetches) > 4
        assert server.requests["manifest.json"] == 1 and server.requests["val-000000.tar"] == 1


@pytest.mark.parametrize("how", ["reset", "503"])
def test_a_server_that_fails_twice_then_answers_is_survived(digits_shards, how):
    with serving(digits_shards) as server:
        server.fail("manifest.json", how, how)
        server.fail("train-000002.tar", "ok", how, how)  # the check at start passes, two fetches fail
        loader = make_loader(server.url, "train", 64, seed=3, num_workers=2 if how == "reset" else 0)
        local = make_loader(str(digits_shards), "train", 64, seed=3)
        assert torch.equal(tokens_of(loader, 30), tokens_of(local, 30))
        # A reset is retried by megapixel, a 503 by webdataset's curl: the third request is answered either way.
        assert server.requests["manifest.json"] == 3 and server.requests["train-000002.tar"] >= 4


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_server_that_keeps_failing_stops_the_stream_with_one_line_naming_the_shard(digits_shards, num_workers):
    with serving(digits_shards) as server:
        loader = make_loader(server.url, "train", 64, num_workers=num_workers)
        server.fail_always("train-000001.tar", "reset")
        message = stream_error(loader)
    assert message.startswith(f"could not read {server.url}train-000001.tar (4 tries; last: curl exit 56: ")
    assert "\n" not in message


def test_a_missing_manifest_or_shard_is_one_line_when_the_set_is_opened(digits_shards, tmp_path):
    with serving(digits_shards) as server:
        with pytest.raises(DataError, match=r"could not read http://127.0.0.1:\d+/elsewhere/manifest.json .*HTTP err"):
            make_loader(server.url + "elsewhere/", "train", 4)
        server.fail_always("val-000000.tar", "404")
        # Before any batch: opening the set checks the head of every shard it lists.
        with pytest.raises(DataError, match=r"could not read http://127.0.0.1:\d+/val-000000.tar \(4 tries"):
            make_loader(server.url, "train", 4)
    with pytest.raises(DataError, match=r"could not read pipe:cat .*/manifest.json \(4 tries; last: the command ex"):
        make_loader(f"pipe:cat {tmp_path}/", "train", 4)


def test_a_pattern_stands_for_whole_splits_of_the_manifest(server):
    assert read_manifest(server.url + "{train-{000000..000003},val-000000}.tar")["splits"]["val"]["count"] == 180
    with pytest.raises(DataError, match="names 3 of the 4 train shards manifest.json lists"):
        read_manifest(server.url + "train-{000000..000002}.tar")
    with pytest.raises(DataError, match="names train-000004.tar, which manifest.json does not list"):
        read_manifest(server.url + "train-{000000..000004}.tar")


@pytest.mark.parametrize("where", ["local", "http", "pipe"])
def test_a_shard_that_differs_from_its_manifest_but_keeps_valid_tokens_is_named(digits_shards, tmp_path, where):
    shards = tmp_path / "shards"
    shutil.copytree(digits_shards, shards)
    path = shards / "train-000002.tar"
    tokens, _ = open_shard(path, 8)
    data = bytearray(path.read_bytes())
    # Token 10 of the first image (its data follows one 512-byte header) becomes another colour of the palette.
    data[512 + 2 * 10] = (int(tokens[0, 10]) + 1) % 16
    path.write_bytes(bytes(data))
    with serving(shards) as server:
        location = {"local": str(shards), "http": server.url, "pipe": f"pipe:cat {shards}/"}[where]
        message = stream_error(make_loader(location, "train", 64, num_workers=2))
    assert message.startswith({"local": str(path), "http": server.url + path.name, "pipe": f"pipe:cat {path}"}[where])
    assert "differs from its manifest (sha256 " in message and "\n" not in message


def test_training_from_a_url_and_resuming_from_a_pipe_gives_the_local_folders_losses(digits_shards, tmp_path):
    seed = random.randrange(2**31)
    straight = tiny(digits_shards, tmp_path / "straight", steps=8, save_every=100, seed=seed)
    train(straight)
    with serving(digits_shards) as server:
        # Two resets while training: retried, and the run goes on as if nothing happened.
        server.fail("train-000001.tar", "ok", "reset", "reset")
        remote = tiny(server.url, tmp_path / "remote", steps=8, save_every=4, keep_last=5, seed=seed)
        remote.data.num_workers = 2
        train(remote)
    run = Path(remote.train.run_dir)
    assert losses(run) == losses(straight.train.run_dir)
    assert (run / "palette.npy").read_bytes() == (digits_shards / "palette.npy").read_bytes()
    # Stopped after step 4 (later checkpoints gone), resumed from the same set read through a command.
    shutil.rmtree(run / "checkpoints" / tag_name(8))
    (run / "checkpoints" / "latest").write_text(tag_name(4))
    remote.data.shards = f"pipe:cat {digits_shards}/{{train-{{000000..000003}},val-000000}}.tar"
    train(remote, resume=True)
    assert losses(run) == losses(straight.train.run_dir)


def test_training_from_a_missing_url_is_one_line_before_anything_is_written(digits_shards, tmp_path, capsys):
    with serving(digits_shards) as server:
        where = server.url + "elsewhere/"
        run = tmp_path / "run"
        assert main(["train", "tiny", f"data.shards={where}", f"train.run_dir={run}"]) == 2
    assert capsys.readouterr().err == (
        f"megapixel: error: could not read {where}manifest.json (4 tries; last: curl exit 22: the server answered "
        "with an HTTP error (4xx or 5xx)): check that it is there and reachable\n"
    )
    assert not run.exists()
