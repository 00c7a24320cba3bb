"""How evenly Ray Serve's consistent-hash ring spreads sessions, and how many move when a replica comes or goes.

Session affinity (serving/server/builder.py) routes every turn through
`ray.serve.experimental.consistent_hash_router.ConsistentHashRouter`. This builds the same ring offline: the
router's own hash (`_hash_bytes`: MurmurHash3 x64 with `CONSISTENT_HASH_SEED`, low 64 bits) is imported, and the
ring construction and primary lookup mirror `ConsistentHashRouter._rebuild_ring` / `_lookup_ranked_replicas` in
ray/serve/experimental/consistent_hash_router.py (Ray 2.60): vnode keys `f"{replica.unique_id}:{i}"`, sorted by
hash, a key's owner is the vnode at `bisect_right(hashes, hash(key))`, wrapping to 0. Replica unique ids look like
Ray's (8 chars of `[a-z0-9]`, `ray.serve._private.utils.get_random_string`), session ids are uuid4 hex; both seeded.

    .venv/bin/python -m benchmarks.ring_sim --replicas 100 --sessions 100000 --vnodes 100,200,400,800 --out ring.json

Each row: max/mean sessions per replica, then the fraction of sessions whose replica changed when one replica is
lost and when one is added (ideal: 1/N and 1/(N+1); consistent hashing moves only the lost replica's sessions,
or only those the new one takes).
"""

from __future__ import annotations

import argparse
import bisect
import json
import random
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ray.serve.experimental.consistent_hash_router import DEFAULT_NUM_VIRTUAL_NODES, _hash_bytes

TARGET_MAX_OVER_MEAN = 1.3
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"  # ray._common.utils.RANDOM_STRING_ALPHABET


@dataclass(frozen=True)
class Ring:
    """Sorted vnode hashes and the replica owning each, as the router holds them."""

    hashes: list[int]
    owners: list[str]

    @classmethod
    def build(cls, replicas: Sequence[str], vnodes: int) -> Ring:
        paired = sorted(
            ((_hash_bytes(f"{replica}:{i}".encode()), replica) for replica in replicas for i in range(vnodes)),
            key=lambda pair: pair[0],
        )
        return cls([h for h, _ in paired], [r for _, r in paired])

    def owner(self, key_hash: int) -> str:
        index = bisect.bisect_right(self.hashes, key_hash)
        return self.owners[0 if index == len(self.hashes) else index]


@dataclass(frozen=True)
class RingStats:
    vnodes: int
    replicas: int
    sessions: int
    max_over_mean: float
    min_over_mean: float
    moved_on_loss: float
    moved_on_add: float
    ideal_loss: float
    ideal_add: float

    def meets_targets(self) -> bool:
        """max/mean within target, and each event moves at most 1.5x its ideal share (and at least half of it)."""
        return (
            self.max_over_mean <= TARGET_MAX_OVER_MEAN
            and 0.5 * self.ideal_loss <= self.moved_on_loss <= 1.5 * self.ideal_loss
            and 0.5 * self.ideal_add <= self.moved_on_add <= 1.5 * self.ideal_add
        )


def replica_ids(count: int, rng: random.Random) -> list[str]:
    return ["".join(rng.choices(_ID_ALPHABET, k=8)) for _ in range(count)]


def session_hashes(count: int, rng: random.Random) -> list[int]:
    return [_hash_bytes(uuid.UUID(int=rng.getrandbits(128), version=4).hex.encode()) for _ in range(count)]


def assign(ring: Ring, hashes: Sequence[int]) -> list[str]:
    return [ring.owner(h) for h in hashes]


def moved_fraction(before: Sequence[str], after: Sequence[str]) -> float:
    return sum(a != b for a, b in zip(before, after, strict=True)) / len(before)


