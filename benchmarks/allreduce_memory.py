"""Measure what the gradient all-reduce allocates; writes ``benchmarks/results/allreduce_memory.{json,md}``.

For gradients of ``P`` bytes (float32, held by parameters of realistic sizes: one
embedding-like matrix of a quarter of them, the rest in 4 MiB matrices and small
vectors) on ``d`` replicas, each replica a process of its own (spawned, one torch
thread, the worker's allocator settings, :func:`funcpipe.worker.limit_allocator_retention`),
over file storage in ``/dev/shm`` (optionally throttled), measures in each replica the
peak resident memory during the gradient sync over what it held before it (weights and
gradients): :func:`funcpipe.worker.reset_peak_rss` then :func:`funcpipe.worker.peak_rss_bytes`.

Two implementations: ``before``, the code before the lean buffers (``torch.cat`` of the
gradients, a separate result, every share kept until the end), copied here; ``after``,
:func:`funcpipe.worker.flatten_gradients` and the in-place :func:`funcpipe.collectives.all_reduce`.
Both sums are checked bitwise against each other. Next to them: the memory model's charge
for the all-reduce, old (``2 P``) and new (``P / d + SYNC_IN_FLIGHT_BYTES``).

    python benchmarks/allreduce_memory.py [--sizes-mb 64 256] [--replicas 2 4] [--down-mb-s 200]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

MIB = 2**20


def parameter_shapes(size_bytes: int) -> list[tuple[int, ...]]:
    """Shapes of float32 parameters totalling about ``size_bytes``: an embedding, 1024x1024 matrices, biases."""
    numel = size_bytes // 4
    embedding = numel // 4
    shapes: list[tuple[int, ...]] = [(embedding // 1024, 1024)]
    rest = numel - shapes[0][0] * 1024
    while rest >= 1024 * 1024 + 1024:
        shapes += [(1024, 1024), (1024,)]
        rest -= 1024 * 1024 + 1024
    if rest:
        shapes.append((rest,))
    return shapes


def before_sync(comm: Any, params: list[Any], keys: Any, rank: int, world: int, algorithm: str) -> Any:
    """The gradient sync as it was (worker._sync_gradients and collectives.all_reduce before the lean buffers)."""
    import torch

    from funcpipe.protocol import PIECE_BYTES, piece_count, ring_peers

    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    chunks = torch.tensor_split(flat, world)
    to_peers, from_peers = ring_peers(rank, world)
    chunk_key = lambda owner, sender, piece=0: keys.chunk(0, 0, owner, sender, piece)
    merged_key = lambda owner, piece=0: keys.merged(0, 0, owner, piece)
    result = torch.empty_like(flat)
    out_chunks = torch.tensor_split(result, world)
    if algorithm == "pipelined":
        pieces = piece_count(flat.numel() * flat.element_size(), world, PIECE_BYTES)
        parts = [torch.tensor_split(chunk, pieces) for chunk in chunks]
        out_parts = [torch.tensor_split(chunk, pieces) for chunk in out_chunks]
        sends: list[Future[None]] = [
            comm.push_send(chunk_key(peer, rank, q), parts[peer][q]) for q in range(pieces) for peer in to_peers
        ]
        shares = [[comm.fetch_bytes(chunk_key(rank, peer, q)) for peer in from_peers] for q in range(pieces)]
        merged = [comm.fetch_into(merged_key(peer, q), out_parts[peer][q]) for q in range(pieces)
                  for peer in from_peers]
        for q in range(pieces):
            mine = out_parts[rank][q]
            mine.copy_(parts[rank][q])
            for share in shares[q]:
                share.result().add_to(mine)
            sends.append(comm.push_send(merged_key(rank, q), mine))
        for future in merged:
            future.result()
        for send in sends:
            send.result()
    else:
        for send in [comm.send(chunk_key(peer, rank), chunks[peer]) for peer in to_peers]:
            send.result()
        mine = out_chunks[rank]
        mine.copy_(chunks[rank])
        for peer in from_peers:
            comm.recv_bytes(chunk_key(rank, peer)).result().add_to(mine)
        comm.send(merged_key(rank), mine).result()
        for peer in from_peers:
            comm.recv_bytes(merged_key(peer)).result().copy_to(out_chunks[peer])
    offset = 0
    for p in params:
        p.grad = result[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return result


def after_sync(comm: Any, params: list[Any], keys: Any, rank: int, world: int, algorithm: str) -> Any:
    from funcpipe.collectives import all_reduce
    from funcpipe.worker import flatten_gradients

    flat = flatten_gradients(params)
    total = all_reduce(comm, flat, keys=keys, iteration=0, stage=0, rank=rank, world=world, algorithm=algorithm)
    offset = 0
    for p in params:
        p.grad = total[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return total


def replica(root: str, job: str, rank: int, world: int, size: int, algorithm: str, variant: str,
            down_mb_s: float | None, barrier: Any, out: Any) -> None:
    import torch

    from funcpipe.collectives import Comm
    from funcpipe.protocol import FETCH_CONNECTIONS, PUSH_CONNECTIONS, JobKeys
    from funcpipe.storage import FileStorage, throttle
    from funcpipe.worker import limit_allocator_retention, peak_rss_bytes, reset_peak_rss

    torch.set_num_threads(1)
    limit_allocator_retention()
    generator = torch.Generator().manual_seed(rank)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in parameter_shapes(size)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    storage: Any = FileStorage(root)
    if down_mb_s:
        storage = throttle(storage, up_mb_s=down_mb_s, down_mb_s=down_mb_s)
    pools = [ThreadPoolExecutor(1), ThreadPoolExecutor(1), ThreadPoolExecutor(FETCH_CONNECTIONS),
             ThreadPoolExecutor(PUSH_CONNECTIONS)]
    comm = Comm(storage, pools[0], pools[1], 600.0, fetch=pools[2], push=pools[3])
    sync = before_sync if variant == "before" else after_sync
    # Warm the threads and the codec up on a small sum, so their first-use costs are not the sync's.
    warm = [torch.nn.Parameter(torch.zeros(1024))]
    warm[0].grad = torch.ones(1024)
    sync(comm, warm, JobKeys(job + "-warm"), rank, world, algorithm)
    del warm
    barrier.wait()
    held = reset_peak_rss() or 0
    barrier.wait()
    total = sync(comm, params, JobKeys(job), rank, world, algorithm)
    peak = peak_rss_bytes() or 0
    digest = float(total.double().sum())
    for pool in pools:
        pool.shutdown(wait=True)
    out.put((rank, held, peak, digest, bool(torch.isfinite(total).all())))


def run(size: int, world: int, algorithm: str, variant: str, down_mb_s: float | None) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    root = tempfile.mkdtemp(prefix="allreduce-memory-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    try:
        barrier, out = ctx.Barrier(world), ctx.Queue()
        job = f"mem-{variant}-{algorithm}-{world}-{size}"
        procs = [ctx.Process(target=replica, args=(root, job, r, world, size, algorithm, variant, down_mb_s,
                                                   barrier, out)) for r in range(world)]
        for p in procs:
            p.start()
        rows = sorted(out.get(timeout=900) for _ in procs)
        for p in procs:
            p.join()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    extra = [(peak - held) / MIB for _, held, peak, _, _ in rows]
    return {"extra_mb": extra, "max_extra_mb": max(extra), "held_mb": [h / MIB for _, h, _, _, _ in rows],
            "digest": rows[0][3], "agree": len({r[3] for r in rows}) == 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[64.0, 256.0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--down-mb-s", type=float, default=None,
                        help="throttle every replica's link to this many MB/s each way (default: unthrottled)")
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from funcpipe.protocol import SYNC_ALGORITHMS, SYNC_IN_FLIGHT_BYTES

    command = " ".join(["python benchmarks/allreduce_memory.py", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    rows = []
    for size_mb in args.sizes_mb:
        size = int(size_mb * MIB)
        for world in args.replicas:
            for algorithm in SYNC_ALGORITHMS:
                got = {v: run(size, world, algorithm, v, args.down_mb_s) for v in ("before", "after")}
                row = {"size_mb": size_mb, "d": world, "algorithm": algorithm,
                       "before_mb": got["before"]["max_extra_mb"], "after_mb": got["after"]["max_extra_mb"],
                       "old_charge_mb": 2 * size / MIB, "new_charge_mb": (size / world + SYNC_IN_FLIGHT_BYTES) / MIB,
                       "same_sum": got["before"]["digest"] == got["after"]["digest"]
                       and got["before"]["agree"] and got["after"]["agree"], "runs": got}
                print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
                rows.append(row)
    elapsed = time.perf_counter() - started
    args.output_dir.mkdir(parents=True, exist_ok=True)
    report = {"command": command, "options": {"down_mb_s": args.down_mb_s}, "elapsed_s": elapsed, "rows": rows}
    (args.output_dir / "allreduce_memory.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# What the gradient all-reduce allocates", "",
        f"Command: `{command}`", "",
        "Peak resident memory of a replica during the gradient sync (flattening, all-reduce, gradients set "
        "from the sum) over what it held before it (weights and gradients), the largest over the `d` replica "
        "processes, MB (MiB). File storage in /dev/shm"
        + (f", throttled to {args.down_mb_s:g} MB/s each way" if args.down_mb_s else ", unthrottled") + ". "
        "`before`: `torch.cat` and a separate result; `after`: gradients moved into the flat buffer, "
        "summed in place, each share dropped once added. Charges: the memory model's, old `2 P`, "
        "new `P / d + SYNC_IN_FLIGHT_BYTES` (24 MiB).", "",
        "| P MB | d | algorithm | before MB | after MB | old charge MB | new charge MB | same sum |",
        "|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['size_mb']:g} | {r['d']} | {r['algorithm']} | {r['before_mb']:.0f} | "
                     f"{r['after_mb']:.0f} | {r['old_charge_mb']:.0f} | {r['new_charge_mb']:.0f} | "
                     f"{'yes' if r['same_sum'] else 'NO'} |")
    lines += ["", f"Total benchmark time: {elapsed:.0f} s.", ""]
    (args.output_dir / "allreduce_memory.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
