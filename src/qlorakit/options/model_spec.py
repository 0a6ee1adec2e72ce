"""`qlorakit eval --model [NAME=]FOLDER[:PRECISION][+ADAPTER]`: one model to evaluate, in one string.

FOLDER is what `--model` takes elsewhere (a local folder, 'default', a hub id in the local cache). PRECISION is
`16bit` (the folder as stored, computed in the inference dtype), `nf4` or `fp4` (quantized while loading);
left out, the folder runs as stored (a 4-bit folder in its stored 4 bits) unless ADAPTER records the quantization
it was trained on, which is then rebuilt. ADAPTER is a PEFT adapter folder; one per model (several adapters are
several models, each its own column). NAME heads the model's column; left out, the whole string does.

    base=default                      the bundled model in 16 bits
    nf4=default:nf4                   the same, NF4 while loading
    tuned=default+runs/quickstart/adapter   NF4 as the adapter was trained on it, plus the adapter
    merged/                           a merged 16-bit folder, named 'merged/'
"""

from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("16bit", "nf4", "fp4")
SYNTAX = "[NAME=]FOLDER[:16bit|nf4|fp4][+ADAPTER]"


@dataclass(frozen=True)
class ModelSpec:
    """One `--model` value, parsed. precision None: as stored, or as the adapter was trained."""

    name: str
    folder: str
    precision: str | None
    adapter: str | None
    text: str

    @property
    def model(self) -> str:
        """The spec without its NAME=: FOLDER[:PRECISION][+ADAPTER]."""
        return self.folder + (f":{self.precision}" if self.precision else "") + (f"+{self.adapter}" if self.adapter
                                                                                  else "")


def parse_model_spec(text: str) -> ModelSpec:
    """The parts of `text`; ValueError (one line naming it and the syntax) when it does not parse."""
    def bad(why: str) -> ValueError:
        return ValueError(f"--model {text!r}: {why}; expected {SYNTAX}, e.g. --model tuned=default+runs/x/adapter")

    name, sep, rest = text.partition("=")
    if not sep or "/" in name:  # a '=' inside a path is not a name
        name, rest = "", text
    elif not name:
        raise bad("the name before '=' is empty")
    base, plus, adapter = rest.partition("+")
    if plus and not adapter:
        raise bad("nothing after '+'")
    if "+" in adapter:
        raise bad("one adapter per model (give each adapter its own --model to compare them)")
    folder, colon, precision = base.rpartition(":")
    if not colon:
        folder, precision = base, ""
    elif precision not in PRECISIONS:
        raise bad(f"unknown precision {precision!r} (allowed: {', '.join(PRECISIONS)})")
    if not folder:
        raise bad("no model folder")
    return ModelSpec(name or text, folder, precision or None, adapter or None, text)


def parse_model_specs(texts: list[str]) -> list[ModelSpec]:
    """Every `--model` value parsed; ValueError for one that does not parse or a name given twice."""
    specs = [parse_model_spec(t) for t in texts]
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"--model {spec.text!r}: the name {spec.name!r} is taken by --model {seen[spec.name]!r}; "
                             "give each model its own NAME=")
        seen[spec.name] = spec.text
    return specs
