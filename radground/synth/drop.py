"""Generate a synthetic hospital drop: DICOM series, reports.csv, drop.yaml, bad inputs.

The drop follows the drop format of the README. A ground-truth sidecar (planted
PHI, organ boxes per slice, bad files and why) is written OUTSIDE the drop folder,
next to it as ``<OUT>.truth.json``; the pipeline must never read it.

Output is byte-for-byte deterministic for a seed: every random draw comes from a
SeedSequence tree rooted at the seed, and nothing reads the clock.
"""

from __future__ import annotations

import csv
import io
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import yaml
from pydicom.uid import generate_uid

from radground.errors import SynthError
from radground.schemas import DROP_INFO_FILE, REPORT_COLUMNS, REPORTS_FILE
from radground.synth import phantom
from radground.synth.dicom import (
    TRANSFER_SYNTAXES,
    PatientHeader,
    SeriesHeader,
    StudyHeader,
    dicom_date,
    dicom_name,
    image_dataset,
    write_dataset,
)
from radground.synth.reports import Finding, Person, random_person, random_phone, write_report

GENERATOR_VERSION = 1
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's example root, as a vendor root stand-in

CT_REGION = ("lung_left", "lung_right", "heart", "aorta", "liver", "spleen",
             "kidney_left", "kidney_right", "vertebrae", "ribs")
MR_REGION = ("aorta", "liver", "spleen", "kidney_left", "kidney_right", "vertebrae")
_MR_EXTENT = (0.45, 0.95)  # MR covers the upper abdomen only
_CT_EXTENT = (0.02, 0.98)
_STREETS = {"de": ["Hauptstraße", "Lindenweg", "Schillerstraße", "Am Mühlbach", "Goethestraße"],
            "en": ["High Street", "Station Road", "Church Lane", "Mill Road", "Park Avenue"]}
_CITIES = {"de": [("80331", "München"), ("50667", "Köln"), ("20095", "Hamburg"), ("69117", "Heidelberg")],
           "en": [("SW1A 1AA", "London"), ("M1 1AE", "Manchester"), ("EH1 1YZ", "Edinburgh")]}


@dataclass(frozen=True)
class SynthResult:
    """What a run produced, for the CLI summary and the tests."""

    drop_dir: Path
    truth_path: Path
    patients: int
    studies: int
    series: int
    dicom_files: int
    bad_files: int
    reports: int
    total_bytes: int
    seconds: float


@dataclass
class _Truth:
    seed: int
    patients: list[dict] = field(default_factory=list)
    bad_files: list[dict] = field(default_factory=list)
    orphan_reports: list[str] = field(default_factory=list)
    studies_without_report: list[str] = field(default_factory=list)
    excluded_series: list[dict] = field(default_factory=list)


class _DropWriter:
    """Holds the drop-wide state while patients are generated one by one."""

    def __init__(self, out: Path, seed: int, patients: int) -> None:
        self.out = out
        self.seed = seed
        root = np.random.SeedSequence(seed)
        children = root.spawn(patients + 1)
        self.patient_seeds = children[1:]
        self.rng = random.Random(int(children[0].generate_state(1)[0]))
        self.truth = _Truth(seed=seed)
        self.reports: list[dict[str, str]] = []
        self.series_count = 0
        # The first three series use three different transfer syntaxes, then any mix.
        self.syntax_order = list(TRANSFER_SYNTAXES[:3])
        self.rng.shuffle(self.syntax_order)
        self.site_language = "de"
        self.institution = self.rng.choice(["Klinikum Rechts der Isar-Süd", "Städtisches Klinikum Nord"])
        self.institution_address = f"{self.rng.choice(_STREETS['de'])} {self.rng.randint(1, 99)}, " + " ".join(
            self.rng.choice(_CITIES["de"]))
        self.phone = random_phone(self.rng, "de")
        self.radiologists = [random_person(self.rng, "de") for _ in range(3)]
        self.used_ids: set[str] = set()
        self.dicom_files = 0
        self.series_written = 0

    def uid(self, *parts: object) -> str:
        return str(generate_uid(prefix=UID_ROOT, entropy_srcs=[str(self.seed), *map(str, parts)]))

    def unique_number(self, rng: random.Random, lo: int, hi: int) -> str:
        while True:
            value = str(rng.randint(lo, hi))
            if value not in self.used_ids:
                self.used_ids.add(value)
                return value

    def next_syntax(self):
        index = self.series_count
        self.series_count += 1
        if index < len(self.syntax_order):
            return self.syntax_order[index]
        return self.rng.choice(TRANSFER_SYNTAXES)


