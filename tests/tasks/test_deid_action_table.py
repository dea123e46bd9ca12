"""deidentify() against every attribute of the PS3.15 Annex E action table it applies.

The table is dicom-anonymizer's copy of PS3.15 table E.1-1 (``ACTION_TABLE`` names the module,
read here straight from the library, not through tasks.deid); the VR of each attribute is
pydicom's data dictionary's. Nothing is hand-picked: a dataset carries every exact tag of the
table, concrete instances of its masked repeating groups (50xx curves, 60xx overlays), the
data dictionary's other current (K) attributes, and private blocks, each with a value of its VR,
at the top level and inside a sequence item two levels deep. The de-identified copy is saved and
read back, and every tag is checked per action code (one parametrised case per tag, so a
failure names it). Three kinds of tag cannot sit in a written dataset as they are: Media Storage
SOP Instance UID (0002,0003) is checked in the file meta deidentify() rebuilds, command elements
(0000,eeee) on the dataset before it is written, and the table's attributes newer than pydicom's
dictionary (no VR known) are planted as UN, as an implicit-VR file would bring them.

What each code must do (PS3.15 E.1-1; the compound codes as tasks/deid.py documents it
resolves them, the choice that is conformant for every IOD):

X   removed.          Z, X/Z   present, zero length (an SQ: no items).
D, X/D, Z/D, X/Z/D    present, a non-empty dummy of the dictionary VR, not the original
                      value; a D sequence keeps its items with every leaf dummied (UIDs keyed).
U   every UID replaced by a keyed one: one source UID gives one new UID wherever it appears
    (any attribute, any level, any dataset); different sources give different UIDs.
X/Z/U*  (Referenced/Source Image Sequence) items kept, cleaned by the table inside.
K   kept as is. Private (odd group) elements: removed at every level; the code has no
    safe-private rule (it keeps no private element).
C   the table's Basic Profile column has no C. "Cleaned" in this implementation means
    (1) a kept sequence is cleaned, i.e. the table applies again inside every item at every
    level (the nested levels of this test), and (2) the Retain Longitudinal Temporal
    Information with Modified Dates Option's C: every listed DA/DT attribute moves back by
    the patient's one offset (whole days: DT keeps its time part, TM stays as it is), except
    Patient's Birth Date (Z: emptied) and Birth Time (X: removed), whose option column is blank.
At the top level PatientID and PatientName (Z) carry the keyed patient pseudonym instead.

A second test runs pydicom's real test files through deidentify() and checks what must hold
whatever a file carries: no X attribute left, no original UID of a U attribute left, no
original person name left, at any nesting level.
"""

from __future__ import annotations

import io
import re
import warnings
from datetime import date, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom import config
from pydicom.datadict import DicomDictionary, RepeatersDictionary, dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pydicom.valuerep import validate_value

from radground.errors import DeidError
from tasks.deid import ACTION_TABLE, deidentify

KEY = b"radground-test-action-table-key-0123456789"
MAX_DAYS = 730
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root: test UIDs only
NEW_UID = re.compile(r"2\.25\.(0|[1-9][0-9]*)")
WELL_KNOWN_UID_ROOT = "1.2.840.10008."  # DICOM's own UIDs (classes, syntaxes): not identifying

# The table's variables and the action each holds (PS3.15 E.1-1 "Basic Prof." column).
CATEGORIES = {
    "D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D", "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*",
}
# What the compound codes resolve to (tasks/deid.py docstring; conformant for every IOD).
RESOLVED = {"X": "X", "Z": "Z", "X/Z": "Z", "D": "D", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "U": "U",
            "X/Z/U*": "U*"}
BIRTH_DATE, BIRTH_TIME = Tag(0x0010, 0x0030), Tag(0x0010, 0x0032)
PATIENT_ID, PATIENT_NAME = Tag(0x0010, 0x0020), Tag(0x0010, 0x0010)
# Written by deidentify() at the top level whatever the source held (the deid attributes).
WRITTEN = {Tag(0x0012, 0x0062), Tag(0x0012, 0x0063), Tag(0x0012, 0x0064), Tag(0x0028, 0x0303)}
NESTED_IN = Tag(0x0008, 0x1115)  # Referenced Series Sequence: K, so its items are cleaned
LEVELS = ("top", "item", "item-in-item")

