"""Text sources, the python-docs split, and fixed token windows."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch

from ranapass import data
from ranapass.data import (TextSourceError, load_texts, split_holdout, token_windows, tokenize_stream,
                           window_starts)

from conftest import synthetic_text

HAVE_PYTHON_DOCS = any(Path(p, "tutorial", "index.html").is_file() for p in glob.glob("/usr/share/doc/python3*/html"))


# ---------------------------------------------------------------------------------------------
# Windows


@pytest.mark.parametrize("total,window,num", [(100, 10, 10), (101, 10, 10), (1000, 7, 13), (50, 5, 1), (64, 2, 3)])
def test_window_starts_even_and_disjoint(total, window, num):
    starts = window_starts(total, window, num)
    assert len(starts) == num and starts[0] == 0
    if num > 1:
        assert starts[-1] + window == total
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert min(gaps) >= window  # non-overlapping
        assert max(gaps) - min(gaps) <= 1  # evenly spaced


@pytest.mark.parametrize("total,window,num", [(99, 10, 10), (0, 2, 1)])
def test_window_starts_too_short(total, window, num):
    with pytest.raises(ValueError, match="fewer or shorter windows, or give more text"):
        window_starts(total, window, num)


@pytest.mark.parametrize("window,num", [(1, 4), (8, 0)])
def test_window_starts_bad_arguments(window, num):
    with pytest.raises(ValueError, match="need window >= 2"):
        window_starts(100, window, num)


def test_tokenize_stream_joins_documents_with_separator(tiny_tokenizer):
    texts = ["Python is fun.", "The fox jumps.", "A list."]
    kwargs = dict(add_special_tokens=False)
    sep = tiny_tokenizer("\n\n", **kwargs)["input_ids"]
    expected = []
    for i, text in enumerate(texts):
        expected += (sep if i else []) + tiny_tokenizer(text, **kwargs)["input_ids"]
    assert tokenize_stream(tiny_tokenizer, texts).tolist() == expected


def test_token_windows_are_evenly_spaced_slices_of_the_stream(tiny_tokenizer):
    texts = [synthetic_text(30, seed=s) for s in range(3)]
    stream = tokenize_stream(tiny_tokenizer, texts)
    windows = token_windows(tiny_tokenizer, texts, window=16, num_windows=5)
    assert windows.shape == (5, 16) and windows.dtype == torch.long
    for row, start in zip(windows, window_starts(len(stream), 16, 5)):
        assert torch.equal(row, stream[start:start + 16])
    assert tiny_tokenizer.bos_token_id not in windows  # no special tokens added
    assert torch.equal(windows, token_windows(tiny_tokenizer, texts, window=16, num_windows=5))


def test_token_windows_too_short_text(tiny_tokenizer):
    with pytest.raises(ValueError, match="tokens, fewer than num_windows x window"):
        token_windows(tiny_tokenizer, ["Python is fun."], window=64, num_windows=2)


def test_token_windows_no_text(tiny_tokenizer):
    with pytest.raises(ValueError, match="no texts"):
        token_windows(tiny_tokenizer, [], window=4, num_windows=1)


# ---------------------------------------------------------------------------------------------
# Plain text and datasets sources


def test_plain_text_folder_and_file(text_dir):
    docs = load_texts(text_dir, "evaluation")
    expected = [(text_dir / n).read_text() for n in ["a.txt", "b.md", "sub/c.txt"]]
    assert docs == expected  # sorted paths, the .bin file ignored
    assert load_texts(text_dir / "b.md", "calibration") == [expected[1]]


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(TextSourceError, match="no .txt/.md/.rst files"):
        load_texts(tmp_path)


def test_unknown_source_and_split(tmp_path):
    with pytest.raises(TextSourceError, match="unknown text source.*python-docs"):
        load_texts(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split must be one of"):
        load_texts("python-docs", "train")


def test_saved_dataset_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["calib one", "", "calib two"]}),
        "validation": datasets.Dataset.from_dict({"text": ["val"]}),
        "test": datasets.Dataset.from_dict({"text": ["eval one"]}),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_texts(tmp_path / "dd", "calibration") == ["calib one", "calib two"]  # empty rows dropped
    assert load_texts(tmp_path / "dd", "evaluation") == ["eval one"]
    assert sorted(load_texts(tmp_path / "dd", "all")) == ["calib one", "calib two", "eval one", "val"]
    with pytest.raises(TextSourceError, match="no column 'body'"):
        load_texts(tmp_path / "dd", "evaluation", text_column="body")

    single = datasets.Dataset.from_dict({"text": ["only"]})
    single.save_to_disk(str(tmp_path / "single"))
    assert load_texts(tmp_path / "single", "evaluation") == ["only"]


def test_hf_load_dataset_from_local_files(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "csvs"
    folder.mkdir()
    (folder / "train.csv").write_text("text\nfirst row\nsecond row\n")
    (folder / "test.csv").write_text("text\nheld out\n")
    assert load_texts(f"hf:{folder}", "calibration") == ["first row", "second row"]
    assert load_texts(f"hf:{folder}", "evaluation") == ["held out"]
    with pytest.raises(TextSourceError, match="load_dataset"):
        load_texts(f"hf:{tmp_path / 'missing'}")


# ---------------------------------------------------------------------------------------------
# HTML prose and the python-docs split (synthetic tree)

BOILERPLATE = "This page is licensed under the same terms as every other page here."


def _page(*paragraphs: str, extra: str = "") -> str:
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    return f"<html><head><style>p {{ color: red }}</style></head><body>{body}{extra}</body></html>"


@pytest.fixture
def fake_python_docs(tmp_path, monkeypatch, isolated_cache) -> Path:
    root = tmp_path / "html"
    pages = {
        "tutorial/index.html": _page("The tutorial introduces the <em>basic</em> concepts of the language.",
                                     BOILERPLATE),
        "howto/logging.html": _page("This howto explains how logging is configured in practice.", BOILERPLATE),
        "faq/general.html": _page("Why does Python use indentation for grouping of statements?", BOILERPLATE),
        "library/os.html": _page("This module provides a portable way of using operating system features.",
                                 "Too short.", BOILERPLATE,
                                 extra="<pre><p>print('code is never prose here')</p></pre>"),
        "index.html": _page("Welcome to the documentation of Python, the programming language.", BOILERPLATE),
        "genindex-A.html": _page("An index page that must never be read as prose at all."),
        "_sources/tutorial/index.rst.txt.html": _page("A source page that must never be read as prose."),
    }
    pages.update({f"library/mod{i}.html": _page(f"Module number {i} does one small thing well.", BOILERPLATE)
                  for i in range(20)})  # BOILERPLATE now sits in 25 files: dropped
    for rel, html in pages.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(html)
    monkeypatch.setenv(data.PYTHON_DOCS_ENV, str(root))
    return root


def test_prose_extraction_rules(fake_python_docs):
    pages = dict(data.python_docs_pages("all"))
    assert pages["tutorial/index.html"] == "The tutorial introduces the basic concepts of the language."
    assert pages["library/os.html"] == "This module provides a portable way of using operating system features."
    assert not any(p.startswith(("genindex", "_sources")) for p in pages)
    assert not any(BOILERPLATE in t for t in pages.values())


def test_python_docs_split_by_folder(fake_python_docs, isolated_cache):
    evaluation = [p for p, _ in data.python_docs_pages("evaluation")]
    calibration = [p for p, _ in data.python_docs_pages("calibration")]
    assert evaluation == ["faq/general.html", "howto/logging.html", "tutorial/index.html"]
    assert "index.html" in calibration and "library/os.html" in calibration
    assert not set(evaluation) & set(calibration)
    assert len(list((isolated_cache / "text").glob("python-docs-*/prose.jsonl"))) == 1
    assert load_texts("python-docs", "evaluation") == [t for _, t in data.python_docs_pages("evaluation")]


def test_div_para_elements_are_prose(tmp_path):
    html = ('<div class="para">The handbook keeps its prose in div elements <div>with nested</div> content.'
            '<pre class="screen">$ apt-get install foo</pre></div>'
            '<div class="note">Not a paragraph at all, really.</div>')
    (tmp_path / "page.html").write_text(html)
    assert data.extract_prose(tmp_path) == [
        ("page.html", "The handbook keeps its prose in div elements with nested content.")]


def test_missing_python_docs_names_the_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv(data.PYTHON_DOCS_ENV, str(tmp_path))
    with pytest.raises(TextSourceError, match="apt-get install python3-doc") as info:
        load_texts("python-docs")
    assert "datasets" in str(info.value) and ".txt file" in str(info.value)


# ---------------------------------------------------------------------------------------------
# The real Debian documentation


@pytest.mark.skipif(not HAVE_PYTHON_DOCS, reason="python3-doc is not installed (`make install` installs it)")
def test_real_python_docs_split_never_overlaps():
    root = data.find_python_docs()
    assert (root / "tutorial" / "index.html").is_file() and "pip" not in str(root)
    evaluation = {p for p, _ in data.python_docs_pages("evaluation")}
    calibration = {p for p, _ in data.python_docs_pages("calibration")}
    assert not evaluation & calibration
    assert evaluation | calibration == {p for p, _ in data.python_docs_pages("all")}
    assert {p.split("/")[0] for p in evaluation} == {"tutorial", "howto", "faq"}
    assert len(calibration) > 5 * len(evaluation) > 100


@pytest.mark.skipif(not data.DEBIAN_HANDBOOK_DIR.is_dir(), reason="debian-handbook is not installed")
def test_real_debian_handbook():
    docs = load_texts("debian-handbook", "evaluation")
    assert len(docs) > 100 and sum(len(d) for d in docs) > 500_000
    assert load_texts("debian-handbook", "calibration") == docs


@pytest.mark.parametrize("count, held, positions", [(32, 2, [8, 24]), (10, 2, [2, 7]), (5, 1, [2]), (7, 3, [1, 3, 5])])
def test_held_out_windows_are_spread_over_the_data(count, held, positions):
    windows = torch.arange(count)[:, None].repeat(1, 4)
    rest, holdout = split_holdout(windows, held)
    assert holdout[:, 0].tolist() == positions
    assert rest[:, 0].tolist() == [i for i in range(count) if i not in positions]
    holdout[0, 0] = -1   # a copy: the caller's windows stay as they were
    assert windows[positions[0], 0] == positions[0]


@pytest.mark.parametrize("count, held", [(4, 0), (2, 2), (1, 3)])
def test_nothing_is_held_out_when_it_would_leave_nothing(count, held):
    windows = torch.zeros(count, 4, dtype=torch.long)
    rest, holdout = split_holdout(windows, held)
    assert holdout is None and rest is windows
