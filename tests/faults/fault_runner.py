"""Runs `qlorakit train CONFIG` many times with faults injected: `fault_runner.py SPEC.json RESULT.json`.

The runner imports qlorakit once, single-threaded, then runs every attempt in a forked child (so an attempt costs
its training, not an interpreter start), with the child's stderr in a file of its own. A fault is one of:

- `{"kill": "forward", "at": k}`: SIGKILL before the k-th training forward pass of the attempt;
- `{"kill": "save", "at": k}`: before the k-th safetensors file write (checkpoints and the final adapter);
- `{"kill": "rename", "at": k}`: before the k-th os.replace (every atomic write of the run renames);
- `{"kill": "ckpt", "at": k}`: before the k-th file operation inside a checkpoint write (a tensor file, a JSON
  file, the manifest, a rename), counted over the attempt;
- `{"kill": "metrics", "at": k}`: in the middle of the k-th metrics.jsonl record (half the line written);
- `{"kill": "time", "at": s}`: the parent kills the child s seconds after starting it, wherever it is;
- `{"fill_disk_after_step": n}`: after checkpoint step n is written, fill the output folder's file system;
- `{"nospace_after_step": n}`: after checkpoint step n, every file write of the run fails with ENOSPC (the
  full disk where mounting a small file system is not permitted);
- `{"slow": s}`: sleep s seconds before each training forward pass (to hold the output folder's lock);
- `{}`: no fault.

SPEC: {"tree": config tree, "root": folder, "sequences": [[fault, ...], ...], "finish": true|false,
"random": {"seed", "target_kills", "per_sequence", "max_sequences", "kinds": {kind: [lo, hi]}},
"concurrent": [fault, fault]}. Every sequence trains in its own output folder under root; it runs its attempts
in order, stopping early when one finishes (exit 0); with "finish" a last attempt without a fault completes it.
"random" draws sequences of random faults until target_kills attempts were killed. "concurrent" starts the second
attempt once the first holds the output folder's lock.
RESULT: {"sequences": [{"out", "config", "attempts": [{"fault", "status", "killed", "stderr", "ckpt_events"}]}],
"concurrent": {...}, "kills": n}.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from qlorakit import cli
from qlorakit.train import checkpoint, loop, metrics


def _install(fault: dict, out_dir: Path, counters: dict) -> None:
    kind, at = fault.get("kill"), fault.get("at")

    full = {"disk": False}

    def no_space() -> None:
        if full["disk"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def tick(name: str) -> None:
        counters[name] = counters.get(name, 0) + 1
        if kind == name and counters[name] == at:
            os.kill(os.getpid(), signal.SIGKILL)

    real_forward = loop.forward_loss_sum

    def forward(*args, **kwargs):
        if torch.is_grad_enabled():
            if fault.get("slow"):
                time.sleep(fault["slow"])
            tick("forward")
        return real_forward(*args, **kwargs)

    loop.forward_loss_sum = forward

    real_replace = os.replace
    inside = {"ckpt": False}

    def replace(src, dst, *args, **kwargs):
        tick("rename")
        if inside["ckpt"]:
            tick("ckpt")
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace

    from qlorakit.adapters import peft_format

    def wrap_save(module):
        real = module.save_file

        def save_file(*args, **kwargs):
            no_space()
            tick("save")
            if inside["ckpt"]:
                tick("ckpt")
            return real(*args, **kwargs)

        module.save_file = save_file

    wrap_save(checkpoint)
    wrap_save(peft_format)

    for module, name in ((checkpoint, "_write_json"), (checkpoint, "write_manifest")):
        real_fn = getattr(module, name)

        def counted(*args, _real=real_fn, **kwargs):
            if inside["ckpt"]:
                tick("ckpt")
            return _real(*args, **kwargs)

        setattr(module, name, counted)

    real_save_ckpt = loop.save_checkpoint

    def save_checkpoint(root, step, *args, **kwargs):
        inside["ckpt"] = True
        try:
            path = real_save_ckpt(root, step, *args, **kwargs)
        finally:
            inside["ckpt"] = False
        if fault.get("fill_disk_after_step") == step:
            _fill(out_dir / "filler")
        if fault.get("nospace_after_step") == step:
            full["disk"] = True
        return path

    loop.save_checkpoint = save_checkpoint

    real_write = metrics.MetricsWriter.write

    def write(self, record):
        no_space()
        counters["metrics"] = counters.get("metrics", 0) + 1
        if kind == "metrics" and counters["metrics"] == at:
            line = json.dumps(record) + "\n"
            with self.path.open("a") as f:
                f.write(line[: len(line) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(self, record)

    metrics.MetricsWriter.write = write


def _fill(path: Path) -> None:
    """Write zeros to `path` until the file system is full (the last writes and the close fail with ENOSPC)."""
    for size in (1 << 16, 512, 1):
        try:
            with open(path, "ab", buffering=0) as f:
                while True:
                    f.write(b"\0" * size)
        except OSError:
            pass


def _start(config: str, fault: dict, out_dir: Path, log: Path) -> int:
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 2)
            os.dup2(fd, 1)
            counters: dict = {}
            _install(fault, out_dir, counters)
            verbose = ["-v"] if os.environ.get("FAULT_RUNNER_VERBOSE") else []  # tracebacks, for debugging
            code = cli.main([*verbose, "train", config, "--no-progress"])
            sys.stderr.write(f"\nfault-runner: checkpoint file operations {counters.get('ckpt', 0)}\n")
            sys.stderr.flush()
        except BaseException as err:  # noqa: BLE001 - report anything the child did not expect
            import traceback

            traceback.print_exc()
            sys.stderr.write(f"fault-runner: child raised {type(err).__name__}: {err}\n")
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def _wait(pid: int, fault: dict) -> tuple[int, bool]:
    if fault.get("kill") == "time":
        deadline = time.monotonic() + float(fault["at"])
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return _decode(status)
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return _decode(status)


def _decode(status: int) -> tuple[int, bool]:
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status), os.WTERMSIG(status) == signal.SIGKILL
    return os.WEXITSTATUS(status), False


def _record(fault: dict, status: int, killed: bool, log: Path, seconds: float) -> dict:
    text = log.read_text(errors="replace")
    events = [int(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("fault-runner: checkpoint file operations")]
    return {"fault": fault, "status": status, "killed": killed, "stderr": text[-4000:],
            "ckpt_events": events[0] if events else None, "seconds": round(seconds, 2)}


def _sequence(tree: dict, out_dir: Path, faults, logs: Path, finish: bool) -> dict:
    """Run attempts on one output folder until one finishes; `faults` is a list, or a callable giving the next
    fault (None: no more). Returns {"out", "attempts"}."""
    import yaml

    tree = json.loads(json.dumps(tree))
    tree["training"]["output_dir"] = str(out_dir)
    config = out_dir.parent / f"{out_dir.name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(tree, sort_keys=False))
    next_fault = faults if callable(faults) else iter(list(faults) + ([{}] if finish else [])).__next__
    attempts: list[dict] = []
    while True:
        try:
            fault = next_fault()
        except StopIteration:
            break
        if fault is None:
            fault = {}
        log = logs / f"{out_dir.parent.name}-{out_dir.name}-{len(attempts) + 1}.txt"
        t0 = time.monotonic()
        status, killed = _wait(_start(str(config), fault, out_dir, log), fault)
        attempts.append(_record(fault, status, killed, log, time.monotonic() - t0))
        if status == 0 or (not killed and not fault):
            break
    return {"out": str(out_dir), "config": str(config), "attempts": attempts}


def _random_faults(kinds: dict, rng, limit: int):
    """A fault generator: a random kind and point from `kinds` ({kind: [lo, hi]}), `limit` faults, then {}."""
    count = {"n": 0}

    def draw():
        count["n"] += 1
        if count["n"] > limit:
            return {}
        kind = rng.choice(sorted(kinds))
        lo, hi = kinds[kind]
        at = round(rng.uniform(lo, hi), 2) if kind == "time" else rng.randint(lo, hi)
        return {"kill": kind, "at": at}

    return draw


def _preload() -> None:
    """Import once, in the parent, what every attempt would import: the children are forked after this."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import transformers
    from transformers import LlamaForCausalLM  # noqa: F401

    import qlorakit.data  # noqa: F401
    import qlorakit.model.loader  # noqa: F401
    import qlorakit.train.run  # noqa: F401

    transformers.AutoTokenizer  # noqa: B018 - resolves the lazy module
    try:
        import torch.utils.tensorboard  # noqa: F401
    except Exception:  # optional, as in metrics.py
        pass


