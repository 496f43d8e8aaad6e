"""Judges and anti-data plumbing, side by side (docs/BENCHMARKS.md, "Judges and endpoint client").

    .venv/bin/python benchmarks/bench_judges.py [--n-texts 256] [--n-requests 64] [--latency 0.05]
        [--n-pairs 128] [--threads 2] [--only encoder|endpoint|anti|harm]

1. Sentence embeddings for the offline probes: our plain-transformers MiniLM pipeline vs
   sentence-transformers' ``encode`` on the same PKU-SafeRLHF responses (same numbers, checked).
2. The OpenAI-compatible client: ``n`` requests to a local stub that answers after ``latency``
   seconds, one at a time vs ``concurrency`` 8.
3. ``excise data anti`` through that stub: a first run vs a re-run into a new file, served by
   the reply cache.
4. Scoring speed of the shipped harm judges (``--n-pairs`` held-out PKU pairs, 2 threads by
   default): ``harm-lm`` (the default) vs ``harm-cross`` vs ``harm-probe``, pairs per second with
   the judge already loaded (one warm-up batch first), and the load time apart.
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


def bench_harm_judges(n: int) -> None:
    from excise.evaluate.judges import load_judge
    from excise.evaluate.judges.probe_training import heldout_pairs

    pairs = heldout_pairs("harm", limit=n)
    rates = {}
    for spec in ("harm-lm", "harm-cross", "harm-probe"):
        load, judge = _timed(lambda spec=spec: load_judge(spec))
        warm, _ = _timed(lambda judge=judge: judge.score(pairs.prompts[:8], pairs.responses[:8]))
        seconds, _ = _timed(lambda judge=judge: judge.score(pairs.prompts, pairs.responses))
        rates[spec] = len(pairs) / seconds
        print(
            f"{spec}: {len(pairs)} pairs in {seconds:.1f} s ({rates[spec]:.1f} pairs/s); "
            f"load + warm-up {load + warm:.1f} s"
        )
    print(
        f"harm-lm is {rates['harm-cross'] / rates['harm-lm']:.1f}x slower than harm-cross, "
        f"{rates['harm-probe'] / rates['harm-lm']:.1f}x slower than harm-probe"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-texts", type=int, default=256)
    parser.add_argument("--n-requests", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--n-pairs", type=int, default=128, help="held-out PKU pairs each harm judge scores")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--only", choices=("encoder", "endpoint", "anti", "harm"), help="run one section (default: all)"
    )
    args = parser.parse_args()
    import os

    import torch

    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.1f}, {args.threads} threads")
    sections = {
        "encoder": lambda: bench_encoder(args.n_texts),
        "endpoint": lambda: bench_endpoint(args.n_requests, args.latency),
        "anti": lambda: bench_anti_cache(args.n_requests, args.latency),
        "harm": lambda: bench_harm_judges(args.n_pairs),
    }
    for name, run in sections.items():
        if args.only in (None, name):
            run()


if __name__ == "__main__":
    main()
