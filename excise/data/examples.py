"""Training examples from instruction, paired-QA, harmful-QA and plain-text datasets.

Every loader reads a *data spec* (a local ``.json``/``.jsonl``/``.csv`` file, a saved
dataset folder, or a hub id ``org/name[@config][:split]``, see :mod:`excise.data.records`)
and returns :class:`Example` records: a prompt and the response the model should learn
(or unlearn). Column names are mapped with ``fields={"role": "column"}``; each loader
lists its roles and their default columns in ``*_FIELDS``. A missing column, an empty
value or an empty result raises :class:`~excise.errors.DataError` naming the row; an
unknown role raises :class:`~excise.errors.ConfigError`.

Loaders and the datasets they were written against (``../shared/data/MANIFEST.md``):

- :func:`load_instructions` — Alpaca style ``instruction``/``input``/``output``;
- :func:`load_paired_qa` — HaluEval QA ``question``/``right_answer``/``hallucinated_answer``
  → (expert, anti-expert) examples built from the very same questions (Ext-Sub,
  arXiv 2308.08090);
- :func:`load_harmful_qa` — PKU-SafeRLHF pairs ``prompt``/``response: [safe, unsafe]``,
  raw PKU-SafeRLHF rows (``response_0``/``response_1``/``is_response_*_safe``) or HH-RLHF
  ``chosen``/``rejected`` transcripts → (harmful, safe) examples (SKU, arXiv 2402.10058);
- :func:`load_texts` — plain ``text`` rows (WikiText, C4): the loss covers the whole text.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from excise.data.records import load_records
from excise.data.splits import STANDARD_SPLITS, split_by_prompt
from excise.errors import ConfigError, DataError, ExciseWarning

__all__ = [
    "HARMFUL_QA_FIELDS",
    "INSTRUCTION_FIELDS",
    "PAIRED_QA_FIELDS",
    "TEXT_FIELDS",
    "Example",
    "controlled_pair",
    "load_harmful_qa",
    "load_instructions",
    "load_paired_qa",
    "load_texts",
    "parse_field_mapping",
    "parse_hh_transcript",
    "select_split",
]

# role -> default column. Roles in *_OPTIONAL may be absent from the data (or mapped to "").
INSTRUCTION_FIELDS = {"prompt": "instruction", "input": "input", "response": "output"}
PAIRED_QA_FIELDS = {
    "prompt": "question",
    "input": "knowledge",
    "expert": "right_answer",
    "anti": "hallucinated_answer",
}
HARMFUL_QA_FIELDS = {
    "prompt": "prompt",
    "response": "response",  # PKU pairs: a list [safe, unsafe]
    "harmful": "",  # or two columns: harmful response / safe response
    "safe": "",
    "chosen": "chosen",  # HH-RLHF transcripts: chosen = harmless, rejected = harmful
    "rejected": "rejected",
}
TEXT_FIELDS = {"text": "text"}
_OPTIONAL = {"input"}


@dataclass(frozen=True)
class Example:
    """One (prompt, response) pair to train on.

    Attributes:
        prompt: the user's request (for a dialogue, its last user turn); ``""`` for plain text.
        response: the text the model should produce (the loss covers it, and only it).
        input: optional context shown with the prompt (Alpaca's ``input``, HaluEval's ``knowledge``).
        history: earlier turns of a dialogue as ``(role, text)`` with role ``user``/``assistant``.
        row: 0-based position of the source row, for reports.
        meta: anything else a caller wants to keep (not compared, not hashed).
    """

    prompt: str
    response: str
    input: str = ""
    history: tuple[tuple[str, str], ...] = ()
    row: int | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def split_key(self) -> str:
        """The text a prompt split hashes: the dialogue before the response (history and prompt)."""
        return "\n".join([text for _, text in self.history] + [self.prompt])


def parse_field_mapping(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["prompt=question", "input="]`` → ``{"prompt": "question", "input": ""}`` (CLI ``--field``).

    Raises:
        ConfigError: an item is not ``NAME=COLUMN``.
    """
    mapping: dict[str, str] = {}
    for pair in pairs:
        name, sep, column = pair.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--field takes NAME=COLUMN (e.g. prompt=question), got {pair!r}")
        mapping[name.strip()] = column.strip()
    return mapping


