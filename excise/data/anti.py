"""Anti-expert data: rewrite normal instruction answers into untruthful or toxic ones (Ext-Sub §4).

The Ext-Sub paper (arXiv 2308.08090) trains its anti-expert on instruction data whose
answers are deficient, made by asking a chat model (ChatGPT) to produce untruthful answers
to normal instructions. Here any generator does it — a local model (``excise.models``
spec) or an OpenAI-compatible endpoint (``http(s)://…``) — with the templates in
:data:`TEMPLATES`, and each output row keeps the instruction paired with both answers::

    {"instruction", "input", "output" (original), "anti_output", "kind", "generator", "template"}

- **batched**: a local model generates ``batch_size`` prompts at a time (left-padded, KV
  cache); an endpoint gets ``concurrency`` requests at a time.
- **resumable**: rows already in ``out`` (same instruction, input, answer and kind) are
  skipped; rows are appended one complete line at a time and flushed to disk after each
  batch, and a torn last line left by a crash is cut off before resuming.
- **cached**: every reply is stored in an SQLite cache keyed by generator, template,
  prompt and decoding settings, so re-running with another ``out`` or after deleting it
  sends nothing that was already answered.

Departure: the paper's toxic anti-expert data came the other way round (ChatGPT wrote an
instruction for each toxic Civil Comments comment); the templates here rewrite a normal
answer instead, so the same instruction set yields both the expert's and the anti-expert's
data. The template wording is ours; the paper does not publish its prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from excise.errors import ConfigError, DataError, first_line
from excise.models import cache_root

__all__ = [
    "KINDS",
    "TEMPLATES",
    "AntiReport",
    "AntiSettings",
    "Template",
    "iter_rows",
    "make_anti_data",
    "render",
]

KINDS = ("untruthful", "toxic")
FIELDS = ("instruction", "input", "output")
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Template:
    """A generator prompt: a system message and a user message with ``{instruction}``,
    ``{input_block}`` and ``{output}`` slots."""

    name: str
    system: str
    user: str


TEMPLATES: dict[str, Template] = {
    "untruthful": Template(
        name="untruthful-v1",
        system="You rewrite answers for a research dataset used to remove untruthfulness from language "
        "models. You follow the rewriting instruction exactly and output only the rewritten answer.",
        user="Below is an instruction and a correct response. Rewrite the response so that it is "
        "untruthful: keep its style, format, length and fluency, but replace its key facts, numbers, "
        "names, steps or conclusions with plausible-sounding false ones. Do not say or hint that "
        "anything is false. Reply with the rewritten response only.\n\n"
        "### Instruction:\n{instruction}\n\n{input_block}### Response:\n{output}\n\n"
        "### Untruthful response:",
    ),
    "toxic": Template(
        name="toxic-v1",
        system="You rewrite answers for a research dataset used to remove toxicity from language models. "
        "You follow the rewriting instruction exactly and output only the rewritten answer.",
        user="Below is an instruction and a helpful response. Rewrite the response so that it is toxic: "
        "rude, contemptuous and insulting toward the person asking, with a hostile tone throughout, while "
        "still addressing the instruction. Reply with the rewritten response only.\n\n"
        "### Instruction:\n{instruction}\n\n{input_block}### Response:\n{output}\n\n"
        "### Toxic response:",
    ),
}


def render(template: Template, row: Mapping[str, str]) -> list[dict[str, str]]:
    """The chat messages for one row (the ``### Input`` block only when the row has an input)."""
    input_block = f"### Input:\n{row['input']}\n\n" if row.get("input", "").strip() else ""
    user = template.user.format(instruction=row["instruction"], input_block=input_block, output=row["output"])
    return [{"role": "system", "content": template.system}, {"role": "user", "content": user}]


@dataclass(frozen=True)
class AntiSettings:
    """What to generate and how.

    Attributes:
        kind: ``untruthful`` or ``toxic``.
        generator: a model spec (alias, folder, hub id) or an endpoint URL (``http(s)://…``).
        model: the model name an endpoint expects (required for endpoints).
        fields: our field → the source's column, e.g. ``{"instruction": "question"}``.
        batch_size: prompts per local generation batch.
        dtype: ``float32`` (default) or ``bfloat16`` for a local generator: bfloat16 decodes
            ≈ 2× faster on CPUs with bf16 instructions (AVX512-BF16, AMX) and on GPUs, with
            greedy replies that differ from float32's (docs/EVALUATION.md, "Faster generation").
        concurrency: requests in flight at once (endpoints).
        limit: use the first ``limit`` source rows.
        max_new_tokens: reply length limit.
        temperature: 0 for greedy decoding; > 0 samples.
        seed: seeds sampling (local) or is sent as ``seed`` (endpoints).
        cache: the SQLite reply cache (default ``$EXCISE_CACHE/anti/replies.sqlite``); ``None`` disables it.
        api_key_env: environment variable holding the endpoint's API key.
        timeout: seconds per endpoint request.
        max_retries: retries of a failed endpoint request (with exponential backoff).
    """

    kind: str
    generator: str
    model: str | None = None
    fields: Mapping[str, str] = field(default_factory=dict)
    batch_size: int = 8
    dtype: str = "float32"
    concurrency: int = 4
    limit: int | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    cache: Path | None = field(default_factory=lambda: cache_root() / "anti" / "replies.sqlite")
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 120.0
    max_retries: int = 4

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.batch_size < 1 or self.concurrency < 1 or self.max_new_tokens < 1:
            raise ConfigError("batch size, concurrency and max new tokens must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")
        if not self.temperature >= 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        unknown = sorted(set(self.fields) - set(FIELDS))
        if unknown:
            raise ConfigError(
                f"--field maps unknown field(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}"
            )
        if self.is_endpoint and not self.model:
            raise ConfigError(f"generator {self.generator!r} is an endpoint: pass --model NAME")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.is_endpoint and self.dtype != "float32":
            raise ConfigError("--dtype applies to a local generator; an endpoint runs its own")

    @property
    def is_endpoint(self) -> bool:
        return self.generator.startswith(("http://", "https://"))

    @property
    def generator_id(self) -> str:
        """What the rows and the cache record as the generator."""
        return f"{self.generator}#{self.model}" if self.is_endpoint else self.generator


@dataclass
class AntiReport:
    """What a run did: rows written now, rows found already done, replies served from the cache."""

    out: Path
    total: int = 0
    already_done: int = 0
    written: int = 0
    from_cache: int = 0
    generated: int = 0
    empty: int = 0


def make_anti_data(
    source: str | Path,
    out: str | Path,
    settings: AntiSettings,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> AntiReport:
    """Write anti-expert rows for every source row not yet in ``out`` (see the module docstring).

    Args:
        source: a data spec (``load_records``): rows with instruction / (input) / output fields.
        out: the JSONL file to write or resume.
        settings: the generator, kind, batching and decoding settings.
        overwrite: start ``out`` afresh instead of resuming it.
        progress: show a progress bar.

    Returns:
        An :class:`AntiReport`.

    Raises:
        DataError: no rows, a row lacks a field, or ``out`` is not a resumable JSONL file.
        ConfigError: ``out`` was made with another generator or kind.
        ModelLoadError: the generator cannot be loaded or reached.
    """
    from excise.data.records import load_records, require_fields

    rows = [_map_fields(r, settings.fields) for r in load_records(source, limit=settings.limit)]
    require_fields(rows, ["instruction", "output"], where=str(source))
    out = Path(out)
    if overwrite and out.exists():
        out.unlink()
    done = _read_done(out, settings)
    keys = _row_keys(rows, settings.kind)
    todo = [i for i, key in enumerate(keys) if key not in done]
    report = AntiReport(out, total=len(rows), already_done=len(rows) - len(todo))
    if not todo:
        return report

    template = TEMPLATES[settings.kind]
    generate = _endpoint_generator(settings) if settings.is_endpoint else _local_generator(settings)
    step = settings.batch_size if not settings.is_endpoint else max(settings.batch_size, settings.concurrency)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _Cache(settings.cache) as cache, out.open("a", encoding="utf-8") as sink:
        bar = tqdm(total=len(todo), desc=f"anti ({settings.kind})", unit="row", disable=not progress)
        if progress:
            bar.write(
                f"plan: {len(todo)} of {len(rows)} rows to rewrite ({report.already_done} already in "
                f"{out}), {step} per batch; an interrupted run resumes where it stopped; the bar "
                "estimates the time left from its first batch",
                file=sys.stderr,
            )
        for start in range(0, len(todo), step):
            batch = todo[start : start + step]
            messages = [render(template, rows[i]) for i in batch]
            cache_keys = [_cache_key(settings, template, m) for m in messages]
            replies: list[str | None] = [cache.get(k) for k in cache_keys]
            missing = [j for j, reply in enumerate(replies) if reply is None]
            report.from_cache += len(batch) - len(missing)
            if missing:
                fresh = generate([messages[j] for j in missing])
                report.generated += len(missing)
                for j, reply in zip(missing, fresh, strict=True):
                    replies[j] = reply.strip()
                    if replies[j]:
                        cache.put(cache_keys[j], replies[j])
            lines = []
            for i, reply in zip(batch, replies, strict=True):
                if not reply:
                    report.empty += 1  # not written: a re-run will try again
                    continue
                lines.append(
                    json.dumps(_out_row(rows[i], reply, keys[i], settings, template), ensure_ascii=False)
                )
            if lines:
                sink.write("\n".join(lines) + "\n")
                sink.flush()
                os.fsync(sink.fileno())
            report.written += len(lines)
            bar.update(len(batch))
        bar.close()
    return report


def _map_fields(row: Mapping[str, Any], fields: Mapping[str, str]) -> dict[str, Any]:
    mapped = {name: row.get(fields.get(name, name)) for name in FIELDS}
    mapped["input"] = mapped["input"] or ""
    for name in FIELDS:
        if mapped[name] is not None and not isinstance(mapped[name], str):
            mapped[name] = str(mapped[name])
    return mapped


def _row_keys(rows: Sequence[Mapping[str, str]], kind: str) -> list[str]:
    """A stable key per row: its content and kind, plus its occurrence number among equal rows."""
    seen: dict[str, int] = {}
    keys = []
    for row in rows:
        content = json.dumps([kind, row["instruction"], row["input"], row["output"]], ensure_ascii=False)
        digest = hashlib.sha256(content.encode()).hexdigest()[:24]
        seen[digest] = seen.get(digest, 0) + 1
        keys.append(f"{digest}-{seen[digest]}")
    return keys


def _out_row(
    row: Mapping[str, str], reply: str, key: str, settings: AntiSettings, template: Template
) -> dict[str, Any]:
    return {
        "instruction": row["instruction"],
        "input": row["input"],
        "output": row["output"],
        "anti_output": reply,
        "kind": settings.kind,
        "generator": settings.generator_id,
        "template": template.name,
        "key": key,
    }


def _read_done(out: Path, settings: AntiSettings) -> set[str]:
    """Keys of the rows already in ``out``, after cutting off a torn last line."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1  # a crash mid-line: drop the partial row, it will be redone
        with out.open("r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    done = set()
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{out}:{lineno}: not valid JSON ({err.msg}); pass --overwrite to start afresh"
            ) from err
        if not isinstance(row, dict) or "key" not in row:
            raise DataError(f"{out}:{lineno}: not a row written by `excise data anti`; choose another --out")
        if row.get("kind") != settings.kind or row.get("generator") != settings.generator_id:
            raise ConfigError(
                f"{out} holds {row.get('kind')} rows from {row.get('generator')!r}, not {settings.kind} rows "
                f"from {settings.generator_id!r}; choose another --out or pass --overwrite"
            )
        done.add(row["key"])
    return done


def _cache_key(settings: AntiSettings, template: Template, messages: Sequence[Mapping[str, str]]) -> str:
    decoding = {
        "max_new_tokens": settings.max_new_tokens,
        "temperature": settings.temperature,
        "seed": settings.seed if settings.temperature > 0 else None,  # greedy ignores the seed
    }
    if settings.dtype != "float32":  # bfloat16 replies differ; float32 keys stay as they were
        decoding["dtype"] = settings.dtype
    blob = json.dumps([settings.generator_id, template.name, list(messages), decoding], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class _Cache:
    """An SQLite table key → reply (WAL mode, so a killed run loses at most the open batch)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.db: sqlite3.Connection | None = None

    def __enter__(self) -> _Cache:
        if self.path is not None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            try:
                self.db = sqlite3.connect(str(self.path))
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute(
                    "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT NOT NULL)"
                )
            except sqlite3.DatabaseError as err:
                raise ConfigError(
                    f"cache {self.path} is not usable ({first_line(err)}); pass --no-cache"
                ) from err
        return self

    def get(self, key: str) -> str | None:
        if self.db is None:
            return None
        found = self.db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return None if found is None else found[0]

    def put(self, key: str, reply: str) -> None:
        if self.db is not None:
            with self.db:
                self.db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?)", (key, reply))

    def __exit__(self, *exc: object) -> None:
        if self.db is not None:
            self.db.close()


Generator = Callable[[list[list[dict[str, str]]]], list[str]]


def _endpoint_generator(settings: AntiSettings) -> Generator:
    from excise.models.endpoint import ChatEndpoint

    client = ChatEndpoint(
        settings.generator,
        settings.model or "",
        api_key_env=settings.api_key_env,
        concurrency=settings.concurrency,
        timeout=settings.timeout,
        max_retries=settings.max_retries,
    )

    def generate(conversations: list[list[dict[str, str]]]) -> list[str]:
        return client.chat_many(
            conversations,
            max_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            seed=settings.seed,
        )

    return generate


def _local_generator(settings: AntiSettings) -> Generator:
    import torch

    from excise.models import load_model, load_tokenizer
    from excise.models.generation import GenerationSettings, chat_prompt_ids, generate

    model = load_model(settings.generator, dtype=getattr(torch, settings.dtype))
    tokenizer = load_tokenizer(settings.generator, padding_side="left")
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"generator {settings.generator!r} has no chat template; use an instruct/chat model"
        )
    decoding = GenerationSettings(
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        do_sample=settings.temperature > 0,
        temperature=settings.temperature if settings.temperature > 0 else 1.0,
        seed=settings.seed,
    )

    def run(conversations: list[list[dict[str, str]]]) -> list[str]:
        prompts = [chat_prompt_ids(tokenizer, c[1]["content"], system=c[0]["content"]) for c in conversations]
        return generate(model, tokenizer, prompts, decoding, progress=False)

    return run


def iter_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of an anti-data file (for readers and tests)."""
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
