"""De-identify DICOM datasets: PS3.15 Annex E, Basic Application Level Confidentiality
Profile with the Retain Longitudinal Temporal Information with Modified Dates Option.

Where the actions come from
---------------------------
The per-attribute actions are dicom-anonymizer's (2.1.0) copy of PS3.15 table E.1-1,
module ``dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c`` (scraped from
the "current" PS3.15 chapter E of that release; a superset of its ``dicomfields_2024b``
and of the library's default ``dicomfields_2023`` / 2023e), loaded through
``dicomanonymizer.dicomfields_selector.dicom_anonymization_database_selector``. Its
variables hold the "Basic Prof." column:

    D_TAGS D · Z_TAGS Z · X_TAGS X · U_TAGS U · Z_D_TAGS Z/D · X_Z_TAGS X/Z · X_D_TAGS X/D
    X_Z_D_TAGS X/Z/D · X_Z_U_STAR_TAGS X/Z/U*   (4-tuples are masked repeating groups, 50xx/60xx)

Attributes in no list are K (keep); sequences are kept but cleaned, i.e. the table is
applied again inside every item at every nesting level. Only the table is used: the
actions are implemented here, because the library's defaults draw random UIDs and write
fixed dummy dates, while radground needs keyed, repeatable UIDs and shifted dates.

How each action is implemented
------------------------------
X      the element is deleted.
Z      zero length (``None``; an empty sequence for SQ).
D      a dummy of the same VR: "ANONYMIZED" for text VRs, "0" for IS/DS, 0 for binary
       numbers, "000Y" for AS, 8 zero bytes for O*/UN; UI gets a keyed UID (as U); in an
       SQ every leaf of every item gets a dummy (UIDs keyed, dates shifted).
U      every value becomes ``pseudonym_uid(key, value)`` = ``2.25.<int of HMAC-SHA256>``,
       so one source UID maps to one new UID in every file and every later drop. UIDs
       under the DICOM root 1.2.840.10008 (classes, transfer syntaxes, well-known frames
       of reference) are never replaced.
X/Z, X/D, Z/D, X/Z/D
       this code does not know each IOD's Type 1/2/3 table, so it takes the choice that
       is conformant for every IOD (as dicom-anonymizer does): X/Z -> Z, the others -> D.
X/Z/U* (Referenced/Source Image Sequence) the items are kept and cleaned by the table,
       which turns the contained SOP Instance UIDs into keyed UIDs; a non-SQ value -> Z.
private every odd-group element is removed at every level (the basic profile's X).

The Retain Longitudinal Temporal Information with Modified Dates Option
----------------------------------------------------------------------
dicom-anonymizer's table has no option columns. In PS3.15 table E.1-1 the "Rtn. Long.
Modif. Dates Opt." column says C for every listed attribute with a DA, DT or TM VR except
Patient's Birth Date (0010,0030) and Patient's Birth Time (0010,0032), whose option
columns are blank (checked against the standard's table). So every listed DA/DT/TM
attribute is modified instead of X/Z/D, and those two keep the basic action (birth date
zero length, birth time removed). Timezone Offset From UTC (SH, C in that column) keeps
the basic X: no date logic applies to it.

"Modified" means: every date of a patient moves back by the same whole number of days,
``date_offset_days(key, PatientID, max_days)`` in [1, max_days], so intervals between a
patient's studies survive and nothing else does. DA values shift. DT values shift their
date part and keep time, fraction and UTC offset (a whole-day shift leaves the time of
day alone, so DT stays consistent with the DA/TM pairs). TM values are kept as they are.
A value that is not a valid date/time of its VR (including a DT without a day) is not
shifted but emptied: it cannot be modified safely, and whatever it holds must not leak.

What the profile costs the pipeline
-----------------------------------
Geometry and the pixel module are all K: ImagePositionPatient, ImageOrientationPatient,
PixelSpacing, SliceThickness, SliceLocation, Rows/Columns, Bits*, Rescale*, Window*,
ImageType, Modality, BodyPartExamined, PatientPosition, FrameOfReferenceUID (keyed, so
still shared across a series) and PixelData (byte-identical; pixel data is not cleaned:
BurnedInAnnotation is kept so ingest can quarantine YES). Removed or emptied by the basic
profile, with no option of this module to keep them: PatientAge (X) and PatientSex (Z)
(need the Retain Patient Characteristics Option, 113108), Study/SeriesDescription and
ProtocolName (X, X/D; need the Clean Descriptors Option), InstitutionName/StationName
(dummy), AccessionNumber/StudyID (Z).

Also set: PatientID and PatientName = the keyed patient pseudonym, PatientIdentityRemoved
YES, DeidentificationMethod, DeidentificationMethodCodeSequence (113100, 113107),
LongitudinalTemporalInformationModified MODIFIED. The file meta information is rebuilt
(SOP class, new SOP instance UID, transfer syntax) rather than copied, and group length
elements (gggg,0000) are dropped because they no longer match.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import logging
import re
from dataclasses import dataclass
from datetime import date, timedelta

import pydicom
from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from radground.errors import DeidError
from radground.keys import MIN_KEY_BYTES

logger = logging.getLogger(__name__)

#: dicom-anonymizer's table module (``dicom_anonymization_databases/<name>.py``).
ACTION_TABLE = "dicomfields_2026c"

#: The table's variables and the PS3.15 action each holds.
TABLE_CATEGORIES: dict[str, str] = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}

DEIDENTIFICATION_METHOD = "radground: PS3.15 Basic Profile, Rtn. Long. Modif. Dates Option"
DEIDENTIFICATION_CODES = (
    ("113100", "DCM", "Basic Application Confidentiality Profile"),
    ("113107", "DCM", "Retain Longitudinal Temporal Information Modified Dates Option"),
)
DUMMY_TEXT = "ANONYMIZED"

# Operations the table's actions resolve to.
_REMOVE, _ZERO, _DUMMY, _UID, _UID_STAR = "remove", "zero", "dummy", "uid", "uid*"
_RESOLVE = {
    "X": _REMOVE, "Z": _ZERO, "D": _DUMMY, "U": _UID, "X/Z": _ZERO, "X/D": _DUMMY,
    "Z/D": _DUMMY, "X/Z/D": _DUMMY, "X/Z/U*": _UID_STAR,
}
_DATE_VRS = frozenset({"DA", "DT", "TM"})
# (implicit VR, little endian) as read -> transfer syntax, for sources without file meta
_UNCOMPRESSED_SYNTAX = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}
# E.1-1 leaves the longitudinal option columns blank for these two: basic action applies.
_BIRTH_DATE_TIME = frozenset({Tag(0x0010, 0x0030), Tag(0x0010, 0x0032)})
_DICOM_ROOT = "1.2.840.10008."
_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_NUMBER_VRS = frozenset({"FL", "FD", "SL", "SS", "UL", "US", "SV", "UV", "AT"})

_DA = re.compile(r"\d{8}")
_DA_ACR_NEMA = re.compile(r"(\d{4})\.(\d{2})\.(\d{2})")  # old ACR-NEMA form YYYY.MM.DD
_DT = re.compile(r"(\d{8})(\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?([+-]\d{4})?")
_TM = re.compile(r"\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?|\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?")


def _load_table() -> tuple[dict[BaseTag, str], list[tuple[int, int, int, int, str]]]:
    database = dicom_anonymization_database_selector(ACTION_TABLE)
    exact: dict[BaseTag, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    # Same order as dicom-anonymizer's initialize_actions: a later list wins a clash.
    for category, action in TABLE_CATEGORIES.items():
        for entry in database[category]:
            if len(entry) == 2:
                exact[Tag(*entry)] = action
            else:  # (group, element, group mask, element mask)
                masked.append((*entry, action))
    return exact, masked


def _dictionary_vr(tag: BaseTag) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


_EXACT_ACTIONS, _MASKED_ACTIONS = _load_table()
# What the longitudinal option modifies: the table's date/time attributes but birth date/time.
_TEMPORAL = frozenset(
    tag for tag in _EXACT_ACTIONS
    if tag not in _BIRTH_DATE_TIME and _dictionary_vr(tag) in _DATE_VRS
)


def profile_action(tag: int | tuple[int, int]) -> str:
    """The table's basic-profile action for ``tag`` ("K" when the table does not list it)."""
    tag = Tag(tag)
    if tag.is_private:
        return "X"
    action = _EXACT_ACTIONS.get(tag)
    if action is not None:
        return action
    for group, element, group_mask, element_mask, masked_action in _MASKED_ACTIONS:
        if tag.group & group_mask == group & group_mask and tag.element & element_mask == element & element_mask:
            return masked_action
    return "K"