def generate_drop(
    out: Path, *, patients: int = 20, seed: int = 0, overwrite: bool = False,
    on_patient: Callable[[int], None] | None = None,
) -> SynthResult:
    """Write a synthetic drop to ``out`` and its truth sidecar next to it."""
    if patients < 1:
        raise SynthError(f"--patients {patients}: a drop needs at least 1 patient.")
    out = Path(out)
    truth_path = out.with_name(out.name + ".truth.json")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SynthError(
                f"output folder {out} exists and is not empty. Choose a new folder or pass --force "
                "to replace it."
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    writer = _DropWriter(out, seed, patients)
    for index in range(patients):
        _write_patient(writer, index)
        if on_patient is not None:
            on_patient(index + 1)
    _plant_bad_inputs(writer)
    _write_reports(writer)
    _finish_truth(writer.truth)
    (out / DROP_INFO_FILE).write_text(
        yaml.safe_dump({"site": f"site-{seed:04d}", "received_at": _received_at(seed)}, sort_keys=True),
        encoding="utf-8",
    )
    truth = writer.truth
    truth_doc = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "drop": out.name,
        "patients": truth.patients,
        "bad_files": sorted(truth.bad_files, key=lambda item: item["path"]),
        "excluded_series": truth.excluded_series,
        "orphan_reports": truth.orphan_reports,
        "studies_without_report": truth.studies_without_report,
        "phi_strings": sorted({s for p in truth.patients for s in p["phi"]}),
    }
    truth_path.write_text(json.dumps(truth_doc, indent=1, ensure_ascii=False, sort_keys=True), encoding="utf-8")
    files = [p for p in out.rglob("*") if p.is_file()]
    return SynthResult(
        drop_dir=out,
        truth_path=truth_path,
        patients=patients,
        studies=sum(len(p["studies"]) for p in truth.patients),
        series=writer.series_written,
        dicom_files=writer.dicom_files,
        bad_files=len(truth.bad_files),
        reports=len(writer.reports),
        total_bytes=sum(p.stat().st_size for p in files),
        seconds=time.perf_counter() - started,
    )


def _received_at(seed: int) -> str:
    day = date(2026, 1, 1) + timedelta(days=seed % 300)
    return f"{day.isoformat()}T08:{seed % 60:02d}:00+01:00"


def _write_patient(writer: _DropWriter, index: int) -> None:
    seq = writer.patient_seeds[index]
    np_rng = np.random.default_rng(seq)
    rng = random.Random(int(seq.generate_state(2)[1]))
    language = "de" if rng.random() < 0.75 else "en"
    person = random_person(rng, language)
    birth = date(1935, 1, 1) + timedelta(days=rng.randint(0, 65 * 365))
    upper = rng.random() < 0.5
    header = PatientHeader(
        name=dicom_name(person, upper=upper),
        patient_id=writer.unique_number(rng, 10_000_000, 99_999_999),
        other_id="KIS-" + writer.unique_number(rng, 100_000, 999_999),
        birth_date=birth,
        sex=person.sex,
        age="",  # filled per study
        address=f"{rng.choice(_STREETS[language])} {rng.randint(1, 120)}, " + " ".join(rng.choice(_CITIES[language])),
    )
    anatomy = phantom.random_anatomy(np_rng)
    findings, spheres = _plant_findings(anatomy, rng)
    anatomy = replace(anatomy, spheres=tuple(spheres))

    phi = {header.name, header.name.replace("^", " "), header.patient_id, header.other_id,
           dicom_date(birth), header.address}
    if rng.random() < 0.5:
        patient_dir = f"{person.family}_{person.given}_{header.patient_id}"
        phi.add(patient_dir)
    else:
        patient_dir = f"PAT{index + 1:04d}"
    if rng.random() < 0.3:
        patient_dir = f"export/{rng.choice(['2026-10', '2026-11'])}/{patient_dir}"

    study_count = 2 if rng.random() < 0.4 else 1
    first_day = date(2022, 1, 1) + timedelta(days=rng.randint(0, 4 * 365))
    days = [first_day] + [first_day + timedelta(days=rng.randint(60, 400))] * (study_count - 1)
    studies = []
    for s, study_date in enumerate(days):
        modality = "CT" if rng.random() < (0.75 if s == 0 else 0.5) else "MR"
        prior = days[s - 1] if s > 0 else (study_date - timedelta(days=rng.randint(90, 700))
                                           if rng.random() < 0.3 else None)
        # Lesions grow between studies, so follow-ups report a different size.
        study_anatomy = anatomy if s == 0 else replace(
            anatomy, spheres=tuple(replace(sp, radius=sp.radius * 1.2) for sp in anatomy.spheres))
        study_findings = findings if s == 0 else [
            replace(f, size_mm=round(f.size_mm * 1.2, 1)) if f.size_mm else f for f in findings]
        studies.append(_write_study(
            writer, rng, np_rng, index, s, header, person, language, modality, study_date, prior,
            study_anatomy, study_findings, patient_dir, phi,
        ))
    writer.truth.patients.append({
        "index": index,
        "patient_id": header.patient_id,
        "name": header.name,
        "language": language,
        "header_phi": sorted(phi),  # headers and paths; report PHI joins in _finish_truth
        "studies": studies,
    })


