"""How well the scrubber finds PHI that no DICOM header names: token recall per category, and
how much clean report text it removes by mistake. Quality figures, not speed (one speed figure).

Two sets, generated here with a fixed seed and kept apart from the rules in tasks/ (the rules use
names-dataset lists and general patterns; this set uses Faker's de_DE / en_US names, streets,
cities and phones, which no rule was written against):

- PHI sentences: German and English radiology sentences with planted PHI: patients named after
  a cue ("Pat.", "Patientin", "Name:"), physicians after a title or label, relatives after a role
  ("Tochter", "wife"), names with no cue at all, addresses, phones, IDs, e-mails and dates.
  Labels are character spans; a token (a run of \\w) of a span counts as found when the
  scrubber's spans cover it completely.
- clean reports: synthetic reports of radground/synth/reports.py; the PHI they record (header
  names, dates, IDs, phone) is masked out of the count, every other token must survive. Tokens
  naming anatomy or carrying a number (sizes, levels, doses) are counted apart: target 0 removed.

The scrubber runs WITHOUT header values (KnownPHI()), so only the header-free rules are measured.
Run: python bench/run.py scrub_eval  (prints the per-category table, writes the JSON).
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Callable
from datetime import date, timedelta

_TOKEN = re.compile(r"\w+")
Piece = tuple[str, str | None]  # (text, category or None)


# ---- PHI sentences --------------------------------------------------------------------------------
class _Planter:
    """Draws PHI values from Faker for one language and renders them as labelled pieces."""

    def __init__(self, language: str, seed: int) -> None:
        from faker import Faker

        self.de = language == "de"
        self.fake = Faker("de_DE" if self.de else "en_US")
        self.fake.seed_instance(seed)
        self.rng = random.Random(seed)

    def first(self) -> str:
        return self.fake.first_name()

    def last(self) -> str:
        return self.fake.last_name()

    def full(self) -> str:
        return f"{self.first()} {self.last()}"

    def patient(self) -> list[Piece]:
        f, s, cat = self.first(), self.last(), "name_patient"
        forms = ([("Pat. ", f"{f} {s}"), ("Patientin ", f"{f} {s}"), ("Patient ", f"{f} {s}"),
                  ("Patient: ", f"{s}, {f}"), ("Name: ", f"{f} {s}"), ("Pat. ", s), ("Frau ", s), ("Herr ", s)]
                 if self.de else
                 [("Patient: ", f"{f} {s}"), ("Name: ", f"{s}, {f}"), ("Mr. ", s), ("Mrs. ", s), ("Ms ", f"{f} {s}"),
                  ("patient ", f"{f} {s}"), ("Patient name: ", f"{f} {s}")])
        cue, name = self.rng.choice(forms)
        return [(cue, None), (name, cat)]

    def physician(self) -> list[Piece]:
        f, s, cat = self.first(), self.last(), "name_titled"
        forms = ([("Dr. med. ", f"{f} {s}", ""), ("Prof. Dr. ", s, ""), ("OA Dr. ", f"{f[0]}. {s}", ""),
                  ("Dr. ", f"{f} {s}", ""), ("Oberärztin ", f"{f} {s}", ""), ("Hausarzt Dr. ", s, ""),
                  ("gez. ", f"{f} {s}", ""), ("Kollege ", s, ""), ("Dr. med. ", f"{f[0]}. {s}", "")]
                 if self.de else
                 [("Dr. ", f"{f} {s}", ""), ("Dr ", s, ""), ("", f"{f} {s}", ", MD"), ("Prof. ", f"{f} {s}", ""),
                  ("Dr. ", f"{f[0]}. {s}", ""), ("", f"{f} {s}", ", FRCR"), ("GP Dr. ", s, "")])
        cue, name, suffix = self.rng.choice(forms)
        return [(cue, None), (name, cat), (suffix, None)]

    def relative(self) -> list[Piece]:
        cat = "name_relative"
        roles = (["Tochter", "Sohn", "Ehemann", "Ehefrau", "Lebensgefährtin", "Betreuerin", "Bruder", "Nichte",
                  "Nachbar", "Mutter"] if self.de else
                 ["daughter", "son", "husband", "wife", "partner", "brother", "sister", "mother", "neighbour"])
        role = self.rng.choice(roles)
        name = self.rng.choice([self.full(), self.full(), self.first()])
        sep = self.rng.choice([" ", " ", ", "])
        return [(role + sep, None), (name, cat)]

    def untitled(self) -> list[Piece]:
        return [(self.full(), "name_untitled")]

    def address(self) -> list[Piece]:
        street = self.fake.street_address()
        if self.de:
            city = f"{self.fake.postcode()} {self.fake.city()}"
        else:
            city = f"{self.fake.city()}, {self.fake.state_abbr(include_territories=False)} {self.fake.postcode()}"
        return self.rng.choice([[(street, "address"), (", ", None), (city, "address")],
                                [(street, "address")], [(city, "address")]])

    def phone(self) -> list[Piece]:
        return [(self.fake.phone_number(), "phone")]

    def email(self) -> list[Piece]:
        return [(self.fake.email(), "email")]

    def ident(self) -> list[Piece]:
        b = self.fake.bothify
        forms = ([("KV-Nr. ", b("?#########").upper()), ("Versichertennummer: ", b("?#########").upper()),
                  ("Fallnummer ", b("########")), ("Pat.-ID: ", b("00######")), ("", b("KVNR-##??###")),
                  ("Auftragsnr. ", b("A########")), ("Versicherung: ", b("??-#####-##").upper())]
                 if self.de else
                 [("MRN ", b("00#####")), ("NHS No. ", b("### ### ####")), ("SSN ", self.fake.ssn()),
                  ("Insurance ID: ", b("???#########").upper()), ("Acc. No. ", b("########")),
                  ("Member ID ", b("??######").upper()), ("", b("MRN-##??###").upper())])
        cue, value = self.rng.choice(forms)
        return [(cue, None), (value, "id")]

    def date(self) -> list[Piece]:
        d = date(1930, 1, 1) + timedelta(days=self.rng.randint(0, 34_000))
        months = (("Januar Februar März April Mai Juni Juli August September Oktober November Dezember" if self.de
                   else "January February March April May June July August September October November December")
                  .split())
        styles = (["{d:02d}.{m:02d}.{y}", "{d}.{m}.{y}", "{d}. {mon} {y}"] if self.de else
                  ["{y}-{m:02d}-{d:02d}", "{d:02d}/{m:02d}/{y}", "{mon} {d}, {y}"])
        text = self.rng.choice(styles).format(d=d.day, m=d.month, y=d.year, mon=months[d.month - 1])
        return [(text, "date")]


_TEMPLATES = {  # "{slot}" -> _Planter method; the rest is clinical text
    "de": [
        "{patient}, geb. {date}, wurde zur CT Thorax mit KM vorgestellt.",
        "{patient} ({ident}) kommt zur Verlaufskontrolle nach Resektion eines Kolonkarzinoms.",
        "Rückruf an {relative} unter {phone} erfolgt, Befund erläutert.",
        "Die Aufnahmen wurden mit {physician} am Demonstrationsmonitor besprochen.",
        "Zuweisung durch {physician}, Praxis {address}.",
        "{relative} begleitet die Patientin und bittet um Befundkopie an {email}.",
        "Wohnhaft {address}; Kontakt {phone}.",
        "Leber mit 2,2 x 1,8 cm großer hypodenser Läsion in Segment IVa, Befund telefonisch an {physician}.",
        "Voruntersuchung vom {date} aus der Praxis {physician} liegt vor.",
        "{untitled} wurde über den Befund informiert, Verlaufskontrolle in 3 Monaten.",
        "Information an {untitled} am {date} um 14:30 Uhr erfolgt.",
        "Osteochondrose LWK 5 und Bandscheibenprotrusion L5/S1; {patient} wünscht Rückruf unter {phone}.",
        "Befund per E-Mail an {email} übermittelt, {ident}.",
        "Pleuraerguss rechts, max. 1,5 cm; {relative} wurde informiert.",
        "Überweisung durch {physician} ({phone}) wegen Dyspnoe.",
        "Keine Lymphadenopathie. {untitled} bestätigt die Angaben zur Vormedikation.",
        "Kopie des Befundes an {physician}, {address}.",
        "{patient}, {address}, {ident}.",
        "Nach Angaben von {relative} Sturz am {date}.",
        "Mit freundlichen kollegialen Grüßen\n{physician}",
        "Keine Fraktur BWK 8, Dens C2 intakt; Rücksprache mit {physician} erfolgt.",
        "Aorta normkalibrig, Herz normal groß; {untitled} (Stationsärztin) wurde verständigt.",
        "Versicherung: {ident}, Adresse {address}.",
        "Niere links mit 12 mm Konkrement; {relative} ({phone}) wünscht Rückruf.",
        "Befundet von {physician}, Rückfragen unter {phone}.",
    ],
    "en": [
        "{patient}, DOB {date}, presented for CT of the chest with contrast.",
        "{patient} ({ident}) returns for follow-up after right hemicolectomy.",
        "Results were discussed with the patient's {relative} by phone ({phone}).",
        "Images reviewed with {physician} at the workstation.",
        "Referred by {physician}, {address}.",
        "The patient's {relative} requested a copy of the report sent to {email}.",
        "Home address: {address}; phone {phone}.",
        "2.2 x 1.8 cm hypodense lesion in hepatic segment IVa, communicated to {physician}.",
        "Prior study dated {date} from the office of {physician} is available.",
        "{untitled} was informed of the findings; follow-up CT in 3 months.",
        "Findings communicated to {untitled} on {date} at 14:30.",
        "Degenerative changes at L5/S1 and T8; {patient} asks for a call back at {phone}.",
        "Report e-mailed to {email}, {ident}.",
        "Small right pleural effusion measuring 1.5 cm; {relative} was notified.",
        "Referring physician: {physician} ({phone}), shortness of breath.",
        "No lymphadenopathy. {untitled} confirmed the medication history.",
        "Copy to {physician}, {address}.",
        "{patient}, {address}, {ident}.",
        "According to the {relative}, fall on {date}.",
        "Electronically signed by: {physician}\nRadiology department",
        "No fracture of T12, C2 intact; discussed with {physician}.",
        "The aorta is normal in caliber; {untitled} (ward nurse) was informed.",
        "Insurance: {ident}; address {address}.",
        "12 mm non-obstructing stone in the left kidney; {relative} ({phone}) wants a call back.",
        "Reported by {physician}. For questions, phone {phone}.",
    ],
}


def phi_sentences(seed: int, per_language: int) -> list[tuple[str, str, list[tuple[int, int, str]]]]:
    """(language, sentence, [(start, end, category)]) with planted PHI, deterministic for ``seed``."""
    out = []
    for n, language in enumerate(("de", "en")):
        planter = _Planter(language, seed * 10 + n)
        templates = _TEMPLATES[language]
        for i in range(per_language):
            pieces: list[Piece] = []
            for part in re.split(r"(\{\w+\})", templates[i % len(templates)]):
                pieces += getattr(planter, part[1:-1])() if part.startswith("{") else [(part, None)]
            text, spans = "", []
            for piece, category in pieces:
                if category:
                    spans.append((len(text), len(text) + len(piece), category))
                text += piece
            out.append((language, text, spans))
    return out


# ---- clean synthetic reports -------------------------------------------------------------------------
def clean_reports(seed: int, per_language: int) -> list[tuple[str, str, list[tuple[int, int]]]]:
    """(language, report, [PHI spans]) from the project's report writer, PHI spans from its record."""
    from radground.synth.reports import KINDS, MODALITIES, ORGANS, Finding, random_person, random_phone, write_report

    rng = random.Random(seed)
    out = []
    for language in ("de", "en"):
        for _ in range(per_language):
            organs = rng.sample(ORGANS, rng.randint(2, len(ORGANS)))
            findings = []
            for organ in rng.sample(organs, rng.randint(0, min(3, len(organs)))):
                kind = rng.choice(KINDS)
                size = round(rng.uniform(3, 60), 1) if kind in ("lesion", "cyst") else None
                detail = (rng.choice(["VII", "IVa", "VIII", "VI"]) if organ == "liver" else
                          rng.choice(["T8", "T11", "L1", "L3"]) if organ == "vertebrae" else None)
                findings.append(Finding(organ, kind, size, detail))
            study = date(2020, 1, 1) + timedelta(days=rng.randint(0, 1500))
            report = write_report(
                rng, language=language, modality=rng.choice(MODALITIES), region_organs=organs, findings=findings,
                patient=random_person(rng, language), birth_date=study - timedelta(days=rng.randint(7000, 32000)),
                study_date=study, prior_date=study - timedelta(days=200) if rng.random() < 0.5 else None,
                physician=random_person(rng, language), referring=random_person(rng, language),
                phone=random_phone(rng, language), accession=str(rng.randint(10**7, 10**8)),
                patient_id=str(rng.randint(10**7, 10**8)))
            spans = [(m.start(), m.end()) for phi in report.phi
                     for m in re.finditer(rf"(?<!\w){re.escape(phi)}(?!\w)", report.text)]
            out.append((language, report.text, spans))
    return out


