"""EasyDict, construction of objects by class name, and URL opening with a local cache."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import os
import re
import tempfile
import urllib.parse
from typing import Any, BinaryIO, Iterator


class EasyDict(dict):
    """A dict whose keys can also be read and written as attributes (``cfg.lr`` == ``cfg['lr']``).

    Writing or deleting an attribute writes or deletes the key (deleting a missing one raises KeyError). Reading
    falls back to the keys only after ordinary lookup fails, so dict methods win over keys of the same name, and a
    missing key reads as AttributeError, which keeps ``getattr(d, name, default)``, copy and pickle working.
    """

    def __setattr__(self, key: str, value: Any) -> None:
        self.__setitem__(key, value)

    def __delattr__(self, key: str) -> None:
        self.__delitem__(key)

    def __getattr__(self, key: str) -> Any:
        if key not in self:
            raise AttributeError(key)
        return self[key]


_moved_modules: dict[str, str] = {}


def declare_moved_module(old_name: str, new_name: str) -> None:
    """Let dotted paths into module ``old_name``, as configs and pickles written before it moved name them, find
    their objects in ``new_name``. The package that moved it declares this when it is imported."""
    _moved_modules[old_name] = new_name


def get_obj_by_name(name: str) -> Any:
    """Return the object named by a dotted path, e.g. ``'training.networks.EDMPrecond'``."""
    module_name, _, attr = name.rpartition(".")
    if not module_name:
        raise ValueError(f"'{name}' is not a dotted path of the form module.attribute")
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError:
        if module_name not in _moved_modules:  # Importing its package may have declared the move just now.
            raise
        obj = importlib.import_module(_moved_modules[module_name])
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def construct_class_by_name(*args: Any, class_name: str, **kwargs: Any) -> Any:
    """Call the class (or function) named by ``class_name`` with the remaining arguments."""
    return get_obj_by_name(class_name)(*args, **kwargs)


# ----------------------------------------------------------------------------
# Files that are never seen half-written.

@contextlib.contextmanager
def atomic_open(path: str, fsync: bool = True) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for binary writing; rename it to ``path`` only when the block
    completes, so readers see the old file or the whole new one, never a partial one (also after a crash)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, fsync=fsync) as f:
        f.write(data)


# ----------------------------------------------------------------------------
# URL opening with a cache.

def make_cache_dir_path(*paths: str) -> str:
    """Where downloads are cached: $EDM_CACHE_DIR, else $XDG_CACHE_HOME/edm, else ~/.cache/edm."""
    if "EDM_CACHE_DIR" in os.environ:
        root = os.environ["EDM_CACHE_DIR"]
    elif "XDG_CACHE_HOME" in os.environ:
        root = os.path.join(os.environ["XDG_CACHE_HOME"], "edm")
    else:
        root = os.path.join(os.path.expanduser("~"), ".cache", "edm")
    return os.path.join(root, *paths)


def is_url(path_or_url: str) -> bool:
    return isinstance(path_or_url, str) and re.match(r"^[a-z][a-z0-9+.-]*://", path_or_url) is not None


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cached_path_for(url: str, cache_dir: str) -> str:
    url_hash = hashlib.md5(url.encode("utf-8")).hexdigest()
    name = re.sub(r"[^0-9a-zA-Z._-]+", "_", os.path.basename(urllib.parse.urlparse(url).path)) or "download"
    return os.path.join(cache_dir, f"{url_hash}_{name}")


def _download(url: str, dest: str, verbose: bool, timeout: float) -> None:
    """Download ``url`` to ``dest``, resuming a partial ``dest + '.part'`` if the server allows it."""
    import requests
    from tqdm.auto import tqdm

    part = dest + ".part"
    done = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"Range": f"bytes={done}-"} if done else {}
    with requests.get(url, stream=True, headers=headers, timeout=timeout) as r:
        if r.status_code == 416:  # The partial file is already complete.
            r.close()
        else:
            r.raise_for_status()
            if done and r.status_code != 206:  # Server ignored the range: start over.
                done = 0
            total = int(r.headers.get("Content-Length", 0)) + done
            with open(part, "ab" if done else "wb") as f, tqdm(
                total=total or None, initial=done, unit="B", unit_scale=True,
                desc=f"Downloading {os.path.basename(dest)}", disable=not verbose, leave=False,
            ) as bar:
                for chunk in r.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    os.replace(part, dest)


def open_url(
    url: str,
    cache_dir: str | None = None,
    num_attempts: int = 5,
    verbose: bool = True,
    return_filename: bool = False,
    cache: bool = True,
    timeout: float = 60.0,
) -> BinaryIO | str:
    """Open a local path, ``file://`` URL or http(s) URL as a binary file object.

    http(s) downloads go to a cache directory (see :func:`make_cache_dir_path`), are resumed when
    interrupted, and are written under a temporary name and renamed only once complete. Each cached
    file keeps a ``.sha256`` beside it, checked on reuse; a mismatch discards the file and downloads again.
    With ``return_filename=True`` the local file name is returned instead of an open file.
    """
    if not is_url(url):
        if not os.path.isfile(url):
            raise FileNotFoundError(f"{url}: no such file")
        return url if return_filename else open(url, "rb")
    if url.startswith("file://"):
        path = urllib.parse.unquote(urllib.parse.urlparse(url).path)
        return open_url(path, return_filename=return_filename)
    if not (url.startswith("http://") or url.startswith("https://")):
        raise ValueError(f"{url}: unsupported URL scheme (use a path, file://, http:// or https://)")
    if return_filename and not cache:
        raise ValueError(f"{url}: return_filename=True needs cache=True (the file must stay on disk)")

    cache_dir = cache_dir or make_cache_dir_path("downloads")
    os.makedirs(cache_dir, exist_ok=True)
    dest = _cached_path_for(url, cache_dir)
    checksum_file = dest + ".sha256"
    if cache and os.path.isfile(dest):
        if os.path.isfile(checksum_file):
            with open(checksum_file) as f:
                expected = f.read().strip()
            if file_sha256(dest) == expected:
                return dest if return_filename else open(dest, "rb")
        os.remove(dest)  # Corrupt or unverifiable cache entry: fetch it again.

    last_error: Exception | None = None
    for _ in range(max(num_attempts, 1)):
        try:
            _download(url, dest, verbose=verbose, timeout=timeout)
            last_error = None
            break
        except Exception as e:  # Network errors are retried; the partial file is kept for resuming.
            last_error = e
    if last_error is not None:
        raise IOError(f"{url}: download failed after {num_attempts} attempts: {last_error}") from last_error

    atomic_write_bytes(checksum_file, file_sha256(dest).encode())
    if not cache:
        with open(dest, "rb") as f:
            data = f.read()
        os.remove(dest)
        os.remove(checksum_file)
        return io.BytesIO(data)
    return dest if return_filename else open(dest, "rb")


# ----------------------------------------------------------------------------
# Command-line helpers.

def parse_float_list(text: str) -> list[float]:
    """'0.05,0.1' -> [0.05, 0.1]; '...' continues the step of the two values before it up to the value after it:
    '0.010,0.015,...,0.030' -> [0.010, 0.015, 0.020, 0.025, 0.030]. Sorted, without repeats."""
    tokens = [token.strip() for token in text.split(",") if token.strip()]
    values: list[float] = []
    for i, token in enumerate(tokens):
        if token != "...":
            try:
                values.append(float(token))
            except ValueError:
                raise ValueError(f"'{token}' is not a number") from None
            continue
        if len(values) < 2 or tokens[i - 1] == "..." or i + 1 >= len(tokens) or tokens[i + 1] == "...":
            raise ValueError("'...' needs two numbers before it and one after it")
        step, last = values[-1] - values[-2], float(tokens[i + 1])
        count = (last - values[-1]) / step if step else -1
        if count < 1 - 1e-4 or abs(count - round(count)) > 1e-4:
            raise ValueError(f"'{values[-2]:g},{values[-1]:g},...,{last:g}' is not an evenly spaced range")
        values += [values[-1] + step * k for k in range(1, round(count))]  # The last one is the next token.
    return sorted({round(v, 12) for v in values})


def parse_int_list(text: str | list | tuple) -> list[int]:
    """Parse '0-63', '1,5,9-12' or a list into a list of ints (ranges are inclusive)."""
    if isinstance(text, (list, tuple)):
        return [int(v) for v in text]
    result: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(-?\d+)\s*-\s*(-?\d+)", part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f"'{part}': range end is below its start")
            result.extend(range(lo, hi + 1))
        elif re.fullmatch(r"-?\d+", part):
            result.append(int(part))
        else:
            raise ValueError(f"'{part}' is not an integer or a range like 0-63")
    return result
