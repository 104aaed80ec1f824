"""Models no registry package ships, under the models directory (``--models-dir``, default ``./models``).

``<models_dir>/<name>/`` holds one model (``sensevoice``: a sherpa-onnx SenseVoice directory with
``model.int8.onnx`` or ``model.onnx`` and ``tokens.txt``).  They arrive only by the explicit step
``twistd activecall --download-models sensevoice`` (``--exit-after-download`` to stop after it), never at
call time.  The download:

- fetches each file of the model's ``CATALOGUE`` entry into ``<file>.part`` and renames it when complete;
- **resumes**: an existing ``.part`` is continued with an HTTP ``Range`` request (a server answering 200
  instead of 206 restarts it);
- **checks** each file's SHA-256 against the catalogue's pinned value when there is one (a mismatch deletes
  the file and fails); a file already present with the right checksum is not fetched again.  Files whose
  checksum is not pinned here (the upstream ones: this machine cannot reach them to pin them) are fetched,
  their digest written to ``<file>.sha256`` and logged, and the result says they were not verified;
- runs blocking (urllib), before the daemon starts: it is a command-line step, not reactor code.

``ACTIVECALL_MODELS_MIRROR`` (or ``base_url``) replaces the catalogue's base URL (a local mirror).
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Optional

REQUIRED = {
    "sensevoice": (("model.int8.onnx", "model.onnx"), ("tokens.txt",)),
}


@dataclass(frozen=True)
class ModelFile:
    path: str  # relative to the base URL, and the file name under <models_dir>/<model>/
    sha256: Optional[str] = None  # pinned digest, when known


@dataclass(frozen=True)
class ModelEntry:
    base_url: str
    files: tuple[ModelFile, ...]


CATALOGUE = {
    # the sherpa-onnx export of SenseVoice-Small (zh/en/ja/ko/yue), as the original fetches it
    "sensevoice": ModelEntry(
        "https://huggingface.co/csukuangfj/sherpa-onnx-sense-voice-zh-en-ja-ko-yue-2024-07-17/resolve/main",
        (ModelFile("model.int8.onnx"), ModelFile("tokens.txt"))),
}
NOT_PROVIDED = {
    "supertonic": "no supertonic provider exists in activecall, so there is nothing to download for it",
}
CHUNK = 1 << 16


class ModelError(Exception):
    pass


def installed_dir(models_dir: str, name: str) -> Optional[str]:
    """``<models_dir>/<name>`` when every file the model needs is there, else None."""
    path = os.path.join(models_dir, name)
    need = REQUIRED.get(name)
    if need is None or not os.path.isdir(path):
        return None
    for alternatives in need:
        if not any(os.path.isfile(os.path.join(path, f)) for f in alternatives):
            return None
    return path


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def fetch_file(url: str, target: str, sha256: Optional[str] = None, timeout: float = 60.0,
               opener: Callable = urllib.request.urlopen) -> str:
    """``url`` into ``target`` (resuming ``target.part``); returns the file's SHA-256.
    Raises ModelError on an HTTP error or a checksum that does not match ``sha256``."""
    if os.path.isfile(target) and (sha256 is None or sha256_of(target) == sha256):
        return sha256_of(target)
    part = target + ".part"
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = opener(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the .part is already whole
            response = None
        else:
            raise ModelError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ModelError(f"{url}: {getattr(e, 'reason', e)}") from None
    if response is not None:
        with response:
            resumed = have and response.status == 206
            with open(part, "ab" if resumed else "wb") as out:
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
    digest = sha256_of(part)
    if sha256 is not None and digest != sha256:
        os.remove(part)
        raise ModelError(f"{url}: checksum mismatch (got sha256 {digest}, expected {sha256}); removed")
    os.replace(part, target)
    return digest


def download(name: str, models_dir: str, base_url: Optional[str] = None,
             catalogue: Optional[dict] = None, log: Callable[[str], None] = print) -> list[tuple[str, str, bool]]:
    """Fetch model ``name`` (or ``all``) into ``models_dir``; [(file, sha256, verified)]."""
    catalogue = CATALOGUE if catalogue is None else catalogue
    if name == "all":
        out = []
        for each in catalogue:
            out += download(each, models_dir, base_url, catalogue, log)
        return out
    if name in NOT_PROVIDED:
        raise ModelError(f"--download-models {name}: {NOT_PROVIDED[name]}")
    entry = catalogue.get(name)
    if entry is None:
        raise ModelError(f"--download-models: unknown model {name!r}; known: {', '.join(sorted(catalogue))}, all")
    base = (base_url or os.environ.get("ACTIVECALL_MODELS_MIRROR") or entry.base_url).rstrip("/")
    directory = os.path.join(models_dir, name)
    os.makedirs(directory, exist_ok=True)
    results = []
    for f in entry.files:
        if os.path.basename(f.path) != f.path or f.path.startswith("."):
            raise ModelError(f"catalogue file name {f.path!r} is not a plain file name")
        target = os.path.join(directory, f.path)
        digest = fetch_file(f"{base}/{f.path}", target, f.sha256)
        verified = f.sha256 is not None
        if not verified:
            with open(target + ".sha256", "w") as out:
                out.write(f"{digest}  {f.path}\n")
        log(f"{name}/{f.path}: sha256 {digest}" + ("" if verified else " (no pinned checksum: not verified)"))
        results.append((target, digest, verified))
    return results
