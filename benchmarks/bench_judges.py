"""Judges and anti-data plumbing, side by side (docs/BENCHMARKS.md, "Judges and endpoint client").

    .venv/bin/python benchmarks/bench_judges.py [--n-texts 256] [--n-requests 64] [--latency 0.05]

1. Sentence embeddings for the offline probes: our plain-transformers MiniLM pipeline vs
   sentence-transformers' ``encode`` on the same PKU-SafeRLHF responses (same numbers, checked).
2. The OpenAI-compatible client: ``n`` requests to a local stub that answers after ``latency``
   seconds, one at a time vs ``concurrency`` 8.
3. ``excise data anti`` through that stub: a first run vs a re-run into a new file, served by
   the reply cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from excise.data.anti import AntiSettings, make_anti_data
from excise.evaluate.judges.encoder import encoder_dir, load_encoder
from excise.evaluate.judges.probe_training import PKU_PAIRS
from excise.models.endpoint import ChatEndpoint
from tests.stub_openai import StubOpenAI


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench_encoder(n: int) -> None:
    from sentence_transformers import SentenceTransformer

    texts = [row["response"][1] for row in json.loads(PKU_PAIRS.read_text())[:n]]
    ours = load_encoder()
    reference = SentenceTransformer(str(encoder_dir()), device="cpu")
    ours.embed(texts[:8]), reference.encode(texts[:8])  # warm up
    t_ours, e_ours = _timed(lambda: ours.embed(texts, batch_size=64))
    t_ref, e_ref = _timed(lambda: reference.encode(texts, batch_size=64, normalize_embeddings=True))
    diff = float(np.abs(e_ours - e_ref).max())
    print(
        f"embed {n} texts: excise {t_ours:.2f} s ({n / t_ours:.0f}/s), sentence-transformers {t_ref:.2f} s "
        f"({n / t_ref:.0f}/s); ratio {t_ours / t_ref:.2f}; max |diff| {diff:.1e}"
    )


def bench_endpoint(n: int, latency: float) -> None:
    def slow(body):
        time.sleep(latency)
        return "ok"

    conversations = [[{"role": "user", "content": f"q{i}"}] for i in range(n)]
    with StubOpenAI(slow) as stub:
        t1, _ = _timed(lambda: ChatEndpoint(stub.url, "m", concurrency=1).chat_many(conversations))
        t8, _ = _timed(lambda: ChatEndpoint(stub.url, "m", concurrency=8).chat_many(conversations))
    print(
        f"{n} requests at {latency * 1000:.0f} ms: one at a time {t1:.2f} s, concurrency 8 {t8:.2f} s; "
        f"speed-up {t1 / t8:.1f}x"
    )


def bench_anti_cache(n: int, latency: float) -> None:
    def slow(body):
        time.sleep(latency)
        return "rewritten"

    with tempfile.TemporaryDirectory() as tmp, StubOpenAI(slow) as stub:
        source = Path(tmp) / "rows.json"
        source.write_text(
            json.dumps([{"instruction": f"task {i}", "output": f"answer {i}"} for i in range(n)])
        )
        settings = AntiSettings(kind="toxic", generator=stub.url, model="m", cache=Path(tmp) / "c.sqlite")
        first, _ = _timed(lambda: make_anti_data(source, Path(tmp) / "a.jsonl", settings, progress=False))
        again, _ = _timed(lambda: make_anti_data(source, Path(tmp) / "b.jsonl", settings, progress=False))
        requests = stub.count
    print(
        f"anti data, {n} rows at {latency * 1000:.0f} ms: first run {first:.2f} s, "
        f"cached re-run {again:.3f} s ({first / again:.0f}x); requests sent {requests}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-texts", type=int, default=256)
    parser.add_argument("--n-requests", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.05)
    args = parser.parse_args()
    import os

    print(f"load average {os.getloadavg()[0]:.1f}")
    bench_encoder(args.n_texts)
    bench_endpoint(args.n_requests, args.latency)
    bench_anti_cache(args.n_requests, args.latency)


if __name__ == "__main__":
    main()
