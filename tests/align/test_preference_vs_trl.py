"""The preference objectives (train/preference.py) against TRL's own implementation, on a tiny random Llama.

DPO and IPO: a one-step TRL DPOTrainer on a PEFT model and qlorakit's LoRA model holding the same weights take
the same batch (TRL's collated one: chosen rows, then rejected rows, with a completion mask); the loss and every
LoRA gradient agree within 1e-5 relative (fp32 on a CPU; the two sum log-probs in different orders). ORPO and
SimPO: TRL's ORPO and CPO trainers' loss functions (odds_ratio_loss, cpo_loss with loss_type simpo) applied to
qlorakit's log-probs give qlorakit's loss and gradients; their per-sequence average log-probs (get_batch_logps)
equal qlorakit's. The reference log-probs with the adapters switched off equal a separate copy of the base's.
"""

from __future__ import annotations

import copy
import tempfile
from types import SimpleNamespace

import pytest
import torch

from qlorakit.model.lora_inject import inject_lora
from qlorakit.nn.lora import LoraLinear
from qlorakit.train.preference import PreferenceSettings, preference_loss, reference_logps, sequence_logps

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

RTOL = 1e-5
PAIRS = [{"prompt": "What is two plus two?", "chosen": " Four.", "rejected": " Paris."},
         {"prompt": "The capital of France?", "chosen": " Paris.", "rejected": " Four, the quick fox."},
         {"prompt": "Give three tips for staying healthy.", "chosen": " Eat well, sleep well.", "rejected": " No."}]


def _tokenizer():
    from tiny_tokenizers import make_chatml_tokenizer

    return make_chatml_tokenizer()


def _base(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=128,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # larger than the default init, so log-probs differ between sequences
    return model


def _ours_like(peft_model, base) -> torch.nn.Module:
    """qlorakit's LoRA on a copy of `base`, holding peft_model's adapter weights."""
    ours = copy.deepcopy(base).requires_grad_(False)  # a frozen base, as qlorakit loads one
    inject_lora(ours, "all-linear", r=4, alpha=8, dropout=0.0)
    theirs = {n.replace("base_model.model.", "").replace(".default", ""): p
              for n, p in peft_model.named_parameters() if "lora_" in n and ".default." in n}
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_" in n:
                p.copy_(theirs[n])
    assert sum("lora_" in n for n, _ in ours.named_parameters()) == len(theirs) > 0
    return ours


def _grads(model) -> dict[str, torch.Tensor]:
    return {n.replace("base_model.model.", "").replace(".default", ""): p.grad.clone()
            for n, p in model.named_parameters() if p.requires_grad and p.grad is not None and ".ref." not in n}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= RTOL * max(float(b.abs().max()), 1e-30))


def _trl_dpo(loss_type: str, beta: float):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok = _tokenizer()
    base = _base(tok)
    # TRL adds the adapter itself (a new adapter: its reference is the base with the adapter off; given a PEFT
    # model it would copy that adapter into a frozen reference); random B, so policy and reference differ
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(PAIRS), max_steps=1,
                     report_to=[], use_cpu=True, beta=beta, loss_type=loss_type, save_strategy="no", bf16=False)
    trainer = DPOTrainer(model=copy.deepcopy(base), args=args, train_dataset=Dataset.from_list(PAIRS),
                         processing_class=tok, peft_config=lora)
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, trainer.model, base, batch


@pytest.mark.parametrize("objective,beta", [("dpo", 0.1), ("ipo", 0.3)])
def test_dpo_and_ipo_equal_trl_dpo_trainer(objective, beta):
    trainer, peft_model, base, batch = _trl_dpo({"dpo": "sigmoid", "ipo": "ipo"}[objective], beta)
    ours = _ours_like(peft_model, base)
    trainer.model.train()
    theirs_loss = trainer.compute_loss(trainer.model, batch)
    theirs_loss.backward()
    theirs = _grads(peft_model)

    ours.train()
    policy = sequence_logps(ours, batch)
    reference = reference_logps(ours, batch)
    loss, metrics = preference_loss(PreferenceSettings(objective, beta=beta), policy, reference)
    loss.backward()
    mine = _grads(ours)

    assert abs(float(loss) - float(theirs_loss)) <= RTOL * abs(float(theirs_loss))
    assert mine.keys() == theirs.keys() and len(mine) == 2 * 7 * 2
    for name in mine:
        assert _close(mine[name], theirs[name]), name
    assert any(g.abs().sum() > 0 for g in mine.values())
    # the policy differs from the base (nonzero B), so the rewards are not all zero
    assert metrics["rewards/margins"] != 0.0 and set(metrics) >= {
        "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
        "logps/rejected"}


