"""PyTorch DDP training of the MLP `cohort bench train` measures, timed phase by phase.

`cohort bench train` embeds this script and runs it right after its own run of each world size
(see cli/src/bench/reference.rs); it is not meant to be run by hand, though it can be:

    OMP_NUM_THREADS=1 python3 pytorch_ddp_mlp.py --world-size 2 --steps 30 --warmup-steps 3 \
        --global-batch 256 --hidden 1024,1024 --lr 0.01 --momentum 0.9 --weight-decay 0 \
        --data /usr/share/datasets/fashion-mnist

Without `--rank` it is the launcher: it starts `--world-size` copies of itself, one process per
rank, joined through a file store in a temporary directory; each trains an MLP
(784-hidden...-10, ReLU between layers) under DistributedDataParallel over gloo with one
intra-op and one inter-op thread, SGD with momentum, cross-entropy loss, on the Fashion-MNIST
training split from `--data` (Cohort's sampler: a shuffled order per epoch, the last incomplete
batch dropped, rank r of N taking a contiguous share of each global batch, the first B mod N
ranks one example more) normalised as Cohort normalises it. Each rank times every step's phases: data (gathering and
normalising the batch), forward (with the loss), backward (including DDP's all-reduce of the
gradients, which it overlaps with the backward pass) and optimizer (the update and clearing
the gradients), and reports the median of each over the steps after the warm-up ones.

The launcher prints, as its last line of stdout, one JSON object:

    {"torch_version": "1.13.1", "blas": ["libopenblasp-r0.3.21.so"], "world_size": 2,
     "threads_per_rank": 1,
     "ranks": [{"rank": 0, "step_s": ..., "data_s": ..., "forward_s": ..., "backward_s": ...,
                "optimizer_s": ..., "last_loss": ...}, ...]}
"""

import argparse
import gzip
import json
import os
import struct
import subprocess
import sys
import tempfile
import time

# Fashion-MNIST training pixels' mean and standard deviation on a 0 to 1 scale, as Cohort
# normalises them (trainer/src/data.rs, PIXEL_MEAN and PIXEL_STD).
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530
TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
CLASSES = 10


def widths(text):
    """Parses a comma-separated list of layer widths."""
    return [int(value) for value in text.split(",") if value]


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True, help="timed steps")
    parser.add_argument("--warmup-steps", type=int, required=True, help="untimed first steps")
    parser.add_argument("--global-batch", type=int, required=True)
    parser.add_argument("--hidden", type=widths, required=True, help="hidden layer widths")
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--momentum", type=float, required=True)
    parser.add_argument("--weight-decay", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", required=True, help="the Fashion-MNIST directory")
    parser.add_argument("--rank", type=int, help="run as this rank (set by the launcher)")
    parser.add_argument("--store", help="the file store joining the ranks (set by the launcher)")
    args = parser.parse_args()
    if args.world_size < 1 or args.global_batch < args.world_size:
        parser.error("expected 1 <= --world-size <= --global-batch")
    return args


def read_idx(directory, name):
    """Reads the IDX file `name` (gzipped or plain) from `directory` as a numpy array."""
    import numpy as np

    for candidate, opener in ((name + ".gz", gzip.open), (name, open)):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            with opener(path, "rb") as file:
                data = file.read()
            dimensions = data[3]
            shape = struct.unpack(">" + "I" * dimensions, data[4 : 4 + 4 * dimensions])
            return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dimensions).reshape(shape)
    raise FileNotFoundError(f"{name}(.gz) not found in {directory}")


def training_split(data):
    """Returns the training images (N x 784 bytes) and labels."""
    images = read_idx(data, TRAIN_IMAGES)
    labels = read_idx(data, TRAIN_LABELS)
    return images.reshape(images.shape[0], -1), labels


