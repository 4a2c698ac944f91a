"""Where training data comes from, through ``datasets`` (the original ``main.py`` uses ``load_dataset``).

A source is a JSON lines / JSON / CSV / Parquet file, a directory of them, or a dataset id in the local
Hugging Face cache. Each file is parsed into rows (prompt, response, history, where, error) kept in
``datasets``' Arrow cache, keyed by the file's path, size and modification time and the columns asked
for: a second run on the same large file reads the cache instead of parsing again. JSON lines are parsed
line by line by :mod:`backend.data` so a bad line is named ``file:line``; CSV and Parquet load through
``load_dataset``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator, Optional, Union

from .data import DataError, _records, parse_row

KINDS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _quiet_datasets():
    """``datasets`` without its progress bars and info logs: our own progress goes to the terminal."""
    import datasets

    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    return datasets


def _row_features():
    from datasets import Features, List, Value

    return Features({
        "prompt": Value("string"), "response": Value("string"), "history": List(List(Value("string"))),
        "where": Value("string"), "error": Value("string"), "fatal": Value("bool"), "empty": Value("bool"),
        "keys": Value("string"), "messages": List(List(Value("string"))),
    })


def source_files(path: Union[str, Path]) -> list[Path]:
    """The data files of a file or directory source (a directory: its supported files, by name)."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in KINDS)
        if not files:
            raise DataError(f"{path} is a directory without .json, .jsonl, .csv or .parquet files; pass a data file or a directory of them")
        return files
    return [path]


def looks_like_dataset_id(value: Union[str, Path]) -> bool:
    text = str(value)
    return not Path(text).expanduser().exists() and Path(text).suffix.lower() not in KINDS and bool(_DATASET_ID.match(text))


def check_source(value, field: str) -> None:
    """Refuse a source that is neither a file, a directory of data files nor a dataset id; reads no data."""
    if looks_like_dataset_id(value):
        return
    path = Path(value).expanduser()
    if not path.exists():
        raise DataError(f"{field} {path}: no such file; check the path.")
    source_files(path)


def parsed_rows(source, columns: tuple, cache_dir: Optional[str] = None) -> Iterator[dict]:
    """Parsed rows of every file of ``source``, in order (see :func:`backend.data.parse_row`)."""
    cache_dir = cache_dir or default_cache_dir()
    if looks_like_dataset_id(source):
        yield from _table_rows(_cached_hub_dataset(str(source), cache_dir), str(source), columns)
        return
    for file in source_files(source):
        kind = KINDS.get(file.suffix.lower(), "json")
        if kind == "json":
            yield from _json_rows_cached(file, columns, cache_dir)
        else:
            yield from _table_rows(_load_table(kind, file, cache_dir), str(file), columns)


# ------------------------------------------------------------------------------------------- JSON lines


def _json_rows(path: str, stamp: tuple, columns: tuple) -> Iterator[dict]:
    """The generator ``datasets`` caches; ``stamp`` (size, mtime) is only there to key the cache."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
        records = list(_records(Path(path), text))
    except FileNotFoundError:
        yield _fatal(path, f"{path}: no such file; check the path")
        return
    except UnicodeDecodeError as err:
        yield _fatal(path, f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8")
        return
    except DataError as err:  # a .json file holding a broken JSON list
        yield _fatal(path, str(err))
        return
    for where, record in records:
        yield parse_row(record, where, columns)


def _fatal(path: str, message: str) -> dict:
    return {"prompt": None, "response": None, "history": None, "where": path, "error": message, "fatal": True,
            "empty": False, "keys": "", "messages": None}


def _json_rows_cached(path: Path, columns: tuple, cache_dir: Optional[str]) -> Iterator[dict]:
    if not path.is_file():
        raise DataError(f"{path}: no such file; check the path")
    stat = path.stat()
    kwargs = dict(path=str(path.resolve()), stamp=(stat.st_size, stat.st_mtime_ns), columns=tuple(columns))
    try:
        table = _quiet_datasets().Dataset.from_generator(_json_rows, gen_kwargs=kwargs, features=_row_features(), cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 - e.g. an empty file (datasets refuses empty tables): parse directly
        if isinstance(err, DataError):
            raise
        yield from _json_rows(**kwargs)
        return
    for batch in table.iter(batch_size=4096):
        for i in range(len(batch["where"])):
            yield {k: v[i] for k, v in batch.items()}


# ------------------------------------------------------------------------------------- tables and hub


def _load_table(kind: str, file: Path, cache_dir: Optional[str]):
    try:
        return _quiet_datasets().load_dataset(kind, data_files=str(file), split="train", cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 - pyarrow/pandas errors of an unreadable file
        raise DataError(f"{file}: not a readable {kind.upper()} file ({str(err).splitlines()[0][:160]}); fix or re-export it") from None


def _cached_hub_dataset(dataset_id: str, cache_dir: Optional[str]):
    datasets = _quiet_datasets()
    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True  # only what is cached: never a download in the middle of training
    try:
        return datasets.load_dataset(dataset_id, split="train", cache_dir=cache_dir)
    except Exception:  # noqa: BLE001 - not cached (ConnectionError, FileNotFoundError, ValueError...)
        raise DataError(
            f"{dataset_id}: no such file, and no dataset of that id in the local Hugging Face cache; fetch it once "
            f"with `hf download --repo-type dataset {dataset_id}` (or datasets.load_dataset('{dataset_id}')) while "
            "online, or check the path"
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline


def _table_rows(table, name: str, columns: tuple) -> Iterator[dict]:
    from .data import _flag

    present = list(table.column_names)
    for role, column in zip(("prompt", "response", "history"), columns):
        if column is not None and column not in present:
            raise DataError(f"{name}: missing column '{column}'; the columns here are {', '.join(present) or '(none)'} — pass {_flag(role)}")
    for i, record in enumerate(table):
        yield parse_row(record, f"{name}: row {i + 1}", columns)


def default_cache_dir() -> Optional[str]:
    """``datasets``' own default unless GLMCHAT_DATA_CACHE says otherwise."""
    return os.environ.get("GLMCHAT_DATA_CACHE") or None
