"""What keeping a driver's leases alive costs, at 1,000 and 10,000 held leases, on a local disk and on
moto's S3 server (127.0.0.1).

    python benchmarks/leases.py [--quick] [--json]

A renew pass (`LeaseBook.renew`, what the driver's heartbeat runs every 5 s) writes the driver's
liveness record once and renews `VERIFY_PER_PASS` leases in turn, so its cost should not depend on
how many leases the driver holds. For scale the same run times `renew_each`: every held lease renewed
by compare-and-swap one after another, which is what a pass cost before (it grows linearly; at
10,000 leases on S3 it is longer than the 60 s TTL). The target: a pass at 10,000 leases under 10% of
the TTL on moto. `renew_each` is timed over 1,000 leases (100 with --quick) and reported per
1,000; 10,000 would take ten times that (minutes on S3).

The leases are put in place with one bulk write, then adopted by the book as if it had acquired them
(acquiring 10,000 one by one on moto takes minutes and is not what is measured here).
The last stdout line with --json is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.storage.leases import DEFAULT_TTL_S, LeaseBook, Leases, Owner, encode  # noqa: E402
from orchestrator.storage.objects import ObjectLeases  # noqa: E402

BUCKET = "ddray-bench-leases"


def log(msg: str) -> None:
    print(msg, flush=True)


def held_book(book: LeaseBook, n: int, put_many) -> list[str]:
    """`n` leases of `book`'s driver in the store (one bulk write), adopted as if acquired."""
    names = [f"distill-{i:016x}" for i in range(n)]
    bodies = {name: book._body(token=1) for name in names}
    put_many({name: encode(body) for name, body in bodies.items()})
    now = time.monotonic()
    for name, body in bodies.items():  # the book's own record of what it holds (as `acquire` leaves it)
        book.held.add(name)
        book._mine[name], book._renewed[name] = body, now
    return names


def timed_passes(book: LeaseBook, passes: int = 3) -> float:
    """Mean seconds of one heartbeat pass."""
    book.renew()  # the first pass creates the liveness record
    t0 = time.perf_counter()
    for _ in range(passes):
        lost = book.renew()
        assert not lost, lost
    return (time.perf_counter() - t0) / passes


def timed_renew_each(book: LeaseBook, names: list[str]) -> float:
    """Seconds to renew every one of `names` by compare-and-swap, one after another (the old pass)."""
    t0 = time.perf_counter()
    for name in names:
        assert book._renew(name, book._mine[name]) is not None
    return time.perf_counter() - t0


def local_medium(root: Path):
    def book():
        return Leases(root / uuid.uuid4().hex[:8], Owner.here())

    def put_many(b: Leases):
        def put(files: dict[str, bytes]) -> None:
            b.dir.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (b.dir / f"{name}.json").write_bytes(data)
        return put
    return book, put_many


def s3_medium():
    def book():  # moto_s3 has created the bucket
        return ObjectLeases(f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}", Owner.here())

    def put_many(b: ObjectLeases):
        fs = b.objects.fs

        def put(files: dict[str, bytes]) -> None:
            fs.pipe({f"{b.dir}/{name}.json": data for name, data in files.items()})  # s3fs: concurrent PUTs
        return put
    return book, put_many


def measure(medium: str, book_of, put_many_of, counts: list[int], each_of: int) -> dict:
    """Renew-pass seconds at each count, and renewing `each_of` leases one by one (scaled to 1,000)."""
    out = {}
    for n in counts:
        book = book_of()
        names = held_book(book, n, put_many_of(book))
        out[f"{medium}_renew_pass_{n // 1000}k_s"] = round(timed_passes(book), 4)
        log(f"{medium}: renew pass at {n:,} held leases: {out[f'{medium}_renew_pass_{n // 1000}k_s']:.4f} s")
        if n == min(counts):
            each = timed_renew_each(book, names[:each_of]) * 1000 / each_of
            out[f"{medium}_renew_each_1k_s"] = round(each, 3)
            log(f"{medium}: every lease renewed one by one: {each:.3f} s per 1,000 (timed over {each_of:,}; "
                f"10,000 would take {10 * each:.1f} s)")
        book.release_all = lambda: None  # the store is thrown away below
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="the one-by-one renewal timed over 100 leases instead of 1,000 (the passes are the same)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-s3", action="store_true", help="skip the moto S3 server")
    args = parser.parse_args(argv)
    counts, each_of = [1000, 10000], 100 if args.quick else 1000
    out: dict = {"ttl_s": DEFAULT_TTL_S}
    with tempfile.TemporaryDirectory() as tmp:
        out.update(measure("local", *local_medium(Path(tmp)), counts, each_of))
        if not args.no_s3:
            from tests.servers import moto_s3  # the tests' moto server: started on 127.0.0.1, stopped after

            with moto_s3(Path(tmp), BUCKET):
                out.update(measure("s3", *s3_medium(), counts, each_of))
    if "s3_renew_pass_10k_s" in out:
        out["lease_renew_pass_10k_s"] = out["s3_renew_pass_10k_s"]
        out["lease_renew_pass_10k_ttl_fraction"] = round(out["s3_renew_pass_10k_s"] / DEFAULT_TTL_S, 5)
        out["lease_renew_each_10k_s_estimate"] = round(10 * out["s3_renew_each_1k_s"], 2)
        log(f"target: a pass at 10,000 leases on moto under 10% of the TTL: {out['s3_renew_pass_10k_s']:.3f} s "
            f"= {100 * out['lease_renew_pass_10k_ttl_fraction']:.2f}% of {DEFAULT_TTL_S:.0f} s "
            f"({'met' if out['lease_renew_pass_10k_ttl_fraction'] < 0.1 else 'NOT met'}); renewing each lease "
            f"would take about {out['lease_renew_each_10k_s_estimate']:.0f} s")
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