def _plant_findings(anatomy: phantom.Anatomy, rng: random.Random) -> tuple[list[Finding], list[phantom.Sphere]]:
    findings: list[Finding] = []
    spheres: list[phantom.Sphere] = []
    if rng.random() < 0.5:
        x, y, z, ax, ay = phantom.blob_center_z(anatomy, phantom.LIVER)
        radius = rng.uniform(5.0, min(17.5, 0.22 * min(ax, ay)))
        angle = rng.uniform(0, 2 * np.pi)
        sx, sy = x + 0.35 * ax * np.cos(angle), y + 0.35 * ay * np.sin(angle)
        spheres.append(phantom.Sphere(phantom.LIVER_LESION, float(sx), float(sy), z, radius))
        segment = "VII" if sx < x and sy > y else rng.choice(["IVa", "VIII", "VI", "V"])
        findings.append(Finding("liver", "lesion", round(2 * radius, 1), segment))
    if rng.random() < 0.3:
        x, y, z, ax, ay = phantom.blob_center_z(anatomy, phantom.KIDNEY_R)
        radius = rng.uniform(4.0, 0.45 * min(ax, ay))
        spheres.append(phantom.Sphere(phantom.KIDNEY_CYST, x, y + 0.3 * ay, z, radius))
        findings.append(Finding("kidney_right", "cyst", round(2 * radius, 1)))
    if rng.random() < 0.4:
        findings.append(Finding("vertebrae", "degenerative", None, rng.choice(["T8", "T11", "L1", "L3"])))
    if rng.random() < 0.15:
        findings.append(Finding(rng.choice(["lung_left", "lung_right"]), "effusion"))
    if rng.random() < 0.3:
        findings.append(Finding("aorta", "calcification"))
    return findings, spheres


