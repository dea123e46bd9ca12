"""Tests for tasks/curate/lexicon.py and radground/lexicon.py: a hand-labelled sentence table.

Every expectation below was written by hand from the rules in docs/method.md and the decisions
in the tasks/curate/lexicon.py docstring (unsided paired organ -> both sides, side cue
inside the span, compounds as whole words, spans never end in ".", generic ribs -> none),
never by running the extractor. Sentences the backend is known to get wrong sit in
KNOWN_GAPS (strict xfail), so the precision/recall/F1 of ``lexicon_scores()`` is honest.
"""

from __future__ import annotations

import copy
import random
from collections import Counter
from datetime import date
from importlib import resources

import pytest
import yaml

from radground.labels import label_map
from radground.lexicon import LEXICON_FILE, LexiconError, display_name, load_lexicon, parse_lexicon
from radground.synth.reports import ORGANS, Finding, random_person, write_report
from tasks.curate.base import CurationError, KeywordExtractor, check_keyword
from tasks.curate.lexicon import LexiconExtractor

Triple = tuple[str, str, bool]  # (keyword, class_name, negated)


def k(keyword: str, class_name: str, negated: bool = False) -> list[Triple]:
    return [(keyword, class_name, negated)]


def both(keyword: str, stem: str, negated: bool = False) -> list[Triple]:
    """A paired structure on both sides: two keywords with the same span."""
    return [(keyword, f"{stem}_left", negated), (keyword, f"{stem}_right", negated)]


def ribs(keyword: str, side: str, *numbers: int) -> list[Triple]:
    return [(keyword, f"rib_{side}_{n}", False) for n in numbers]


def levels(keyword: str, *names: str) -> list[Triple]:
    return [(keyword, f"vertebrae_{n}", False) for n in names]


def case(language: str, sentence: str, *expected: list[Triple]):
    return pytest.param(language, sentence, [t for group in expected for t in group], id=f"{language}:{sentence[:48]}")


