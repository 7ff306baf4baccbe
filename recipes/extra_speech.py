#!/usr/bin/env python3
"""More recorded speech for the bundled model's recipe: three Debian sources the corpus does not hold.

usage: python recipes/extra_speech.py SHARED OUT

The corpus (SHARED/data/corpus/build_corpus.py) holds speech from two training packages, spoken names and
Czech game dialogue, and the model's speech stayed weak on held-out speech (docs/MODEL.md). These add
read sentences and prompts from other speakers and languages, decoded the same way (16 kHz mono FLAC, with
build_corpus.py's own code) into OUT/audio, with OUT/manifest.csv in the corpus's columns and
OUT/speech_extra_train.csv, the training manifest (``--unlabelled``). Every file is training audio: the
held-out speech stays the corpus's test packages (recipes/default_model.py), so the figures compare with
earlier models'.

- festvox-ru: one man reading 620 Russian sentences, 16 kHz (BSD-like festvox licence);
- asterisk-core-sounds-{en,es,fr,it,ru}-wav: telephone prompts by five speakers, words to sentences,
  8 kHz (CC BY-SA 3.0: en, es, fr; CC BY 3.0: it, ru). Nothing above 4 kHz, as in telephone music;
  train with ``--band-limit`` so a missing top octave is not what speech is learned by;
- fillets-ng-data-nl: Dutch dialogue of the game whose Czech dialogue is in the corpus (GPL-2).

Each source is one group (the five asterisk languages together), drawn twice as often as a group of
weight 1; each package's ``debian/copyright`` is copied into OUT/licences.

Tried on 2026-12-03 and not shipped: stages trained with it were no better on held-out speech, and worse
elsewhere (docs/MODEL.md, "More speech"). Kept so that result can be reproduced and taken further.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import sys
from pathlib import Path

ASTERISK = [f"asterisk-core-sounds-{lang}-wav" for lang in ("en", "es", "fr", "it", "ru")]
PACKAGES = {
    "festvox-ru": ("speech", "BSD-like (festvox; keep the notice and authors' names)", 1.66),
    **{pkg: ("speech", "CC BY-SA 3.0 (en, es, fr) / CC BY 3.0 (it, ru)", 0.44) for pkg in ASTERISK},
    "fillets-ng-data-nl": ("speech", "GPL-2 (Dutch dialogue)", 1.60),
}
WEIGHT = 2


def group_of(package: str) -> str:
    return "asterisk-core-sounds" if package in ASTERISK else package


def main(shared: Path, out: Path) -> None:
    spec = importlib.util.spec_from_file_location("build_corpus", shared / "data" / "corpus" / "build_corpus.py")
    corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corpus)
    corpus.PACKAGES.update(PACKAGES)  # build_package looks a package's kind and licence up there
    out = out.resolve()
    debs = out / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    rows = []
    for pkg in PACKAGES:
        got = corpus.build_package(pkg, str(out), str(debs))
        print(f"{pkg:28s} {len(got):5d} files {sum(float(r['seconds']) for r in got) / 3600:5.2f} h", flush=True)
        rows += got
    fields = ["path", "package", "kind", "licence", "seconds", "source_rate", "group"]
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    with open(out / "speech_extra_train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "group", "weight"])
        w.writeheader()
        w.writerows(
            {"path": os.path.join(out, r["path"]), "group": group_of(r["package"]), "weight": WEIGHT} for r in rows
        )
    print(f"{sum(float(r['seconds']) for r in rows) / 3600:.2f} h of speech -> {out}/speech_extra_train.csv")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1])
    main(Path(sys.argv[1]), Path(sys.argv[2]))