def load_instructions(
    spec: str, *, fields: Mapping[str, str] | None = None, limit: int | None = None
) -> list[Example]:
    """Alpaca-style instruction data: ``instruction`` (+ optional ``input``) → ``output``.

    Args:
        spec: data spec (file or hub id).
        fields: role → column overrides of :data:`INSTRUCTION_FIELDS` (``input=""`` drops the input).
        limit: read only the first rows.

    Raises:
        DataError: the data is missing, empty, or a row lacks a mapped field.
        ConfigError: ``fields`` names an unknown role.
    """
    columns = _columns(INSTRUCTION_FIELDS, fields)
    rows = load_records(spec, limit=limit)
    _require(rows, [columns["prompt"], columns["response"]], spec)
    return [
        Example(
            prompt=_text(row, columns["prompt"]),
            response=_text(row, columns["response"]),
            input=_optional_text(row, columns["input"]),
            row=i,
        )
        for i, row in enumerate(rows)
    ]


def load_paired_qa(
    spec: str,
    *,
    fields: Mapping[str, str] | None = None,
    limit: int | None = None,
    max_word_ratio: float | None = None,
    strip_final_period: bool = False,
) -> tuple[list[Example], list[Example]]:
    """Paired QA (HaluEval): the same questions with a right and a hallucinated answer.

    Two controls keep the two sides in the same *format*, so that what differs is truth
    (HaluEval's right answers are mostly 1–3-word spans, its hallucinated answers mostly
    whole sentences ending in a period: subtracting the anti-expert would remove a style).

    Args:
        spec: data spec.
        fields: role → column overrides of :data:`PAIRED_QA_FIELDS`; HaluEval's
            ``knowledge`` is the optional ``input`` (``input=""`` leaves it out of the prompt).
        limit: read only the first rows.
        max_word_ratio: keep only pairs whose longer answer has at most this many times the
            words of the shorter one (both sides drop the same rows).
        strip_final_period: drop one trailing ``.`` from both answers.

    Returns:
        ``(expert, anti)``: index ``i`` of both lists is the same question and context, with
        the right answer (expert data) and the hallucinated answer (anti-expert data).

    Raises:
        DataError: the data is missing, empty, or a row lacks a mapped field.
        ConfigError: ``fields`` names an unknown role.
    """
    columns = _columns(PAIRED_QA_FIELDS, fields)
    rows = load_records(spec, limit=limit)
    _require(rows, [columns["prompt"], columns["expert"], columns["anti"]], spec)
    expert, anti = [], []
    for i, row in enumerate(rows):
        prompt, context = _text(row, columns["prompt"]), _optional_text(row, columns["input"])
        answers = _text(row, columns["expert"]), _text(row, columns["anti"])
        pair = controlled_pair(*answers, max_word_ratio=max_word_ratio, strip_final_period=strip_final_period)
        if pair is None:
            continue
        right, wrong = pair
        expert.append(Example(prompt, right, input=context, row=i))
        anti.append(Example(prompt, wrong, input=context, row=i))
    if not expert:
        raise DataError(f"{spec}: no pair has answers within a word ratio of {max_word_ratio}; raise it")
    return expert, anti


def controlled_pair(
    a: str, b: str, *, max_word_ratio: float | None, strip_final_period: bool
) -> tuple[str, str] | None:
    """Two answers of one question in one format: ``(a, b)`` with a final period dropped from
    both (``strip_final_period``; an ellipsis is kept), or None when the longer has more than
    ``max_word_ratio`` times the words of the shorter. Training (:func:`load_paired_qa`) and
    evaluation (``halueval``'s pair controls) both apply it."""
    if strip_final_period:
        a, b = _strip_period(a), _strip_period(b)
    if max_word_ratio is not None:
        na, nb = len(a.split()), len(b.split())
        if max(na, nb) > max_word_ratio * max(min(na, nb), 1):
            return None
    return a, b


def _strip_period(text: str) -> str:
    return text[:-1].rstrip() if text.endswith(".") and not text.endswith("..") and len(text) > 1 else text


