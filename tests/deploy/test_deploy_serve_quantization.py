"""`qlorakit serve` builds the base the way its adapters were trained on it (their qlorakit record), as `generate`
does: an FP4 / blocksize-128 adapter is served on an FP4 / blocksize-128 base, with the same greedy reply as
`qlorakit generate`; adapters trained on differently quantized bases are refused, naming both."""

from __future__ import annotations

import pytest
from deploy_helpers import make_adapter

from qlorakit import cli
from qlorakit.errors import AdapterMismatchError
from qlorakit.infer.serve import AdapterServer
from qlorakit.nn.linear4bit import Linear4bit

FP4_128 = {"load_in_4bit": True, "quant_type": "fp4", "blocksize": 128, "double_quant": False,
           "compute_dtype": "float32"}
PROMPT = "What is two plus two?"


@pytest.fixture(scope="module")
def fp4_adapter(tiny_base, tmp_path_factory):
    return make_adapter(tiny_base, tmp_path_factory.mktemp("adapter-fp4") / "adapter", seed=3,
                        quantization=FP4_128)


def test_an_fp4_blocksize_128_adapter_is_served_on_the_base_it_was_trained_on(tiny_base, fp4_adapter, capsys):
    app = AdapterServer(str(tiny_base), {"fp4": fp4_adapter}, device="cpu", progress=False)
    linears = [m for m in app.net.modules() if isinstance(m, Linear4bit)]
    assert linears and all((m.quant_type, m.blocksize) == ("fp4", 128) for m in linears)
    assert all(getattr(m, "nested_blocksize", None) is None for m in linears)  # no double quantization
    served = app.generate("fp4", PROMPT, chat_history=None, chat=False, max_tokens=6, temperature=0.0,
                          top_p=1.0)[0]
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(tiny_base), "--adapter", str(fp4_adapter), "--prompt", PROMPT,
                     "--max-new-tokens", "6", "--device", "cpu", "--no-chat-template"]) == 0
    assert served == capsys.readouterr().out.removesuffix("\n") and served


def test_adapters_of_differently_quantized_bases_are_refused_naming_both(tiny_base, adapter, fp4_adapter,
                                                                           tmp_path):
    nf4 = make_adapter(tiny_base, tmp_path / "nf4", seed=4,
                       quantization={"quant_type": "nf4", "blocksize": 64, "double_quant": True})
    with pytest.raises(AdapterMismatchError, match="adapters 'fp4' and 'nf4' were trained on differently "
                                                   "quantized bases \\(fp4, blocksize 128, no double") as err:
        AdapterServer(str(tiny_base), {"fp4": fp4_adapter, "nf4": nf4}, device="cpu", progress=False)
    assert "\n" not in str(err.value)
    # an adapter saved without a record goes with any one base
    app = AdapterServer(str(tiny_base), {"fp4": fp4_adapter, "plain": adapter}, device="cpu", progress=False)
    assert {m.quant_type for m in app.net.modules() if isinstance(m, Linear4bit)} == {"fp4"}