CASES = [
    # --- German: lungs, both sides, lobes ---------------------------------------------
    case("de", "Lunge beidseits ohne Infiltrate.", both("Lunge beidseits", "lung", True)),
    case("de", "Lungen bds. frei belüftet, keine Rundherde.", both("Lungen bds", "lung")),
    case("de", "Beide Lungen o.B.", both("Beide Lungen", "lung")),
    case("de", "Keine pulmonalen Rundherde, Lunge beidseits frei.",
         both("pulmonalen", "lung", True), both("Lunge beidseits", "lung")),
    case("de", "Linke Lunge ohne Infiltrate.", k("Linke Lunge", "lung_left", True)),
    case("de", "Lunge rechts o.B.", k("Lunge rechts", "lung_right")),
    case("de", "Lunge li. frei belüftet.", k("Lunge li", "lung_left")),
    case("de", "Lunge o.B.", both("Lunge", "lung")),
    case("de", "Rundherd im linken Oberlappen, ca. 2,2 cm.", k("linken Oberlappen", "lung_upper_lobe_left")),
    case("de", "Solider Rundherd im Unterlappen rechts (12 mm).", k("Unterlappen rechts", "lung_lower_lobe_right")),
    case("de", "Pulmonaler Nodulus in der rechten Lunge, max. 8 mm.",
         k("Pulmonaler", "lung_right"), k("rechten Lunge", "lung_right")),
    case("de", "Kleiner Rundherd im Mittellappen, V.a. Granulom.", k("Mittellappen", "lung_middle_lobe_right")),
    case("de", "Rundherd im Oberlappen der linken Lunge.",
         k("Oberlappen der linken Lunge", "lung_upper_lobe_left")),
    case("de", "Im OL re. ein Rundherd, ML o.B.",
         k("OL re", "lung_upper_lobe_right"), k("ML", "lung_middle_lobe_right")),
    case("de", "Atelektase des linken Unterlappens.", k("linken Unterlappens", "lung_lower_lobe_left")),
    case("de", "Dystelektasen in beiden Unterlappen.", both("beiden Unterlappen", "lung_lower_lobe")),
    case("de", "Rundherd linkspulmonal, z.B. Metastase.", k("linkspulmonal", "lung_left")),
    case("de", "Lunge: Rundherd im Oberlappen links.",
         k("Lunge", "lung_left"), k("Oberlappen links", "lung_upper_lobe_left")),
    case("de", "Lungenembolie in der Pulmonalarterie rechts."),
    case("de", "Kein Pleuraerguss."),
    # --- German: heart, vessels -----------------------------------------------------------
    case("de", "Herz normal groß, kein Perikarderguss.", k("Herz", "heart")),
    case("de", "Keine Kardiomegalie, kein Erguss.", k("Kardiomegalie", "heart", True)),
    case("de", "Verkalkungen der Koronararterien.", k("Koronararterien", "heart")),
    case("de", "Aorta nicht erweitert, keine Dissektion.", k("Aorta", "aorta", True)),
    case("de", "Kalzifizierte Plaques der Bauchaorta.", k("Bauchaorta", "aorta")),
    case("de", "Pfortader und Milzvene frei perfundiert.",
         k("Pfortader", "portal_vein_and_splenic_vein"), k("Milzvene", "portal_vein_and_splenic_vein")),
    # --- German: abdomen, compounds, negation ---------------------------------------------
    case("de", "Leber normal groß, homogen, ohne Herde.", k("Leber", "liver")),
    case("de", "Keine fokalen Leberläsionen.", k("Leberläsionen", "liver", True)),
    case("de", "Hypodense Läsion in Lebersegment VII, ca. 1,5 cm, DD Hämangiom.", k("Lebersegment", "liver")),
    case("de", "Keine Milzläsion.", k("Milzläsion", "spleen", True)),
    case("de", "Kein Nachweis von Metastasen in der Leber.", k("Leber", "liver", True)),
    case("de", "Metastase in der Leber nicht ausgeschlossen.", k("Leber", "liver")),
    case("de", "Hepatosplenomegalie.", k("Hepatosplenomegalie", "liver"), k("Hepatosplenomegalie", "spleen")),
    case("de", "Leber- und Milzläsionen, größenprogredient.", k("Leber", "liver"), k("Milzläsionen", "spleen")),
    case("de", "Leber und Milz ohne Herde.", k("Leber", "liver", True), k("Milz", "spleen", True)),
    case("de", "Keine Läsion in Leber, Milz oder Nieren.",
         k("Leber", "liver", True), k("Milz", "spleen", True), both("Nieren", "kidney", True)),
    case("de", "Keine Läsion der Leber, Milz o.B.", k("Leber", "liver", True), k("Milz", "spleen")),
    case("de", "Keine Raumforderung in Leber, Milz, Pankreas oder Nieren; freie Flüssigkeit im Becken.",
         k("Leber", "liver", True), k("Milz", "spleen", True), k("Pankreas", "pancreas", True),
         both("Nieren", "kidney", True)),
    case("de", "Die Milz ist nicht vergrößert.", k("Milz", "spleen", True)),
    case("de", "CT Thorax ohne KM: Lunge beidseits frei.", both("Lunge beidseits", "lung")),
    case("de", "Z.n. Cholezystektomie, V.a. Rezidiv im Pankreaskopf.",
         k("Cholezystektomie", "gallbladder"), k("Pankreaskopf", "pancreas")),
    case("de", "Wandverdickung des Magens und des Duodenums.", k("Magens", "stomach"), k("Duodenums", "duodenum")),
    case("de", "Divertikel im Sigma, keine Divertikulitis.", k("Sigma", "colon")),
    case("de", "Harnblase und Prostata unauffällig.", k("Harnblase", "urinary_bladder"), k("Prostata", "prostate")),
    case("de", "Struma mit Verlagerung der Trachea nach rechts.",
         k("Struma", "thyroid_gland"), k("Trachea", "trachea")),
    case("de", "Schädel-Hirn-Trauma ohne Kalottenfraktur.",
         k("Schädel", "skull"), k("Hirn", "brain"), k("Kalottenfraktur", "skull", True)),
    # --- German: kidneys and adrenals, every way to write a side --------------------------
    case("de", "Nieren bds. o.B.", both("Nieren bds", "kidney")),
    case("de", "Niere rechts ohne Harnstau.", k("Niere rechts", "kidney_right", True)),
    case("de", "Zyste in der Niere li.", k("Niere li", "kidney_left")),
    case("de", "Kortikale Zyste (Bosniak I) in der Niere re., am ehesten blande.", k("Niere re", "kidney_right")),
    case("de", "Hypodense Läsion in der linken Niere, 1,5 x 1,2 cm.", k("linken Niere", "kidney_left")),
    case("de", "Nierenzyste links, 2,2 cm.", k("Nierenzyste links", "kidney_cyst_left")),
    case("de", "Die rechte Niere ist nicht gestaut, jedoch Zyste in der linken Niere.",
         k("rechte Niere", "kidney_right", True), k("linken Niere", "kidney_left")),
    case("de", "In der linken und rechten Niere je eine Zyste.", both("linken und rechten Niere", "kidney")),
    case("de", "Nebennieren beidseits schlank.", both("Nebennieren beidseits", "adrenal_gland")),
    case("de", "Raumforderung der rechten Nebenniere, V.a. Adenom.", k("rechten Nebenniere", "adrenal_gland_right")),
    # --- German: spine and ribs -----------------------------------------------------------
    case("de", "Osteolytische Läsion in LWK 3, ca. 22 mm.", levels("LWK 3", "L3")),
    case("de", "Sklerotische Läsion in BWK 8 (12 mm).", levels("BWK 8", "T8")),
    case("de", "Deckplatteneinbruch LWK5 und Th12.", levels("LWK5", "L5"), levels("Th12", "T12")),
    case("de", "Fraktur von HWK 2 (Dens).", levels("HWK 2", "C2")),
    case("de", "Spondylolyse LWK 5, Hämangiom in Th8.", levels("LWK 5", "L5"), levels("Th8", "T8")),
    case("de", "Höhenminderung des 12. BWK.", levels("12. BWK", "T12")),
    case("de", "Metastasen in BWK 8 bis 10.", levels("BWK 8 bis 10", "T8", "T9", "T10")),
    case("de", "Bandscheibenprotrusion LWK 4/5.",
         k("Bandscheibenprotrusion", "intervertebral_discs"), k("LWK 4/5", "intervertebral_discs")),
    case("de", "Osteochondrose der LWS, betont L5/S1.",
         k("LWS", "vertebrae"), k("L5/S1", "intervertebral_discs")),
    case("de", "Keine suspekten ossären Läsionen der Wirbelsäule.", k("Wirbelsäule", "vertebrae", True)),
    case("de", "Myelopathiesignal im Myelon auf Höhe HWK 5.", k("Myelon", "spinal_cord"), levels("HWK 5", "C5")),
    case("de", "Rippen intakt, keine Frakturen."),
    case("de", "Fraktur der 7. Rippe rechts.", ribs("7. Rippe rechts", "right", 7)),
    case("de", "Nicht dislozierte Fraktur der Rippe 7 re.", ribs("Rippe 7 re", "right", 7)),
    case("de", "Frakturen der 4. und 5. Rippe links.", ribs("4. und 5. Rippe links", "left", 4, 5)),
    case("de", "Alte Fraktur der rechten 9. Rippe.", ribs("rechten 9. Rippe", "right", 9)),
    # --- German: technique lines with nothing to find --------------------------------------
    case("de", "Spiral-CT Thorax/Abdomen nach i.v. Gabe von 80 ml KM (Imeron 350), portalvenöse Phase."),
    case("de", "Mehrzeilen-CT, Schichtdicke 1 mm, MPR koronar und sagittal."),
    case("de", "MRT mit T1- und T2-gewichteten Sequenzen."),
    # --- English ----------------------------------------------------------------------------
    case("en", "Both lungs are clear.", both("Both lungs", "lung")),
    case("en", "The lungs are clear bilaterally.", both("lungs", "lung")),
    case("en", "No pulmonary nodules or consolidation in either lung.",
         both("pulmonary", "lung", True), both("either lung", "lung", True)),
    case("en", "No nodule in the right lung.", k("right lung", "lung_right", True)),
    case("en", "Left lung: unremarkable.", k("Left lung", "lung_left")),
    case("en", "Nodule in the left upper lobe, measuring 2.2 cm.", k("left upper lobe", "lung_upper_lobe_left")),
    case("en", "Solid pulmonary nodule in the right lower lobe (8 mm).",
         k("pulmonary", "lung_right"), k("right lower lobe", "lung_lower_lobe_right")),
    case("en", "Nodules in the RLL and LUL.", k("RLL", "lung_lower_lobe_right"), k("LUL", "lung_upper_lobe_left")),
    case("en", "Stable 4 mm nodule in the lingula.", k("lingula", "lung_upper_lobe_left")),
    case("en", "Atelectasis of the right middle lobe.", k("right middle lobe", "lung_middle_lobe_right")),
    case("en", "Consolidation of the lower lobes.", both("lower lobes", "lung_lower_lobe")),
    case("en", "Subsegmental pulmonary embolism in the right lower lobe pulmonary artery.",
         k("right lower lobe", "lung_lower_lobe_right")),
    case("en", "Small pleural effusion on the left side."),
    case("en", "No cardiomegaly or pericardial effusion.", k("cardiomegaly", "heart", True)),
    case("en", "No aortic aneurysm or dissection.", k("aortic", "aorta", True)),
    case("en", "Calcified plaques of the abdominal aorta and both common iliac arteries.",
         k("aorta", "aorta"), both("both common iliac arteries", "iliac_artery")),
    case("en", "The portal vein is patent.", k("portal vein", "portal_vein_and_splenic_vein")),
    case("en", "No focal hepatic lesion.", k("hepatic", "liver", True)),
    case("en", "Hypodense lesion in hepatic segment VII, e.g. hemangioma vs. metastasis.", k("hepatic", "liver")),
    case("en", "Metastasis cannot be excluded in the liver.", k("liver", "liver")),
    case("en", "The spleen is unremarkable.", k("spleen", "spleen")),
    case("en", "No focal splenic lesion.", k("splenic", "spleen", True)),
    case("en", "Mild hepatosplenomegaly.", k("hepatosplenomegaly", "liver"), k("hepatosplenomegaly", "spleen")),
    case("en", "No focal lesion in the liver, spleen, or pancreas.",
         k("liver", "liver", True), k("spleen", "spleen", True), k("pancreas", "pancreas", True)),
    case("en", "The gallbladder is distended, no cholecystitis.",
         k("gallbladder", "gallbladder"), k("cholecystitis", "gallbladder", True)),
    case("en", "Dilated small bowel loops, no free air.", k("small bowel", "small_bowel")),
    case("en", "Patient with pT2 N0 colon cancer.", k("colon", "colon")),
    case("en", "Thickening of the urinary bladder wall, the prostate is enlarged.",
         k("urinary bladder", "urinary_bladder"), k("prostate", "prostate")),
    case("en", "Unremarkable thyroid gland and trachea.", k("thyroid gland", "thyroid_gland"), k("trachea", "trachea")),
    case("en", "Both kidneys are unremarkable, no hydronephrosis.", both("Both kidneys", "kidney")),
    case("en", "Kidneys: no mass or hydronephrosis bilaterally.", both("Kidneys", "kidney", True)),
    case("en", "No hydronephrosis of the left kidney.", k("left kidney", "kidney_left", True)),
    case("en", "Kidney, left: simple cyst.", k("Kidney, left", "kidney_left")),
    case("en", "The left kidney is not enlarged.", k("left kidney", "kidney_left", True)),
    case("en", "Simple cortical cyst (Bosniak I) of the right kidney.", k("right kidney", "kidney_right")),
    case("en", "There is no evidence of a mass in the left or right kidney.",
         both("left or right kidney", "kidney", True)),
    case("en", "Lungs, left kidney and liver unremarkable.",
         both("Lungs", "lung"), k("left kidney", "kidney_left"), k("liver", "liver")),
    case("en", "Bilateral adrenal nodules.", both("Bilateral adrenal", "adrenal_gland")),
    case("en", "Right adrenal adenoma, 1.5 cm.", k("Right adrenal", "adrenal_gland_right")),
    case("en", "Lytic lesion at L3 (22 mm).", levels("L3", "L3")),
    case("en", "Sclerotic lesion in the T8 vertebral body.", levels("T8", "T8")),
    case("en", "Compression fracture of T12 and L1.", levels("T12", "T12"), levels("L1", "L1")),
    case("en", "Sclerotic lesion at C2, no fracture.", levels("C2", "C2")),
    case("en", "Disc bulge at L5/S1.", k("Disc", "intervertebral_discs"), k("L5/S1", "intervertebral_discs")),
    case("en", "No suspicious osseous lesion of the spine.", k("spine", "vertebrae", True)),
    case("en", "MRI of the chest with T1, T2 and diffusion-weighted sequences."),
    case("en", "The ribs are intact."),
    case("en", "Fracture of the right 7th rib.", ribs("right 7th rib", "right", 7)),
    case("en", "Nondisplaced fractures of the left 4th and 5th ribs.",
         ribs("left 4th and 5th ribs", "left", 4, 5)),
    case("en", "Healed fracture of the 6th rib on the left.", ribs("6th rib on the left", "left", 6)),
    case("en", "Fractures of right ribs 7-9.", ribs("right ribs 7-9", "right", 7, 8, 9)),
    case("en", "Fracture of the left clavicle.", k("left clavicle", "clavicula_left")),
    case("en", "Degenerative changes of both hips.", both("both hips", "hip")),
]