def main(spec_path: str, result_path: str) -> None:
    import random

    torch.set_num_threads(1)
    _preload()
    spec = json.loads(Path(spec_path).read_text())
    root = Path(spec["root"])
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    result: dict = {"sequences": [], "concurrent": [], "kills": 0}
    for i, faults in enumerate(spec.get("sequences", [])):
        result["sequences"].append(_sequence(spec["tree"], root / f"seq-{i}" / "run", faults, logs,
                                             spec.get("finish", True)))
    if "random" in spec:
        plan = spec["random"]
        rng = random.Random(plan["seed"])
        i = 0
        while result["kills"] < plan["target_kills"] and i < plan["max_sequences"]:
            seq = _sequence(spec["tree"], root / f"rand-{i}" / "run",
                            _random_faults(plan["kinds"], rng, plan["per_sequence"]), logs, True)
            result["kills"] += sum(a["killed"] for a in seq["attempts"])
            result["sequences"].append(seq)
            i += 1
    if spec.get("concurrent"):
        first, second = spec["concurrent"]
        out_dir = root / "concurrent" / "run"
        seq = _sequence(spec["tree"], out_dir, [], logs, False)  # writes the config only
        config = seq["config"]
        log_a, log_b = logs / "concurrent-a.txt", logs / "concurrent-b.txt"
        t0 = time.monotonic()
        pid_a = _start(config, first, out_dir, log_a)
        lock = out_dir / ".qlorakit-train.lock"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if lock.is_file() and lock.read_text().strip() == str(pid_a):
                break
            time.sleep(0.02)
        status_b, killed_b = _wait(_start(config, second, out_dir, log_b), second)
        status_a, killed_a = _wait(pid_a, first)
        took = time.monotonic() - t0
        result["concurrent"] = {"out": str(out_dir), "attempts": [_record(first, status_a, killed_a, log_a, took),
                                                                  _record(second, status_b, killed_b, log_b, took)]}
    Path(result_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