def _protected(language: str) -> Callable[[str], bool]:
    """Is a token anatomy or a measurement: a lexicon term (or German compound of one), a number, a unit?"""
    from radground.lexicon import load_lexicon

    lexicon = load_lexicon()
    terms = {t.casefold() for s in lexicon.structures for term in s.terms[language] for t in term.split()}
    stems = tuple(t for t in terms if len(t) >= 4)
    units = {"mm", "cm", "ml", "l", "kg", "mg", "hu", "kv", "mas", "mgy", "msv", "s", "min", "x",
             "lwk", "bwk", "hwk", "swk", "iva", "ivb", "vii", "viii", "vi", "v", "iv", "iii", "ii", "i"}

    def protected(token: str) -> bool:
        fold = token.casefold()
        return (any(c.isdigit() for c in fold) or fold in units or fold in terms
                or (language == "de" and fold.startswith(stems)))
    return protected


# ---- scoring ---------------------------------------------------------------------------------------------
def _covered(spans: list[tuple[int, int, str]], start: int, end: int) -> bool:
    return any(s <= start and end <= e for s, e, _ in spans)


def bench_scrub_eval(seed: int = 0, sentences_per_language: int = 400, reports_per_language: int = 100,
                     show: bool = True) -> dict:
    from tasks.scrub import KnownPHI, locate_phi

    locate = lambda text, language: locate_phi(text, KnownPHI(), language=language)  # noqa: E731
    locate("Warm-up: loads the name lists once.", "de")

    found, total = Counter(), Counter()
    phi_false = phi_clean_tokens = 0
    phi_false_words: Counter = Counter()
    misses: list[str] = []
    sentences = phi_sentences(seed, sentences_per_language)
    started = time.perf_counter()
    for language, text, labels in sentences:
        spans = locate(text, language)
        for m in _TOKEN.finditer(text):
            label = next((c for s, e, c in labels if s <= m.start() and m.end() <= e), None)
            hit = _covered(spans, m.start(), m.end())
            if label is None:
                phi_clean_tokens += 1
                phi_false += hit
                if hit:
                    phi_false_words[m.group()] += 1
                continue
            for key in (label, f"{label}|{language}", "ALL"):
                total[key] += 1
                found[key] += hit
            if not hit and len(misses) < 25:
                misses.append(f"{language} {label}: {m.group()!r} in {text!r}")
    seconds = time.perf_counter() - started

    removed = kept = protected_removed = protected_total = 0
    protected_lost: Counter = Counter()
    protected = {language: _protected(language) for language in ("de", "en")}
    false_removals: Counter = Counter()
    for language, text, phi in clean_reports(seed, reports_per_language):
        spans = locate(text, language)
        for m in _TOKEN.finditer(text):
            if any(s <= m.start() < e or s < m.end() <= e for s, e in phi):
                continue  # recorded PHI of the synthetic report
            hit = _covered(spans, m.start(), m.end())
            removed += hit
            kept += not hit
            if hit:
                false_removals[m.group()] += 1
            if protected[language](m.group()):
                protected_total += 1
                protected_removed += hit
                if hit:
                    protected_lost[m.group()] += 1

    recall = {key: round(found[key] / total[key], 4) for key in sorted(total)}
    figures = {
        "seed": seed,
        "phi_sentences": len(sentences),
        "phi_tokens": total["ALL"],
        "recall": recall,
        "recall_all": recall["ALL"],
        "phi_sentences_false_removal_rate": round(phi_false / max(phi_clean_tokens, 1), 4),
        "phi_sentences_removed_examples": dict(phi_false_words.most_common(15)),
        "clean_reports": 2 * reports_per_language,
        "clean_tokens": removed + kept,
        "clean_false_removal_rate": round(removed / max(removed + kept, 1), 5),
        "clean_tokens_removed": removed,
        "clean_removed_examples": dict(false_removals.most_common(15)),
        "anatomy_measurement_tokens": protected_total,
        "anatomy_measurement_removed": protected_removed,
        "anatomy_measurement_removed_examples": dict(protected_lost.most_common(15)),
        "sentences_per_s": round(len(sentences) / seconds),
    }
    if show:
        print(f"{'category':<24}{'tokens':>8}{'found':>8}{'recall':>9}")
        for key in sorted(total, key=lambda k: (k == "ALL", k)):
            print(f"{key:<24}{total[key]:>8}{found[key]:>8}{recall[key]:>9.3f}")
        print(f"false removals: {figures['phi_sentences_false_removal_rate']:.2%} of non-PHI tokens in PHI sentences; "
              f"{figures['clean_false_removal_rate']:.3%} ({removed}/{removed + kept}) of clean report tokens; "
              f"anatomy/measurement tokens removed: {protected_removed}/{protected_total}")
        for line in misses:
            print("  missed", line)
        if false_removals:
            print("  removed from clean reports:", dict(false_removals.most_common(15)))
    return figures


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(bench_scrub_eval(seed=int(sys.argv[1]) if len(sys.argv) > 1 else 0), indent=2))
