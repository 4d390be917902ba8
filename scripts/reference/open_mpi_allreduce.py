"""Open MPI's MPI_Allreduce, timed the way `cohort bench allreduce` times its ring.

`cohort bench allreduce` embeds this script and runs it under `mpirun` (see
cli/src/bench/reference.rs); it is not meant to be run by hand, though it can be:

    mpirun -np 2 --mca pml ob1 --mca btl self,vader python3 open_mpi_allreduce.py \
        --elements 1024,16384 --warmup 40,40 --iterations 200,200

For each size, every rank runs the warm-up all-reduces untimed, meets the others at a
barrier, then times each of the timed all-reduces (sum of float32 zeros, in place) on its own
and keeps the median, as Cohort's ranks do. Rank 0 gathers every rank's medians and prints, as
its last line of stdout, one JSON object:

    {"library": "Open MPI v4.1.4", "world_size": 2,
     "sizes": [{"elements": 1024, "warmup": 40, "iterations": 200,
                "rank_times_s": [1.2e-05, 1.3e-05]}, ...]}
"""

import argparse
import json
import sys
import time

import numpy as np
from mpi4py import MPI


def counts(text):
    """Parses a comma-separated list of non-negative integers."""
    return [int(value) for value in text.split(",") if value]


def median_time(comm, buffer, warmup, iterations):
    """Returns the median time in seconds of one in-place sum all-reduce of `buffer`."""
    for _ in range(warmup):
        comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
    comm.Barrier()
    times = []
    for _ in range(max(iterations, 1)):
        started = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        times.append(time.perf_counter() - started)
    times.sort()
    return times[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=counts, required=True, help="float32 elements per size")
    parser.add_argument("--warmup", type=counts, required=True, help="untimed calls per size")
    parser.add_argument("--iterations", type=counts, required=True, help="timed calls per size")
    args = parser.parse_args()
    if not len(args.elements) == len(args.warmup) == len(args.iterations):
        parser.error("--elements, --warmup and --iterations need one value per size each")

    comm = MPI.COMM_WORLD
    medians = []
    for elements, warmup, iterations in zip(args.elements, args.warmup, args.iterations):
        buffer = np.zeros(elements, dtype=np.float32)
        medians.append(median_time(comm, buffer, warmup, iterations))
        del buffer
    per_rank = comm.gather(medians, root=0)
    if comm.rank == 0:
        sizes = [
            {
                "elements": elements,
                "warmup": warmup,
                "iterations": iterations,
                "rank_times_s": [rank[index] for rank in per_rank],
            }
            for index, (elements, warmup, iterations) in enumerate(
                zip(args.elements, args.warmup, args.iterations)
            )
        ]
        result = {
            "library": MPI.Get_library_version().replace("\0", "").split(",")[0].strip(),
            "world_size": comm.size,
            "sizes": sizes,
        }
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