# What a careful reader would label, and the backend does not get (yet); see the reply notes.
KNOWN_GAPS = [
    case("de", "Rippenserienfraktur 5-7 rechts.", ribs("Rippenserienfraktur 5-7 rechts", "right", 5, 6, 7)),
    case("de", "Höhenminderung des Lendenwirbelkörpers 5.", levels("Lendenwirbelkörpers 5", "L5")),
    case("de", "Z.n. Hemikolektomie rechts.", k("Hemikolektomie", "colon")),
    case("de", "Rundherde im rechten Ober- und Unterlappen.",
         k("rechten Ober- und Unterlappen", "lung_upper_lobe_right"),
         k("rechten Ober- und Unterlappen", "lung_lower_lobe_right")),
    case("en", "Nodules in the left upper and lower lobes.",
         k("left upper and lower lobes", "lung_upper_lobe_left"),
         k("left upper and lower lobes", "lung_lower_lobe_left")),
    # a positive finding before the structure: "without" negates the listhesis, not L5
    case("en", "Spondylolysis at L5 without listhesis.", levels("L5", "L5")),
    case("en", "Disc bulge at L4-5.", k("Disc", "intervertebral_discs"), k("L4-5", "intervertebral_discs")),
]


@pytest.fixture(scope="module")
def extractor() -> LexiconExtractor:
    return LexiconExtractor()


