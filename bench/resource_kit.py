#!/usr/bin/env python
"""Per-token verification cost of the resource kit, side by side with a plain ``jwt.decode``.

For each signing algorithm the broker offers (ES256, RS256, EdDSA) this measures, in one process
and one run, the cost of:

- ``sig only``: the signature check alone on pre-split input (the floor for any verifier);
- ``plain``: ``jwt.decode(token, key_object, algorithms=[alg], audience=..., issuer=...)`` with the
  public key loaded from the JWKS once and kept (the PERFORMANCE.md baseline; exp is checked);
- ``kit new``: ``BrokerTokenVerifier.verify`` on a token it has not seen (cache miss: RFC 9068
  checks, signature, claims, then a cache insert);
- ``kit repeat``: ``BrokerTokenVerifier.verify`` on a token it verified before (cache hit).

The JWKS is served by a local ``http.server`` thread on 127.0.0.1 and fetched once, before timing.
Tokens are signed beforehand with the broker's own ``issue_access_token``. The methods are timed
in rounds, interleaved chunk by chunk, and the median round is reported, so that the ratios
compare figures taken under the same load from neighbours. Goals (docs/benchmarks.md,
PERFORMANCE.md): the kit at least as fast as the plain decode (kit new / plain <= 1.0), and a
repeat token >= 20x faster than the plain decode.

    .venv/bin/python bench/resource_kit.py            # about 30 s
    .venv/bin/python bench/resource_kit.py --quick    # about 8 s
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from jwt import PyJWK
from jwt.utils import base64url_decode

from broker.keys import LoadedKey, generate_private_key, public_jwk
from broker.oauth2.rfc9068 import AccessTokenClaims, issue_access_token
from broker.resource import BrokerTokenVerifier

ALGORITHMS = ("ES256", "RS256", "EdDSA")
AUDIENCE = "http://127.0.0.1:8001/mcp"
KIT_GOAL = 1.0  # kit new / plain must be <= this
REPEAT_GOAL = 20.0  # plain / kit repeat must be >= this
CHUNK = 250  # tokens timed per method before switching to the next method


@contextmanager
def jwks_server(document: dict[str, Any]) -> Iterator[tuple[str, list[int]]]:
    """Serve ``document`` at /jwks.json on 127.0.0.1; yields the base URL and a hit counter."""
    body = json.dumps(document).encode()
    hits = [0]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/jwks.json":
                self.send_error(404)
                return
            hits[0] += 1
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def mint(key: LoadedKey, issuer: str, count: int) -> list[str]:
    claims = AccessTokenClaims(
        issuer=issuer,
        subject="usr_" + "x" * 22,
        audience=AUDIENCE,
        client_id="cl_" + "y" * 22,
        scope="demo:read demo:write",
        auth_time=int(time.time()),
        lifetime=3600,
    )
    return [issue_access_token(key, claims)[0] for _ in range(count)]


def _timed(function: Callable[[str], Any], tokens: list[str]) -> float:
    start = time.perf_counter()
    for token in tokens:
        function(token)
    return time.perf_counter() - start


def measure(
    methods: dict[str, Callable[[str], Any]],
    verifier: BrokerTokenVerifier,
    tokens: list[str],
    rounds: int,
    chunk: int,
) -> dict[str, list[float]]:
    """µs per token of each method, one value per round.

    Each round clears the kit's cache, then walks the tokens in chunks; every chunk is timed with
    every method, in an order that rotates from chunk to chunk, so load from neighbours falls on
    all methods alike. ``repeat`` always runs right after ``new`` on the same chunk (cache hits).
    """
    groups = [[name] for name in methods if name not in ("new", "repeat")] + [["new", "repeat"]]
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        verifier.clear_cache()
        gc.collect()
        totals = dict.fromkeys(methods, 0.0)
        for index, offset in enumerate(range(0, len(tokens), chunk)):
            part = tokens[offset : offset + chunk]
            shift = index % len(groups)
            for group in groups[shift:] + groups[:shift]:
                for name in group:
                    totals[name] += _timed(methods[name], part)
        for name, seconds in totals.items():
            samples[name].append(seconds * 1e6 / len(tokens))
    return samples


def run(tokens_per_alg: int, rounds: int) -> list[dict[str, Any]]:
    keys = {}
    for alg in ALGORITHMS:
        private = generate_private_key(alg)
        keys[alg] = LoadedKey(f"bench-{alg.lower()}", alg, private)
    document = {"keys": [public_jwk(k.private_key, k.kid, k.alg) for k in keys.values()]}
    results = []
    with jwks_server(document) as (issuer, hits):
        for alg, key in keys.items():
            tokens = mint(key, issuer, tokens_per_alg)
            # What a resource server holds: the public key as loaded from the JWKS, parsed once.
            jwk = PyJWK.from_dict(public_jwk(key.private_key, key.kid, alg))
            public = jwk.key
            algorithm = jwk.Algorithm
            prepared = algorithm.prepare_key(public)

            def plain(token: str, public: Any = public, alg: str = alg) -> Any:
                return jwt.decode(
                    token,
                    public,
                    algorithms=[alg],
                    audience=AUDIENCE,
                    issuer=issuer,
                    options={"require": ["exp", "iss", "aud"]},
                )

            # The floor: the signature check alone on pre-split, pre-decoded inputs.
            split = {}
            for token in tokens:
                head, _, signature = token.rpartition(".")
                split[token] = (head.encode(), base64url_decode(signature))

            def signature_only(
                token: str, split: Any = split, algorithm: Any = algorithm, key: Any = prepared
            ) -> Any:
                message, signature = split[token]
                return algorithm.verify(message, key, signature)

            verifier = BrokerTokenVerifier(
                issuer, AUDIENCE, algorithms=[alg], cache_size=max(10_000, tokens_per_alg)
            )
            verifier.keys.refresh()  # the JWKS fetch is not part of a token's cost
            # Sanity: every path accepts the tokens and they agree on who they are for.
            assert plain(tokens[0])["sub"] == verifier.verify(tokens[0]).subject
            assert signature_only(tokens[0])
            methods: dict[str, Callable[[str], Any]] = {
                "sig": signature_only,
                "plain": plain,
                "new": verifier.verify,
                "repeat": verifier.verify,
            }
            warm = tokens[: min(200, len(tokens))]
            measure(methods, verifier, warm, 1, 50)
            samples = measure(methods, verifier, tokens, rounds, CHUNK)
            row: dict[str, Any] = {
                name: statistics.median(values) for name, values in samples.items()
            }
            row["kit_ratio"] = statistics.median(
                n / p for n, p in zip(samples["new"], samples["plain"], strict=True)
            )
            row["repeat_ratio"] = statistics.median(
                p / r for p, r in zip(samples["plain"], samples["repeat"], strict=True)
            )
            row["spread"] = {name: (min(v), max(v)) for name, v in samples.items()}
            row["alg"] = alg
            row["token_bytes"] = len(tokens[0])
            results.append(row)
        fetches = hits[0]
    for row in results:
        row["jwks_fetches"] = fetches
    return results


def report(results: list[dict[str, Any]], tokens_per_alg: int, rounds: int) -> bool:
    print(
        f"\nResource kit, µs per token, one core ({tokens_per_alg} distinct tokens per algorithm, "
        f"median of {rounds} rounds interleaved by chunks of {CHUNK}; "
        f"Python {platform.python_version()}, PyJWT {jwt.__version__})"
    )
    header = (
        f"{'alg':<6} {'bytes':>5} {'sig only':>9} {'plain':>8} {'kit new':>8} "
        f"{'kit repeat':>11} {'new/plain':>10} {'goal <=1.0':>11} "
        f"{'plain/repeat':>13} {'goal >=20':>10}"
    )
    print(header)
    print("-" * len(header))
    all_met = True
    for row in results:
        kit_ok = row["kit_ratio"] <= KIT_GOAL
        repeat_ok = row["repeat_ratio"] >= REPEAT_GOAL
        all_met &= kit_ok and repeat_ok
        print(
            f"{row['alg']:<6} {row['token_bytes']:>5} {row['sig']:>9.1f} {row['plain']:>8.1f} "
            f"{row['new']:>8.1f} {row['repeat']:>11.2f} {row['kit_ratio']:>10.2f} "
            f"{'met' if kit_ok else 'NOT met':>11} {row['repeat_ratio']:>13.1f} "
            f"{'met' if repeat_ok else 'NOT met':>10}"
        )
    print(
        "\nsig only = the signature check alone (the floor); ratios are medians of per-round "
        "ratios.\nWork on top of the signature check (µs/token): "
        + ", ".join(
            f"{r['alg']} plain +{r['plain'] - r['sig']:.1f}, kit +{r['new'] - r['sig']:.1f}"
            for r in results
        )
    )
    print("Spread of the rounds (min-max µs/token):")
    for row in results:
        parts = [f"{name} {lo:.1f}-{hi:.1f}" for name, (lo, hi) in row["spread"].items()]
        print(f"  {row['alg']:<6} " + ", ".join(parts))
    print(
        f"JWKS fetches: {results[0]['jwks_fetches']} (one per verifier, before timing). "
        "Per core: "
        + ", ".join(
            f"{r['alg']} plain {1e6 / r['plain']:,.0f}/s, kit new {1e6 / r['new']:,.0f}/s"
            for r in results
        )
    )
    print("all goals met" if all_met else "some goals NOT met")
    return all_met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 8 s instead of about 30 s")
    parser.add_argument("--tokens", type=int, help="distinct tokens per algorithm")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds")
    args = parser.parse_args(argv)
    tokens = args.tokens or (1500 if args.quick else 4000)
    rounds = args.rounds or (5 if args.quick else 9)
    started = time.monotonic()
    results = run(tokens, rounds)
    report(results, tokens, rounds)
    print(f"({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
