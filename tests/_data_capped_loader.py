"""Child process of test_data_stream.py: iterate a dataset under an address-space cap; print batch hashes as JSON.

usage: python _data_capped_loader.py DATASET CAP_MIB. numpy, torch and pyarrow's thread pool are set up before
the cap (their address space is not the dataset's); the cap is then current VmSize + CAP_MIB.
"""

import hashlib
import json
import resource
import sys

import numpy as np

from raymoe.data import PackedBatches, TokenDataset


def address_space() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmSize")).split()[1]) * 1024


def main(path: str, cap_mib: int) -> None:
    PackedBatches(TokenDataset(path, verify=False), seq_len=64, global_batch_size=4, extra_tokens=2).next_batch()
    base = address_space()
    resource.setrlimit(resource.RLIMIT_AS, (base + (cap_mib << 20), base + (cap_mib << 20)))
    ds = TokenDataset(path, cache_bytes=4 << 20)
    out = {}
    for dp in (1, 2):
        out[f"dp{dp}"] = []
        for rank in range(dp):
            loader = PackedBatches(ds, seq_len=256, global_batch_size=8, extra_tokens=2, seed=5, dp_rank=rank,
                                   dp_size=dp)
            out[f"dp{dp}"].append([hashlib.sha256(loader.next_batch().numpy().tobytes()).hexdigest()
                                   for _ in range(20)])
            out[f"cursor{dp}"] = loader.cursor.to_dict()
    try:
        np.ones(len(ds) * 2, dtype=np.uint8)  # the whole stream as uint16 bytes
        out["whole_stream_fits"] = True
    except MemoryError:
        out["whole_stream_fits"] = False
    out["row_group_reads"] = ds.stream.num_group_reads
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