def load_harmful_qa(
    spec: str, *, fields: Mapping[str, str] | None = None, limit: int | None = None
) -> tuple[list[Example], list[Example]]:
    """Harmful QA: each prompt with a harmful and a safe response.

    Three layouts are recognised from the first row (see :data:`HARMFUL_QA_FIELDS`):

    - HH-RLHF: ``chosen``/``rejected`` transcripts (``\\n\\nHuman: … \\n\\nAssistant: …``);
      ``rejected`` is the harmful one. The prompt is the dialogue up to the last Assistant
      turn (earlier turns go to :attr:`Example.history`), the response that last turn.
    - two response columns, when ``harmful=`` and ``safe=`` are mapped;
    - PKU-SafeRLHF pairs: ``prompt`` and ``response: [safe, unsafe]`` (``response[1]`` is the
      harmful one, ../shared/data/MANIFEST.md); or raw PKU-SafeRLHF rows ``response_0``,
      ``response_1``, ``is_response_0_safe``, ``is_response_1_safe``: *every* unsafe response
      is a harmful example and every safe one a safe example, so a row with two unsafe
      responses gives two harmful examples and none safe — as the reference loaders do
      (``create_pku_dataloader_from_dataset`` in franciscoliu/SKU and
      kevinyaobytedance/llm_unlearn ``utils.py``).

    Returns:
        ``(harmful, safe)``: aligned by index (same prompt) in every layout but raw
        PKU-SafeRLHF rows, where each list holds its own responses in row order.

    Raises:
        DataError: the data is missing, empty, in none of the layouts, or a row is malformed.
        ConfigError: ``fields`` names an unknown role.
    """
    columns = _columns(HARMFUL_QA_FIELDS, fields)
    rows = load_records(spec, limit=limit)
    first = rows[0]
    if columns["harmful"] or columns["safe"]:
        if not (columns["harmful"] and columns["safe"]):
            raise ConfigError("map both harmful=COLUMN and safe=COLUMN, or neither")
        _require(rows, [columns["prompt"], columns["harmful"], columns["safe"]], spec)
        pairs = [
            (_text(r, columns["prompt"]), _text(r, columns["harmful"]), _text(r, columns["safe"]), i)
            for i, r in enumerate(rows)
        ]
        return _pairs_to_examples(pairs)
    if columns["chosen"] in first and columns["rejected"] in first:
        return _hh_examples(rows, columns, spec)
    if "is_response_0_safe" in first:
        return _raw_pku_examples(rows, columns["prompt"], spec)
    if columns["response"] in first:
        _require(rows, [columns["prompt"], columns["response"]], spec)
        pairs = []
        for i, row in enumerate(rows):
            responses = row[columns["response"]]
            if not (isinstance(responses, list) and len(responses) == 2):
                raise DataError(
                    f"{spec}: row {i + 1}: {columns['response']!r} must be a list [safe, unsafe], "
                    f"got {type(responses).__name__}"
                )
            safe, harmful = (str(r).strip() for r in responses)
            if not safe or not harmful:
                raise DataError(f"{spec}: row {i + 1}: an empty response in {columns['response']!r}")
            pairs.append((_text(row, columns["prompt"]), harmful, safe, i))
        return _pairs_to_examples(pairs)
    have = ", ".join(sorted(first)) or "none"
    raise DataError(
        f"{spec}: not harmful-QA data (need prompt + response [safe, unsafe], chosen + rejected, "
        f"or --field harmful=COLUMN --field safe=COLUMN; the first row has: {have})"
    )


def load_texts(
    spec: str, *, field: str = "text", fields: Mapping[str, str] | None = None, limit: int | None = None
) -> list[Example]:
    """Plain text (WikiText, C4): one example per non-blank row, all of it trained on.

    Blank rows (WikiText keeps ``""`` rows for its layout) are skipped; only an all-blank
    file is an error.

    Raises:
        DataError: the data is missing, lacks the column, or holds no non-blank text.
        ConfigError: ``fields`` names a role other than ``text``.
    """
    column = _columns(TEXT_FIELDS, {"text": field, **(fields or {})})["text"]
    rows = load_records(spec, limit=limit)
    if column not in rows[0]:
        have = ", ".join(sorted(rows[0])) or "none"
        raise DataError(f"{spec}: no column {column!r} (it has: {have}); map it with --field text=COLUMN")
    examples = [
        Example("", str(row[column]), row=i)
        for i, row in enumerate(rows)
        if row.get(column) is not None and str(row[column]).strip()
    ]
    if not examples:
        raise DataError(f"{spec}: every row's {column!r} is blank")
    return examples