def simulate(replicas: int, sessions: int, vnodes: int, seed: int = 0) -> RingStats:
    """One ring of `replicas`, then the same ring minus one replica and plus one new replica."""
    rng = random.Random(seed)
    ids = replica_ids(replicas + 1, rng)
    base, newcomer = ids[:replicas], ids[replicas]
    hashes = session_hashes(sessions, rng)
    owners = assign(Ring.build(base, vnodes), hashes)
    loads = Counter(owners)
    mean = sessions / replicas
    lost = assign(Ring.build(base[1:], vnodes), hashes)
    added = assign(Ring.build([*base, newcomer], vnodes), hashes)
    return RingStats(
        vnodes=vnodes,
        replicas=replicas,
        sessions=sessions,
        max_over_mean=round(max(loads.values()) / mean, 4),
        min_over_mean=round(min(loads.get(r, 0) for r in base) / mean, 4),
        moved_on_loss=round(moved_fraction(owners, lost), 5),
        moved_on_add=round(moved_fraction(owners, added), 5),
        ideal_loss=round(1 / replicas, 5),
        ideal_add=round(1 / (replicas + 1), 5),
    )


@dataclass(frozen=True)
class Sweep:
    """One vnode count over several seeds (each seed draws other replica ids, as each deployment does)."""

    vnodes: int
    runs: list[RingStats]

    @property
    def worst_max_over_mean(self) -> float:
        return max(run.max_over_mean for run in self.runs)

    @property
    def mean_max_over_mean(self) -> float:
        return round(sum(run.max_over_mean for run in self.runs) / len(self.runs), 4)

    def moved(self, event: str) -> tuple[float, float]:
        """(mean, worst) fraction moved on `loss` or `add` over the seeds."""
        values = [getattr(run, f"moved_on_{event}") for run in self.runs]
        return round(sum(values) / len(values), 5), max(values)

    def meets_targets(self) -> bool:
        return all(run.meets_targets() for run in self.runs)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=100)
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument(
        "--vnodes", type=_ints, default=[DEFAULT_NUM_VIRTUAL_NODES, 200, 400, 800], help="virtual nodes per replica"
    )
    parser.add_argument("--seeds", type=int, default=10, help="rings per vnode count (seeds 0..N-1)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Sweep]:
    args = parse_args(argv)
    sweeps = [
        Sweep(v, [simulate(args.replicas, args.sessions, v, seed) for seed in range(args.seeds)]) for v in args.vnodes
    ]
    print(
        f"{args.replicas} replicas, {args.sessions} sessions, {args.seeds} seeds; targets: max/mean <= "
        f"{TARGET_MAX_OVER_MEAN}, moved within 0.5-1.5x of 1/N on loss and 1/(N+1) on add"
    )
    print("vnodes  max/mean mean  worst  moved(loss) mean  worst  ideal   moved(add) mean  worst  ideal   meets")
    for sweep in sweeps:
        (loss, loss_worst), (add, add_worst) = sweep.moved("loss"), sweep.moved("add")
        ideal = sweep.runs[0]
        print(
            f"{sweep.vnodes:>6}  {sweep.mean_max_over_mean:>13.3f}  {sweep.worst_max_over_mean:>5.3f}"
            f"  {loss:>16.4f}  {loss_worst:.4f}  {ideal.ideal_loss:.4f}"
            f"  {add:>15.4f}  {add_worst:.4f}  {ideal.ideal_add:.4f}  {sweep.meets_targets()}"
        )
    chosen = next((sweep.vnodes for sweep in sweeps if sweep.meets_targets()), None)
    print(f"smallest vnode count meeting the targets on every seed: {chosen}")
    if args.out:
        results = [
            {"vnodes": s.vnodes, "meets": s.meets_targets(), "runs": [asdict(r) for r in s.runs]} for s in sweeps
        ]
        payload = {"config": vars(args) | {"out": str(args.out)}, "results": results, "chosen_vnodes": chosen}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    return sweeps


if __name__ == "__main__":
    main()