# --- keyed pseudonyms -------------------------------------------------------------------

def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) < MIN_KEY_BYTES:
        size = len(key) if isinstance(key, bytes | bytearray) else type(key).__name__
        raise DeidError(
            f"de-identification key is unusable ({size}; expected bytes, at least "
            f"{MIN_KEY_BYTES} long). Get it with load_key(settings)."
        )


def _digest(key: bytes, domain: bytes, *parts: str) -> bytes:
    # The domain prefix keeps the uses apart: a UID and a PatientID with the same text
    # must not give related outputs (they would otherwise share one HMAC value).
    message = domain + b"\x00" + b"\x00".join(p.encode("utf-8", "surrogatepass") for p in parts)
    return hmac.new(key, message, hashlib.sha256).digest()


def patient_pseudonym(key: bytes, patient_id: str, issuer: str = "") -> str:
    """Keyed pseudonym "P" + 20 hex digits for a source PatientID (+ IssuerOfPatientID).

    HMAC-SHA256(key, "patient-id" NUL id [NUL issuer]); leading/trailing blanks of both are
    insignificant in DICOM and ignored. Same id, issuer and key -> same pseudonym.
    """
    _check_key(key)
    patient_id, issuer = patient_id.strip(), issuer.strip()
    if not patient_id:
        raise DeidError("PatientID missing: cannot derive a patient pseudonym from an empty ID.")
    parts = (patient_id, issuer) if issuer else (patient_id,)
    return "P" + _digest(key, b"patient-id", *parts).hex()[:20].upper()


