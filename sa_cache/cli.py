"""The ``sa-cache`` command line: thin click commands over plain functions."""

from __future__ import annotations

import os

import click
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

URL_HELP = "Cache URL (default: $SA_CACHE_URL, then memory://)."


def _url_option(fn: click.decorators.FC) -> click.decorators.FC:
    return click.option(
        "--url", default=lambda: os.environ.get("SA_CACHE_URL") or "memory://", help=URL_HELP
    )(fn)


@click.group()
@click.version_option(package_name="sa-cache")
def main() -> None:
    """sa_cache: a caching layer for SQLAlchemy ORM applications."""


@main.command()
@_url_option
@click.option("--requests", default=2000, show_default=True, help="Requests per run.")
@click.option("--customers", default=500, show_default=True, help="Rows in the demo shop.")
def demo(url: str, requests: int, customers: int) -> None:
    """Run a read-heavy request mix on SQLite, uncached then cached, and compare."""
    from .demo import run_demo

    console = Console()
    with Progress(console=console, transient=True) as bar:
        tasks = {
            name: bar.add_task(f"{name:>8} requests", total=requests)
            for name in ("uncached", "cached")
        }
        plain, cached, cache = run_demo(
            url, requests, customers, progress=lambda name, n: bar.advance(tasks[name], n)
        )
    stats = cache.stats.snapshot()
    hits, misses = stats.get("query.hit", 0), stats.get("query.miss", 0)
    table = Table(title=f"sa-cache demo on {url} ({requests} requests, SQLite)")
    table.add_column("")
    table.add_column("uncached", justify="right")
    table.add_column("cached", justify="right")
    table.add_row("queries", str(plain.queries), str(cached.queries))
    table.add_row("cache hits", "-", str(hits))
    table.add_row("cache misses", "-", str(misses))
    rate = hits / (hits + misses) if hits + misses else 0.0
    table.add_row("hit rate", "-", f"{rate:.1%}")
    table.add_row("database statements", str(plain.statements), str(cached.statements))
    table.add_row("statements saved", "-", str(plain.statements - cached.statements))
    per_plain = plain.seconds / plain.requests * 1e6
    per_cached = cached.seconds / cached.requests * 1e6
    table.add_row("time per request", f"{per_plain:,.0f} µs", f"{per_cached:,.0f} µs")
    table.add_row("speed-up", "1.00x", f"{per_plain / per_cached:.2f}x")
    console.print(table)
    if stats.get("store.error"):
        console.print(
            f"[yellow]the store failed {stats['store.error']} times; "
            "those requests used the database[/yellow]"
        )
    cache.close()
