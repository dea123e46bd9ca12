"""Reading Parquet bytes must never abort the process at exit."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Reads a table from bytes and exits at once: the moment an Arrow pool thread may still hold the
# buffer. With pa.BufferReader over Python bytes this aborted ~1 run in 3 on this machine.
_READ_AND_EXIT = """
import pyarrow as pa, pyarrow.parquet as pq
from radground.tables import table_from_parquet_bytes
sink = pa.BufferOutputStream()
pq.write_table(pa.table({"a": list(range(1000)), "b": ["x"] * 1000}), sink)
print(table_from_parquet_bytes(sink.getvalue().to_pybytes()).num_rows)
"""


def test_reading_parquet_bytes_then_exiting_never_aborts():
    for _ in range(8):
        run = subprocess.run([sys.executable, "-c", _READ_AND_EXIT], capture_output=True, text=True, cwd=ROOT,
                             timeout=60)
        assert run.returncode == 0, run.stderr  # -6 = "terminate called without an active exception"
        assert run.stdout.strip() == "1000"