# Two images of one study and one patient; the second differs only in its SOP Instance UID.
SOP_A, SOP_B = UID_ROOT + "9001", UID_ROOT + "9002"
REFERENCED = SOP_B  # what the sequences' items reference: the study's other image


# --- the table, straight from the library ---------------------------------------------------

def _table() -> tuple[dict[Tag, str], list[tuple[int, int, int, int, str]]]:
    database = dicom_anonymization_database_selector(ACTION_TABLE)
    exact: dict[Tag, str] = {}
    masked = []
    for category, action in CATEGORIES.items():
        for entry in database[category]:
            if len(entry) == 2:
                assert Tag(*entry) not in exact, f"{Tag(*entry)} listed twice in the table"
                exact[Tag(*entry)] = action
            else:
                masked.append((*entry, action))
    return exact, masked


EXACT, MASKED = _table()


def _repeater_instances(group: int, element: int, group_mask: int, element_mask: int) -> list[Tag]:
    """Concrete tags of a masked entry: first, second and last repeating group (xx = 00, 02, 1E),
    and every element the data dictionary defines for that group when the element is masked too."""
    prefix = f"{group >> 8:02X}xx"
    if element_mask == 0xFFFF:
        elements = [element]
    else:
        elements = sorted(int(key[4:], 16) for key in RepeatersDictionary if key.startswith(prefix))
    return [Tag(group | offset, el) for offset in (0x00, 0x02, 0x1E) for el in elements]


def _masked_action(tag: Tag) -> str | None:
    for group, element, group_mask, element_mask, action in MASKED:
        if tag.group & group_mask == group & group_mask and tag.element & element_mask == element & element_mask:
            return action
    return None


MASKED_TAGS = {tag: action for *entry, action in MASKED for tag in _repeater_instances(*entry)}
TABLE = {**EXACT, **MASKED_TAGS}


def _vr(tag: Tag) -> str | None:
    try:
        return dictionary_VR(tag).split(" or ")[0]
    except KeyError:  # newer than pydicom's dictionary
        return None


def _kept_tags() -> list[Tag]:
    """The data dictionary's current attributes the table does not list: K."""
    kept = []
    for value in DicomDictionary:
        tag = Tag(value)
        vr, retired = DicomDictionary[value][0], DicomDictionary[value][3]
        if (retired or tag in TABLE or _masked_action(tag) or tag.element == 0 or tag.group in (0x0000, 0x0002)
                or tag.group >= 0xFFFA or tag in WRITTEN or vr == "SQ" or vr == "PN"):
            continue
        kept.append(tag)
    return kept


KEPT = _kept_tags()
KEPT_OVERLAY = [Tag(0x6000 | offset, 0x0010) for offset in (0x00, 0x02)]  # Overlay Rows: 60xx but not masked


# --- a dataset carrying all of it -----------------------------------------------------------

def _uid(tag: Tag) -> str:
    return f"{UID_ROOT}{int(tag)}"


def _date(tag: Tag) -> date:
    return date(2023, 1, 1) + timedelta(days=int(tag) % 300)


