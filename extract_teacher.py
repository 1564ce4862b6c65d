"""Extract a trained teacher's deformations into a Teacher_deformations store (for ALDK / L2 distillation).

``python extract_teacher.py -c weights/<teacher>[:STEP] [-d dataset.json] [--split 1] [--limit N]``
``python extract_teacher.py --oracle -d data/synthetic.json``: the generator's ground-truth flows instead
(synthetic datasets of one shared anatomy), stored as ``Teacher_deformations/<dataset>/oracle.h5``.

Runs the teacher over the (unaugmented) pairs of a split and stores each pair's final aggregated flow
as float16 ``(3, X, Y, Z)`` under the key ``"<fixed id>-<moving id>"`` in one chunked, compressed HDF5
file, by default ``Teacher_deformations/<dataset json name>/<teacher run>_<step>.h5`` -- the folder
``train.py --aldk`` looks in by default. The file's manifest records the teacher (config, step, weight
digest, checkpoint path) and the dataset config. Extraction is resumable: an interrupted run leaves
``<out>.partial`` and the next run skips the pairs already stored; running again on a finished store
adds missing pairs. Storage is about ``6 * X * Y * Z`` bytes per pair before compression (12 MiB at
128^3): for large training sets prefer ``train.py --aldk --teacher weights/<teacher>`` (online teacher).
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from data_util import DatasetError, RCNDataset, make_loader, scan_id
from data_util.teacher_flows import TeacherFlowError, TeacherFlowWriter, pair_key
from network import CheckpointError, SizeError
from network.aldk import OnlineTeacher
from network.cli import ArgumentParser, fail, nonneg_int, positive_int, stored_dataset, to_device


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("-c", "--checkpoint", default=None, help="teacher: weights/<run>[:STEP] or a ckpt_<step>.pt file")
    p.add_argument("--oracle", action="store_true", help="store the synthetic generator's ground-truth pair "
                   "flows instead of a network's (needs -d, a dataset of data_util.synthetic --anatomy shared)")
    p.add_argument("-d", "--dataset", default=None, help="dataset JSON (default: the teacher's training dataset)")
    p.add_argument("--split", default="1", help="scheme whose pairs are extracted (default '1', training)")
    p.add_argument("--paired", action="store_true", help="adjacent entries are pairs (LSPIG)")
    p.add_argument("--out", default=None, help="store file (default Teacher_deformations/<dataset>/<run>_<step>.h5)")
    p.add_argument("--limit", type=positive_int, default=None, help="extract only N pairs")
    p.add_argument("--shuffle", action="store_true", help="with --limit: a random subset of pairs (--seed)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("-r", "--rep", type=positive_int, default=None, help="teacher shared-weight repetitions (default: its own)")
    p.add_argument("-g", "--gpu", default="-1", help="GPU id, or -1 for the CPU; under torchrun one id per process (-g 0,1) or -1")
    p.add_argument("--batch", type=positive_int, default=1, help="pairs per teacher forward pass")
    p.add_argument("--workers", type=nonneg_int, default=1, help="data loader worker processes")
    p.add_argument("--threads", type=nonneg_int, default=0, help="torch CPU threads (0: torch default)")
    return p.parse_args(argv)


def default_store_path(dataset_json: str, checkpoint_path: str, step: int) -> str:
    stem = os.path.splitext(os.path.basename(dataset_json))[0]
    run = os.path.basename(os.path.dirname(os.path.abspath(checkpoint_path)))
    return os.path.join("Teacher_deformations", stem, f"{run}_{step}.h5")


def open_teacher(args, device):
    """``(teacher, dataset, pairs)``: a network checkpoint (``-c``) or the synthetic oracle (``--oracle``)."""
    from data_util.synthetic import OracleTeacher

    if args.oracle == bool(args.checkpoint):
        fail("pass either -c weights/<teacher> or --oracle")
    if args.oracle and args.dataset is None:
        fail("--oracle needs -d path/to/synthetic.json")
    try:
        teacher = OnlineTeacher(args.checkpoint, device, rep=args.rep) if args.checkpoint else None
        if args.dataset is None:
            args.dataset = stored_dataset({"path": teacher.path, "train_args": teacher.train_args})
        dataset = RCNDataset(args.dataset, paired=args.paired, splits=[args.split])
        pairs = dataset.pairs(args.split)
        if teacher is None:
            teacher = OracleTeacher(dataset)
    except (CheckpointError, DatasetError, SizeError, ValueError) as e:
        fail(str(e))
    if dataset.image_size is not None and tuple(dataset.image_size) != teacher.image_size:
        fail(f"{args.dataset}: image size {tuple(dataset.image_size)} differs from the teacher's {teacher.image_size}")
    return teacher, dataset, pairs


def store_path(args, teacher, oracle: bool) -> str:
    if args.out:
        return args.out
    if oracle:
        return os.path.join("Teacher_deformations", os.path.splitext(os.path.basename(args.dataset))[0], "oracle.h5")
    return default_store_path(args.dataset, teacher.path, teacher.step)


def extract(teacher, dataset, args, pairs, writer, device, oracle: bool, show: bool = True) -> None:
    """Run the teacher over ``pairs`` (those not in ``writer`` yet) and store each pair's flow."""
    from tqdm import tqdm

    pairs = [p for p in pairs if pair_key(scan_id(p[0]), scan_id(p[1])) not in writer]
    if not pairs:
        return
    if oracle:
        for fixed, moving in tqdm(pairs, dynamic_ncols=True, disable=None if show else True):
            writer.write(pair_key(scan_id(fixed), scan_id(moving)), teacher.flow(fixed, moving))
        return
    loader = make_loader(dataset, args.split, args.batch, pairs=pairs, num_workers=args.workers)
    for batch in tqdm(loader, total=len(loader), dynamic_ncols=True, disable=None if show else True):
        batch = to_device(batch, device)
        flow = teacher(batch["voxel1"], batch["voxel2"]).float().cpu()
        for b in range(flow.shape[0]):
            writer.write(pair_key(batch["id1"][b], batch["id2"][b]), flow[b].numpy())


