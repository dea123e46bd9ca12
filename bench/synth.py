"""`radground synth OUT --patients 20` end to end, as a user runs it (a CLI subprocess)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path


def bench_synth(patients: int = 20, seed: int = 0) -> dict:
    """`radground synth OUT --patients 20` end to end, as a user runs it (CLI subprocess)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "radground", "synth"]
        subprocess.run([*cmd, f"{tmp}/warmup", "--patients", "1", "--seed", "1"], check=True,
                       capture_output=True)
        started = time.perf_counter()
        subprocess.run([*cmd, f"{tmp}/drop", "--patients", str(patients), "--seed", str(seed)], check=True,
                       capture_output=True)
        seconds = time.perf_counter() - started
        files = [p for p in Path(tmp, "drop").rglob("*") if p.is_file()]
        dicom = [p for p in files if p.suffix.lower() not in (".csv", ".yaml", ".txt", ".jpg")]
        megabytes = sum(p.stat().st_size for p in files) / 1e6
    return {"patients": patients, "seconds": round(seconds, 2), "files": len(files),
            "megabytes": round(megabytes, 1),
            "slices_per_s": round(len(dicom) / seconds, 1)}
