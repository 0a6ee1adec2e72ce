"""The frozen input embedding table kept in host memory, looked up on the CPU, and the frozen LM head kept there
between losses (for 70B models on 48 GB GPUs).

QLoRA trains LoRA adapters on the linears; the input embedding (vocab x hidden in the compute dtype, 0.49 GiB
for Llama-2-70B in bf16) is frozen, yet it sits on the GPU for a lookup that touches batch x seq rows of it.
`move_embeddings_to_host(model)` swaps it for a `HostEmbedding`: the table lives in pinned host memory, the
lookup runs on the CPU for the batch's token ids, and only the [batch, seq, hidden] result is copied to the GPU
(non_blocking, from a pinned buffer, on the current stream). No gradient flows into the table, so nothing else
changes: the output is the same rows of the same table, bit for bit.

The move is refused (a one-line reason, nothing changed) when the table is trained, tied to the output
embedding (lm_head would still need it on the GPU), not a plain nn.Embedding (subclasses may scale or
renormalize), or not on an accelerator (nothing to gain). `restore_embeddings(model)` puts an nn.Embedding back
on the recorded device: generation (CUDA-graph decoding) must not run CPU ops.

Token ids are best fed on the CPU: ids on the GPU are copied back first, which waits for the GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# Hook tables of nn.Module that move with the embedding, as the same dict objects: handles already given out
# (e.g. transformers' `_require_grads_hooks` from enable_input_require_grads, which activation checkpointing
# registers on the input embedding) keep working, `remove()` included.
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _host_copy(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A copy of `t` in host memory with `dtype`, pinned when CUDA is available (one allocation, no temporary)."""
    out = torch.empty(t.shape, dtype=dtype, pin_memory=torch.cuda.is_available())
    out.copy_(t)
    return out


def _adopt_hooks(dst: nn.Module, src: nn.Module) -> None:
    for name in _HOOK_DICTS:
        if hasattr(src, name):
            setattr(dst, name, getattr(src, name))
    dst._is_full_backward_hook = getattr(src, "_is_full_backward_hook", None)


class _HostTable(nn.Module):
    """A frozen table kept in host memory, whose results go to `device`. The table is a plain attribute, neither
    an nn.Parameter nor a buffer: a buffer (even persistent=False) is moved by `model.to(device)` / `model.cuda()`
    and by qlorakit's `buffers_to`, which would silently put the table back on the GPU; a parameter would also
    show in `model.parameters()` (optimizers, `requires_grad_`). `_apply` follows dtype changes and takes the new
    device as the target of results, while the table stays on the host. `state_dict()` keeps the key
    (`...weight`, a host tensor), and `load_state_dict` writes into the host table, so the model's state dict has
    the same keys as before the move."""

    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor, device: torch.device | str):
        super().__init__()
        self.weight = _host_copy(weight.detach(), weight.dtype)
        self.device = torch.device(device)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> _HostTable:
        """`model.to(...)`, `.cuda()`, `.float()`, `.half()`: the table takes the new dtype (a new host copy) and
        stays on the host; the new device becomes where results go. The conversion is read off
        `fn` applied to an empty tensor of the table's dtype on the current target device."""
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self.weight.dtype, device=self.device))
        if probe.dtype != self.weight.dtype:
            self.weight = _host_copy(self.weight, probe.dtype)
        self.device = probe.device
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        key = prefix + "weight"
        if key not in state_dict:
            if strict:
                missing_keys.append(key)
            return
        value = state_dict[key]
        if value.shape != self.weight.shape:
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                              f"the host table has shape {tuple(self.weight.shape)}")
            return
        with torch.no_grad():
            self.weight.copy_(value)


class HostEmbedding(_HostTable):
    """A frozen embedding whose table is in host memory; `forward` returns the looked-up rows on `device`.

    Behaves like nn.Embedding for what transformers' decoders use: `embed(input_ids)`, `.weight` (the host
    table: dtype, shape), `num_embeddings`, `embedding_dim`, `padding_idx`.
    """

    def __init__(self, weight: torch.Tensor, device: torch.device | str, padding_idx: int | None = None):
        super().__init__(weight, device)
        self.num_embeddings, self.embedding_dim = self.weight.shape
        self.padding_idx = padding_idx

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to("cpu").reshape(-1)
        # The rows go to a pinned buffer when the result goes to a GPU, so the copy can be non_blocking; the
        # caching host allocator keeps that buffer until the copy has read it.
        rows = torch.empty((ids.numel(), self.embedding_dim), dtype=self.weight.dtype,
                           pin_memory=self.device.type == "cuda")
        torch.index_select(self.weight, 0, ids, out=rows)
        return rows.view(*input_ids.shape, self.embedding_dim).to(self.device, non_blocking=True)

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}, dtype={self.weight.dtype}, to={self.device}"


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _refusal(model: nn.Module, embed: nn.Module, allow_cpu: bool) -> str | None:
    if isinstance(embed, HostEmbedding):
        return "the input embeddings are already in host memory"
    if type(embed) is not nn.Embedding:
        return f"the input embeddings are a {type(embed).__name__}, not a plain nn.Embedding"
    weight = embed.weight
    if weight.requires_grad:
        return "the input embedding is trained (requires_grad), and its table must stay a parameter"
    if embed.max_norm is not None:
        return "the input embedding renormalizes its table in place (max_norm)"
    get_output = getattr(model, "get_output_embeddings", None)
    out_weight = getattr(get_output() if get_output is not None else None, "weight", None)
    if isinstance(out_weight, torch.Tensor) and out_weight.device.type != "meta" \
            and weight.device.type != "meta" and _shares_storage(out_weight, weight):
        return "the input embedding is tied to the output embedding (same storage), which needs it on the GPU"
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return "the config ties the input and output embeddings (tie_word_embeddings)"
    if weight.device.type == "meta":
        return "the input embedding is on the meta device (not loaded)"
    if weight.device.type == "cpu" and not allow_cpu:
        return "the input embedding is already on the CPU (nothing to gain)"
    return None


