"""Settings of one evaluation run (STYLE.md rule 7): the CLI flags and recipe keys are these fields."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["DEFAULT_REFUSAL", "EvalConfig"]

# refusal-logprob's sentence: the opening of a typical assistant refusal.
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."


class EvalConfig(BaseModel):
    """What to evaluate, on what, and how. Fields a metric does not use are ignored by it
    (and still recorded, so a result file says exactly how it was made)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Base model: alias, .gguf file, local folder or hub id.")
    adapter: Path | None = Field(None, description="PEFT adapter folder applied on the base model.")
    merge: bool = Field(False, description="Merge a LoRA adapter into the weights before scoring (faster).")
    data: str | None = Field(None, description="Data spec (file or hub id); default: the metric's own.")
    fields: dict[str, str] = Field(default_factory=dict, description="Field mapping NAME -> column.")
    split: Literal["eval", "all"] | None = Field(
        None, description="Keep only the `eval` side of the project-wide prompt split, or all rows."
    )
    allow_overlap: bool = Field(
        False,
        description="Evaluate even items whose prompt the adapter (or model) was trained on, or whose "
        "training data cannot be checked; each is a warning kept in the result instead of an error.",
    )
    limit: int | None = Field(
        None,
        ge=1,
        description="Keep N items (after the split): a seeded subsample, the items whose hash of "
        "(seed, item) is smallest, in file order; the same N items for every model.",
    )
    head: int | None = Field(
        None, ge=1, description="Keep the first N items (after the split) instead of a subsample."
    )
    seed: int = Field(0, description="Seeds sampling (greedy decoding ignores it).")
    batch_size: int = Field(16, ge=1, description="Rows per forward pass.")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Model dtype (an unmerged LoRA takes it too). bfloat16 generates ≈ 2× faster on GPUs "
        "and CPUs with bf16 instructions, with other greedy answers (docs/EVALUATION.md).",
    )
    device: str = Field("auto", description="`auto` (CUDA if present), `cpu`, `cuda`, `cuda:1`…")
    max_new_tokens: int = Field(128, ge=1, description="Generation length limit.")
    chat: bool | None = Field(
        None, description="Wrap prompts in the tokenizer's chat template; default: the metric's own."
    )
    system: str | None = Field(None, description="System prompt for chat-templated prompts.")
    template: str | None = Field(
        None,
        description="pairs, answer-nll, refusal-logprob: the training template the answers are scored in "
        "(chat, alpaca, tulu, question-answer, plain); default: chat (plain with --no-chat).",
    )
    refusal: str = Field(
        DEFAULT_REFUSAL,
        min_length=1,
        description="refusal-logprob: the refusal sentence whose log-probability is read.",
    )
    judge: str | None = Field(None, description="Judge spec; default: the metric's own.")
    judge_options: dict[str, Any] = Field(default_factory=dict, description="Options for the judge.")
    reference: str | None = Field(
        None,
        description="utility: the original model. Fluency is measured under it (default: the base with "
        "the adapter off); required without an adapter, then also the model similarity compares with. "
        "pairs, answer-nll, refusal-logprob: the model the differences (forget, retain, selectivity, "
        "ΔNLL) are taken against (default: the base with the adapter off).",
    )
    protocol: Literal["judge", "loss"] = Field(
        "judge", description="halueval: HaluEval's Yes/No judgement, or Ext-Sub's answer-loss comparison."
    )
    window: int = Field(1024, ge=2, description="perplexity: tokens per window.")
    stride: int = Field(512, ge=1, description="perplexity: tokens the window advances by.")
    share_prefix: bool = Field(True, description="Compute a prompt prefix common to all rows once.")
    pair_max_word_ratio: float | None = Field(
        None, ge=1, description="halueval: keep pairs whose longer answer has ≤ this × the shorter's words."
    )
    pair_strip_period: bool = Field(False, description="halueval: drop a final period from both answers.")

    @model_validator(mode="after")
    def _stride_within_window(self) -> EvalConfig:
        if self.limit is not None and self.head is not None:
            raise ValueError("give limit (a seeded subsample) or head (the first rows), not both")
        if self.stride > self.window:
            raise ValueError(f"stride ({self.stride}) must not exceed window ({self.window})")
        return self

    def settings(self) -> dict[str, Any]:
        """Everything that can change a result, as plain JSON (the cache key and the record)."""
        return self.model_dump(mode="json")
