"""What a model's tensors weigh, from config.json alone: the architecture is built on the meta device (no weights
are read or allocated) and every byte count below is what qlorakit allocates for it, to the byte.

- A 4-bit linear (Linear4bit) of n = out x in weights holds the packed codes, uint8 [(n + 1) // 2], and its
  constants: the fp32 [16] codebook (`quant_map`) plus, without double quantization, fp32 absmax
  [ceil(n / blocksize)]; with it, uint8 absmax [nb = ceil(n / blocksize)], fp32 nested absmax
  [ceil(nb / nested_blocksize)], the fp32 [256] nested codebook and the fp32 nested offset (quant/state.py).
- Everything else the loader places (embeddings, LM head, norms, the biases of 4-bit linears) is in the compute
  dtype, a tied head counted once; buffers (RoPE tables) keep the dtype the architecture builds them in.
- A LoRA adapter on a linear [out, in] is A [r, in] and B [out, r] in the adapter dtype; its gradient the same.
- AdamW states (optim/storage.py): one arena per placement, one slot per trainable tensor in parameter order,
  each part of a slot on a 256-byte boundary; 32-bit: two fp32 [n]; 8-bit (tensors of >= min_8bit_size
  elements): two uint8 [n] and two fp32 [ceil(n / block_size)]. Slot.make itself computes the layout here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from torch import nn

from ..model.lora_inject import select_targets
from ..model.targets import TargetLinear, find_target_linears, load_causal_lm_config, meta_causal_lm
from ..optim.adamw import AdamW
from ..optim.factory import OPTIMIZERS
from ..optim.buckets import host_bytes, staging_bytes
from ..optim.offload import plan_chunks
from ..optim.storage import Slot
from ..quant.blockwise import num_blocks
from ..quant.codebooks import code_4bit, dynamic_map
from ..quant.double_quant import DEFAULT_NESTED_BLOCKSIZE

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_FUSED_GROUPS = {"attention": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def packed_bytes(numel: int) -> int:
    """Bytes of a weight's packed 4-bit codes: two codes per byte, an odd count padded by one code."""
    return (numel + 1) // 2


def quant_constant_bytes(numel: int, blocksize: int, double_quant: bool, quant_type: str = "nf4",
                         nested_blocksize: int = DEFAULT_NESTED_BLOCKSIZE) -> int:
    """Bytes of one 4-bit weight's quantization constants, as quantize_4bit allocates them (module docstring)."""
    code = code_4bit(quant_type).numel() * 4
    nb = num_blocks(numel, blocksize)
    if not double_quant:
        return code + nb * 4
    return code + nb + num_blocks(nb, nested_blocksize) * 4 + dynamic_map().numel() * 4 + 4


def _adamw_default(name: str) -> int:
    return int(inspect.signature(AdamW.__init__).parameters[name].default)


@dataclass(frozen=True)
class OptimizerBytes:
    """Bytes of AdamW state arenas by placement ('device', 'managed' = paged, 'pinned' = offloaded host), and the
    offloaded states' two GPU staging buffers."""

    device: int
    managed: int
    pinned: int
    staging: int


def optimizer_bytes(param_numels: list[int], optimizer: str) -> OptimizerBytes:
    """State bytes of optimizer `optimizer` (an OPTIMIZERS name) over trainable tensors of `param_numels` elements
    (in parameter order), placed as on a CUDA device: paged / offloaded optimizers keep the states of tensors of
    at least min_paged_size elements in unified / pinned host memory, the others in ordinary GPU memory."""
    bits, paged = OPTIMIZERS[optimizer]
    if paged == "host":  # in_backward.HostAdamW: fp32 master copy + 2 moments in pinned host memory, 2 GPU slots
        return OptimizerBytes(0, 0, host_bytes(param_numels, 1), staging_bytes(param_numels, 1))
    min_8bit, block, min_paged = (_adamw_default(k) for k in ("min_8bit_size", "block_size", "min_paged_size"))
    slots: dict[str, list[Slot]] = {"device": [], "managed": [], "pinned": []}
    for n in param_numels:
        where = "device"
        if paged and n >= min_paged:
            where = "pinned" if paged == "pinned" else "managed"
        offset = sum(s.nbytes for s in slots[where])
        slots[where].append(Slot.make(n, bits == 8 and n >= min_8bit, block, offset))
    nbytes = {k: max(1, sum(s.nbytes for s in v)) if v else 0 for k, v in slots.items()}
    chunks = plan_chunks(slots["pinned"])[0]
    staging = 2 * max((end - start for start, end in chunks), default=1) if slots["pinned"] else 0
    return OptimizerBytes(nbytes["device"], nbytes["managed"], nbytes["pinned"], staging)


