"""Derive the ImageNet-1k label table (curators/data/imagenet1k.tsv) from WordNet 3.0.

Class order and wnids: timm's imagenet_synsets.txt (the standard sorted-wnid order, index 0..999).
Display names: open_clip's cleaned ImageNet class names (the ones CLIP prompts use).
Lemmas, gloss, hypernym chain and the first hypernym's lemmas: WordNet 3.0 data.noun (Debian package wordnet-base);
an ImageNet wnid is 'n' + the synset's byte offset in data.noun.

Usage: python scripts/derive_labels.py [/usr/share/wordnet/data.noun] > curators/data/imagenet1k.tsv
"""

from __future__ import annotations

import sys
from importlib import resources


def read_synsets(data_noun: str) -> dict[str, tuple[list[str], str, list[str]]]:
    """offset -> (lemmas, gloss, direct hypernym offsets)."""
    synsets: dict[str, tuple[list[str], str, list[str]]] = {}
    with open(data_noun, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):
                continue  # licence header
            head, _, gloss = line.partition(" | ")
            parts = head.split()
            offset, n_words = parts[0], int(parts[3], 16)
            lemmas = [parts[4 + 2 * i].replace("_", " ") for i in range(n_words)]
            pos = 4 + 2 * n_words
            n_ptrs = int(parts[pos])
            hypernyms = []
            for i in range(n_ptrs):
                symbol, target, target_pos = parts[pos + 1 + 4 * i : pos + 4 + 4 * i]
                if symbol in ("@", "@i") and target_pos == "n":
                    hypernyms.append(target)
            synsets[offset] = (lemmas, gloss.strip(), hypernyms)
    return synsets


def hypernym_chain(offset: str, synsets: dict) -> list[str]:
    """First-hypernym path from the synset up to the root, as wnids."""
    chain, seen = [], {offset}
    while synsets[offset][2]:
        offset = synsets[offset][2][0]
        if offset in seen:
            break
        seen.add(offset)
        chain.append("n" + offset)
    return chain


def main() -> None:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    data_noun = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/wordnet/data.noun"
    synsets = read_synsets(data_noun)
    wnids = resources.files("timm.data._info").joinpath("imagenet_synsets.txt").read_text().split()
    assert len(wnids) == 1000 == len(IMAGENET_CLASSNAMES)
    print("index\twnid\tname\tlemmas\tgloss\thypernyms\tparent_lemmas")
    for index, (wnid, name) in enumerate(zip(wnids, IMAGENET_CLASSNAMES, strict=True)):
        lemmas, gloss, _ = synsets[wnid[1:]]
        chain = hypernym_chain(wnid[1:], synsets)
        parent = synsets[chain[0][1:]][0] if chain else []  # the search queries' disambiguator
        fields = [str(index), wnid, name, "|".join(lemmas), gloss, "|".join(chain), "|".join(parent)]  # fmt: skip
        assert not any("\t" in f or "\n" in f for f in fields)
        print("\t".join(fields))


if __name__ == "__main__":
    main()
