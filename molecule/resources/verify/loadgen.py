"""A load generator that keeps streamed chat completions flowing through nginx.

The scale, failover and upgrade scenarios run it the whole time they change the deployment and
then look at every request it made: which instance answered, when, and whether the stream was
complete (HTTP 200, at least one content chunk, and the closing `data: [DONE]`).

Also usable by hand against the lab:
    .venv/bin/python molecule/resources/verify/loadgen.py --base-url http://localhost:8081 \
        --api-key KEY --duration 30
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass

import httpx

PROMPTS = (
    "Name three colours.",
    "What is the capital of France?",
    "Give me one tip for writing clear emails.",
    "Count from one to five.",
)


@dataclass(frozen=True)
class RequestRecord:
    started: float  # time.monotonic()
    ended: float
    ok: bool
    status_code: int | None
    instance: str | None
    content_chunks: int
    error: str | None

    def overlaps(self, moment: float) -> bool:
        return self.started <= moment <= self.ended


class LoadGenerator:
    """`concurrency` threads, each sending one streamed completion after another until stop()."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        model: str,
        *,
        concurrency: int = 2,
        max_tokens: int = 12,
        timeout_s: float = 120,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.model = model
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self._records: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> LoadGenerator:
        for index in range(self.concurrency):
            thread = threading.Thread(target=self._run, args=(index,), name=f"loadgen-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> list[RequestRecord]:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + 10)
        return self.records()

    def records(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self, index: int) -> None:
        # A new connection per request: an nginx reload closes idle keep-alive connections, and a
        # request sent on one at that moment fails before reaching any server, which HTTP/1.1
        # clients (browsers, the openai package) answer by retrying. Without reuse, every failure
        # counted here is one a client could not have avoided.
        with httpx.Client(
            base_url=self.base_url,
            timeout=self.timeout_s,
            headers={"Authorization": f"Bearer {self.api_key}"},
            limits=httpx.Limits(max_keepalive_connections=0),
        ) as client:
            sent = 0
            while not self._stopping.is_set():
                record = self._one_request(client, PROMPTS[(index + sent) % len(PROMPTS)])
                sent += 1
                with self._lock:
                    self._records.append(record)
                if not record.ok:
                    # A failing deployment must not turn this into a busy loop.
                    time.sleep(0.5)

    def _one_request(self, client: httpx.Client, prompt: str) -> RequestRecord:
        started = time.monotonic()
        status_code: int | None = None
        instance: str | None = None
        chunks = 0
        done = False
        error: str | None = None
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "stream": True,
            "max_tokens": self.max_tokens,
            "ignore_eos": True,
        }
        try:
            with client.stream("POST", "/api/v1/chat/completions", json=body) as response:
                status_code = response.status_code
                instance = response.headers.get("x-zeus-instance")
                if status_code != 200:
                    response.read()
                    error = f"HTTP {status_code}: {response.text[:300]}"
                else:
                    for line in response.iter_lines():
                        if not line.startswith("data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == "[DONE]":
                            done = True
                            continue
                        chunk = json.loads(payload)
                        if "error" in chunk:
                            error = f"error chunk: {chunk['error']}"
                        for choice in chunk.get("choices", []):
                            if choice.get("delta", {}).get("content"):
                                chunks += 1
                    if error is None and not done:
                        error = "stream ended without data: [DONE]"
                    elif error is None and chunks == 0:
                        error = "stream had no content"
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        return RequestRecord(
            started=started,
            ended=time.monotonic(),
            ok=error is None,
            status_code=status_code,
            instance=instance,
            content_chunks=chunks,
            error=error,
        )


def summarize(records: list[RequestRecord]) -> str:
    """One line per kind of failure, plus totals: what an assertion message should show."""
    failed = [r for r in records if not r.ok]
    lines = [f"{len(records)} requests, {len(failed)} failed"]
    for (instance, error), count in Counter((r.instance, r.error) for r in failed).most_common(10):
        lines.append(f"  {count} x instance={instance}: {error}")
    served = Counter(r.instance for r in records if r.ok)
    lines.append(f"  served by: {dict(served)}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", required=True, help="nginx, e.g. http://localhost:8081")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--model", help="model id; default: the first of /api/v1/models")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--duration", type=float, default=30, help="seconds")
    parser.add_argument("--json", action="store_true", help="print every request as JSON lines")
    args = parser.parse_args()
    model = args.model
    if model is None:
        response = httpx.get(
            f"{args.base_url.rstrip('/')}/api/v1/models",
            headers={"Authorization": f"Bearer {args.api_key}"},
            timeout=30,
        )
        response.raise_for_status()
        model = response.json()["data"][0]["id"]
    generator = LoadGenerator(
        args.base_url, args.api_key, model, concurrency=args.concurrency, max_tokens=args.max_tokens
    )
    with generator:
        time.sleep(args.duration)
    records = generator.records()
    if args.json:
        for record in records:
            print(json.dumps(asdict(record)))
    print(summarize(records))
    return 0 if records and all(r.ok for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
