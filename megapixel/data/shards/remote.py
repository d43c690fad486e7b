"""Where a shard set's files are (a local folder, a URL or a `pipe:` command) and reading them through webdataset.

`data.shards` names a whole shard set; its manifest.json, palette.npy and shards are found from it:

- a local folder, `/data/imagenet64` (read in place, shards memory-mapped);
- a folder URL, `https://host/imagenet64/` (any scheme `webdataset.gopen` opens: http and https through curl, gs
  through gsutil, ...): each file is the URL followed by its name;
- a brace pattern of the shards, local or at a URL, as webdataset writes them:
  `https://host/imagenet64/train-{000000..000127}.tar`;
- a `pipe:` command whose one word naming a shard is such a pattern (or a folder ending in `/`):
  `pipe:aws s3 cp s3://bucket/imagenet64/train-{000000..000127}.tar -`; each file is the command with its name in
  place of the pattern's file name.

A pattern is another way of writing the folder (the manifest beside the shards lists every shard): it must name all
the shards of each split it names. Remote files are read whole through `webdataset.gopen` (its curl retries HTTP
408, 429, 500, 502-504 and timeouts itself) and each read is tried `ATTEMPTS` times with doubling pauses, so a reset
connection, a cut transfer or a persistent server error ends in one line naming the file and the last error.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from megapixel.errors import DataError

# Tries of one remote read, and the pause before the second (doubling after each failure): 0.5 + 1 + 2 s in all.
ATTEMPTS = 4
FIRST_PAUSE_S = 0.5
# Shards checked at once when a remote set is opened (each check is one short read: a curl or command process).
CHECKS_AT_ONCE = 16
# What curl's exit codes mean (gopen runs `curl -f -s -L URL` for http and https).
CURL_EXITS = {
    6: "could not resolve the host",
    7: "could not connect",
    18: "the transfer was cut short",
    22: "the server answered with an HTTP error (4xx or 5xx)",
    28: "timed out",
    35: "TLS handshake failed",
    52: "the server sent an empty reply",
    56: "the connection was reset or failed while receiving",
}
FORMS = (
    "a folder, a folder URL (https://host/set/), a brace pattern of its shards (https://host/set/train-{000..127}.tar)"
    " or a pipe: command naming them (pipe:aws s3 cp s3://bucket/set/train-{000..127}.tar -)"
)


@dataclass(frozen=True)
class Location:
    """Where a shard set's files are: a file named NAME is at `prefix + NAME + suffix` (a path, URL or command)."""

    text: str  # as the user wrote it
    prefix: str
    suffix: str
    remote: bool  # read through webdataset.gopen (else a local folder, memory-mapped)
    names: tuple[str, ...] | None  # the shard names a pattern gives; None for a folder

    def file(self, name: str) -> str:
        """Where the set's file `name` is."""
        return f"{self.prefix}{name}{self.suffix}"

    def check_names(self, splits: dict[str, list[str]]) -> None:
        """DataError unless a pattern names whole splits of the manifest's shards (`splits`: split -> names)."""
        if self.names is None:
            return
        listed = {name for names in splits.values() for name in names}
        unknown = [name for name in self.names if name not in listed]
        if unknown:
            raise DataError(
                f"{self.text} names {unknown[0]}, which manifest.json does not list"
                f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}: name the set's own shards"
            )
        for split, names in splits.items():
            named = sum(name in self.names for name in names)
            if 0 < named < len(names):
                raise DataError(
                    f"{self.text} names {named} of the {len(names)} {split} shards manifest.json lists: a pattern "
                    "stands for the whole set; name all of them, or give the folder"
                )


def parse_location(text: str) -> Location:
    """The Location `text` (data.shards) names; DataError when it is none of the forms a shard set can have."""
    if text.startswith("pipe:"):
        return _pipe_location(text)
    if text.startswith("file:"):
        return _path_location(url2pathname(urlparse(text).path), text)
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", text):
        scheme = urlparse(text).scheme
        # Imported here: webdataset imports torch (seconds), which local shard sets and making shards never need.
        from webdataset.gopen import gopen_schemes

        known = set(gopen_schemes) - {"__default__"}
        if scheme not in known:
            raise DataError(
                f"data.shards: webdataset opens no {scheme}:// URLs (it opens {', '.join(sorted(known))}); "
                f"read them through a command instead, e.g. pipe:aws s3 cp {scheme}://bucket/set/train-{{000..127}}"
                ".tar -"
            )
        last = text.rsplit("/", 1)[-1]
        if "{" not in last and not last.endswith(".tar"):
            return Location(text, text.rstrip("/") + "/", "", remote=True, names=None)
        return _word_location(text, 0, len(text))
    return _path_location(text, text)