def move_embeddings_to_host(model: nn.Module, *, allow_cpu: bool = False) -> str | None:
    """Replace the model's input embedding by a HostEmbedding whose result goes to the table's current device.

    Returns None when moved; otherwise changes nothing and returns why. `allow_cpu` moves even a table that is
    on the CPU (no memory gained, same code path: for tests on machines without a GPU).
    """
    embed = model.get_input_embeddings()
    reason = _refusal(model, embed, allow_cpu)
    if reason is not None:
        return reason
    host = HostEmbedding(embed.weight, embed.weight.device, embed.padding_idx)
    host.train(embed.training)
    _adopt_hooks(host, embed)
    model.set_input_embeddings(host)
    return None


def restore_embeddings(model: nn.Module) -> None:
    """Put an nn.Embedding with the host table's values back on the recorded device (a no-op without a
    HostEmbedding). The table is frozen, as it was before the move."""
    host = model.get_input_embeddings()
    if not isinstance(host, HostEmbedding):
        return
    embed = nn.Embedding(host.num_embeddings, host.embedding_dim, host.padding_idx, device="meta",
                         dtype=host.weight.dtype)
    embed.weight = nn.Parameter(host.weight.to(host.device), requires_grad=False)
    embed.train(host.training)
    _adopt_hooks(embed, host)
    model.set_input_embeddings(embed)


class HostHead(_HostTable):
    """A frozen, bias-free output projection (the LM head) whose weight is in host memory. The training loss
    (train/loss.decoder_loss_sum) copies the weight to the hidden states' device for the loss's forward and
    backward only: the copy is freed once the loss's backward has run, so the backward through the decoder layers,
    where a step's memory peaks, runs without it. `forward(x)` (for callers that want logits) does the same."""

    def __init__(self, weight: torch.Tensor, device: torch.device | str):
        super().__init__(weight, device)
        self.out_features, self.in_features = self.weight.shape
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight.to(x.device, non_blocking=True))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, to={self.device}"


def move_head_to_host(model: nn.Module, *, allow_cpu: bool = False) -> str | None:
    """Replace the model's output projection by a HostHead (weight in pinned host memory, copied in for the loss).
    Returns None when moved, else why not (and changes nothing): tied to the input embedding, trained, with a
    bias, not a plain nn.Linear, or already on the CPU (unless `allow_cpu`, for tests)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, HostHead):
        return "the output projection is already in host memory"
    if type(head) is not nn.Linear:
        return f"the output projection is a {type(head).__name__}, not a plain nn.Linear"
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return "the config ties the input and output embeddings (tie_word_embeddings)"
    if head.weight.requires_grad:
        return "the output projection is trained (requires_grad)"
    if head.bias is not None:
        return "the output projection has a bias"
    if head.weight.device.type == "meta":
        return "the output projection is on the meta device (not loaded)"
    if head.weight.device.type == "cpu" and not allow_cpu:
        return "the output projection is already on the CPU (nothing to gain)"
    host = HostHead(head.weight, head.weight.device)
    _adopt_hooks(host, head)
    model.set_output_embeddings(host)
    return None


def restore_head(model: nn.Module) -> None:
    """Put an nn.Linear with the host weight's values back on the recorded device (no-op without a HostHead)."""
    host = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(host, HostHead):
        return
    head = nn.Linear(host.in_features, host.out_features, bias=False, device="meta", dtype=host.weight.dtype)
    head.weight = nn.Parameter(host.weight.to(host.device), requires_grad=False)
    _adopt_hooks(head, host)
    model.set_output_embeddings(head)


def host_embedding_bytes(model: nn.Module) -> int:
    """Bytes of tables held in host memory by the model's HostEmbeddings and HostHeads (0 if none)."""
    tables = {id(m.weight): m.weight for m in model.modules() if isinstance(m, (HostEmbedding, HostHead))}
    return sum(t.numel() * t.element_size() for t in tables.values())