def shard_path(out: str, rank: int, world_size: int) -> str:
    """Where process ``rank`` of a torchrun extraction stores its share before rank 0 merges them."""
    return f"{out}.rank{rank}of{world_size}"


def merge_shards(writer, out: str, world_size: int) -> int:
    """Copy every shard's pairs into ``writer`` (rank 0, after all shards are finished), then delete
    the shards; returns the number of pairs copied. An interrupted merge is resumed by a rerun."""
    import h5py

    copied = 0
    for rank in range(world_size):
        path = shard_path(out, rank, world_size)
        with h5py.File(path, "r") as shard:
            for key in shard["flows"]:
                if key not in writer:
                    writer.write(key, shard["flows"][key][()])
                    copied += 1
    for rank in range(world_size):
        os.remove(shard_path(out, rank, world_size))
    return copied


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from engine.distributed import from_environment

    dist, device = from_environment(args.gpu, argv, "extract_teacher.py", timeout_minutes=24 * 60)
    if not dist.is_main:
        sys.stdout = open(os.devnull, "w")
    status = extract_store(args, dist, device)
    dist.close()
    return status


def extract_store(args, dist, device) -> int:
    """Extract into one store; under torchrun each process takes every ``world_size``-th missing pair
    into its own shard and rank 0 merges the shards."""
    teacher, dataset, pairs = open_teacher(args, device)
    if args.limit is not None:
        if args.shuffle:
            order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed)).tolist()
            pairs = [pairs[i] for i in order]
        pairs = pairs[:args.limit]
    oracle = not isinstance(teacher, OnlineTeacher)
    out = store_path(args, teacher, oracle)
    with open(dataset.json_path, encoding="utf-8") as f:
        dataset_config = json.load(f)
    manifest = {"teacher": teacher.fingerprint(),
                "teacher_checkpoint": None if oracle else os.path.abspath(teacher.path),
                "dataset": args.dataset, "dataset_abspath": dataset.json_path, "dataset_config": dataset_config,
                "split": args.split, "paired": args.paired, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    writer = TeacherFlowWriter(out, manifest, teacher.image_size) if dist.is_main else None
    todo = dist.broadcast([p for p in pairs if pair_key(scan_id(p[0]), scan_id(p[1])) not in writer]
                          if dist.is_main else None)
    source = ("the generator's ground-truth flows" if oracle else f"teacher {teacher.path} (step {teacher.step}, "
              f"{teacher.config.n_cascades} x {teacher.config.base_network}, preset {teacher.config.preset})")
    spread = f", over {dist.world_size} processes" if dist.enabled else ""
    print(f"{source}; {len(pairs)} pairs of split '{args.split}', {len(pairs) - len(todo)} "
          f"already stored, {len(todo)} to extract{spread} -> {out}")
    t0 = time.time()
    target = writer
    try:
        if dist.enabled:
            target = TeacherFlowWriter(shard_path(out, dist.rank, dist.world_size), manifest, teacher.image_size)
        extract(teacher, dataset, args, todo[dist.rank::dist.world_size], target, device, oracle, dist.is_main)
        if dist.enabled:
            target.finish()
            dist.barrier()
            if dist.is_main:
                merge_shards(writer, out, dist.world_size)
        n = len(writer) if writer is not None else 0
        if writer is not None:
            writer.finish()
    except KeyboardInterrupt:
        for w in {id(target): target, id(writer): writer}.values():
            if w is not None:
                w.close()
        print(f"interrupted: the pairs so far are kept in {out}.partial (and the per-process shards); "
              f"run the same command again to resume")
        return 130
    except (DatasetError, TeacherFlowError, ValueError) as e:
        for w in {id(target): target, id(writer): writer}.values():
            if w is not None:
                w.close()
        if isinstance(e, (DatasetError, TeacherFlowError)):
            raise
        raise TeacherFlowError(str(e)) from None
    if dist.is_main:
        print(f"done: {len(todo)} pairs in {time.time() - t0:.1f} s; {out} holds {n} pairs "
              f"({os.path.getsize(out) / 2 ** 20:.1f} MiB)")
    return 0


def cli() -> int:
    """Console entry point (``ldr-extract-teacher``): :func:`main` with every fault reported as one line."""
    from network.cli import run

    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
