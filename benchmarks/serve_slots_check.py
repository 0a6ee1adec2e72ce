"""GPU check of continuous batching's slot cache (infer/slots.py): the CUDA-graph step against the eager step and
against each prompt decoded alone, and the time of one slot step either way.

    python3 benchmarks/serve_slots_check.py [--out DIR] [--layers 4] [--slots 8] [--new 24]

A random-init Llama-3-8B-shaped model cut to --layers layers, in NF4 with LoRA r=16 on every linear (random B, so
the adapter changes the tokens), bf16. Prompts of different lengths join the slots at different steps, one pair
prefilled together (left-padded), one prompt taking a slot another has left, as
tests/pipeline/test_pipeline_decode.py does on the CPU. Free-running greedy tokens of a random-init model sit
on near-ties that one rounding flips, so the checks (PASS/FAIL) compare logits on the same inputs (teacher-forced on
the eager run's tokens): the eager slot step against one full forward of each prompt and its tokens (no cache,
batch 1), and the graph step against the eager step, each within bf16's rounding (compare(): 2^-4 of the largest
logit; bit-identity reported), no token flipped where the reference's top-2 margin exceeds the difference; and the
graph was used (not the eager fallback). How many prompts' free-running tokens equal the prompt decoded alone is
reported. Then the median time of the slot step, graph and eager, with every slot busy. `--device cpu` runs the
eager half only (a harness check; no graph, no timing that means anything). JSON: OUT/serve_slots_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import Run, sh  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
            max_position_embeddings=512, num_hidden_layers=2, rms_norm_eps=1e-5)


# bf16 keeps 8 significant bits: a logit computed by two kernel orders may differ by a few of its last places
# (~2^-8 relative) per rounding that differs, through every layer; a wrong cache row, position or mask moves the
# logits by their own size. The bound: 2^-4 of the largest logit's magnitude (fp32: 2^-12).
def compare(name: str, got: dict[int, list[torch.Tensor]], want: dict[int, torch.Tensor], bound: float, run: Run,
            record: dict, key: str) -> None:
    """Check per prompt that the logits rows `got` (teacher-forced on `tokens`) equal `want` [steps, vocab] within
    the bound, and that the argmax agrees wherever want's top-2 margin exceeds the difference."""
    worst, exact, flips, firm = 0.0, True, 0, 0
    for i, rows in got.items():
        a, b = torch.stack(rows), want[i]
        diff = (a - b).abs().amax(dim=-1)
        scale = float(b.abs().max())
        worst = max(worst, float(diff.max()) / max(scale, 1e-30))
        exact &= bool(torch.equal(a, b))
        top2 = b.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * diff
        firm += int(clear.sum())
        flips += int((a.argmax(-1) != b.argmax(-1))[clear].sum())
    record[key] = {"max_rel_diff": worst, "bit_identical": exact, "clear_tokens": firm, "clear_token_flips": flips,
                   "bound": bound}
    run.check(f"{name}: logits within {bound:g} of the largest, no clear-margin token flipped",
              worst <= bound and flips == 0,
              f"max |diff| / max |logit| = {worst:.2e}, bit-identical: {exact}, {flips} of {firm} clear tokens flipped")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--new", type=int, default=24)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = ap.parse_args()
    from qlorakit.infer.decode import decode_tokens
    from qlorakit.infer.slots import SlotDecoder, greedy_joins
    from qlorakit.model.lora_inject import inject_lora
    from qlorakit.model.synthetic import synthetic_llama

    cuda = args.device == "cuda"
    bound = 2.0 ** -4 if cuda else 2.0 ** -12  # bf16 on the GPU, fp32 on the CPU
    torch.manual_seed(0)
    net = synthetic_llama("llama3-8b" if cuda else TINY, layers=args.layers if cuda else None, device=args.device,
                          compute_dtype=torch.bfloat16 if cuda else torch.float32)
    inject_lora(net, "all-linear", r=16, alpha=16, dropout=0.0,
                adapter_dtype=torch.bfloat16 if cuda else torch.float32)
    for name, p in net.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    net.eval()
    vocab = net.config.vocab_size
    lengths = [37, 9, 120, 15, 64]
    prompts = [torch.randint(4, vocab, (n,)).tolist() for n in lengths]
    joins = {0: [(0, 2)], 3: [(1, 0), (2, 5)], 7: [(3, 1)], args.new + 1: [(4, 2)]}
    run = Run()
    alone = [torch.stack(list(decode_tokens(net, torch.tensor([p], device=args.device), None, max_new_tokens=args.new,
                                            eos_ids=[-5], pad_id=0, graphs=False)), dim=1)[0].tolist()
             for p in prompts]
    width = 256
    eager_logits: dict[int, list[torch.Tensor]] = {}
    eager = greedy_joins(SlotDecoder(net, slots=args.slots, width=width, graphs=False), prompts, joins, args.new,
                         record=eager_logits)
    same = sum(eager[i] == alone[i] for i in range(len(prompts)))
    record: dict = {"args": vars(args), "lengths": lengths, "prompts_equal_to_alone": same}
    if cuda:  # bf16: a batched, left-padded prefill may round otherwise than batch 1 and flip a near-tie
        print(f"eager slot step: {same}/{len(prompts)} prompts' tokens equal the prompt decoded alone (free-running)")
    else:  # fp32 on the CPU: exact, as tests/pipeline/test_pipeline_decode.py asserts
        run.check("eager slot step: each prompt's tokens equal it decoded alone", same == len(prompts))
    # Teacher-forced against one full forward of each prompt + the eager tokens (no cache, batch 1): what the slot
    # cache computes, within the rounding of the compute dtype.
    with torch.no_grad():
        full = {i: net(input_ids=torch.tensor([prompts[i] + eager[i][:-1]], device=args.device),
                       use_cache=False).logits[0, len(prompts[i]) - 1:].float().cpu() for i in range(len(prompts))}
    compare("eager slot step vs a full forward", eager_logits, full, bound, run, record, "vs_full_forward")
    if cuda:
        dec = SlotDecoder(net, slots=args.slots, width=width, graphs=True)
        graph_logits: dict[int, list[torch.Tensor]] = {}
        greedy_joins(dec, prompts, joins, args.new, forced=eager, record=graph_logits)
        compare("graph slot step vs the eager step", graph_logits, {i: torch.stack(v) for i, v in eager_logits.items()},
                bound, run, record, "graph_vs_eager")
        run.check("the step ran as a CUDA graph", getattr(dec, "graph", None) is not None,
                  f"graph attribute: {type(getattr(dec, 'graph', None)).__name__}")
        for mode in (False, True):
            d = SlotDecoder(net, slots=args.slots, width=width, graphs=mode)
            d.prefill(list(range(args.slots)), [prompts[i % len(prompts)][:32] for i in range(args.slots)])
            ids = torch.zeros(args.slots, dtype=torch.long, device="cuda")
            times = []
            for _ in range(30):
                torch.cuda.synchronize()
                t = time.perf_counter()
                d.step(ids)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            record[f"step_ms_{'graph' if mode else 'eager'}"] = round(sorted(times[5:])[12] * 1e3, 3)
        record["device"] = torch.cuda.get_device_name(0)
    record.update(checks=run.checks, commit=sh("git", "rev-parse", "HEAD"))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "serve_slots_check.json").write_text(json.dumps(record, indent=1) + "\n")
    if cuda:
        print(f"slot step, {args.slots} slots, {args.layers} layers: graph {record['step_ms_graph']} ms, eager "
              f"{record['step_ms_eager']} ms")
    print(f"{len(run.checks) - len(run.failed)}/{len(run.checks)} checks passed")
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
