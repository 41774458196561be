#!/usr/bin/env python
"""Refresh grants against the bare endpoint at a few client concurrencies, as an SVG chart.

One broker under gunicorn (as ``bench/token_endpoint.py`` starts it: 2 gthread workers, the same
configuration), one refresh-token family per client thread; at each concurrency (default 1, 2,
4, 8, 16 client threads) ``GET /health`` and refresh grants alternate for ``--duration`` seconds
each, ``--rounds`` times. Writes a two-panel SVG (throughput, and median latency with the 95th
percentile as a thinner line) drawn by hand, no plotting library, and prints the numbers.

    .venv/bin/python bench/refresh_chart.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/refresh_chart.py --out docs/benchmarks-refresh.svg --levels 1,4,16
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from token_endpoint import (
    PASSWORD,
    ROOT,
    USERNAME,
    Phase,
    database,
    free_port,
    gunicorn,
    hash_password,
    mint_families,
    percentile,
    register,
    run_load,
    signed_in,
    upgrade,
    write_config,
)

WIDTH, PANEL_HEIGHT, LEFT, RIGHT, TOP, GAP = 720, 250, 70, 150, 40, 70
COLOURS = {"bare": "#1f77b4", "refresh": "#d62728"}
LABELS = {"bare": "GET /health (bare)", "refresh": "refresh grant"}


def measure(args: argparse.Namespace, work: Path) -> dict[int, dict[str, Phase]]:
    users = work / "users.yaml"
    users.write_text(
        yaml.safe_dump({"users": {USERNAME: {"password_hash": hash_password(PASSWORD)}}})
    )
    results: dict[int, dict[str, Phase]] = {}
    with database(args.database_url, work, "chart") as db_url:
        port = free_port()
        config = write_config(work, "chart", port, db_url, users, "ES256")
        upgrade(config)
        with gunicorn(config, port, db_url, work / "gunicorn.log", 2, None) as instance:
            client_id = register(instance.url)
            browser = signed_in(instance.url, client_id)
            families = mint_families(instance.url, [client_id] * max(args.levels), browser)
            browser.close()

            def health(client: httpx.Client, _: Any) -> None:
                if client.get("/health").status_code != 200:
                    raise RuntimeError("/health failed")

            calls = {"bare": health, "refresh": families.refresh}
            for call in calls.values():  # gthread workers are slow for their first seconds
                run_load(instance, "warm-up", max(args.levels), call, duration=3)
            for level in args.levels:
                totals = {name: Phase(name) for name in calls}
                for index in range(args.rounds):
                    order = list(calls) if index % 2 == 0 else list(reversed(calls))
                    for name in order:
                        phase = run_load(instance, name, level, calls[name], duration=args.duration)
                        if phase.errors:
                            raise SystemExit(f"{name} at {level}: {phase.first_error}")
                        totals[name].add(phase)
                results[level] = totals
                print(
                    f"  {level:>3} client threads: "
                    + ", ".join(
                        f"{name} {p.rate:,.0f}/s p50 {percentile(p.latencies, 0.5) * 1e3:.1f} ms"
                        for name, p in totals.items()
                    ),
                    flush=True,
                )
    return results


def _nice(value: float) -> float:
    """A round axis maximum at or above ``value``."""
    step = 10 ** max(0, len(str(int(value))) - 1)
    for factor in (1, 2, 2.5, 5, 10):
        if step * factor >= value:
            return float(step * factor)
    return float(step * 10)


def svg(results: dict[int, dict[str, Phase]], title: str) -> str:
    levels = sorted(results)
    plot_w = WIDTH - LEFT - RIGHT
    height = TOP + 2 * PANEL_HEIGHT + GAP + 40

    def x(level: int) -> float:
        return LEFT + plot_w * levels.index(level) / max(1, len(levels) - 1)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
    ]
    panels = [
        ("requests/s", lambda p: p.rate, None),
        (
            "latency ms (p50; thin: p95)",
            lambda p: percentile(p.latencies, 0.5) * 1e3,
            lambda p: percentile(p.latencies, 0.95) * 1e3,
        ),
    ]
    for index, (label, value, extra) in enumerate(panels):
        top = TOP + index * (PANEL_HEIGHT + GAP)
        bottom = top + PANEL_HEIGHT
        values = [value(results[lv][n]) for lv in levels for n in COLOURS]
        if extra is not None:
            values += [extra(results[lv][n]) for lv in levels for n in COLOURS]
        ymax = _nice(max(values) * 1.05)

        def y(v: float, top: float = top, ymax: float = ymax) -> float:
            return top + PANEL_HEIGHT * (1 - v / ymax)

        parts.append(
            f'<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{PANEL_HEIGHT}" '
            'fill="none" stroke="#999"/>'
        )
        for tick in range(5):
            v = ymax * tick / 4
            parts.append(
                f'<line x1="{LEFT}" y1="{y(v):.1f}" x2="{LEFT + plot_w}" y2="{y(v):.1f}" '
                'stroke="#eee"/>'
            )
            parts.append(
                f'<text x="{LEFT - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:,.0f}</text>'
            )
        parts.append(
            f'<text x="16" y="{(top + bottom) / 2}" text-anchor="middle" '
            f'transform="rotate(-90 16 {(top + bottom) / 2})">{label}</text>'
        )
        for level in levels:
            parts.append(
                f'<text x="{x(level):.1f}" y="{bottom + 16}" text-anchor="middle">{level}</text>'
            )
        for name, colour in COLOURS.items():
            series = [(x(lv), y(value(results[lv][name]))) for lv in levels]
            points = " ".join(f"{px:.1f},{py:.1f}" for px, py in series)
            parts.append(
                f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2.5"/>'
            )
            parts += [
                f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3.5" fill="{colour}"/>'
                for px, py in series
            ]
            if extra is not None:
                series = [(x(lv), y(extra(results[lv][name]))) for lv in levels]
                points = " ".join(f"{px:.1f},{py:.1f}" for px, py in series)
                parts.append(
                    f'<polyline points="{points}" fill="none" stroke="{colour}" '
                    'stroke-width="1" stroke-dasharray="4 3"/>'
                )
    bottom = TOP + 2 * PANEL_HEIGHT + GAP
    parts.append(
        f'<text x="{LEFT + plot_w / 2}" y="{bottom + 34}" text-anchor="middle">'
        "client threads (each with a keep-alive connection)</text>"
    )
    for index, (name, colour) in enumerate(COLOURS.items()):
        ly = TOP + 20 + index * 20
        parts.append(
            f'<line x1="{WIDTH - RIGHT + 12}" y1="{ly}" x2="{WIDTH - RIGHT + 36}" y2="{ly}" '
            f'stroke="{colour}" stroke-width="2.5"/>'
        )
        parts.append(f'<text x="{WIDTH - RIGHT + 42}" y="{ly + 4}">{LABELS[name]}</text>')
    ratio_y = TOP + 70
    parts.append(f'<text x="{WIDTH - RIGHT + 12}" y="{ratio_y}">refresh / bare:</text>')
    for index, level in enumerate(levels):
        ratio = results[level]["refresh"].rate / results[level]["bare"].rate
        parts.append(
            f'<text x="{WIDTH - RIGHT + 12}" y="{ratio_y + 16 * (index + 1)}">'
            f"{level:>3} threads: {ratio:.2f}</text>"
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", help="a PostgreSQL URL (default: SQLite)")
    parser.add_argument("--levels", default="1,2,4,8,16", help="client threads, comma-separated")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per level")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks-refresh.svg"))
    parser.add_argument("--title", help="the chart's title")
    args = parser.parse_args(argv)
    args.levels = sorted({int(level) for level in args.levels.split(",")})
    work = Path(tempfile.mkdtemp(prefix="broker-bench-chart-"))
    started = time.monotonic()
    try:
        results = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    backend = "PostgreSQL" if args.database_url else "SQLite"
    title = args.title or f"Refresh grants vs GET /health, {backend}, gunicorn 2 x 4 gthread"
    Path(args.out).write_text(svg(results, title))
    print(f"wrote {args.out} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
