"""Build radground/data/names/{first,last}_names.txt.gz: the scrubber's offline name lists.

The names come from the ``names-dataset`` package (a dev dependency; loading it takes ~18 s
and ~2 GB of RAM, which is why nothing reads it at run time): the most frequent first names
(per gender) and last names of the countries whose people a German, Austrian, Swiss, US or
UK hospital report is most likely to name, including the largest immigrant-origin groups in
Germany. Only names written in Latin letters are kept (a German or English report spells
"Иванов" as "Ivanov"); multi-word entries ("De Luca") keep their last word, since the
scrubber reads names word by word and handles particles ("de", "van", "von") itself.

The output is deterministic (sorted, gzip without a timestamp), so a rebuild with the same
package version gives the same bytes. radground/data/names/not_names.txt, the words that are not
names, is hand-curated and not made here.

    pip install names-dataset==3.3.1   # already in the dev extras of pyproject.toml
    python scripts/build-name-lists.py [--first N] [--last N] [OUT_DIR]
"""

from __future__ import annotations

import argparse
import gzip
import io
import re
import sys
import unicodedata
from importlib.metadata import version
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "radground" / "data" / "names"
# DACH + the two English-speaking systems, then the largest groups of foreign origin in
# Germany (Turkey, Poland, Italy, Russia, the former Yugoslavia, Greece, Syria, Afghanistan,
# Iraq). Romania, Ukraine, Kosovo and Bosnia are not in names-dataset 3.3.1.
HOME = ("DE", "AT", "CH", "US", "GB")
ORIGIN = ("TR", "PL", "IT", "RU", "HR", "RS", "GR", "SY", "AF", "IQ")
COUNTRIES = HOME + ORIGIN
# Deep lists for the countries whose reports these are: patients are old, and their names ("Gotthold",
# "Ingetraud") rank low in names-dataset, which was gathered from social-network profiles.
FIRST_PER_GENDER = 5000  # per home country and gender; ORIGIN countries get a fifth
LAST_PER_COUNTRY = 10000  # per home country; ORIGIN countries get a fifth
_PARTICLES = {"de", "da", "di", "del", "della", "van", "von", "der", "den", "la", "le", "el", "al", "ten", "zu"}
_LATIN_NAME = re.compile(r"[A-Za-zÀ-ɏ]+(?:['’-][A-Za-zÀ-ɏ]+)*")


def clean(raw: str) -> str | None:
    """The name as it is written in a report, or None when it is no usable single word."""
    words = unicodedata.normalize("NFC", raw).strip().split()
    while len(words) > 1 and words[0].casefold() in _PARTICLES:
        words = words[1:]
    if len(words) != 1:
        return None
    word = words[0]
    if not _LATIN_NAME.fullmatch(word) or len(word) < 2:
        return None
    # names-dataset title-cases its keys; keep inner capitals of "McDonald" if present.
    return word if word[0].isupper() and not word.isupper() else word[:1].upper() + word[1:].lower()


def collect(dataset, first_n_home: int, last_n_home: int) -> tuple[list[str], list[str]]:
    first: set[str] = set()
    last: set[str] = set()
    for country in COUNTRIES:
        share = 1 if country in HOME else 5
        first_n, last_n = first_n_home // share, last_n_home // share
        by_gender = dataset.get_top_names(n=first_n, country_alpha2=country, use_first_names=True).get(country, {})
        for names in by_gender.values():
            first.update(filter(None, map(clean, names)))
        names = dataset.get_top_names(n=last_n, country_alpha2=country, use_first_names=False).get(country, [])
        last.update(filter(None, map(clean, names)))
    return sorted(first), sorted(last)


def write(path: Path, names: list[str], header: list[str]) -> None:
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as f:
        f.write(("".join(f"# {line}\n" for line in header) + "".join(f"{n}\n" for n in names)).encode("utf-8"))
    path.write_bytes(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, default=OUT)
    parser.add_argument("--first", type=int, default=FIRST_PER_GENDER, help="first names per home country and gender")
    parser.add_argument("--last", type=int, default=LAST_PER_COUNTRY, help="last names per home country")
    args = parser.parse_args()
    from names_dataset import NameDataset  # heavy: ~18 s, ~2 GB

    dataset = NameDataset()
    missing = [c for c in COUNTRIES if c not in dataset.get_country_codes(alpha_2=True, cache=True)]
    if missing:
        sys.exit(f"build-name-lists: names-dataset {version('names-dataset')} lacks countries {missing}; "
                 "drop them from COUNTRIES or install names-dataset==3.3.1.")
    first, last = collect(dataset, args.first, args.last)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python scripts/build-name-lists.py" + (
        f" --first {args.first}" if args.first != FIRST_PER_GENDER else "") + (
        f" --last {args.last}" if args.last != LAST_PER_COUNTRY else "")
    for kind, names, n, per in (("first", first, args.first, "country and gender"),
                                ("last", last, args.last, "country")):
        header = [f"{kind} names, one per line: the top {n} per {per} of {', '.join(HOME)} and the top {n // 5} "
                  f"of {', '.join(ORIGIN)}; Latin script only",
                  f"source: names-dataset {version('names-dataset')} (PyPI), "
                  f"NameDataset().get_top_names(n={n}, country_alpha2=..., use_first_names={kind == 'first'})",
                  f"made by: {command}   ({len(names)} names; do not edit by hand)"]
        path = args.out / f"{kind}_names.txt.gz"
        write(path, names, header)
        print(f"{path}: {len(names)} names, {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