def _value(tag: Tag, vr: str | None):
    """A valid value of ``vr`` that names its tag where the VR allows (so it is recognisable)."""
    name = f"{int(tag):08X}"
    if vr is None:
        return "UN", b"UNKNOWN-" + name.encode()
    if vr == "SQ":
        return vr, Sequence([_sequence_item(tag)])
    text = {
        "PN": f"Family{name}^Given^Middle", "LO": f"long {name}", "SH": f"sh {name}", "LT": f"long text {name}",
        "ST": f"short text {name}", "UT": f"unlimited {name}", "UC": f"chars {name}", "CS": f"CS{name}",
        "AE": f"AE{name}", "UI": _uid(tag), "AS": "042Y", "DS": "12.5", "IS": "42",
        "UR": f"http://example.org/{name}",
        "DA": _date(tag).strftime("%Y%m%d"), "DT": _date(tag).strftime("%Y%m%d") + "143000.123456+0100",
        "TM": "143000.5",
    }
    if vr in text:
        return vr, text[vr]
    if vr in ("US", "UL", "SS", "SL", "SV", "UV"):
        return vr, 7
    if vr in ("FL", "FD"):
        return vr, 2.5
    if vr == "AT":
        return vr, Tag(0x0010, 0x0010)
    return vr, b"ORIGINAL" + name.encode()[:8]  # OB OD OF OL OV OW UN: 16 bytes


def _sequence_item(owner: Tag) -> Dataset:
    """What a table sequence's item carries: a reference to the study's other image (UIDs, U),
    a person name (Z/D), a code (K) and a private block."""
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = REFERENCED
    item.CodeMeaning = f"meaning {int(owner):08X}"
    item.ContentCreatorName = f"Nested^Person{int(owner):08X}"
    item.private_block(0x0029, "RADGROUND TEST", create=True).add_new(0x01, "LO", "private in a table sequence")
    return item


def _fill(ds: Dataset, depth: int, kept: bool) -> None:
    for tag in list(TABLE) + (KEPT + KEPT_OVERLAY if kept else []):
        if tag.group == 0x0002:  # file meta (Media Storage SOP Instance UID): checked in the file meta
            continue
        vr, value = _value(tag, _vr(tag))
        ds.add(DataElement(tag, vr, value))
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    for group in (0x0009, 0x0011):
        block = ds.private_block(group, f"RADGROUND TEST {group:04X}", create=True)
        block.add_new(0x01, "LO", "private text")
        block.add_new(0x02, "PN", "Private^Person")
        block.add_new(0x03, "SQ", Sequence([Dataset()]))
        block[0x03].value[0].add_new(0x00100010, "PN", "Private^Nested")
    if depth < 2:
        inner = Dataset()
        _fill(inner, depth + 1, kept)
        ds.add(DataElement(NESTED_IN, "SQ", Sequence([inner])))


def _source(sop_uid: str, kept: bool = True) -> Dataset:
    ds = Dataset()
    _fill(ds, 0, kept)
    ds.SOPInstanceUID = sop_uid
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    return ds


def _levels(ds: Dataset) -> list[Dataset]:
    out = [ds]
    while NESTED_IN in out[-1] and out[-1][NESTED_IN].value:
        out.append(out[-1][NESTED_IN].value[0])
    return out


def _saved(ds: Dataset) -> Dataset:
    """Written and read back. Command elements (0000,eeee) have no place in a file (PS3.10) and
    pydicom refuses to write them at the top level: those are checked on the dataset itself."""
    meta = ds.file_meta
    ds = Dataset({elem.tag: elem for elem in ds if elem.tag.group != 0x0000})
    ds.file_meta = meta
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