class ModelShape:
    """The architecture of a model folder's config.json, built on the meta device, and the byte counts of its parts.

    Holds the meta model (for LoRA target selection with the same rule inject_lora uses), the linears that load
    in 4 bits (model/targets.py), the transformer config, and whether each decoder layer is a Llama layer that
    the fused block paths can take (model/fused_blocks.py) when all its projections carry LoRA.
    """

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        config = load_causal_lm_config(self.model_dir)
        self.prequantized = getattr(config, "quantization_config", None) is not None
        if self.prequantized:
            del config.quantization_config  # qlorakit reads the 4-bit tensors itself (model/loader.py)
        self.config = config
        self.model: nn.Module = meta_causal_lm(config, str(self.model_dir / "config.json"))
        self.architecture = type(self.model).__name__
        self.targets: dict[str, TargetLinear] = find_target_linears(self.model)
        self._order = {name: i for i, (name, _) in enumerate(self.model.named_modules())}
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model
        self.layers = list(getattr(decoder, "layers", []))
        c = config
        self.hidden = int(c.hidden_size)
        self.intermediate = int(getattr(c, "intermediate_size", 4 * self.hidden))
        self.heads = int(c.num_attention_heads)
        self.kv_heads = int(getattr(c, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(c, "head_dim", None) or self.hidden // self.heads)
        self.vocab = int(c.vocab_size)

    @property
    def num_layers(self) -> int:
        return len(self.layers) or int(getattr(self.config, "num_hidden_layers", 0))

    def linear(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def adapted(self, target_modules: str | list[str]) -> list[str]:
        """Module paths inject_lora adapts, in registration order (the optimizer's parameter order)."""
        return sorted(select_targets(self.model, target_modules), key=self._order.__getitem__)

    def target_weight_numels(self) -> list[int]:
        return [t.in_features * t.out_features for t in self.targets.values()]

    def weights_4bit_bytes(self) -> int:
        return sum(packed_bytes(n) for n in self.target_weight_numels())

    def constant_bytes(self, blocksize: int, double_quant: bool, quant_type: str) -> int:
        return sum(quant_constant_bytes(n, blocksize, double_quant, quant_type) for n in self.target_weight_numels())

    def other_weight_bytes(self, compute_bytes: int) -> int:
        """Every parameter but the 4-bit linears' weights, in the compute dtype (a tied head once), plus buffers."""
        skip = {t.weight_key for t in self.targets.values()}
        total = 0
        for name, p in self.model.named_parameters():
            if name not in skip:
                total += p.numel() * (compute_bytes if p.is_floating_point() else p.element_size())
        return total + sum(b.numel() * b.element_size() for b in self.model.buffers())

    def movable_embedding_bytes(self, compute_bytes: int) -> int:
        """Bytes of the input embedding table that training.embeddings_on_host moves to host memory: 0 when it is
        tied to the output embedding (model/host_embedding.py refuses those)."""
        if getattr(self.config, "tie_word_embeddings", False):
            return 0
        embed = self.model.get_input_embeddings()
        return embed.weight.numel() * compute_bytes if isinstance(embed, nn.Embedding) else 0

    def movable_head_bytes(self, compute_bytes: int) -> int:
        """Bytes of the LM head that training.head_on_host keeps in host memory between losses: 0 when tied
        or not a bias-free nn.Linear (model/host_embedding.move_head_to_host refuses those)."""
        if getattr(self.config, "tie_word_embeddings", False):
            return 0
        head = self.model.get_output_embeddings()
        if type(head) is not nn.Linear or head.bias is not None:
            return 0
        return head.weight.numel() * compute_bytes

    @cached_property
    def all_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def largest_tensor(self) -> int:
        return max((p.numel() for p in self.model.parameters()), default=0)

    def lora_numels(self, adapted: list[str], rank: int) -> list[int]:
        """Element counts of the trainable tensors, in parameter order: A [r, in] then B [out, r] per linear."""
        out = []
        for name in adapted:
            m = self.linear(name)
            out += [rank * m.in_features, m.out_features * rank]
        return out

    def fusable_layers(self, adapted: list[str]) -> dict[str, int]:
        """How many decoder layers the fused paths take: 'attention' (Q/K/V group), 'mlp' (gate/up group + down),
        'layer' (both, so the whole layer and its norms run fused). Llama layers with SiLU only."""
        try:
            from transformers.models.llama.modeling_llama import LlamaDecoderLayer
        except ImportError:
            return {"attention": 0, "mlp": 0, "layer": 0}
        chosen = set(adapted)
        counts = {"attention": 0, "mlp": 0, "layer": 0}
        silu = getattr(self.config, "hidden_act", "silu") == "silu"
        prefix = {id(m): n for n, m in self.model.named_modules()}
        for layer in self.layers:
            if type(layer) is not LlamaDecoderLayer:
                continue
            base = prefix[id(layer)]
            attn = all(f"{base}.self_attn.{p}" in chosen for p in _FUSED_GROUPS["attention"])
            mlp = silu and all(f"{base}.mlp.{p}" in chosen for p in _FUSED_GROUPS["mlp"])
            counts["attention"] += attn
            counts["mlp"] += mlp
            counts["layer"] += attn and mlp
        return counts

    def workspace_elements(self, adapted: list[str], fused: bool) -> int:
        """Elements of the dequantize workspace (kernels/triton_matmul.py): the largest dense weight a 4-bit
        matmul dequantizes at once, the stacked Q/K/V or gate/up weight when those run as fused groups."""
        largest = max(self.target_weight_numels(), default=0)
        if fused:
            counts = self.fusable_layers(adapted)
            kv = self.kv_heads * self.head_dim
            if counts["attention"]:
                largest = max(largest, (self.heads * self.head_dim + 2 * kv) * self.hidden)
            if counts["mlp"]:
                largest = max(largest, 2 * self.intermediate * self.hidden)
        return largest


def dtype_bytes(name: str) -> int:
    return DTYPE_BYTES[name]
