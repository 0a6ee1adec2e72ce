"""Export a (merged) Llama-family Hugging Face folder to one GGUF file, with its byte-level BPE tokenizer.

Supported: LlamaForCausalLM and MistralForCausalLM (GGUF architecture `llama`, as llama.cpp stores Mistral; q/k
rows reordered into the interleaved rotary layout GGUF readers expect) and Qwen2ForCausalLM (`qwen2`, with q/k/v
biases, no reordering). Other architectures, RoPE scaling and non-byte-level tokenizers (sentencepiece) are refused.

Tensor types: 1-D tensors (norms, biases) are F32; matrices are F16, BF16 or Q8_0 (Q8_0 needs rows that are a
multiple of 32 values; other matrices are written F16). Tensors are read one at a time and spooled to a
temporary file by gguf.GGUFWriter, so memory stays near one tensor (plus the writer's 256 MB spool buffer).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from ..errors import CheckpointFormatError, QlorakitError
from ..model.checkpoint_files import find_checkpoint_files

GGUF_TYPES = ("f16", "bf16", "q8_0")
_ARCHES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _tensor_names() -> tuple[dict[str, object], dict[str, object]]:
    """(top-level HF name -> gguf.MODEL_TENSOR, per-block HF suffix -> gguf.MODEL_TENSOR)."""
    from gguf import MODEL_TENSOR as T

    top = {"model.embed_tokens": T.TOKEN_EMBD, "model.norm": T.OUTPUT_NORM, "lm_head": T.OUTPUT}
    block = {
        "input_layernorm": T.ATTN_NORM, "self_attn.q_proj": T.ATTN_Q, "self_attn.k_proj": T.ATTN_K,
        "self_attn.v_proj": T.ATTN_V, "self_attn.o_proj": T.ATTN_OUT, "post_attention_layernorm": T.FFN_NORM,
        "mlp.gate_proj": T.FFN_GATE, "mlp.up_proj": T.FFN_UP, "mlp.down_proj": T.FFN_DOWN,
    }
    return top, block


def gguf_tensor_name(hf_name: str) -> str | None:
    """The GGUF name of a Llama-family tensor (e.g. blk.0.attn_q.weight); None for buffers GGUF does not store."""
    from gguf import TENSOR_NAMES

    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    module, _, kind = hf_name.rpartition(".")
    top, block = _tensor_names()
    if module in top:
        return f"{TENSOR_NAMES[top[module]]}.{kind}"
    m = _BLOCK.match(module)
    if m and m.group(2) in block:
        return f"{TENSOR_NAMES[block[m.group(2)]].format(bid=int(m.group(1)))}.{kind}"
    raise CheckpointFormatError(f"{hf_name}: no GGUF name for this tensor; allowed: Llama-family tensors "
                                "(embed_tokens, layers.N.{self_attn,mlp,*_layernorm}, norm, lm_head)")


def rotary_interleave(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from the HF rotary layout (per head: first halves, then second halves) to GGUF's interleaved one.

    weight: [n_heads * head_dim, ...] (a weight or a bias); returns the same shape and dtype.
    """
    head_dim = weight.shape[0] // n_heads
    rest = weight.shape[1:]
    return weight.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(weight.shape)


def check_exportable(model_dir: str | Path) -> tuple[dict, str]:
    """(config.json, GGUF architecture) of a folder export_gguf can write; QlorakitError naming what is not."""
    folder = Path(model_dir)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    arch_name = (config.get("architectures") or ["?"])[0]
    arch = _ARCHES.get(arch_name)
    if arch is None:
        raise QlorakitError(f"{folder}: GGUF export supports {', '.join(_ARCHES)}; this model is {arch_name}")
    if "quantization_config" in config:
        raise QlorakitError(f"{folder}: is a 4-bit checkpoint; export GGUF from a 16-bit merge (without --quantize)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise QlorakitError(f"{folder}: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not exported; "
                            "allowed: plain RoPE")
    _byte_level_bpe(folder)
    return config, arch