def _write_study(
    writer: _DropWriter, rng: random.Random, np_rng: np.random.Generator, p: int, s: int,
    patient: PatientHeader, person: Person, language: str, modality: str, study_date: date,
    prior: date | None, anatomy: phantom.Anatomy, findings: list[Finding], patient_dir: str,
    phi: set[str],
) -> dict:
    accession = "A" + writer.unique_number(rng, 10_000_000, 99_999_999)
    referring, requesting, operator = (random_person(rng, language) for _ in range(3))
    study = StudyHeader(
        study_uid=writer.uid("study", p, s),
        accession=accession,
        study_id=str(rng.randint(1000, 9999)),
        study_date=study_date,
        study_time=f"{rng.randint(7, 18):02d}{rng.randint(0, 59):02d}{rng.randint(0, 59):02d}",
        description="CT Thorax/Abdomen" if modality == "CT" else "MRT Abdomen",
        referring=referring,
        requesting=requesting,
        operator=operator,
        institution=writer.institution,
        institution_address=writer.institution_address,
        station=f"CT{rng.randint(1, 4)}" if modality == "CT" else f"MR{rng.randint(1, 3)}",
    )
    age = (study_date - patient.birth_date).days // 365
    patient = replace(patient, age=f"{age:03d}Y")
    phi |= {accession, dicom_date(study_date), dicom_name(referring), dicom_name(requesting),
            dicom_name(operator), writer.institution, writer.institution_address}
    study_dir = f"{study_date:%Y%m%d}_{accession}" if rng.random() < 0.5 else f"ST{s + 1:03d}"
    if accession in study_dir:
        phi.add(study_dir)

    series_docs = []
    region = CT_REGION if modality == "CT" else MR_REGION
    visible = [f for f in findings if f.organ in region]
    series_docs.append(_write_series(
        writer, rng, np_rng, p, s, 1, patient, study, modality, anatomy, f"{patient_dir}/{study_dir}", person,
        phi,
    ))
    if modality == "CT" and rng.random() < 0.5:
        series_docs.append(_write_localizer(writer, rng, p, s, patient, study, anatomy, f"{patient_dir}/{study_dir}"))

    report = write_report(
        rng, language=language, modality=modality, region_organs=region, findings=visible,
        patient=person, birth_date=patient.birth_date, study_date=study_date, prior_date=prior,
        physician=rng.choice(writer.radiologists), referring=referring, phone=writer.phone,
        accession=accession, patient_id=patient.patient_id,
    )
    writer.reports.append({
        "accession_number": accession, "patient_id": patient.patient_id,
        "study_date": study_date.isoformat(), "language": language, "report_text": report.text,
    })
    return {
        "accession": accession,
        "study_uid": study.study_uid,
        "study_date": study_date.isoformat(),
        "modality": modality,
        "language": language,
        "findings": [f.__dict__ for f in visible],
        "report_phi": sorted(report.phi),
        "series": series_docs,
    }


def _geometry(rng: random.Random, rows: int, fov_range: tuple[float, float], prone: bool):
    fov = round(rng.uniform(*fov_range), 1)
    spacing = fov / rows
    row_dir, col_dir = ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)) if prone else ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
    return spacing, row_dir, col_dir


def _write_series(
    writer: _DropWriter, rng: random.Random, np_rng: np.random.Generator, p: int, s: int, number: int,
    patient: PatientHeader, study: StudyHeader, modality: str, anatomy: phantom.Anatomy, study_path: str,
    person: Person, phi: set[str],
) -> dict:
    is_ct = modality == "CT"
    rows = 512 if is_ct else 256
    prone = is_ct and rng.random() < 0.15
    spacing, row_dir, col_dir = _geometry(rng, rows, (360.0, 460.0) if is_ct else (360.0, 420.0), prone)
    n_slices = rng.randint(12, 18) if is_ct else rng.randint(10, 14)
    t0, t1 = _CT_EXTENT if is_ct else _MR_EXTENT
    z_positions = [anatomy.z_at(t0 + (t1 - t0) * i / (n_slices - 1)) for i in range(n_slices)]
    gap = abs(z_positions[1] - z_positions[0])
    series = SeriesHeader(
        series_uid=writer.uid("series", p, s, number),
        frame_of_reference_uid=writer.uid("for", p, s),
        modality=modality,
        number=number,
        description="Thorax-Abdomen 5mm" if is_ct else "T1 VIBE tra",
        transfer_syntax=writer.next_syntax(),
        rows=rows,
        cols=rows,
        pixel_spacing=(spacing, spacing),
        slice_thickness=min(5.0, gap),
        row_dir=row_dir,
        col_dir=col_dir,
        ct_signed=is_ct and rng.random() < 0.3,
    )
    writer.series_written += 1
    # The image centre sits near the isocentre; the patient may lie off-centre.
    centre = np.array([rng.uniform(-10, 10), rng.uniform(-10, 10), 0.0])
    half = (rows - 1) / 2 * spacing
    series_dir = f"{study_path}/SE{number:03d}_{series.description.replace(' ', '_').replace('/', '-')}"
    style = rng.choice(["im", "uid", "name", "lower"])
    files = []
    for i, z in enumerate(z_positions):
        position = centre - half * np.array(row_dir) - half * np.array(col_dir)
        position[2] = z
        x, y, _ = phantom.patient_coordinates(position, np.array(row_dir), np.array(col_dir),
                                              (spacing, spacing), (rows, rows))
        labels = phantom.render_labels(anatomy, x, y, z)
        pixels = phantom.ct_hounsfield(anatomy, labels, np_rng) if is_ct else phantom.mr_signal(labels, x, np_rng)
        sop_uid = writer.uid("sop", p, s, number, i)
        name = _file_name(style, i, sop_uid, person)
        if style == "name":
            phi.add(name)
        ds = image_dataset(patient, study, series, sop_uid=sop_uid, instance=i + 1,
                           position=tuple(float(v) for v in position), pixels=pixels)
        path = f"{series_dir}/{name}"
        write_dataset(ds, writer.out / path)
        writer.dicom_files += 1
        files.append({
            "path": path, "sop_uid": sop_uid, "instance": i + 1, "z": round(z, 3),
            "boxes": phantom.organ_boxes(labels),
        })
    return {
        "series_uid": series.series_uid,
        "modality": modality,
        "kind": "axial",
        "transfer_syntax": str(series.transfer_syntax),
        "rows": rows,
        "cols": rows,
        "pixel_spacing": [spacing, spacing],
        "image_orientation": [*row_dir, *col_dir],
        "ct_signed": series.ct_signed,
        "files": files,
        "_series": series,  # removed before the truth is written; used for bad inputs
        "_patient": patient,
        "_study": study,
        "_next_z": z_positions[-1] - gap,
        "_position": [float(v) for v in centre - half * np.array(row_dir) - half * np.array(col_dir)],
    }