def date_offset_days(key: bytes, patient_id: str, max_days: int) -> int:
    """The patient's stable date shift in days, in [1, max_days]; every date moves back by it.

    HMAC-SHA256(key, "date-shift" NUL id). Keyed on the PatientID alone (not the issuer) so
    that report text, which carries only the PatientID, shifts by the same offset.
    """
    _check_key(key)
    if isinstance(max_days, bool) or not isinstance(max_days, int) or max_days < 1:
        raise DeidError(
            f"date shift maximum {max_days!r} is not allowed; expected an integer >= 1 "
            "(setting deid.date_shift_max_days)."
        )
    patient_id = patient_id.strip()
    if not patient_id:
        raise DeidError("PatientID missing: cannot derive a date offset from an empty ID.")
    number = int.from_bytes(_digest(key, b"date-shift", patient_id)[:8], "big")
    return number % max_days + 1


def pseudonym_uid(key: bytes, uid: str) -> str:
    """Keyed replacement UID "2.25.<decimal>" (at most 44 characters) for a source UID.

    The decimal is the first 128 bits of HMAC-SHA256(key, "uid" NUL uid), the same size as
    the UUID-derived 2.25 UIDs of PS3.5 B.2. Well-known UIDs (under 1.2.840.10008) come back
    unchanged; an empty UID stays empty.
    """
    _check_key(key)
    uid = uid.strip(" \x00")
    if not uid or uid.startswith(_DICOM_ROOT):
        return uid
    return "2.25." + str(int.from_bytes(_digest(key, b"uid", uid)[:16], "big"))


def shift_date(value: str, offset_days: int) -> str:
    """Move a DICOM DA date "YYYYMMDD" back by ``offset_days`` days; returns "YYYYMMDD".

    Also accepts the old ACR-NEMA form "YYYY.MM.DD". Raises DeidError (without echoing the
    value, which may be PHI) when the text is not a valid date.
    """
    text = value.strip()
    match = _DA_ACR_NEMA.fullmatch(text)
    if match:
        text = "".join(match.groups())
    if not _DA.fullmatch(text):
        raise DeidError(f"not a DICOM DA date ({len(value)} characters; expected YYYYMMDD).")
    try:
        moved = date(int(text[:4]), int(text[4:6]), int(text[6:])) - timedelta(days=offset_days)
    except (ValueError, OverflowError):
        raise DeidError("not a valid calendar date, or shifted out of range (expected YYYYMMDD).") from None
    return f"{moved.year:04d}{moved.month:02d}{moved.day:02d}"


# --- de-identification --------------------------------------------------------------------

@dataclass(frozen=True)
class DeidResult:
    """A de-identified copy and the keys later stages file it under (no PHI)."""

    dataset: pydicom.Dataset
    patient_pseudonym: str
    study_uid: str
    series_uid: str
    sop_uid: str
    date_offset_days: int


@dataclass
class _Context:
    key: bytes
    offset_days: int
    uids: dict[str, str]

    def uid(self, value: str) -> str:
        new = self.uids.get(value)
        if new is None:
            new = self.uids[value] = pseudonym_uid(self.key, value)
        return new


