"""Throughput and latency of the OpenAI-compatible server: concurrent clients (batched) against one at a time.

    python -m bench.api_throughput [--model DIR] [--clients 8] [--requests 3] [--max-tokens 8] [--json FILE]

Starts ``vlm-chat api``'s app in-process on 127.0.0.1 (a free port) and asks ``clients x requests`` easy-VQA test
questions (a seeded sample, each with its image as a data URL) with the official ``openai`` client, greedily:

1. ``sequential``: one client, one request at a time (every generation is a batch of one);
2. ``concurrent``: ``clients`` threads, each sending its ``requests`` questions one after another (the server batches
   the requests that wait while the model is busy);
3. ``streaming``: the same with ``stream: true`` (server-sent events, batched the same way).

It reports requests/s of each, the speed-up of 2 over 1 (goal >= 3x), p50/p95 latency (and time to the first piece
when streaming), the batch sizes the server ran, failures, and whether every concurrent and streamed answer equals the
sequential one for the same question; and, as the ceiling of what batching can give on this machine, ``clients``
questions through ``VLMChat.generate`` one at a time vs one ``generate_batch`` call, without the server.
Results: docs/reliability.md, "Serving under load".
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import os
import platform
import random
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: each value reported is a measured latency)."""
    ranked = sorted(values)
    return ranked[max(0, min(len(ranked) - 1, round(q / 100 * len(ranked) + 0.5) - 1))]


def _questions(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (data URL, question) pairs from easy-VQA's test split."""
    from vlm_chat.datasets import easyvqa

    samples = random.Random(seed).sample(easyvqa.load_split("test"), n)
    urls = {}
    for s in samples:
        if s.image not in urls:
            urls[s.image] = "data:image/png;base64," + base64.b64encode(Path(s.image).read_bytes()).decode()
    return [(urls[s.image], s.question) for s in samples]


def _ask(client, model: str, url: str, question: str, max_tokens: int, stream: bool) -> tuple[str, float, float]:
    """One request -> (answer, latency s, time to first piece s)."""
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": question}]}]
    start = time.perf_counter()
    if not stream:
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)
        elapsed = time.perf_counter() - start
        return reply.choices[0].message.content, elapsed, elapsed
    first, pieces = None, []
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.perf_counter() - start
            pieces.append(chunk.choices[0].delta.content)
    elapsed = time.perf_counter() - start
    return "".join(pieces), elapsed, first if first is not None else elapsed