def extract_triples(extractor: LexiconExtractor, language: str, sentence: str) -> list[Triple]:
    original = str(sentence)
    [result] = extractor.extract([sentence], language)
    assert isinstance(result, list), result
    assert sentence == original
    for kw in result:
        assert check_keyword(sentence, kw) is None, kw
        assert not kw.keyword.endswith("."), kw  # abbreviation dots stay outside the span
        assert label_map().by_name(kw.class_name).id == kw.class_id
    return sorted((kw.keyword, kw.class_name, kw.negated) for kw in result)


@pytest.mark.parametrize(("language", "sentence", "expected"), CASES)
def test_sentence(extractor, language, sentence, expected):
    assert extract_triples(extractor, language, sentence) == sorted(expected)


@pytest.mark.parametrize(("language", "sentence", "expected"), KNOWN_GAPS)
@pytest.mark.xfail(strict=True, reason="known gap of the lexicon backend, kept so the F1 stays honest")
def test_known_gap(extractor, language, sentence, expected):
    assert extract_triples(extractor, language, sentence) == sorted(expected)


def test_table_is_large_and_bilingual():
    languages = Counter(p.values[0] for p in CASES + KNOWN_GAPS)
    assert sum(languages.values()) >= 60 and languages["de"] >= 25 and languages["en"] >= 25