@pytest.fixture(scope="module")
def study():
    """Two de-identified images of one study (saved and read back), with their sources."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every planted value must be valid for its VR
        sources = {"a": _source(SOP_A), "b": _source(SOP_B, kept=False)}  # K attributes: checked in a
    for name, source in sources.items():
        result = deidentify(source, KEY, max_shift_days=MAX_DAYS)
        out[name] = (source, result, _saved(result.dataset))
    assert [len(_levels(s)) for s, _, _ in out.values()] == [3, 3]
    assert [len(_levels(saved)) for _, _, saved in out.values()] == [3, 3], "the kept sequence lost its items"
    return out


def _is_empty(elem: DataElement) -> bool:
    if elem.VR == "SQ":
        return len(elem.value) == 0
    return elem.value is None or len(elem.value) == 0


def _leaves(ds: Dataset):
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _leaves(item)
        else:
            yield elem


def _is_new_uid(value: str, original: str) -> bool:
    return bool(NEW_UID.fullmatch(value)) and value != original and len(value) <= 64


def _shifted_dt(text: str, days: int) -> str:
    moved = datetime.strptime(text[:8], "%Y%m%d").date() - timedelta(days=days)
    return moved.strftime("%Y%m%d") + text[8:]


ROWS = sorted(TABLE.items())


def _row_id(row) -> str:
    tag, action = row
    return f"({tag.group:04X},{tag.element:04X})-{keyword_for_tag(tag) or 'unknown'}-{action}"


def test_the_table_is_complete_enough_to_mean_something():
    assert len(EXACT) > 600
    assert Tag(0x0010, 0x2154) in EXACT and EXACT[Tag(0x0010, 0x2154)] == "X"  # Patient's Telephone Numbers
    assert {action for _, action in ROWS} == set(CATEGORIES.values())
    assert {Tag(0x5000, 0x3000), Tag(0x601E, 0x3000), Tag(0x6002, 0x4000)} <= set(MASKED_TAGS)
    assert len(KEPT) > 2000
    assert NESTED_IN not in TABLE and _masked_action(NESTED_IN) is None


@pytest.mark.parametrize("row", ROWS, ids=_row_id)
def test_each_table_attribute_gets_its_action_at_every_level(row, study):
    tag, action = row
    source, result, saved = study["a"]
    expected_vr = _vr(tag)
    if tag.group == 0x0002:  # Media Storage SOP Instance UID lives in the file meta
        new = str(saved.file_meta[tag].value)
        assert _is_new_uid(new, SOP_A) and new == str(saved.SOPInstanceUID)
        return
    outs = _levels(saved)
    if tag.group == 0x0000:
        outs[0] = result.dataset  # not written to a file (see _saved)
    for level, (src, out) in enumerate(zip(_levels(source), outs, strict=True)):
        where = f"{_row_id(row)} at {LEVELS[level]}"
        original = src[tag].value
        if level == 0 and tag in (PATIENT_ID, PATIENT_NAME):
            assert str(out[tag].value) == result.patient_pseudonym != str(original), where
            continue
        if tag == BIRTH_DATE:  # Z; the dates option does not cover it
            assert tag in out and _is_empty(out[tag]), where
            continue
        if tag == BIRTH_TIME:  # X; the dates option does not cover it
            assert tag not in out, where
            continue
        if expected_vr in ("DA", "DT") and tag in EXACT:  # C: modified dates, whatever the basic code
            assert tag in out, f"{where}: a date the option modifies was removed"
            expected = _shifted_dt(str(original), result.date_offset_days)
            assert out[tag].value == expected, f"{where}: not moved back by the patient's offset"
            continue
        if expected_vr == "TM" and tag in EXACT:  # C: whole-day shifts keep the time of day
            assert tag in out and out[tag].value == original, where
            continue
        resolved = RESOLVED[action]
        if resolved == "X":
            assert tag not in out, f"{where}: must be removed"
        elif resolved == "Z":
            assert tag in out, f"{where}: must be kept with zero length, was removed"
            assert _is_empty(out[tag]), f"{where}: must be emptied, holds {out[tag].value!r}"
        elif resolved == "U":
            assert tag in out, where
            assert _is_new_uid(str(out[tag].value), str(original)), f"{where}: UID not replaced"
        elif resolved == "U*":  # the sequence is kept, its items cleaned by the table
            assert len(out[tag].value) == len(original), where
            item, was = out[tag].value[0], original[0]
            assert item.ReferencedSOPClassUID == CTImageStorage and item.CodeMeaning == was.CodeMeaning, where
            assert _is_new_uid(item.ReferencedSOPInstanceUID, REFERENCED), where
            assert item.ContentCreatorName != was.ContentCreatorName, where  # Z/D inside: a dummy
            assert not [e.tag for e in item if e.tag.is_private], where
        else:  # D
            assert tag in out, f"{where}: must be replaced by a dummy, was removed"
            elem = out[tag]
            assert elem.VR in dictionary_VR(tag).split(" or "), f"{where}: VR {elem.VR}"
            if elem.VR == "SQ":
                assert len(elem.value) == len(original), where
                leaves = {e.tag: e.value for e in _leaves(elem.value[0])}
                was = {e.tag: e.value for e in _leaves(original[0]) if not e.tag.is_private}
                assert set(leaves) == set(was), f"{where}: leaves {set(leaves) ^ set(was)}"
                for leaf_tag, value in leaves.items():
                    if str(was[leaf_tag]).startswith(WELL_KNOWN_UID_ROOT):  # a class UID: kept, as U keeps it
                        assert value == was[leaf_tag], where
                    else:
                        assert value and value != was[leaf_tag], f"{where}: leaf {leaf_tag} kept"
                assert _is_new_uid(leaves[Tag("ReferencedSOPInstanceUID")], REFERENCED), where
            elif elem.VR == "UI":
                assert _is_new_uid(str(elem.value), str(original)), f"{where}: UID not replaced"
            else:
                assert not _is_empty(elem) and elem.value != original, f"{where}: not a dummy: {elem.value!r}"
                validate_value(elem.VR, elem.value, config.RAISE)


def test_kept_attributes_are_unchanged_at_every_level(study):
    source, _, saved = study["a"]
    for level, (src, out) in enumerate(zip(_levels(source), _levels(saved), strict=True)):
        changed = [str(tag) for tag in KEPT + KEPT_OVERLAY if tag not in out or out[tag].value != src[tag].value]
        assert not changed, f"K attributes changed at {LEVELS[level]}: {changed[:20]} ({len(changed)})"


def test_uids_map_one_to_one_everywhere_across_the_study(study):
    mapped: dict[str, set[str]] = {}
    for source, result, _ in study.values():
        for src, out in zip(_levels(source), _levels(result.dataset), strict=True):
            for tag, action in TABLE.items():
                if action == "U" and tag.group != 0x0002:
                    mapped.setdefault(str(src[tag].value), set()).add(str(out[tag].value))
            for tag in TABLE:
                if _vr(tag) != "SQ" or tag not in out:
                    continue
                for item in out[tag].value:  # what _sequence_item put there: references to image B
                    mapped.setdefault(REFERENCED, set()).add(str(item.ReferencedSOPInstanceUID))
    inconsistent = {uid: news for uid, news in mapped.items() if len(news) != 1}
    assert not inconsistent, f"one source UID, several new UIDs: {sorted(inconsistent)[:10]}"
    news = [next(iter(n)) for n in mapped.values()]
    assert len(set(news)) == len(news), "two source UIDs got the same new UID"
    a, b = study["a"][2], study["b"][2]
    assert a.StudyInstanceUID == b.StudyInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert mapped[REFERENCED] == {str(b.SOPInstanceUID)}, "a reference no longer points at the image it named"
    assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID


def test_every_date_of_the_patient_moves_by_one_offset(study):
    offsets = set()
    for source, result, saved in study.values():
        assert 1 <= result.date_offset_days <= MAX_DAYS
        for src, out in zip(_levels(source), _levels(saved), strict=True):
            for tag in EXACT:
                if _vr(tag) == "DA" and tag != BIRTH_DATE:
                    before = datetime.strptime(src[tag].value, "%Y%m%d")
                    offsets.add((before - datetime.strptime(out[tag].value, "%Y%m%d")).days)
    assert len(offsets) == 1, f"one patient's dates moved by different offsets: {sorted(offsets)}"
    assert offsets == {study["a"][1].date_offset_days}


def test_private_elements_are_removed_at_every_level(study):
    source, _, saved = study["a"]
    assert sum(1 for e in _walk(source) if e.tag.is_private) > 10
    left = sorted({str(e.tag) for e in _walk(saved) if e.tag.is_private})
    assert not left, f"private elements left: {left}"


def _walk(ds: Dataset):
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)


# --- pydicom's real files -------------------------------------------------------------------

REQUIRED = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def _action(tag: Tag) -> str:
    if tag.is_private:
        return "X"
    return EXACT.get(tag) or _masked_action(tag) or "K"


def _read(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        return pydicom.dcmread(path, force=True)


def _source_facts(ds: Dataset) -> tuple[set[str], set[str]]:
    """The source's U-attribute UIDs (not DICOM's well-known ones) and person names, at every level."""
    uids, names = set(), set()
    for elem in _walk(ds):
        if elem.value in (None, "", b""):
            continue
        if _action(elem.tag) == "U" and elem.VR == "UI":
            values = elem.value if isinstance(elem.value, list | tuple) or elem.VM > 1 else [elem.value]
            uids |= {str(v) for v in values if str(v) and not str(v).startswith(WELL_KNOWN_UID_ROOT)}
        elif elem.VR == "PN":
            values = elem.value if elem.VM > 1 else [elem.value]
            names |= {str(v).strip() for v in values if str(v).strip(" ^=")}
    return uids, names


@pytest.fixture(scope="module")
def corpus(pydicom_files_on_disk):
    """(name, source, result) for every pydicom test file deidentify() accepts."""
    done, refused = [], {}
    for path in pydicom_files_on_disk:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the corpus's deliberately odd files
            try:
                source = _read(path)
                _source_facts(source)  # decodes every element: a file pydicom cannot decode is not ours
            except Exception:  # noqa: BLE001
                continue
            if not all(str(source.get(k, "") or "").strip() for k in REQUIRED):
                continue
            try:
                result = deidentify(source, KEY, max_shift_days=MAX_DAYS)
            except DeidError as exc:
                refused[path.name] = str(exc)
                continue
            done.append((path.name, source, result))
    assert len(done) >= 150, f"only {len(done)} of pydicom's files went through (refused: {refused})"
    return done


def test_pydicom_files_lose_every_x_attribute_original_uid_and_person_name(corpus):
    problems = {}
    for name, source, result in corpus:
        uids, names = _source_facts(source)
        found = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for elem in _walk(result.dataset):
                # X, unless the dates option modifies it instead (listed DA/DT/TM: see the module doc)
                if _action(elem.tag) == "X" and not (elem.tag in EXACT and _vr(elem.tag) in ("DA", "DT", "TM")):
                    found.append(f"X attribute {elem.tag} left")
                if elem.VR in ("SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN") or elem.value in (None, ""):
                    continue
                values = elem.value if elem.VM > 1 else [elem.value]
                texts = {str(v).strip(" \x00") for v in values}
                if texts & uids:
                    found.append(f"original UID in {elem.tag}")
                if texts & names:  # in any text element, not only PN ones
                    found.append(f"original person name in {elem.tag}")
        if found:
            problems[name] = found
    assert not problems, f"not de-identified: {problems}"


# --- person names the table does not list ----------------------------------------------------

# Retired ones too: old files still carry them.
UNLISTED_PN = [Tag(value) for value in DicomDictionary if DicomDictionary[value][0] == "PN"
               and Tag(value) not in TABLE and not _masked_action(Tag(value))]


def test_person_names_the_table_does_not_list_are_removed_at_every_level():
    """The table lags the dictionary (SecondaryReviewerName, EvaluatorName, DocumentAuthorTrial were K by
    omission): a person's name is never kept, listed or not."""
    assert {"SecondaryReviewerName", "EvaluatorName", "DocumentAuthorTrial"} <= set(map(keyword_for_tag, UNLISTED_PN))
    source = _source(SOP_A, kept=False)
    for level in _levels(source):
        for tag in UNLISTED_PN:
            level.add(DataElement(tag, "PN", f"Unlisted^Person{int(tag):08X}"))
    result = deidentify(source, KEY, max_shift_days=MAX_DAYS)
    for depth, out in enumerate(_levels(result.dataset)):
        left = [keyword_for_tag(tag) for tag in UNLISTED_PN if tag in out]
        assert not left, f"unlisted person names kept at {LEVELS[depth]}: {left}"
