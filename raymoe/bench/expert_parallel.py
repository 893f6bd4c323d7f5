"""Expert parallelism on this machine: throughput at ep = 1, 2, 4, the gloo all-to-all itself, and what sending
each token once per destination rank saves.

1. **Throughput.** The ``small`` preset (16 routed experts, top-4 of 4 groups keeping 2) on four Ray workers
   (pp=1, dp=4) with the same global batch at ep=1 (experts replicated, data-parallel), ep=2 (4 experts per rank
   ... 8, two expert-data-parallel replicas) and ep=4 (4 experts per rank, no replica). The three layouts run on
   three worker groups side by side and the benchmark alternates them step by step, so swings in machine load hit
   all alike; tokens/s and the ratio to ep=1 are reported as min / median / max over the steps, with the load.
   This machine has 2 cores for 4 workers (each layout oversubscribes them the same way): the numbers show what
   the all-to-all costs against replicating the experts here, not what a GPU cluster gains from EP (memory: each
   rank holds 1/ep of the experts, reported too).
2. **The exchange.** ``all_to_all_single`` between 2 and 4 gloo processes (no Ray) for messages of 4 KiB to
   16 MiB per peer: median latency and the bandwidth it implies (bytes a rank sends to others / time).
3. **Deduplication.** From the ep runs' own counters (``DispatchStats``): bytes a one-copy-per-(token, expert)
   dispatcher would send, the deduplicated bytes we send (hidden states, forward and backward), and the measured
   bytes (with the routing rows).
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from pathlib import Path

from raymoe.bench.load import machine_load, spread
from raymoe.bench.results import write_results

PRESET = "small"
EPS = (1, 2, 4)
DP = 4
MICROBATCHES = 2
STEPS, QUICK_STEPS = 10, 3
WARMUP = 1
MESSAGE_BYTES = (4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20)
REPEATS, QUICK_REPEATS = 20, 4


def _config(ep: int, steps: int):
    from raymoe.config import load_config

    return load_config(PRESET, ["parallel.pp=1", f"parallel.dp={DP}", f"parallel.ep={ep}", "schedule.name=1f1b",
                                f"schedule.num_microbatches={MICROBATCHES}", f"run.steps={steps}"])


def measure_throughput(steps: int) -> dict:
    from raymoe.parallel.topology import Topology
    from raymoe.runtime.driver import Driver
    from raymoe.runtime.session import cluster_cpus
    from raymoe.runtime.worker_group import WorkerGroup

    cpus = min(1.0, cluster_cpus() / (DP * len(EPS)))
    groups, drivers = {}, {}
    try:
        for ep in EPS:
            groups[ep] = WorkerGroup(Topology(pp=1, ep=ep, dp=DP), num_cpus_per_worker=cpus,
                                     name_suffix=f"-layout{ep}").start()
            drivers[ep] = Driver(_config(ep, steps), worker_group=groups[ep]).start()
        records: dict[int, list[dict]] = {ep: [] for ep in EPS}
        loads = []
        for step in range(steps):
            batch = drivers[EPS[0]].batches.next_batch()  # the same global batch for every layout
            for ep in EPS:
                record = drivers[ep].step(batch).record
                if step >= WARMUP:
                    records[ep].append(record)
            loads.append(machine_load()["loadavg_1m"])
        params = {ep: [info.num_params for info in drivers[ep].load_info] for ep in EPS}
    finally:
        for driver in drivers.values():
            driver.close()
        for group in groups.values():
            group.shutdown()
    return summarize_throughput(records, params, loads)


def summarize_throughput(records: dict[int, list[dict]], params: dict[int, list[int]], loads: list[float]) -> dict:
    base = records[EPS[0]]
    out = {"loadavg_1m": spread(loads), "layouts": {}}
    for ep, recs in records.items():
        ratios = [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(recs, base)]
        entry = {
            "tokens_per_s": spread([r["tokens_per_s"] for r in recs]),
            "ratio_to_ep1": spread(ratios),
            "params_per_rank": params[ep][0],
            "loss_last": recs[-1]["loss"],
        }
        if ep > 1:
            naive = statistics.median(r["a2a_naive_bytes"] for r in recs)
            dedup = statistics.median(r["a2a_dedup_bytes"] for r in recs)
            measured = statistics.median(r["a2a_measured_same_node_bytes"] + r["a2a_measured_cross_node_bytes"]
                                         for r in recs)
            entry.update({
                "a2a_naive_bytes": naive, "a2a_dedup_bytes": dedup, "a2a_measured_bytes": measured,
                "dedup_saved_fraction": 1 - dedup / naive if naive else 0.0,
                "a2a_seconds_max": spread([r["a2a_seconds_max"] for r in recs]),
                "rows_received_max_over_mean": spread([r["a2a_rows_received_max"] / r["a2a_rows_received_mean"]
                                                       for r in recs]),
            })
        out["layouts"][ep] = entry
    return out


# -- the gloo exchange alone ---------------------------------------------------------------------------------------
def _a2a_worker(rank: int, world: int, port: int, sizes, repeats: int, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = {}
    for size in sizes:
        per_peer = size // 4
        send = torch.ones(per_peer * world, dtype=torch.float32)
        recv = torch.empty_like(send)
        times = []
        for _ in range(repeats + 1):
            dist.barrier()
            start = time.perf_counter()
            dist.all_to_all_single(recv, send)
            times.append(time.perf_counter() - start)
        rows[size] = times[1:]
    dist.destroy_process_group()
    queue.put((rank, rows))


def measure_exchange(world: int, repeats: int) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_a2a_worker, args=(r, world, port, MESSAGE_BYTES, repeats, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    rows = []
    for size in MESSAGE_BYTES:
        # the exchange ends when the slowest rank has everything: take the max over ranks per repeat
        per_repeat = [max(results[r][size][i] for r in range(world)) for i in range(repeats)]
        median = statistics.median(per_repeat)
        rows.append({"ranks": world, "bytes_per_peer": size, "latency_s": spread(per_repeat),
                     "sent_bandwidth_GBps": size * (world - 1) / median / 1e9})
    return rows


def markdown(results: dict) -> str:
    lines = ["| layout (small, pp=1, dp=4, same global batch) | tokens/s median (min-max) | vs ep=1 median "
             "(min-max) | params per rank | a2a bytes/step naive / dedup / measured | dedup saves | "
             "rows received max/mean |", "|---|---|---|---|---|---|---|"]
    for ep, e in results["throughput"]["layouts"].items():
        t, r = e["tokens_per_s"], e["ratio_to_ep1"]
        a2a = (f"{e['a2a_naive_bytes'] / 1e6:.1f} / {e['a2a_dedup_bytes'] / 1e6:.1f} / "
               f"{e['a2a_measured_bytes'] / 1e6:.1f} MB" if "a2a_naive_bytes" in e else "-")
        saved = f"{100 * e['dedup_saved_fraction']:.0f}%" if "dedup_saved_fraction" in e else "-"
        imbalance = f"{e['rows_received_max_over_mean']['median']:.2f}" if "rows_received_max_over_mean" in e else "-"
        lines.append(f"| ep={ep} | {t['median']:.0f} ({t['min']:.0f}-{t['max']:.0f}) | {r['median']:.2f} "
                     f"({r['min']:.2f}-{r['max']:.2f}) | {e['params_per_rank']:,} | {a2a} | {saved} | {imbalance} |")
    lines += ["", "| gloo all_to_all_single | bytes per peer | latency median (min-max) | bandwidth sent |",
              "|---|---|---|---|"]
    for row in results["exchange"]:
        lat = row["latency_s"]
        lines.append(f"| {row['ranks']} ranks | {row['bytes_per_peer'] >> 10} KiB | {lat['median'] * 1e3:.2f} ms "
                     f"({lat['min'] * 1e3:.2f}-{lat['max'] * 1e3:.2f}) | {row['sent_bandwidth_GBps']:.2f} GB/s |")
    load = results["throughput"]["loadavg_1m"]
    lines.append(f"\nLoad average (1 min) during the throughput steps: {load['min']:.2f}-{load['max']:.2f} on "
                 f"{os.cpu_count()} cores.")
    return "\n".join(lines)


def run(out_dir: Path, *, quick: bool = False) -> dict:
    from raymoe.runtime.session import ray_session

    with ray_session(num_cpus=DP * len(EPS)):
        throughput = measure_throughput(QUICK_STEPS if quick else STEPS)
    repeats = QUICK_REPEATS if quick else REPEATS
    exchange = measure_exchange(2, repeats) + measure_exchange(4, repeats)
    results = {"preset": PRESET, "quick": quick, "machine": machine_load(), "throughput": throughput,
               "exchange": exchange}
    results["markdown"] = markdown(results)
    write_results(out_dir, "expert_parallel", results)
    return {"markdown": results["markdown"], "throughput": throughput, "exchange": exchange}