def test_reference_logps_equal_a_separate_copy_of_the_base():
    trainer, peft_model, base, batch = _trl_dpo("sigmoid", 0.1)
    ours = _ours_like(peft_model, base)
    switched_off = reference_logps(ours, batch)
    separate = sequence_logps(copy.deepcopy(base).requires_grad_(False).eval(), batch)
    on = sequence_logps(ours, batch)
    assert torch.equal(switched_off.chosen, separate.chosen) and torch.equal(switched_off.rejected, separate.rejected)
    assert not torch.equal(on.chosen, separate.chosen)  # the adapters are back on afterwards
    assert all(not m.__dict__.get("_off") for m in ours.modules() if isinstance(m, LoraLinear))


def _orpo_cpo_self(beta: float, **more):
    """What TRL's loss methods read from their trainer."""
    fields = {"beta": beta, "accelerator": SimpleNamespace(device=torch.device("cpu")), "alpha": 0.0,
              "label_smoothing": 0.0, **more}
    return SimpleNamespace(**fields)


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_orpo_and_simpo_equal_trl_loss_functions(objective):
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    _, peft_model, base, batch = _trl_dpo("sigmoid", 0.1)
    beta, gamma, eps = (0.25, 0.5, 0.0) if objective == "orpo" else (2.0, 0.7, 0.1)
    settings = PreferenceSettings(objective, beta=beta, simpo_gamma=gamma, label_smoothing=eps)
    runs = {}
    for who in ("ours", "trl"):
        model = _ours_like(peft_model, base)
        model.train()
        logps = sequence_logps(model, batch, with_nll=objective == "orpo")
        c_avg, r_avg = logps.chosen / logps.chosen_tokens, logps.rejected / logps.rejected_tokens
        if who == "ours":
            loss, _ = preference_loss(settings, logps)
        elif objective == "orpo":
            losses, *_ = ORPOTrainer.odds_ratio_loss(_orpo_cpo_self(beta), c_avg, r_avg)
            loss = logps.nll - losses.mean()
        else:
            ns = _orpo_cpo_self(beta, loss_type="simpo", simpo_gamma=gamma, label_smoothing=eps)
            losses, *_ = CPOTrainer.cpo_loss(ns, c_avg, r_avg)
            loss = losses.mean()
        loss.backward()
        runs[who] = (float(loss), _grads(model))
    assert abs(runs["ours"][0] - runs["trl"][0]) <= RTOL * abs(runs["trl"][0])
    for name, g in runs["trl"][1].items():
        assert _close(runs["ours"][1][name], g), name


def test_average_logps_and_nll_equal_trl_get_batch_logps():
    from trl.experimental.orpo import ORPOTrainer

    _, peft_model, base, batch = _trl_dpo("sigmoid", 0.1)
    model = _ours_like(peft_model, base)
    with torch.no_grad():
        logps = sequence_logps(model, batch, with_nll=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    theirs = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    n = len(PAIRS)
    mine = torch.cat([logps.chosen / logps.chosen_tokens, logps.rejected / logps.rejected_tokens])
    assert _close(mine, theirs)
    nll_labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)[:n, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:n, :-1].reshape(-1, logits.shape[-1]), nll_labels.reshape(-1))
    assert _close(logps.nll, nll)


def test_a_starting_adapter_as_the_reference_equals_trl_with_a_peft_model():
    """Given a PEFT model (an adapter to continue, e.g. an SFT one), TRL copies it into a frozen 'ref' adapter
    that is the reference; qlorakit's training.reference_adapter does the same with a snapshot of the adapter.
    At the first step policy and reference agree (loss log 2), and the gradients still equal TRL's."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from qlorakit.nn.lora import adapter_snapshot

    tok = _tokenizer()
    base = _base(tok)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False))
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(PAIRS), max_steps=1,
                     report_to=[], use_cpu=True, beta=0.1, loss_type="sigmoid", save_strategy="no", bf16=False)
    trainer = DPOTrainer(model=peft_model, args=args, train_dataset=Dataset.from_list(PAIRS), processing_class=tok)
    assert "ref" in trainer.model.peft_config  # TRL's own reference adapter
    batch = next(iter(trainer.get_train_dataloader()))
    ours = _ours_like(trainer.model, base)
    trainer.model.train()
    theirs_loss = trainer.compute_loss(trainer.model, batch)
    theirs_loss.backward()
    theirs = _grads(trainer.model)

    ours.train()
    settings = PreferenceSettings("dpo", beta=0.1)
    snapshot = adapter_snapshot(ours)
    loss, metrics = preference_loss(settings, sequence_logps(ours, batch), reference_logps(ours, batch, snapshot))
    loss.backward()
    mine = _grads(ours)
    assert abs(float(loss) - float(theirs_loss)) <= RTOL * float(theirs_loss)
    assert abs(float(loss) - 0.6931471805599453) < 1e-6 and metrics["rewards/margins"] == 0.0
    assert mine.keys() == theirs.keys() and all(_close(mine[n], theirs[n]) for n in mine)
    # the reference swaps the snapshot in and gives the layers their own tensors back
    assert all(m.lora_A.weight.data_ptr() != snapshot[name][0].data_ptr()
               for name, m in ours.named_modules() if isinstance(m, LoraLinear))
