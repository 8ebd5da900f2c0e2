"""Text for calibration and evaluation, and its tokenization into fixed windows.

Text sources (the ``source`` argument of :func:`load_texts`):

- ``"python-docs"`` (default): the prose of Python's HTML documentation (Debian ``python3-doc``):
  the text of every ``<p>`` element, code blocks skipped, paragraphs under 5 words dropped, and
  paragraphs found in more than 20 files dropped (boilerplate such as "New in version 3.x.").
  It is split **by file**: the *evaluation* split is every page under ``tutorial/``, ``howto/`` and
  ``faq/``; the *calibration* split is every other page. No page is in both. The extraction runs
  once and is cached as JSON lines (with a manifest) in the cache dir (:mod:`ranapass.cache`). The docs are found
  in ``/usr/share/doc/python3*/html``, or in ``$RANAPASS_PYTHON_DOCS`` when set.
- ``"debian-handbook"``: the en-US prose of The Debian Administrator's Handbook (Debian
  ``debian-handbook``), extracted the same way (its paragraphs are ``<div class="para">``);
  out-of-domain text, used whole for every split.
- a path to a ``.txt``/``.md``/``.rst`` file or a folder of them (read recursively): used whole for
  every split, so pass different files for calibration and evaluation.
- a ``datasets`` dataset: a folder written by ``save_to_disk``, or ``"hf:NAME"`` /
  ``"hf:NAME:CONFIG"`` for ``datasets.load_dataset(NAME, CONFIG)``; column ``text_column``.
  For a dataset with splits, calibration reads ``train`` and evaluation reads ``test`` (else
  ``validation``); ``"all"`` reads every split.

:func:`token_windows` turns texts into ``num_windows`` non-overlapping windows of ``window``
tokens, evenly spaced over the token stream (see its docstring for the exact positions).
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Literal

import torch

from ranapass.cache import cache_dir, usable_entry
from ranapass.errors import RanapassError
from ranapass.manifest import write_folder

__all__ = [
    "Split",
    "TextSourceError",
    "load_texts",
    "token_windows",
    "calibration_windows",
    "evaluation_windows",
    "window_starts",
    "split_holdout",
    "tokenize_stream",
    "extract_prose",
    "find_python_docs",
    "python_docs_split",
    "python_docs_pages",
    "check_token_ids",
]

log = logging.getLogger(__name__)

Split = Literal["calibration", "evaluation", "all"]
SPLITS = ("calibration", "evaluation", "all")

EVALUATION_DIRS = ("tutorial/", "howto/", "faq/")
"""Pages of the Python docs under these folders form the evaluation split; all others calibrate."""

MIN_WORDS = 5
"""Paragraphs with fewer words are dropped (headings in disguise, "See also", lone names)."""
MAX_FILES_PER_PARAGRAPH = 20
"""A paragraph found in more files than this is boilerplate and is dropped."""
_EXTRACTION_VERSION = 1
"""Bump when the extraction rules change: it is part of the cache key."""

_PROSE_FILE = "prose.jsonl"
"""The file of a text cache entry (a folder with its manifest): one JSON object per page."""

PYTHON_DOCS_ENV = "RANAPASS_PYTHON_DOCS"
DEBIAN_HANDBOOK_DIR = Path("/usr/share/doc/debian-handbook/html/en-US")
PLAIN_TEXT_SUFFIXES = (".txt", ".md", ".rst")


class TextSourceError(RanapassError, FileNotFoundError):
    """A text source is missing or unknown; the message names the fixes."""


# ---------------------------------------------------------------------------------------------
# HTML prose extraction


class _ProseParser(HTMLParser):
    """Collects the text of paragraph elements: ``<p>``, or any element of class ``para``
    (DocBook/publican output such as the Debian handbook), skipping code and scripts."""

    _SKIP = ("script", "style", "pre")

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._tag: str | None = None  # tag of the paragraph element being collected
        self._depth = 0  # nesting of that tag inside the paragraph
        self._skip = 0
        self._parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skip += 1
        if self._tag is not None:
            self._depth += tag == self._tag
        elif tag == "p" or "para" in (dict(attrs).get("class") or "").split():
            self._tag, self._depth, self._parts = tag, 1, []

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skip = max(self._skip - 1, 0)
        if tag == self._tag:
            self._depth -= 1
            if self._depth == 0:
                text = re.sub(r"\s+", " ", "".join(self._parts)).strip()
                if text:
                    self.paragraphs.append(text)
                self._tag = None

    def handle_data(self, data: str) -> None:
        if self._tag is not None and not self._skip:
            self._parts.append(data)


def _html_files(root: Path) -> list[Path]:
    """The content pages under ``root``: no ``_sources``/``_static``, indexes or search pages."""
    skip_names = ("genindex", "search.html", "py-modindex.html")
    files = []
    for path in sorted(root.rglob("*.html")):
        rel = path.relative_to(root).as_posix()
        if any(part.startswith("_") for part in rel.split("/")) or rel.startswith(skip_names):
            continue
        files.append(path)
    return files


def extract_prose(root: Path) -> list[tuple[str, str]]:
    """``(relative path, prose)`` for every content page under ``root``, in path order.

    A page's prose is its kept paragraphs joined by newlines; pages left with no prose are dropped.
    """
    pages = []
    counts: Counter[str] = Counter()
    for path in _html_files(root):
        parser = _ProseParser()
        parser.feed(path.read_text(encoding="utf-8", errors="replace"))
        parser.close()
        pages.append((path.relative_to(root).as_posix(), parser.paragraphs))
        counts.update(set(parser.paragraphs))
    docs = []
    for rel, paragraphs in pages:
        kept = [p for p in paragraphs
                if counts[p] <= MAX_FILES_PER_PARAGRAPH and len(p.split()) >= MIN_WORDS]
        if kept:
            docs.append((rel, "\n".join(kept)))
    return docs


def _cached_prose(name: str, root: Path) -> list[tuple[str, str]]:
    """:func:`extract_prose` of ``root``, cached; the key covers the file list, sizes and times."""
    h = hashlib.sha256(f"{_EXTRACTION_VERSION}|{root}".encode())
    for path in _html_files(root):
        stat = path.stat()
        h.update(f"|{path.relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    cached = cache_dir("text") / f"{name}-{h.hexdigest()[:12]}"
    if usable_entry(cached):
        with (cached / _PROSE_FILE).open(encoding="utf-8") as f:
            return [(row["path"], row["text"]) for row in map(json.loads, f)]
    log.info("extracting the prose of %s (once; cached in %s)", root, cached)
    docs = extract_prose(root)
    with write_folder(cached) as tmp:
        (tmp / _PROSE_FILE).write_text("".join(json.dumps({"path": p, "text": t}) + "\n" for p, t in docs),
                                       encoding="utf-8")
    return docs


# ---------------------------------------------------------------------------------------------
# Built-in sources


def find_python_docs() -> Path:
    """The folder of Python's HTML documentation: ``$RANAPASS_PYTHON_DOCS`` if set, else the first
    ``/usr/share/doc/python3*/html`` holding ``tutorial/index.html`` (Debian installs several
    names that link to one folder; ``python3-pip`` has an unrelated ``html`` folder).

    Raises:
        TextSourceError: nothing found; the message names how to install it and the alternatives.
    """
    override = os.environ.get(PYTHON_DOCS_ENV)
    candidates = [Path(override)] if override else sorted(map(Path, glob.glob("/usr/share/doc/python3*/html")))
    for candidate in candidates:
        if (candidate / "tutorial" / "index.html").is_file():
            return candidate.resolve()
    where = f"{PYTHON_DOCS_ENV}={override}" if override else "/usr/share/doc/python3*/html"
    raise TextSourceError(
        f"Python's HTML documentation was not found in {where} (no tutorial/index.html). Fixes: "
        "`sudo apt-get install python3-doc` (Debian/Ubuntu; `make install` does it); or, without root, "
        "`apt-get download python3-doc python3.X-doc && dpkg -x python3.X-doc_*.deb DIR` and "
        f"{PYTHON_DOCS_ENV}=DIR/usr/share/doc/python3.X/html; or pass other text: a .txt file or folder, "
        "a `datasets` folder written by save_to_disk, or hf:NAME for datasets.load_dataset")


def python_docs_split(path: str) -> Literal["calibration", "evaluation"]:
    """The split a page of the Python docs belongs to, from its path relative to the docs root."""
    return "evaluation" if path.startswith(EVALUATION_DIRS) else "calibration"


def python_docs_pages(split: Split = "all") -> list[tuple[str, str]]:
    """``(path relative to the docs root, prose)`` of the Python docs pages in ``split``."""
    docs = _cached_prose("python-docs", find_python_docs())
    return [(path, text) for path, text in docs if split == "all" or python_docs_split(path) == split]


def _python_docs(split: Split) -> list[str]:
    return [text for _, text in python_docs_pages(split)]


def _debian_handbook(split: Split) -> list[str]:
    if not (DEBIAN_HANDBOOK_DIR / "index.html").is_file():
        raise TextSourceError(f"The Debian handbook was not found in {DEBIAN_HANDBOOK_DIR}: run "
                              "`sudo apt-get install debian-handbook` (`make install` does it), or pass other text")
    return [text for _, text in _cached_prose("debian-handbook", DEBIAN_HANDBOOK_DIR.resolve())]


_BUILTIN = {"python-docs": _python_docs, "debian-handbook": _debian_handbook}


# ---------------------------------------------------------------------------------------------
# User sources


def _plain_text(path: Path) -> list[str]:
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in PLAIN_TEXT_SUFFIXES)
    if not files:
        raise TextSourceError(f"no {'/'.join(PLAIN_TEXT_SUFFIXES)} files under {path}")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in ("dataset_dict.json", "state.json"))


def _dataset_texts(dataset, split: Split, text_column: str, name: str) -> list[str]:
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        wanted = {"calibration": ("train",), "evaluation": ("test", "validation"),
                  "all": tuple(dataset)}[split]
        chosen = [s for s in wanted if s in dataset]
        if not chosen:
            raise TextSourceError(f"dataset {name} has splits {sorted(dataset)}, none of {list(wanted)} "
                                  f"(used for the {split} split)")
        parts = [dataset[s] for s in (chosen if split == "all" else chosen[:1])]
    else:
        parts = [dataset]
    for part in parts:
        if text_column not in part.column_names:
            raise TextSourceError(f"dataset {name} has no column {text_column!r} (columns: "
                                  f"{part.column_names}); pass text_column")
    return [t for part in parts for t in part[text_column] if t]


def load_texts(source: str | os.PathLike = "python-docs", split: Split = "evaluation", *,
               text_column: str = "text") -> list[str]:
    """The documents of a text source, for one split (see the module docstring for sources).

    Args:
        source: ``"python-docs"``, ``"debian-handbook"``, a text file or folder, a ``save_to_disk``
            folder, or ``"hf:NAME[:CONFIG]"``.
        split: ``"calibration"``, ``"evaluation"`` or ``"all"``.
        text_column: column holding the text, for ``datasets`` sources.

    Returns:
        One string per document (page, file or dataset row), in a fixed order.

    Raises:
        TextSourceError: the source is unknown or missing; the message names the fixes.

    Example::

        >>> docs = load_texts("python-docs", "evaluation")  # doctest: +SKIP
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    source = os.fspath(source)
    if source in _BUILTIN:
        return _BUILTIN[source](split)
    if source.startswith("hf:"):
        import datasets

        name, _, config = source[3:].partition(":")
        try:
            dataset = datasets.load_dataset(name, config or None)
        except Exception as e:  # datasets raises many types; all mean "could not load"
            raise TextSourceError(f"datasets.load_dataset({name!r}, {config or None!r}) failed: {e}. "
                                  "Without network, use a save_to_disk folder or text files") from e
        return _dataset_texts(dataset, split, text_column, source)
    path = Path(source).expanduser()
    if _is_saved_dataset(path):
        import datasets

        return _dataset_texts(datasets.load_from_disk(str(path)), split, text_column, str(path))
    if path.exists():
        return _plain_text(path)
    raise TextSourceError(f"unknown text source {source!r}: use one of {sorted(_BUILTIN)}, a text file or "
                          "folder, a datasets save_to_disk folder, or hf:NAME[:CONFIG]")