def lexicon_scores() -> dict[str, float]:
    """Precision/recall/F1 on (keyword span, class) pairs over the whole table, gaps included.

    Also the share of correctly found pairs whose negation flag is right."""
    extractor = LexiconExtractor()
    tp = fp = fn = neg_ok = 0
    for p in CASES + KNOWN_GAPS:
        language, sentence, expected = p.values
        got = Counter(extract_triples(extractor, language, sentence))
        want = Counter(expected)
        got_pairs = Counter((kw, c) for kw, c, _ in got.elements())
        want_pairs = Counter((kw, c) for kw, c, _ in want.elements())
        hit = got_pairs & want_pairs
        tp += sum(hit.values())
        fp += sum((got_pairs - want_pairs).values())
        fn += sum((want_pairs - got_pairs).values())
        neg_ok += sum((got & want).values())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "negation_accuracy": neg_ok / tp if tp else 0.0,
            "pairs_expected": float(tp + fn), "sentences": float(len(CASES) + len(KNOWN_GAPS))}


def test_f1_on_the_table():
    scores = lexicon_scores()
    print("lexicon scores:", {k: round(v, 3) for k, v in scores.items()})
    assert scores["f1"] >= 0.9, scores
    assert scores["f1"] < 1.0, "KNOWN_GAPS should cost something; if they pass, move them to CASES"


# --- batch behaviour ------------------------------------------------------------------------
def test_batch_keeps_order_and_empty_results(extractor):
    sentences = ["", "Milz o.B.", "Rippen o.B.", "Niere li."]
    results = extractor.extract(sentences, "de")
    assert [[kw.class_name for kw in r] for r in results] == [[], ["spleen"], [], ["kidney_left"]]
    assert results[3][0].keyword == "Niere li" and (results[3][0].start, results[3][0].end) == (0, 8)


