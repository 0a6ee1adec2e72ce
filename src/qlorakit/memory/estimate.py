"""Peak GPU memory of a training config, from config.json alone (no weights are read; no GPU is needed).

The memory model, one micro-batch of T = batch_size x max_seq_length tokens, compute dtype of d bytes:

Static (the whole run), exact to the byte (memory/shapes.py; tests compare them with a loaded model):
  4-bit weights and their quantization constants; embeddings, LM head, norms, biases and buffers in the compute
  dtype; LoRA adapters and their gradients in lora.adapter_dtype (host_adamw_32bit: adapters in the compute
  dtype, two layers' gradients in flight, master copy and states in pinned host memory); AdamW states (32-bit: 8 B per trainable
  parameter; 8-bit: 2 B + 8 B per 256 for tensors of >= 4096 elements), in ordinary GPU memory (adamw_*), CUDA
  unified memory (paged_*: torch does not count it, NVML does; it is allocated at the first step and must fit
  in free GPU memory then, optim/paged.py) or pinned host memory (offload_*: two GPU staging buffers of the
  largest 64 MiB chunk). Optimizer placement is the CUDA one (on a CPU every state is in host memory).
  The dequantize workspace: one dense copy, in the compute dtype, of the largest weight a 4-bit matmul
  dequantizes at once (the stacked gate/up weight on fused Llama layers), kept for the run (kernels/triton_matmul).

Activations (formulas, not measurements of this config):
  - with gradient checkpointing, each recomputed layer keeps its input, T x hidden x d; the layers that
    training.keep_activations_gib keeps (how many: fused_blocks.keep_plan, as the run plans it) keep all of
    their activations; without checkpointing every layer keeps all of its activations;
  - the fused layers below those that training.host_activations_gib holds (fused_blocks.keep_plan) keep their
    activations, without the gate/up output, in pinned host memory (model/offload_saved.py): on the GPU they
    leave only their saved tensors under offload_saved.MIN_BYTES, and backward holds two such layers' worth
    (the one being differentiated, the next one reloaded); none is recomputed;
  - a layer's activations: fused Llama layers, model/fused_blocks.layer_activation_bytes (with the gate/up
    output unless the plan drops it) plus o_proj's input, a contiguous copy of the attention output, d x hidden
    per token (found with saved-tensor hooks; layer_activation_bytes leaves it out); other layers (transformers'
    modules) d x (5 hidden + q + 2 kv + 4 intermediate) + 8 hidden + 4 heads bytes per token (layer input, fp32
    RMSNorm inputs and normed outputs, Q/K/V after RoPE, attention output and its copy, the log-sum-exp, gate,
    up, SiLU and product); both plus each adapted linear's x A^T, r x d per token;
  - one layer's working set in backward: the recomputed layer's activations plus the MLP backward's gradients
    d x (3 intermediate + 3 hidden) per token;
  - eager attention adds its probabilities, batch x heads x S^2 x (4 + d) bytes per layer, and two score
    tensors in the working set; sdpa and flash attention keep O(T);
  - packed batches (data.packing without flash_attention_2) carry a [batch, 1, S, S] additive mask in the
    compute dtype (train/forward.py);
  - the fused linear + cross-entropy loss (train/loss.py): one 2048-row chunk of logits, 2048 x vocab x d, its
    fp32 row losses, and 5 x T x hidden x d of hidden-state rows, copies and their gradient.

Peak: the largest of three moments, each static + what is alive then:
  forward end (loss): saved activations + mask + loss chunk + gradients if gradient_accumulation > 1 (they
  accumulate across micro-batches; with 1 they are None until backward);
  backward: saved activations + mask + working set + gradients (with accumulation 1: the larger of the last
  layer's moment, all saved activations and 1/L of the gradients, and the first layer's, all gradients);
  optimizer step: gradients (the update runs in place).
`torch_peak` is that sum: what torch.cuda.max_memory_allocated reports. `device_peak` is what NVML shows:
torch_peak x (1 + ALLOCATOR_MARGIN) for memory torch's caching allocator reserves beyond what is allocated,
plus CUDA_CONTEXT_BYTES (1.5 GiB), plus the paged optimizer states. Both constants are fitted to measured runs
(see them below); benchmarks/memory_estimate.py measures more configurations and prints estimate beside
measurement.

Not modelled: a CPU run's dense weight copies (model/lora_inject.keep_dense_copies_on_cpu), DDP/FSDP (per rank
this is the one-process number; FSDP divides the static parts by the ranks), the allocator's 512-byte rounding
per tensor, RoPE's cos/sin (one [S, head_dim] pair per micro-batch) and the data loader.

Comparisons, same activations, loss and micro-batch: 16-bit LoRA (the base linears in the compute dtype instead
of 4 bits, no workspace) and full fine-tuning as the seed document's table counts it: weights 2 B + gradients
2 B + AdamW 8 B per parameter (pure 16-bit; mixed precision with an fp32 master copy adds 4 B per parameter,
reported beside it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..config import QloraConfig
from .activations import LOSS_CHUNK_ROWS, Activations, activations
from ..optim.factory import OPTIMIZERS
from ..optim.buckets import host_bytes, staging_bytes
from .shapes import DTYPE_BYTES, ModelShape, OptimizerBytes, dtype_bytes, optimizer_bytes

GiB = 2**30
# device_peak = torch_peak x (1 + ALLOCATOR_MARGIN) + CUDA_CONTEXT_BYTES + paged states, the whole card as NVML
# shows it, for training's allocator setting (expandable segments, train/runtime.prefer_expandable_segments).
# Fitted to benchmarks/results/memory_estimate-llama3-8b-h100-expandable.json (H100, torch 2.11, CUDA 13; 21 rows,
# torch peaks 7 to 33 GiB): NVML less torch's reserved memory less the paged states was 1.29 to 1.32 GiB on every
# row (0.47 GiB the card showed before the process, 0.67 GiB CUDA context, cuBLAS and Triton modules), and reserved
# exceeded allocated by 0.5% to 7% (17% at 4 x 8192 tokens with offloaded inputs); 4% puts every row within 10%.
# The 70B row (train_step-h100-70b-host-v1.json: 36.46 GiB torch, 38.34 NVML) comes out 2% high. The older
# default allocator reserved more (7% margin, fitted to H200 runs in train_step-h200-3/-4.json); other GPUs,
# drivers and torch versions differ by some 0.1 to 0.5 GiB.
CUDA_CONTEXT_BYTES = 1331 * 2**20
ALLOCATOR_MARGIN = 0.04


@dataclass(frozen=True)
class Component:
    key: str
    label: str
    nbytes: int
    where: str  # "gpu", "gpu unified memory", "host"

    @property
    def gib(self) -> float:
        return self.nbytes / GiB


@dataclass
class Method:
    """One way to fine-tune the model, for the comparison rows. Bytes on the GPU."""

    name: str
    label: str
    weights: int  # base weights (4-bit with constants and workspace, or 16-bit), other weights, adapters
    grads_and_states: int  # gradients and optimizer states (paged ones included)
    torch_peak: int
    device_peak: int
    extra: dict = field(default_factory=dict)


@dataclass
class Estimate:
    """Peak GPU memory of one training config (see the module docstring for the model). Bytes throughout."""

    model_dir: str
    architecture: str
    summary: str
    components: list[Component]
    torch_peak: int
    peak_moment: str
    device_peak: int
    host: list[Component]
    comparisons: list[Method]
    notes: list[str]

    def component(self, key: str) -> int:
        """Bytes of the component called `key` (0 when this config has none)."""
        return next((c.nbytes for c in self.components if c.key == key), 0)

    @property
    def torch_peak_gib(self) -> float:
        return self.torch_peak / GiB

    @property
    def device_peak_gib(self) -> float:
        return self.device_peak / GiB

    def to_json(self) -> dict:
        def g(n: int) -> float:
            return round(n / GiB, 4)

        return {
            "model_dir": self.model_dir, "architecture": self.architecture, "summary": self.summary,
            "torch_peak_gib": g(self.torch_peak), "device_peak_gib": g(self.device_peak),
            "peak_moment": self.peak_moment,
            "components": {c.key: {"gib": g(c.nbytes), "bytes": c.nbytes, "where": c.where, "what": c.label}
                           for c in self.components},
            "host": {c.key: {"gib": g(c.nbytes), "bytes": c.nbytes, "what": c.label} for c in self.host},
            "comparisons": {m.name: {"what": m.label, "weights_gib": g(m.weights),
                                     "grads_and_states_gib": g(m.grads_and_states), "torch_peak_gib": g(m.torch_peak),
                                     "device_peak_gib": g(m.device_peak), **{k: g(v) for k, v in m.extra.items()}}
                            for m in self.comparisons},
            "assumptions": {"cuda_context_gib": g(CUDA_CONTEXT_BYTES), "allocator_margin": ALLOCATOR_MARGIN,
                            "loss_chunk_rows": LOSS_CHUNK_ROWS},
            "notes": self.notes,
        }

    def table(self) -> str:
        """A short aligned table, GiB with 2 decimals."""
        w = max(len(c.label) for c in [*self.components, *self.host, *self.comparisons]) + 2
        lines = [self.summary, "", f"{'GPU memory':<{w}}{'GiB':>7}  where"]
        lines += [f"{c.label:<{w}}{c.gib:>7.2f}  {c.where}" for c in self.components]
        lines.append(f"{'torch peak (' + self.peak_moment + ')':<{w}}{self.torch_peak / GiB:>7.2f}")
        lines.append(f"{'device peak (as NVML shows it)':<{w}}{self.device_peak / GiB:>7.2f}")
        lines += ["", f"{'host memory':<{w}}{'GiB':>7}"] + [f"{c.label:<{w}}{c.gib:>7.2f}" for c in self.host]
        lines += ["", f"{'compared with':<{w}}{'weights':>7}{'grads+optimizer':>17}{'torch peak':>12}"
                      f"{'device peak':>13}"]
        lines += [f"{m.label:<{w}}{m.weights / GiB:>7.2f}{m.grads_and_states / GiB:>17.2f}"
                  f"{m.torch_peak / GiB:>12.2f}{m.device_peak / GiB:>13.2f}" for m in self.comparisons]
        return "\n".join(lines + [""] + [f"note: {n}" for n in self.notes])


def _peaks(static: int, grads: int, act: Activations, accumulation: int, layers: int,
           loss_only: int = 0) -> tuple[int, str]:
    """(torch peak bytes, which moment) from the static bytes, the gradients and the activations; `loss_only`:
    bytes on the GPU around the loss only (an LM head kept in host memory)."""
    in_forward = grads if accumulation > 1 else 0
    if accumulation > 1:
        backward = grads + act.saved
    else:
        backward = max(act.saved + grads // max(1, layers), act.saved_first + grads)
    moments = {
        "backward": static + act.mask + act.working_set + backward,
        "loss": static + in_forward + act.saved + act.mask + act.loss + loss_only,
        "optimizer step": static + grads,
    }
    moment = max(moments, key=moments.__getitem__)
    return moments[moment], moment


def device_peak(torch_peak: int, unified: int) -> int:
    """What NVML shows: torch's peak plus the allocator's reserve margin, the CUDA context, paged states."""
    return int(torch_peak * (1 + ALLOCATOR_MARGIN)) + CUDA_CONTEXT_BYTES + unified


def _optimizer_label(name: str) -> str:
    bits, paged = OPTIMIZERS[name]
    where = {True: "paged ", "pinned": "offloaded ", "host": "host ", False: ""}[paged]
    return f"{where}AdamW {bits}-bit"


def estimate_shape(cfg: QloraConfig, shape: ModelShape) -> Estimate:
    """estimate() for an already built ModelShape (suggest() re-estimates one model many times)."""
    q, lo, t = cfg.quantization, cfg.lora, cfg.training
    d = dtype_bytes(q.compute_dtype)
    adapted = shape.adapted(lo.target_modules)
    lora_numels = shape.lora_numels(adapted, lo.rank)
    # host_adamw_32bit: the GPU holds the adapters in the compute dtype and the gradients of the layers whose step
    # is in flight (taken as two layers'); master copy, moments and an accumulation sum live in pinned host memory
    host_step = OPTIMIZERS[t.optimizer][1] == "host"
    lora = sum(lora_numels) * (d if host_step else dtype_bytes(lo.adapter_dtype))
    grads = 2 * lora // max(1, shape.num_layers) if host_step else lora
    accumulation = 1 if host_step else t.gradient_accumulation
    opt = optimizer_bytes(lora_numels, t.optimizer)
    if host_step and t.gradient_accumulation > 1:  # and an fp32 gradient sum, on the host and in the GPU slots
        opt = replace(opt, pinned=host_bytes(lora_numels, t.gradient_accumulation),
                      staging=staging_bytes(lora_numels, t.gradient_accumulation))
    four_bit = _four_bit_bytes(cfg, shape, adapted)
    w4, consts, workspace = four_bit if q.load_in_4bit else (0, 0, 0)
    w16_linears = 0 if q.load_in_4bit else sum(shape.target_weight_numels()) * d
    embed_host = shape.movable_embedding_bytes(d) if t.embeddings_on_host else 0
    head_host = shape.movable_head_bytes(d) if t.head_on_host else 0  # on the GPU for the loss only
    others = shape.other_weight_bytes(d) - embed_host - head_host
    act = activations(shape, cfg, adapted)
    n, optimizer = len(shape.targets), _optimizer_label(t.optimizer)
    components = [
        Component("weights_4bit", f"4-bit weights ({q.quant_type}, {n} linears)", w4, "GPU"),
        Component("quant_constants", "quantization constants", consts, "GPU"),
        Component("linear_weights_16bit", f"16-bit linear weights ({n} linears)", w16_linears, "GPU"),
        Component("embeddings_head_norms", "embeddings, head, norms", others, "GPU"),
        Component("dequant_workspace", "dequantize workspace", workspace, "GPU"),
        Component("lora_adapters", f"LoRA adapters (r={lo.rank}, {len(adapted)} linears)", lora, "GPU"),
        Component("lora_gradients", "LoRA gradients" + (" (in flight, stepped in backward)" if host_step else ""),
                  grads, "GPU"),
        Component("optimizer_states", f"optimizer states ({optimizer})" if not OPTIMIZERS[t.optimizer][1]
                  else "optimizer states of small tensors", opt.device, "GPU"),
        Component("optimizer_states_paged", f"optimizer states ({optimizer})", opt.managed, "GPU, unified memory"),
        Component("offload_staging", "optimizer staging buffers", opt.staging, "GPU"),
        Component("saved_activations", "saved activations", act.saved, "GPU"),
        Component("attention_mask", "packed-batch attention mask", act.mask, "GPU"),
        Component("layer_working_set", "one layer's recompute + backward", act.working_set, "GPU"),
        Component("loss_chunk", "loss chunk and hidden rows", act.loss, "GPU"),
    ]
    grads_states = grads + opt.device + opt.staging
    weights = w4 + consts + workspace + w16_linears + others + lora
    torch_peak, moment = _peaks(weights + grads_states - grads, grads, act, accumulation, shape.num_layers,
                                head_host)
    peak = device_peak(torch_peak, opt.managed)
    components.append(Component("cuda_context", "CUDA context, cuBLAS, kernels", CUDA_CONTEXT_BYTES,
                                "GPU, outside torch"))
    components.append(Component("allocator_margin", f"allocator reserve ({ALLOCATOR_MARGIN:.0%} of torch peak)",
                                peak - torch_peak - CUDA_CONTEXT_BYTES - opt.managed, "GPU, torch's cache"))
    components = [c for c in components if c.nbytes or c.key in _ALWAYS]
    comparisons = []
    for name, label, base in (("qlora_nf4", f"QLoRA ({q.quant_type}, this LoRA)", sum(four_bit)),
                              ("lora_16bit", "LoRA, 16-bit base", sum(shape.target_weight_numels()) * d)):
        method_weights = base + others + lora
        method_peak = _peaks(method_weights + grads_states - grads, grads, act, accumulation,
                             shape.num_layers)[0]
        comparisons.append(Method(name, label, method_weights, grads_states + opt.managed, method_peak,
                                  device_peak(method_peak, opt.managed)))
    comparisons.append(_full_finetuning(shape, act, t.gradient_accumulation, d))
    tokens = t.batch_size * t.max_seq_length
    summary = (f"{shape.architecture}, {shape.num_layers} layers, {shape.all_parameters / 1e9:.2f}B parameters "
               f"({shape.model_dir}); {tokens:,} tokens per micro-batch ({t.batch_size} x {t.max_seq_length})")
    return Estimate(str(shape.model_dir), shape.architecture, summary, components, torch_peak, moment, peak,
                    _host(shape, opt, act, embed_host, head_host), comparisons, _notes(cfg, shape, act, opt))


_ALWAYS = {"lora_adapters", "lora_gradients", "saved_activations", "layer_working_set", "loss_chunk"}


def _four_bit_bytes(cfg: QloraConfig, shape: ModelShape, adapted: list[str]) -> tuple[int, int, int]:
    """(packed weights, quantization constants, dequantize workspace) of the base in 4 bits."""
    q = cfg.quantization
    # stacked_dequant false: the groups dequantize one weight at a time (kernels/triton_matmul workspace cap)
    fused = cfg.training.fused_blocks and cfg.training.stacked_dequant and shape.fusable_layers(adapted)["layer"] > 0
    return (shape.weights_4bit_bytes(), shape.constant_bytes(q.blocksize, q.double_quant, q.quant_type),
            shape.workspace_elements(adapted, fused) * dtype_bytes(q.compute_dtype))


def _full_finetuning(shape: ModelShape, act: Activations, accumulation: int, d: int) -> Method:
    """Every parameter trains in the compute dtype, AdamW 32-bit states in GPU memory: the seed document's
    2 + 2 + 8 bytes per parameter. `fp32_master_copy`: what mixed precision would add."""
    numels = [p.numel() for p in shape.model.parameters()]
    weights = sum(numels) * d + sum(b.numel() * b.element_size() for b in shape.model.buffers())
    grads = sum(numels) * d
    states = optimizer_bytes(numels, "adamw_32bit").device
    peak = _peaks(weights + states, grads, act, accumulation, shape.num_layers)[0]
    return Method("full_16bit", "full fine-tuning, 16-bit", weights, grads + states, peak, device_peak(peak, 0),
                  {"fp32_master_copy": sum(numels) * 4})


def _host(shape: ModelShape, opt: OptimizerBytes, act: Activations, embed_host: int,
          head_host: int) -> list[Component]:
    out = []
    if embed_host:
        out.append(Component("input_embeddings", "input embeddings, pinned", embed_host, "host"))
    if head_host:
        out.append(Component("lm_head", "LM head, pinned (on the GPU for the loss)", head_host, "host"))
    if act.host:
        out.append(Component("offloaded_activations", "activations in pinned host memory", act.host, "host"))
    if opt.pinned:
        out.append(Component("optimizer_states_pinned", "optimizer states, pinned (offloaded)", opt.pinned, "host"))
    if opt.managed:
        out.append(Component("optimizer_states_paged", "paged states, when the driver evicts them", opt.managed,
                             "host"))
    stored = str(getattr(shape.config, "dtype", None) or "bfloat16").removeprefix("torch.")
    out.append(Component("loading", f"loading: the largest tensor ({stored})",
                         shape.largest_tensor() * DTYPE_BYTES.get(stored, 2), "host"))
    return out


def _notes(cfg: QloraConfig, shape: ModelShape, act: Activations, opt: OptimizerBytes) -> list[str]:
    notes = [f"activations: {act.what}"]
    if shape.prequantized:
        notes.append(f"{shape.model_dir} holds pre-quantized 4-bit weights: their stored block size and double "
                     "quantization win over the config's, which this estimate uses")
    if opt.managed:
        notes.append("paged optimizer states live in CUDA unified memory: torch does not count them, NVML does; "
                     "they are allocated at the first step and must fit in free GPU memory then")
    if opt.pinned:
        notes.append("offloaded optimizer states live in pinned host memory and cross PCIe twice per step")
    if cfg.training.distributed == "fsdp":
        notes.append("training.distributed fsdp: this is the one-process estimate; FSDP splits the static parts "
                     "over the ranks")
    return notes