def _file_name(style: str, i: int, sop_uid: str, person: Person) -> str:
    if style == "im":
        return f"IM{i + 1:05d}"
    if style == "uid":
        return f"{sop_uid}.dcm"
    if style == "name":
        return f"{person.family.upper()}_{i + 1:04d}.dcm"
    return f"img_{i + 1}.DCM"


def _write_localizer(
    writer: _DropWriter, rng: random.Random, p: int, s: int, patient: PatientHeader, study: StudyHeader,
    anatomy: phantom.Anatomy, study_path: str,
) -> dict:
    """A coronal scout image: a mean-HU projection, as localizers are. Later stages exclude it."""
    size, coarse = 512, 128
    fov = round(rng.uniform(420.0, 480.0), 1)
    xs = np.linspace(-fov / 2, fov / 2, coarse)
    ys = np.linspace(-fov / 2, fov / 2, 96)
    zs = np.linspace(anatomy.z_top, anatomy.z_top - anatomy.length, coarse)
    grid_x, grid_y = np.meshgrid(xs, ys)  # (96, 128)
    table = phantom.mean_hu_table(anatomy.contrast)
    hu_mean = np.array([table[phantom.render_labels(anatomy, grid_x, grid_y, z)].mean(axis=0) for z in zs])
    image = np.repeat(np.repeat(hu_mean, size // coarse, axis=0), size // coarse, axis=1).astype(np.int16)
    number = 99
    series = SeriesHeader(
        series_uid=writer.uid("series", p, s, number),
        frame_of_reference_uid=writer.uid("for", p, s),
        modality="CT", number=number, description="Topogramm", transfer_syntax=TRANSFER_SYNTAXES[0],
        rows=size, cols=size, pixel_spacing=(anatomy.length / size, fov / size), slice_thickness=1.0,
        row_dir=(1.0, 0.0, 0.0), col_dir=(0.0, 0.0, -1.0),
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), ct_signed=True,
    )
    writer.series_written += 1
    sop_uid = writer.uid("sop", p, s, number, 0)
    path = f"{study_path}/SE{number:03d}_Topogramm/IM00001"
    ds = image_dataset(patient, study, series, sop_uid=sop_uid, instance=1,
                       position=(-fov / 2, 0.0, anatomy.z_top), pixels=image)
    write_dataset(ds, writer.out / path)
    writer.dicom_files += 1
    writer.truth.excluded_series.append({"series_uid": series.series_uid, "reason": "localizer"})
    return {"series_uid": series.series_uid, "modality": "CT", "kind": "localizer",
            "transfer_syntax": str(series.transfer_syntax), "files": [{"path": path, "sop_uid": sop_uid}]}


def _axial_series(writer: _DropWriter) -> list[dict]:
    return [se for p in writer.truth.patients for st in p["studies"] for se in st["series"]
            if se["kind"] == "axial"]


def _plant_bad_inputs(writer: _DropWriter) -> None:
    """Truncated DICOM, header-only DICOM, non-DICOM files, orphan report, study without report."""
    rng = writer.rng
    axial = _axial_series(writer)
    for kind in ("truncated", "no_pixel_data"):
        target = rng.choice(axial)
        series: SeriesHeader = target["_series"]
        instance = len(target["files"]) + 1
        sop_uid = writer.uid("bad", kind, target["series_uid"])
        position = (*target["_position"][:2], target["_next_z"])
        if kind == "truncated":
            # A ramp, not zeros: compressed syntaxes must not shrink the pixel data to nothing.
            pixels = (np.arange(series.rows * series.cols) % 1500).reshape(series.rows, series.cols)
            ds = image_dataset(target["_patient"], target["_study"], series, sop_uid=sop_uid,
                               instance=instance, position=position, pixels=pixels)
            reason = "file ends inside the pixel data (cut half-way into it)"
        else:
            ds = image_dataset(target["_patient"], target["_study"], series, sop_uid=sop_uid,
                               instance=instance, position=position, pixels=None)
            reason = "image instance without PixelData"
        folder = target["files"][0]["path"].rsplit("/", 1)[0]
        path = f"{folder}/IM9{instance:04d}"
        write_dataset(ds, writer.out / path)
        if kind == "truncated":
            blob = (writer.out / path).read_bytes()
            cut = len(blob) - len(ds.PixelData) // 2  # half-way into the pixel data
            (writer.out / path).write_bytes(blob[:cut])
        writer.truth.bad_files.append({"path": path, "kind": kind, "reason": reason,
                                       "series_uid": target["series_uid"], "sop_uid": sop_uid})
    log_text = "PACS export log\nexport finished with 0 errors\n"
    (writer.out / "export_log.txt").write_text(log_text, encoding="utf-8")
    writer.truth.bad_files.append({"path": "export_log.txt", "kind": "not_dicom", "reason": "plain text file"})
    preview = b"\xff\xd8\xff\xe0" + bytes(rng.getrandbits(8) for _ in range(2048))
    viewer_path = f"{axial[0]['files'][0]['path'].split('/', 1)[0]}/preview.jpg"
    (writer.out / viewer_path).write_bytes(preview)
    writer.truth.bad_files.append({"path": viewer_path, "kind": "not_dicom", "reason": "JPEG thumbnail, not DICOM"})

    for se in (se for p in writer.truth.patients for st in p["studies"] for se in st["series"]):
        for key in [k for k in se if k.startswith("_")]:
            del se[key]

    orphan = "A" + writer.unique_number(rng, 10_000_000, 99_999_999)
    writer.reports.append({
        "accession_number": orphan, "patient_id": writer.unique_number(rng, 10_000_000, 99_999_999),
        "study_date": "2025-05-05", "language": "de",
        "report_text": "Befund:\nKeine Voraufnahmen vorliegend. Leber o.B.\n\nBeurteilung:\nUnauffälliger Befund.",
    })
    writer.truth.orphan_reports.append(orphan)
    if len(writer.reports) >= 3:  # at least two real studies: one of them loses its report
        missing = rng.choice(writer.reports[:-1])
        writer.reports.remove(missing)
        writer.truth.studies_without_report.append(missing["accession_number"])


def _finish_truth(truth: _Truth) -> None:
    """A patient's PHI = header and path values + what the delivered reports carry."""
    for patient in truth.patients:
        phi = set(patient.pop("header_phi"))
        for study in patient["studies"]:
            if study["accession"] in truth.studies_without_report:
                study["report_phi"] = []
            phi |= set(study["report_phi"])
        patient["phi"] = sorted(phi)


def _write_reports(writer: _DropWriter) -> None:
    rows = list(writer.reports)
    writer.rng.shuffle(rows)  # deliveries are not sorted
    buffer = io.StringIO()
    table = csv.DictWriter(buffer, fieldnames=REPORT_COLUMNS, lineterminator="\n")
    table.writeheader()
    table.writerows(rows)
    (writer.out / REPORTS_FILE).write_text(buffer.getvalue(), encoding="utf-8")