def export_gguf(model_dir: str | Path, out_file: str | Path, gguf_type: str = "f16", progress: bool = True) -> Path:
    """Write `model_dir` (a 16/32-bit Llama/Mistral/Qwen2 folder with tokenizer.json) to `out_file` as GGUF."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise QlorakitError(f"GGUF type {gguf_type!r} is not allowed; use one of {', '.join(GGUF_TYPES)}")
    folder = Path(model_dir)
    config, arch = check_exportable(folder)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    n_heads, n_kv = int(config["num_attention_heads"]), int(config.get("num_key_value_heads")
                                                            or config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // n_heads)
    rope_theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))

    qtype = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    out = Path(out_file)
    writer = gguf.GGUFWriter(str(out), arch, use_temp_file=True)
    writer.add_name(folder.name)
    writer.add_file_type(int(ftype))
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(config["vocab_size"]))
    _add_tokenizer(writer, folder, arch, int(config["vocab_size"]))

    checkpoint = find_checkpoint_files(folder)
    with tqdm(total=checkpoint.num_tensors(), desc="gguf", unit="tensor", file=sys.stderr,
              disable=not progress) as bar:
        for path, names in checkpoint.keys.items():
            with safe_open(str(path), framework="pt") as f:
                for hf_name in names:
                    target = gguf_tensor_name(hf_name)
                    bar.update()
                    if target is None:
                        continue
                    t = f.get_tensor(hf_name)
                    if arch == "llama" and ".attn_q." in target:
                        t = rotary_interleave(t, n_heads)
                    elif arch == "llama" and ".attn_k." in target:
                        t = rotary_interleave(t, n_kv)
                    data, raw = _encode(t, qtype)
                    writer.add_tensor(target, data, raw_dtype=raw)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
    finally:
        writer.close()
    return out


def _encode(t: torch.Tensor, qtype) -> tuple[np.ndarray, object]:
    """(numpy data, GGML type) of one tensor: 1-D as F32, matrices as `qtype` (Q8_0 only for rows of 32k)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if t.dim() == 1:
        return t.float().numpy(), Q.F32
    if qtype == Q.BF16:
        # GGUF BF16 is the raw bfloat16 bits: written as uint8 bytes, [rows, 2 * cols].
        bits = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
        return bits.reshape(t.shape[0], -1), Q.BF16
    if qtype == Q.Q8_0 and t.shape[-1] % 32 == 0:
        return gguf.quants.quantize(t.float().numpy(), Q.Q8_0), Q.Q8_0
    return t.to(torch.float16).numpy(), Q.F16


def _byte_level_bpe(folder: Path) -> dict:
    """The parsed tokenizer.json of `folder`, after checking it is a byte-level BPE (GPT-2 style) tokenizer."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CheckpointFormatError(f"{folder}: no tokenizer.json; GGUF export needs the fast tokenizer file")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in json.dumps(
            tok.get("pre_tokenizer")):
        raise QlorakitError(f"{path}: only byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen2, SmolLM) are "
                            "exported to GGUF; sentencepiece-style tokenizers are not supported")
    return tok


def _add_tokenizer(writer, folder: Path, arch: str, vocab_size: int) -> None:
    """Byte-level BPE vocabulary, merges, token types, special ids and chat template, under llama.cpp's keys."""
    from gguf import TokenType

    tok = _byte_level_bpe(folder)
    model = tok["model"]
    ids: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    special: set[int] = set()
    added: set[int] = set()
    for entry in tok.get("added_tokens", []):
        ids[entry["id"]] = entry["content"]
        (special if entry.get("special") else added).add(entry["id"])
    size = max(vocab_size, max(ids) + 1)
    tokens = [ids.get(i, f"[PAD{i}]") for i in range(size)]
    types = [TokenType.CONTROL if i in special else TokenType.USER_DEFINED if i in added
             else TokenType.UNUSED if i not in ids else TokenType.NORMAL for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if arch == "qwen2" else "default")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * size)  # BPE ranks merges, not tokens
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)

    cfg_path = folder / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    by_text = {t: i for i, t in enumerate(tokens)}
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("pad_token", writer.add_pad_token_id), ("unk_token", writer.add_unk_token_id)):
        value = tcfg.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value in by_text:
            add(by_text[value])
    writer.add_add_bos_token(bool(tcfg.get("add_bos_token", False)))
    template = tcfg.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, str):
        writer.add_chat_template(template)