def deidentify(ds: pydicom.Dataset, key: bytes, *, max_shift_days: int) -> DeidResult:
    """Return a de-identified copy of ``ds`` (see the module docstring); ``ds`` is not changed.

    Raises DeidError when the dataset lacks what pseudonyms and file names are built from
    (PatientID, Study/Series/SOP Instance UID) or holds an element that cannot be decoded
    where the profile needs its value. Messages name attributes, never their values.
    """
    _check_key(key)
    patient_id = _required_text(ds, "PatientID")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        _required_text(ds, keyword)
    issuer = _optional_text(ds, "IssuerOfPatientID")
    pseudonym = patient_pseudonym(key, patient_id, issuer)
    offset = date_offset_days(key, patient_id, max_shift_days)
    ctx = _Context(key=key, offset_days=offset, uids={})

    out = _copy_dataset(ds)
    _clean(out, ctx)

    out.PatientID = pseudonym
    out.PatientName = pseudonym
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = DEIDENTIFICATION_METHOD
    codes = []
    for value, scheme, meaning in DEIDENTIFICATION_CODES:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
        codes.append(item)
    out.DeidentificationMethodCodeSequence = Sequence(codes)
    out.LongitudinalTemporalInformationModified = "MODIFIED"
    out.file_meta = _file_meta(ds, out)
    return DeidResult(
        dataset=out,
        patient_pseudonym=pseudonym,
        study_uid=str(out.StudyInstanceUID),
        series_uid=str(out.SeriesInstanceUID),
        sop_uid=str(out.SOPInstanceUID),
        date_offset_days=offset,
    )


def _required_text(ds: Dataset, keyword: str) -> str:
    value = _optional_text(ds, keyword)
    if not value:
        raise DeidError(
            f"{keyword} missing or empty: de-identification derives the pseudonyms and new "
            "UIDs from it. Quarantine the file, or re-export it with the attribute filled."
        )
    return value


def _optional_text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception as exc:  # undecodable bytes; never echo them
        raise DeidError(f"{keyword} cannot be decoded ({type(exc).__name__}).") from None
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return str(value).strip(" \x00")


def _copy_dataset(ds: Dataset) -> Dataset:
    # A plain Dataset, element by element: a FileDataset copy would carry the source path
    # (often a patient name), its preamble and its read buffer. Raw elements stay raw, so an
    # element the profile keeps is never decoded (and cannot fail to decode).
    out = Dataset()
    for tag in list(ds.keys()):  # tags only: iterating a Dataset would decode every element
        try:
            elem = ds.get_item(tag)
        except Exception as exc:
            raise DeidError(f"element {tag} cannot be read ({type(exc).__name__}).") from None
        # A raw element is an immutable tuple of bytes: sharing it is a copy, and ~20x cheaper.
        out[tag] = elem if isinstance(elem, RawDataElement) else copy.deepcopy(elem)
    out.set_original_encoding(*ds.original_encoding, ds.original_character_set)
    return out