def _path_location(path: str, text: str) -> Location:
    """A local folder, or a local shard or brace pattern of shards (`path`: the path `text` stands for)."""
    name = Path(path).name
    if "{" in name or name.endswith(".tar"):
        folder, names = _split_pattern(text, path)
        return Location(text, str(Path(folder or ".")) + "/", "", remote=False, names=names)
    return Location(text, str(Path(path)) + "/", "", remote=False, names=None)


def _pipe_location(text: str) -> Location:
    # Words of the command, quotes excluded: in `pipe:curl -s 'https://h/set/x-{0..3}.tar'` the quotes stay around.
    words = list(re.finditer(r"[^\s'\"]+", text[len("pipe:") :]))
    naming = [m for m in words if "{" in m.group()] or [m for m in words if m.group().endswith((".tar", "/"))]
    if len(naming) != 1:
        how = "no word of it names" if not naming else f"{len(naming)} of its words name"
        raise DataError(f"data.shards: {how} the shards in {text!r}: write {FORMS}")
    start, end = (len("pipe:") + i for i in naming[0].span())
    return _word_location(text, start, end)


def _word_location(text: str, start: int, end: int) -> Location:
    """The remote Location of `text` whose characters [start, end) name a folder (ending in /), a shard, or a brace
    pattern of shards."""
    word = text[start:end]
    if word.endswith("/"):
        return Location(text, text[:end], text[end:], remote=True, names=None)
    folder, names = _split_pattern(text, word)
    return Location(text, text[:start] + folder, text[end:], remote=True, names=names)


def _split_pattern(text: str, word: str) -> tuple[str, tuple[str, ...]]:
    """The folder (up to its last /) and the file names of a shard, or of a webdataset brace pattern of shards (the
    `word` of `text`); DataError when they are in several folders."""
    if "{" in word:
        # Imported here: webdataset imports torch (seconds); only a pattern needs its brace expansion.
        from webdataset.shardlists import expand_urls

        expanded = expand_urls(word)
    else:
        expanded = [word]
    folders = {name[: name.rfind("/") + 1] for name in expanded}
    if len(folders) != 1:
        raise DataError(f"data.shards: {text} names shards in {len(folders)} folders: a shard set is one folder")
    folder = folders.pop()
    return folder, tuple(name[len(folder) :] for name in expanded)


def read_remote(where: str, attempts: int = ATTEMPTS) -> bytes:
    """The bytes at a URL or pipe: command, read whole through webdataset.gopen and tried `attempts` times;
    DataError naming it and the last error."""
    # Imported here: webdataset imports torch (seconds); local shard sets never need it.
    from webdataset.gopen import gopen

    last = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(FIRST_PAUSE_S * 2 ** (attempt - 1))
        try:
            with gopen(where, "rb") as stream:
                return stream.read()
        except (OSError, ValueError) as err:
            last = reason(where, err)
    raise DataError(f"could not read {where} ({attempts} tries; last: {last}): check that it is there and reachable")


def check_remote(files: list[str], attempts: int = ATTEMPTS) -> None:
    """DataError naming the first of `files` (URLs or pipe: commands of shards) that cannot be opened or does not
    start as a tar: each is read only as far as its first header, several at once."""
    with ThreadPoolExecutor(CHECKS_AT_ONCE) as pool:
        for where, problem in zip(files, pool.map(lambda f: _head_problem(f, attempts), files), strict=True):
            if problem:
                raise DataError(f"could not read {where} ({problem}): copy the whole set again")


def _head_problem(where: str, attempts: int) -> str | None:
    """Why `where` does not start as a tar after `attempts` tries, or None when it does."""
    # Imported here: webdataset imports torch (seconds); local shard sets never need it.
    from webdataset.gopen import gopen

    last = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(FIRST_PAUSE_S * 2 ** (attempt - 1))
        try:
            stream = gopen(where, "rb")
            head = stream.read(512)
        except (OSError, ValueError) as err:
            last = reason(where, err)
            continue
        try:
            stream.close()
        except (OSError, ValueError) as err:
            # A command stopped by the closed pipe after the header may exit non-zero (SIGPIPE): only a short
            # read is a failure.
            if len(head) < 512:
                last = reason(where, err)
                continue
        if len(head) == 512 and head[257:262] == b"ustar":
            return None
        return f"{len(head)} bytes that are not a tar header" if head else "it is empty"
    return f"{attempts} tries; last: {last}"


def reason(where: str, err: Exception) -> str:
    """One line for an error of webdataset.gopen: a curl or command exit status in words."""
    status = re.search(r"exit (-?\d+)", str(err))
    if status is None:
        return str(err).splitlines()[0] if str(err).strip() else type(err).__name__
    code = int(status.group(1))
    if where.startswith("pipe:"):
        return f"the command exited with status {code}"
    return f"curl exit {code}: {CURL_EXITS.get(code, 'see man curl')}"
