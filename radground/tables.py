"""Read and write record tables as Parquet through the object store.

Every table has one record model in radground.schemas; its Arrow schema is derived
from that model, so writer and reader cannot drift apart.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from radground.schemas import arrow_schema
from radground.store import ObjectStore


def to_arrow(records: Iterable[BaseModel | dict], model: type[BaseModel]) -> pa.Table:
    """Validate records against their model and build an Arrow table with the model's schema."""
    schema = arrow_schema(model)
    rows = [model.model_validate(r).model_dump() if isinstance(r, dict) else r.model_dump() for r in records]
    columns = {name: [row[name] for row in rows] for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    # zstd level 1: most of level 3's size on noisy pixels at a fraction of the CPU;
    # the output is deterministic for equal input.
    pq.write_table(table, sink, compression="zstd", compression_level=1)
    return sink.getvalue()


def write_table(store: ObjectStore, key: str, records: Sequence[BaseModel | dict], model: type[BaseModel]) -> int:
    """Write records as one Parquet object (atomically); returns the row count."""
    table = to_arrow(records, model)
    store.put(key, parquet_bytes(table))
    return table.num_rows


def read_table(store: ObjectStore, key: str) -> pa.Table:
    return table_from_parquet_bytes(store.get(key))


def table_from_parquet_bytes(data: bytes) -> pa.Table:
    """A Parquet object's table, read from memory."""
    return pq.read_table(arrow_reader(data))


def arrow_reader(data: bytes) -> pa.BufferReader:
    """A reader over a copy of ``data`` that Arrow owns: the only safe way to hand bytes to pyarrow.

    Wrapping ``bytes`` directly (``pa.BufferReader(data)`` or ``io.BytesIO``) lets an Arrow pool
    thread drop the last reference to the Python buffer; when that happens during interpreter
    shutdown the thread must take the GIL, Python ends it, and the process aborts ("terminate
    called without an active exception", pyarrow 25, ~1 CLI run in 10). Arrow's own copy needs no GIL.
    """
    sink = pa.BufferOutputStream()
    sink.write(data)
    return pa.BufferReader(sink.getvalue())


def read_tables(store: ObjectStore, keys: Sequence[str], model: type[BaseModel]) -> pa.Table:
    """Concatenate several Parquet objects of one table (an empty table if there are none)."""
    tables = [read_table(store, key) for key in keys]
    if not tables:
        return arrow_schema(model).empty_table()
    return pa.concat_tables(tables)


def relabelled(data: bytes, drop_id: str) -> bytes:
    """A Parquet table of an earlier drop as this drop's: the drop_id column set to ``drop_id``."""
    table = table_from_parquet_bytes(data)
    column = table.schema.get_field_index("drop_id")
    table = table.set_column(column, table.schema.field(column), pa.array([drop_id] * table.num_rows, pa.string()))
    return parquet_bytes(table)
