"""Load generator for `pinion serve`: N concurrent clients, each a greedy completion of max_tokens tokens
(ignoring end of generation is not an API option, so prompts are chosen to run long), through the official
openai client. Prints the requests' total completion tokens over the wall time.

    python3 benches/serve_load.py http://127.0.0.1:8080/v1 MODEL_ID --clients 8 --max-tokens 64
"""

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI

PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The history of the Roman Empire begins",
    "def quicksort(xs):",
    "The three laws of thermodynamics are",
    "My favourite recipe for bread is",
    "In the year 2050, cities will",
    "The capital of France is Paris. The capital of Germany is",
    "Dear diary, today I",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base_url")
    ap.add_argument("model")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    client = OpenAI(base_url=a.base_url, api_key="unused", max_retries=0, timeout=600)

    def one(i):
        r = client.completions.create(
            model=a.model, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=a.max_tokens, temperature=0
        )
        return r.usage.completion_tokens

    t = time.monotonic()
    with ThreadPoolExecutor(a.clients) as ex:
        tokens = sum(ex.map(one, range(a.clients)))
    secs = time.monotonic() - t
    print(f"clients {a.clients}: {tokens} tokens in {secs:.2f} s = {tokens / secs:.1f} tokens/s")


if __name__ == "__main__":
    main()