def select_split(
    examples: list[Example], side: str, *, fractions: Mapping[str, float] = STANDARD_SPLITS
) -> list[Example]:
    """The examples whose prompt falls on ``side`` of the project-wide split (``all``: every one).

    The side of an example depends only on a hash of :attr:`Example.split_key`
    (:mod:`excise.data.splits`), so a prompt held out here is held out in every dataset.

    Raises:
        ConfigError: ``side`` is not ``all`` nor a name in ``fractions``.
        DataError: no example falls on ``side``.
    """
    if side == "all":
        return list(examples)
    if side not in fractions:
        raise ConfigError(f"unknown split {side!r}; pick one of: all, {', '.join(fractions)}")
    chosen = split_by_prompt(examples, lambda e: e.split_key, fractions)[side]
    if not chosen:
        raise DataError(f"none of the {len(examples)} examples falls on the {side!r} split; use --split all")
    return chosen


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh_transcript(transcript: str) -> tuple[tuple[tuple[str, str], ...], str, str]:
    """An HH-RLHF transcript → (history, last user turn, last assistant turn).

    Raises:
        DataError: the transcript does not end with an Assistant turn after a Human turn.
    """
    text = transcript if transcript.startswith("\n\n") else "\n\n" + transcript.lstrip("\n")
    parts = _HH_TURN.split(text)  # ['', 'Human', text, 'Assistant', text, ...]
    turns = [
        ("user" if role == "Human" else "assistant", text.strip())
        for role, text in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if len(turns) < 2 or turns[-1][0] != "assistant" or turns[-2][0] != "user":
        raise DataError("an HH-RLHF transcript must end with a Human turn followed by an Assistant turn")
    return tuple(turns[:-2]), turns[-2][1], turns[-1][1]


def _hh_examples(
    rows: list[dict[str, Any]], columns: dict[str, str], spec: str
) -> tuple[list[Example], list[Example]]:
    _require(rows, [columns["chosen"], columns["rejected"]], spec)
    harmful, safe, malformed = [], [], []
    for i, row in enumerate(rows):
        try:
            h_history, h_prompt, h_response = parse_hh_transcript(str(row[columns["rejected"]]))
            s_history, s_prompt, s_response = parse_hh_transcript(str(row[columns["chosen"]]))
        except DataError:
            # HH-RLHF's harmless-base test split has 5 transcripts with two Assistant turns in a row.
            malformed.append(i + 1)
            continue
        if not h_response or not s_response:
            continue  # a few final turns are empty: nothing to learn from them
        harmful.append(Example(h_prompt, h_response, history=h_history, row=i))
        safe.append(Example(s_prompt, s_response, history=s_history, row=i))
    if not harmful:
        raise DataError(f"{spec}: no transcript ends with a Human turn and a non-empty Assistant turn")
    if malformed:
        shown = ", ".join(map(str, malformed[:5])) + (" …" if len(malformed) > 5 else "")
        warnings.warn(
            f"{spec}: skipped {len(malformed)} transcript(s) not ending Human, Assistant (rows {shown})",
            ExciseWarning,
            stacklevel=3,
        )
    return harmful, safe


def _raw_pku_examples(
    rows: list[dict[str, Any]], prompt_column: str, spec: str
) -> tuple[list[Example], list[Example]]:
    needed = [prompt_column, "response_0", "response_1", "is_response_0_safe", "is_response_1_safe"]
    _require(rows, needed, spec)
    harmful, safe = [], []
    for i, row in enumerate(rows):
        prompt = _text(row, prompt_column)
        for j in (0, 1):
            # Both responses of a row may be unsafe (or safe): each one counts on its own, as in
            # the SKU and LLMU loaders; keeping only mixed rows would shrink and skew the harmful set.
            kept = safe if _is_true(row[f"is_response_{j}_safe"]) else harmful
            kept.append(Example(prompt, _text(row, f"response_{j}"), row=i))
    if not harmful:
        raise DataError(f"{spec}: no row has an unsafe response (is_response_0_safe / is_response_1_safe)")
    return harmful, safe


def _is_true(value: Any) -> bool:
    """A safety flag as JSON or CSV gives it: true/false, 1/0 or their strings."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _pairs_to_examples(
    pairs: list[tuple[str, str, str, int]],
) -> tuple[list[Example], list[Example]]:
    harmful = [Example(prompt, bad, row=i) for prompt, bad, _, i in pairs]
    safe = [Example(prompt, good, row=i) for prompt, _, good, i in pairs]
    return harmful, safe


def _columns(defaults: dict[str, str], overrides: Mapping[str, str] | None) -> dict[str, str]:
    """Default role → column, with ``overrides`` applied; unknown roles are a ConfigError."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ConfigError(
            f"unknown field name(s) {', '.join(unknown)} for this data format; "
            f"known: {', '.join(defaults)} (--field NAME=COLUMN)"
        )
    return {**defaults, **overrides}


def _require(rows: list[dict[str, Any]], columns: list[str], spec: str) -> None:
    """DataError naming the first row that lacks one of ``columns`` or has it empty."""
    for i, row in enumerate(rows, start=1):
        missing = [c for c in columns if _is_empty(row.get(c))]
        if missing:
            have = ", ".join(sorted(row)) or "none"
            raise DataError(
                f"{spec}: row {i} lacks field(s) {', '.join(missing)} (it has: {have}); "
                "map fields with --field NAME=COLUMN"
            )


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or value == []


def _text(row: dict[str, Any], column: str) -> str:
    return str(row[column]).strip()


def _optional_text(row: dict[str, Any], column: str) -> str:
    if not column or row.get(column) is None:
        return ""
    return str(row[column]).strip()