def _file_meta(source: Dataset, out: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    old = getattr(source, "file_meta", None)
    if out.get("SOPClassUID"):
        meta.MediaStorageSOPClassUID = out.SOPClassUID
    elif old is not None and old.get("MediaStorageSOPClassUID"):  # a class UID: not identifying
        meta.MediaStorageSOPClassUID = old.MediaStorageSOPClassUID
    meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    if old is not None and "TransferSyntaxUID" in old:
        meta.TransferSyntaxUID = old.TransferSyntaxUID
    elif source.original_encoding in _UNCOMPRESSED_SYNTAX:  # read from a file without meta
        meta.TransferSyntaxUID = _UNCOMPRESSED_SYNTAX[source.original_encoding]
    return meta


def _operation(tag: BaseTag) -> str | None:
    action = profile_action(tag)
    return None if action == "K" else _RESOLVE[action]


def _clean(ds: Dataset, ctx: _Context) -> None:
    """Apply the table to one dataset level, recursing into every kept sequence."""
    for tag in list(ds.keys()):
        if tag.is_private or tag.element == 0:  # private elements; stale group lengths
            del ds[tag]
            continue
        operation = _operation(tag)
        vr = _vr_of(ds, tag)
        if operation is None and vr == "PN":
            # A person's name the table does not list (it lags the dictionary: SecondaryReviewerName,
            # EvaluatorName, DocumentAuthorTrial): a name is never safe to keep.
            del ds[tag]
            continue
        if operation is None:
            if vr == "SQ":
                for item in _element(ds, tag).value:
                    _clean(item, ctx)
            continue
        if tag in _TEMPORAL and vr in _DATE_VRS:
            _shift(ds, tag, vr, ctx)
        elif operation == _REMOVE:
            del ds[tag]
        elif operation == _UID or (operation == _UID_STAR and vr == "UI"):
            _replace_uids(ds, tag, ctx)
        elif operation == _UID_STAR and vr == "SQ":
            for item in _element(ds, tag).value:
                _clean(item, ctx)
        elif operation == _DUMMY:
            _dummy(ds, tag, vr, ctx)
        else:  # _ZERO or a non-SQ, non-UI X/Z/U*
            ds[tag] = DataElement(tag, vr, Sequence() if vr == "SQ" else None)


def _vr_of(ds: Dataset, tag: BaseTag) -> str:
    """The element's VR without decoding its value; ambiguous VRs take their first choice."""
    elem = ds.get_item(tag, keep_deferred=True)
    vr = elem.VR
    if vr in (None, "UN"):  # implicit VR, or UN from an explicit-VR sender
        vr = _dictionary_vr(tag) or "UN"
    return vr.split(" or ")[0]


def _element(ds: Dataset, tag: BaseTag) -> DataElement:
    try:
        return ds[tag]
    except Exception as exc:
        raise DeidError(
            f"element {tag} cannot be decoded ({type(exc).__name__}); the profile needs its value. "
            "Quarantine the file, or fix the element at the source."
        ) from None


def _text_values(elem: DataElement) -> list[str]:
    value = elem.value
    if value is None or value == "":
        return []
    if isinstance(value, bytes):  # still UN: decode the characters, they are ASCII for these VRs
        return value.decode("latin-1").strip(" \x00").split("\\")
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value]
    return [str(value)]


def _shift(ds: Dataset, tag: BaseTag, vr: str, ctx: _Context) -> None:
    shifted: list[str] = []
    for text in _text_values(_element(ds, tag)):
        new = _shift_value(text.strip(" \x00"), vr, ctx.offset_days)
        if new is None:  # unparseable: empty the whole element rather than keep any of it
            shifted = []
            break
        shifted.append(new)
    value: str | list[str] | None = None
    if len(shifted) == 1:
        value = shifted[0]
    elif shifted:
        value = shifted
    ds[tag] = DataElement(tag, vr, value)


def _shift_value(text: str, vr: str, offset: int) -> str | None:
    if text == "":
        return ""
    if vr == "TM":  # whole-day shifts leave the time of day unchanged
        return text if _TM.fullmatch(text) else None
    if vr == "DA":
        try:
            return shift_date(text, offset)
        except DeidError:
            return None
    match = _DT.fullmatch(text)  # DT: a day is required to shift by days
    if not match:
        return None
    try:
        day = shift_date(match.group(1), offset)
    except DeidError:
        return None
    return day + text[8:]


def _replace_uids(ds: Dataset, tag: BaseTag, ctx: _Context) -> None:
    new = [ctx.uid(v) for v in _text_values(_element(ds, tag))]
    ds[tag] = DataElement(tag, "UI", new[0] if len(new) == 1 else (new or None))


def _dummy(ds: Dataset, tag: BaseTag, vr: str, ctx: _Context) -> None:
    if vr == "SQ":
        for item in _element(ds, tag).value:
            _dummy_item(item, ctx)
    elif vr == "UI":
        _replace_uids(ds, tag, ctx)
    elif vr in _DATE_VRS:
        if tag in _BIRTH_DATE_TIME:
            ds[tag] = DataElement(tag, vr, None)
        else:
            _shift(ds, tag, vr, ctx)
    else:
        ds[tag] = DataElement(tag, vr, _dummy_value(vr))


def _dummy_item(item: Dataset, ctx: _Context) -> None:
    for tag in list(item.keys()):
        if tag.is_private or tag.element == 0:
            del item[tag]
        else:
            _dummy(item, tag, _vr_of(item, tag), ctx)


def _dummy_value(vr: str) -> object:
    if vr in _TEXT_VRS:
        return DUMMY_TEXT
    if vr in ("DS", "IS"):
        return "0"
    if vr in _NUMBER_VRS:
        return 0
    if vr == "AS":
        return "000Y"
    if vr == "UR":
        return "http://anonymized.invalid"  # .invalid is reserved (RFC 2606)
    return bytes(8)  # OB, OD, OF, OL, OV, OW, UN: 8 bytes suit every word size