# ---------------------------------------------------------------------------------------------
# Windows


def window_starts(total: int, window: int, num_windows: int) -> list[int]:
    """Start offsets of ``num_windows`` non-overlapping windows evenly spread over ``total`` tokens.

    ``start_i = floor(i * (total - window) / (num_windows - 1))``: the first window starts at token 0,
    the last one ends at the last token, and the gaps between windows differ by at most one token.
    One window starts at 0.
    """
    if window < 2 or num_windows < 1:
        raise ValueError(f"need window >= 2 and num_windows >= 1, got window={window}, num_windows={num_windows}")
    if total < window * num_windows:
        raise RanapassError(f"the text has {total} tokens, fewer than num_windows x window = {num_windows} x "
                         f"{window} = {num_windows * window}: ask for fewer or shorter windows, or give more text")
    if num_windows == 1:
        return [0]
    return [i * (total - window) // (num_windows - 1) for i in range(num_windows)]


def tokenize_stream(tokenizer, texts: Sequence[str], separator: str = "\n\n") -> torch.Tensor:
    """One 1-D LongTensor of token ids: each text tokenized on its own (``add_special_tokens=False``),
    the texts' ids concatenated with the ids of ``separator`` between them.

    Tokenizing documents separately (in one batch call) is 2.5x faster than tokenizing their join
    as one string, and gives the same ids except at the seams.
    """
    if not texts:
        raise ValueError("no texts to tokenize")
    kwargs = dict(add_special_tokens=False, return_attention_mask=False, verbose=False)
    docs = tokenizer(list(texts), **kwargs)["input_ids"]
    sep = tokenizer(separator, **kwargs)["input_ids"] if separator else []
    pieces = [sep + doc if i else doc for i, doc in enumerate(docs)]
    return torch.tensor(list(itertools.chain.from_iterable(pieces)), dtype=torch.long)


def token_windows(tokenizer, texts: Sequence[str], window: int = 512, num_windows: int = 32, *,
                  separator: str = "\n\n") -> torch.Tensor:
    """Cut ``num_windows`` non-overlapping, evenly spaced windows of ``window`` tokens from texts.

    The texts become one token stream (:func:`tokenize_stream`: each text tokenized with
    ``add_special_tokens=False``, joined by the ids of ``separator``); window i starts at token
    ``floor(i * (L - window) / (num_windows - 1))`` of the L-token stream (see :func:`window_starts`).
    Deterministic: same texts, same windows.

    Args:
        tokenizer: a Hugging Face tokenizer.
        texts: the documents, e.g. from :func:`load_texts`.
        window: tokens per window.
        num_windows: number of windows.

    Returns:
        LongTensor ``[num_windows, window]``.

    Raises:
        ValueError: the stream is shorter than ``num_windows * window`` tokens.

    Example::

        >>> windows = token_windows(tokenizer, load_texts("python-docs", "evaluation"), 512, 32)  # doctest: +SKIP
        >>> windows.shape
        torch.Size([32, 512])
    """
    stream = tokenize_stream(tokenizer, texts, separator)
    starts = window_starts(len(stream), window, num_windows)
    return torch.stack([stream[s:s + window] for s in starts])


def split_holdout(windows: torch.Tensor, held: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``windows`` less ``held`` of them, and those (None when ``held`` is 0 or leaves nothing).

    The held-out windows are spread over the data (the middle window of each of ``held`` equal parts), not
    its tail: windows follow the order of the text, and thresholds fitted on its last pages missed the
    planned FLOPs on every other text (benchmarks/RESULTS.md, profile and plan time).
    """
    count = windows.shape[0]
    if not held or count <= held:
        return windows, None
    positions = [int((i + 0.5) * count / held) for i in range(held)]
    keep = torch.ones(count, dtype=torch.bool)
    keep[positions] = False
    return windows[keep], windows[positions]   # index lists copy


def calibration_windows(tokenizer, source: str | os.PathLike = "python-docs", *, num_windows: int = 256,
                        window: int = 512) -> torch.Tensor:
    """Calibration windows: the calibration split of ``source``, ``num_windows`` x ``window`` tokens."""
    return token_windows(tokenizer, load_texts(source, "calibration"), window, num_windows)


def evaluation_windows(tokenizer, source: str | os.PathLike = "python-docs", *, num_windows: int = 32,
                       window: int = 512) -> torch.Tensor:
    """Evaluation windows: the evaluation split of ``source``, ``num_windows`` x ``window`` tokens
    (the defaults are the evaluation protocol of :mod:`ranapass.evaluate`)."""
    return token_windows(tokenizer, load_texts(source, "evaluation"), window, num_windows)


def _vocabulary(model: torch.nn.Module) -> int | None:
    """The number of token ids ``model`` embeds, or None for a model that takes no token ids."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    return embedding.num_embeddings if isinstance(embedding, torch.nn.Embedding) else None


def check_token_ids(ids: torch.Tensor, model: torch.nn.Module, what: str = "token ids") -> None:
    """Refuse token ids ``model`` cannot embed: not integers, negative, or beyond its vocabulary.

    Checked up front by the entry points that take token ids (profiling, evaluation, generation), so a
    mistake is one clear error before any expensive work. Models without a token embedding are skipped.

    Raises:
        RanapassError: naming ``what``, the offending value and the fix.
    """
    vocab = _vocabulary(model)
    if vocab is None or not isinstance(ids, torch.Tensor):
        return
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise RanapassError(f"{what} must be integer token ids, got dtype {ids.dtype}: pass the tokenizer's ids "
                            "(e.g. ranapass.data.token_windows) as a LongTensor")
    if ids.numel() == 0:
        raise RanapassError(f"{what} are empty (shape {tuple(ids.shape)})")
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        raise RanapassError(f"{what} hold a negative token id ({low}): token ids start at 0")
    if high >= vocab:
        raise RanapassError(f"{what} hold token id {high}, beyond the model's vocabulary of {vocab} tokens: "
                            "tokenize with this model's tokenizer")