def _client_run(base_url: str, model: str, work: list[tuple[str, str]], max_tokens: int, stream: bool) -> dict:
    """One client's requests, one after another (run in its own process, as real clients are)."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    out: dict = {"answers": {}, "latencies": [], "firsts": [], "failures": []}
    for i, (url, question) in enumerate(work):
        try:
            text, elapsed, first = _ask(client, model, url, question, max_tokens, stream)
        except Exception as e:  # counted and reported: a failure is a result here, not a crash
            out["failures"].append(f"request {i}: {e!r}")
            continue
        out["answers"][i] = text
        out["latencies"].append(elapsed)
        out["firsts"].append(first)
    return out


def _warm(_: int) -> None:
    import openai  # noqa: F401  (the import is the warm-up)

    time.sleep(0.5)  # keep this worker busy so that the pool starts all of them


def _phase(pool, base_url: str, model: str, work: list[list[tuple[str, str]]], max_tokens: int,
           stream: bool) -> dict:
    """Each list of ``work`` is one client (a process of ``pool``); answers keyed by (client, index)."""
    start = time.perf_counter()
    runs = [pool.submit(_client_run, base_url, model, w, max_tokens, stream) for w in work]
    runs = [r.result() for r in runs]
    wall = time.perf_counter() - start
    answers = {(k, i): a for k, r in enumerate(runs) for i, a in r["answers"].items()}
    latencies = [x for r in runs for x in r["latencies"]]
    firsts = [x for r in runs for x in r["firsts"]]
    failures = [f"client {k} {f}" for k, r in enumerate(runs) for f in r["failures"]]
    done = len(latencies)
    return {
        "requests": done, "failures": failures, "wall_s": round(wall, 2), "requests_per_s": round(done / wall, 3),
        "p50_s": round(_percentile(latencies, 50), 3) if done else None,
        "p95_s": round(_percentile(latencies, 95), 3) if done else None,
        "first_piece_p50_s": round(_percentile(firsts, 50), 3) if stream and done else None,
        "first_piece_p95_s": round(_percentile(firsts, 95), 3) if stream and done else None,
        "answers": answers,
    }


def _library_ceiling(chat, qs: list[tuple[str, str]], batch: int, max_tokens: int) -> dict:
    """What batching gains without any server: ``batch`` questions one at a time vs one `generate_batch` call.

    Runs in a worker thread, as the server's batcher does (on a busy CPU, torch in the main thread was much slower).
    """
    from vlm_chat.images import load_image

    images = [load_image(base64.b64decode(url.split(",", 1)[1])) for url, _ in qs[:batch]]
    questions = [q for _, q in qs[:batch]]
    out: dict = {}

    def work() -> None:
        start = time.perf_counter()
        alone = [chat.generate(i, q, max_new_tokens=max_tokens) for i, q in zip(images, questions)]
        out["one_at_a_time_s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        batched = chat.generate_batch(images, questions, max_new_tokens=max_tokens)
        out["one_batch_s"] = round(time.perf_counter() - start, 2)
        out["speedup"] = round(out["one_at_a_time_s"] / out["one_batch_s"], 2)
        out["equal"] = alone == batched

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return out


def measure(model: str | None = None, clients: int = 8, requests: int = 3, max_tokens: int = 8, seed: int = 0,
            streaming: bool = True) -> dict:
    """Run the three phases on one server; see the module docstring.

    Returns:
        A dict of results (JSON-ready once ``answers`` are dropped).
    """
    import torch

    from vlm_chat.api import RunningServer, create_app
    from vlm_chat.serving import load_model

    chat = load_model(model)
    app = create_app(chat, model_id="bench", max_batch_size=clients)
    server = RunningServer(app, port=0)
    batcher = app.state.batcher

    qs = _questions(clients * requests, seed)
    per_client = [qs[k * requests:(k + 1) * requests] for k in range(clients)]
    base_url = f"{server.url}/v1"
    # Clients in their own processes: threads here would share the server's GIL and skew what is measured.
    pool = ProcessPoolExecutor(max_workers=clients, mp_context=multiprocessing.get_context("spawn"))
    try:
        list(pool.map(_warm, range(clients)))
        _client_run(base_url, "bench", qs[:1], max_tokens, False)  # warm-up of the model, not timed
        results = {}
        phases = [("sequential", [qs], False), ("concurrent", per_client, False)]
        if streaming:
            phases.append(("streaming", per_client, True))
        for name, work, stream in phases:
            first_batch = len(batcher.batch_sizes)
            results[name] = _phase(pool, base_url, "bench", work, max_tokens, stream)
            sizes = batcher.batch_sizes[first_batch:]
            results[name]["batch_sizes"] = {str(b): sizes.count(b) for b in sorted(set(sizes))}
        results["library_batch_ceiling"] = _library_ceiling(chat, qs, clients, max_tokens)
    finally:
        pool.shutdown()
        server.stop()
    lone = {qs[i]: a for (_, i), a in results["sequential"]["answers"].items()}
    for name in ("concurrent", "streaming"):
        if name in results:
            got = results[name]["answers"]
            results[name]["equal_to_sequential"] = sum(got[(k, i)] == lone.get(per_client[k][i])
                                                       for (k, i) in got)
    for r in results.values():
        r.pop("answers", None)
    seq = results["sequential"]["requests_per_s"]
    return {
        "command": "python -m bench.api_throughput " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads "
                   f"{torch.get_num_threads()}, device {chat.device}",
        "model": model or "demo model", "clients": clients, "requests_per_client": requests, "max_tokens": max_tokens,
        **results,
        "speedup_concurrent_vs_sequential": round(results["concurrent"]["requests_per_s"] / seq, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the demo model)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="sample of easy-VQA test questions")
    parser.add_argument("--no-streaming", action="store_true", help="skip the streaming phase")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    result = measure(args.model, args.clients, args.requests, args.max_tokens, args.seed, not args.no_streaming)
    text = json.dumps(result, indent=2)
    print(text)  # the benchmark's output
    if args.json:
        Path(args.json).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