def rank_share(global_batch, world_size, rank):
    """The slice of a global batch rank `rank` takes, as Cohort's sampler cuts it."""
    base, extra = divmod(global_batch, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def blas_libraries():
    """The BLAS libraries this process has mapped (Debian's torch uses whichever
    libblas.so.3 the alternatives system points at: OpenBLAS, or the much slower reference
    BLAS)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return []
    return sorted(
        {os.path.basename(path) for path in paths if "blas" in path or "mkl" in path}
    )


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def train_rank(args):
    """One rank: trains and prints its medians as JSON on its last line of stdout."""
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as functional
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    dist.init_process_group(
        "gloo", init_method="file://" + args.store, rank=args.rank, world_size=args.world_size
    )
    images, labels = training_split(args.data)
    features = images.shape[1]
    layers = []
    previous = features
    for width in args.hidden:
        layers += [nn.Linear(previous, width), nn.ReLU()]
        previous = width
    layers.append(nn.Linear(previous, CLASSES))
    torch.manual_seed(args.seed)
    model = DistributedDataParallel(nn.Sequential(*layers))
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    scale = 1.0 / (255.0 * PIXEL_STD)
    shift = PIXEL_MEAN / PIXEL_STD
    share = rank_share(args.global_batch, args.world_size, args.rank)
    batches_per_epoch = len(labels) // args.global_batch
    phases = {"step_s": [], "data_s": [], "forward_s": [], "backward_s": [], "optimizer_s": []}
    order = None
    loss = None
    for step in range(args.warmup_steps + args.steps):
        started = time.perf_counter()
        epoch, position = divmod(step, batches_per_epoch)
        if position == 0:
            order = np.random.default_rng(args.seed + epoch).permutation(len(labels))
        batch = order[position * args.global_batch : (position + 1) * args.global_batch][share]
        inputs = torch.from_numpy(images[batch]).float().mul_(scale).sub_(shift)
        targets = torch.from_numpy(labels[batch].astype(np.int64))
        gathered = time.perf_counter()
        loss = functional.cross_entropy(model(inputs), targets)
        forwarded = time.perf_counter()
        loss.backward()
        backwarded = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        finished = time.perf_counter()
        if step >= args.warmup_steps:
            phases["step_s"].append(finished - started)
            phases["data_s"].append(gathered - started)
            phases["forward_s"].append(forwarded - gathered)
            phases["backward_s"].append(backwarded - forwarded)
            phases["optimizer_s"].append(finished - backwarded)
    dist.barrier()
    dist.destroy_process_group()
    result = {name: median(values) for name, values in phases.items()}
    result["rank"] = args.rank
    result["torch_version"] = torch.__version__
    result["blas"] = blas_libraries()
    result["last_loss"] = float(loss.item())
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def launch(args):
    """The launcher: one process per rank, then every rank's result on one line."""
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory(prefix="cohort-pytorch-ddp-") as directory:
        command = [sys.executable, os.path.abspath(__file__)] + sys.argv[1:]
        command += ["--store", os.path.join(directory, "store")]
        ranks = [
            subprocess.Popen(command + ["--rank", str(rank)], stdout=subprocess.PIPE, text=True)
            for rank in range(args.world_size)
        ]
        outputs = [rank.communicate()[0] for rank in ranks]
    results = []
    for rank, (process, output) in enumerate(zip(ranks, outputs)):
        lines = output.strip().splitlines()
        if process.returncode != 0 or not lines:
            sys.exit(f"rank {rank} exited with {process.returncode}")
        results.append(json.loads(lines[-1]))
    # Every rank loads the same torch; rank 0 speaks for all.
    torch_version, blas = results[0]["torch_version"], results[0]["blas"]
    for result in results:
        del result["torch_version"], result["blas"]
    report = {
        "torch_version": torch_version,
        "blas": blas,
        "world_size": args.world_size,
        "threads_per_rank": 1,
        "ranks": results,
    }
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()


def main():
    args = parse_arguments()
    if args.rank is None:
        launch(args)
    else:
        train_rank(args)


if __name__ == "__main__":
    main()
