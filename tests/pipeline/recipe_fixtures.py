"""A tiny project for recipe tests: a tiny random Llama folder, HaluEval-like and plain-text data."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import save_tiny_model


def make_project(root: Path) -> Path:
    """``root/tiny`` (model + tokenizer), ``root/data/qa.jsonl`` (40 rows), ``root/data/text.jsonl``."""
    save_tiny_model(root / "tiny", max_position_embeddings=512)
    data = root / "data"
    data.mkdir()
    rows = [
        {
            "knowledge": f"Item {i} is red.",
            "question": f"What year is item {i} from?",
            "right_answer": str(1900 + 7 * i),
            "hallucinated_answer": f"{2100 - 3 * i}, in red",
        }
        for i in range(40)
    ]
    (data / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = [{"text": f"The quick brown fox {i} jumps over the lazy dog.\n"} for i in range(20)]
    (data / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text))
    pairs = [{"prompt": f"How do I do bad thing {i}?", "response": ["I can't help.", f"Do step {i}."]}
             for i in range(40)]  # fmt: skip
    (data / "harm.json").write_text(json.dumps(pairs))
    normal = [{"instruction": f"Name colour {i}.", "input": "", "output": f"Colour {i}."} for i in range(40)]
    (data / "normal.json").write_text(json.dumps(normal))
    return root


TINY_RECIPE: dict[str, Any] = {
    "name": "tiny",
    "base": "MODEL",
    "out": "OUT",
    "train": {"steps": 2, "batch_size": 2, "lora_r": 2, "lora_alpha": 4, "max_length": 128, "lr": 0.01},
    "adapters": {
        "expert": {"method": "sft", "data": "${data}/qa.jsonl", "format": "paired-expert"},
        "anti_expert": {"method": "sft", "data": "${data}/qa.jsonl", "format": "paired-anti"},
    },
    "operations": {
        "ext_sub": {"op": "ext_sub", "inputs": ["expert", "anti_expert"], "lam": 1.0},
        "subtract": {"op": "subtract", "inputs": ["expert", "anti_expert"], "lam": 0.5},
    },
    "eval": {"batch_size": 4},
    "evaluations": {
        "halueval": {
            "metric": "halueval",
            "protocol": "loss",
            "split": "eval",  # the adapters train on the `train` side
            "limit": 6,
            "data": "${data}/qa.jsonl",
        },
        "perplexity": {"metric": "perplexity", "data": "${data}/text.jsonl", "window": 64, "stride": 64},
    },
    "sweeps": {
        "ext_sub": {
            "operation": "ext_sub",
            "lams": [0.5, 1.0],
            "deficiency": {"evaluation": "halueval", "key": "accuracy"},
            "utility": {"evaluation": "perplexity", "key": "perplexity"},
            "bootstrap": 20,
        }
    },
    "report": False,
}


def tiny_recipe(project: Path, out: Path, **sections: Any) -> dict[str, Any]:
    """:data:`TINY_RECIPE` on ``project``'s model and data, writing to ``out``; sections replaced
    (a value of None deletes the section)."""
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe |= {"base": str(project / "tiny"), "out": str(out), "data_dir": str(project / "data")}
    for key, value in sections.items():
        if value is None:
            recipe.pop(key, None)
        else:
            recipe[key] = value
    return recipe


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