def test_is_a_keyword_extractor(extractor):
    assert isinstance(extractor, KeywordExtractor) and extractor.name == "lexicon"


def test_unsupported_language_is_rejected_before_work(extractor):
    with pytest.raises(CurationError, match=r"language 'fr' is not supported.*Translate the sentences first"):
        extractor.extract(["Le foie est normal."], "fr")


def test_synthetic_reports_give_valid_deterministic_spans(extractor):
    """Whole synthetic reports, line by line: no failures, every span verbatim, same answer twice."""
    rng = random.Random(7)
    for language in ("de", "en"):
        for seed in range(20):
            findings = [Finding(o, rng.choice(("lesion", "cyst", "calcification")), rng.randint(3, 40),
                                {"liver": "VII", "vertebrae": "L3"}.get(o)) for o in rng.sample(ORGANS, 3)]
            report = write_report(
                random.Random(seed), language=language, modality=rng.choice(("CT", "MR")),
                region_organs=list(ORGANS), findings=findings, patient=random_person(rng, language),
                birth_date=date(1950, 1, 2), study_date=date(2024, 3, 4), prior_date=None,
                physician=random_person(rng, language), referring=random_person(rng, language),
                phone="+49 89 1234567", accession="A1234567", patient_id="P123456")
            lines = [line for line in report.text.splitlines() if line.strip()]
            first, second = extractor.extract(lines, language), extractor.extract(lines, language)
            assert first == second
            for line, result in zip(lines, first, strict=True):
                assert isinstance(result, list), (line, result)
                assert all(check_keyword(line, kw) is None for kw in result), line


# --- radground/lexicon.py ----------------------------------------------------------------------
def test_display_name_for_every_class_in_both_languages():
    for cls in label_map():
        for language in ("en", "de"):
            name = display_name(cls.name, language)
            assert isinstance(name, str) and name.strip(), (cls.name, language)
    assert display_name("kidney_left", "de") == "linke Niere"
    assert display_name("rib_right_7", "de") == "7. Rippe rechts"
    assert display_name("rib_left_2", "en") == "left 2nd rib"
    assert display_name("vertebrae_L5", "de") == "LWK 5"
    assert display_name("vertebrae_T8", "en") == "T8 vertebra"


def test_display_name_rejects_unknown_inputs():
    with pytest.raises(KeyError, match="not in the label map"):
        display_name("appendix", "en")
    with pytest.raises(ValueError, match="language 'fr' is not supported"):
        display_name("liver", "fr")


def test_every_yaml_class_exists_in_the_label_map():
    raw = yaml.safe_load(_lexicon_text())
    names = set(label_map().names)
    for name, entry in raw["structures"].items():
        for cls in entry.get("classes", []) + [entry[s] for s in ("left", "right") if s in entry]:
            assert cls in names, (name, cls)
    assert set(raw["display"]) <= names


def test_synonym_tables_cover_the_reported_organs():
    de, en = load_lexicon().synonyms("de"), load_lexicon().synonyms("en")
    for stem in ("Leber", "Milz", "Niere", "Lunge", "Oberlappen", "Herz", "Aorta", "Pankreas", "Prostata"):
        assert any(stem in terms for terms in de.values()), stem
    for word in ("liver", "spleen", "kidneys", "lungs", "upper lobe", "heart", "aorta", "LUL", "RLL"):
        assert any(word in terms for terms in en.values()), word
    assert load_lexicon().classes_of("kidney") == ("kidney_left", "kidney_right")


def _lexicon_text() -> str:
    return resources.files("radground.data").joinpath(LEXICON_FILE).read_text(encoding="utf-8")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["structures"]["liver"].update(classes=["livre"]), "class 'livre', which is not in the label map"),
    (lambda d: d["structures"]["kidney"].update(left="kidney_right"), "left: 'kidney_right' is not a left-side"),
    (lambda d: d["structures"]["spleen"]["de"].append("Leber"), "'Leber' is listed under both"),
    (lambda d: d["display"].pop("spleen"), r"no display name for \['spleen'\]"),
    (lambda d: d["negation"]["en"].update(before=[False]), "negation.en.before must be a list"),
])
def test_parse_lexicon_rejects_inconsistent_yaml(edit, message):
    data = copy.deepcopy(yaml.safe_load(_lexicon_text()))
    edit(data)
    with pytest.raises(LexiconError, match=message):
        parse_lexicon(data, label_map())
