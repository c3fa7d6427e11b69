"""Data-parallel training: 2 processes (torchrun, gloo on CPU) give the adapter of 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from tsugiki.cli import main
from tsugiki.train import distributed
from helpers_data import write_jsonl

# Rows of different lengths, so ranks see different target counts and the global denominator matters.
ROWS = [{"instruction": f"Say the word number {i}.", "input": "", "output": " ".join([f"word {i % 5}"] * (1 + i % 4))}
        for i in range(20)]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", ROWS)


def train_args(model_dir, data_file, out, batch_size, max_steps=5):
    # 17 train rows in steps of 4: step 5 holds one row, so rank 1 gets none there.
    return ["train", "--model", model_dir, "--data", data_file, "--output_dir", out, "--batch_size", str(batch_size),
            "--max_steps", str(max_steps), "--dtype", "fp32", "--lora_dropout", "0", "--lora_r", "4",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--save_steps", "4", "--eval_split", "3",
            "--tensorboard", "false"]


def torchrun(args, nproc=2):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), "-m", "tsugiki", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_two_processes_match_one_process_with_the_same_global_batch(model_dir, data_file, tmp_path, capsys):
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    torchrun(train_args(model_dir, data_file, two, batch_size=2))
    assert main(train_args(model_dir, data_file, one, batch_size=4)) == 0

    a, b = load_file(os.path.join(two, "adapter_model.safetensors")), load_file(os.path.join(one, "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and a
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # The run trained (the adapter moved away from its zero-initialised B matrices).
    assert any(float(t.abs().max()) > 0 for n, t in a.items() if "lora_B" in n)

    # One writer: the same files as the single-process run, nothing left half-written, one line per step.
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))
    assert not [n for n in os.listdir(two) if n.startswith(".")]  # no tmp folder or file left behind
    rows_two, rows_one = metrics(two), metrics(one)
    assert [r["step"] for r in rows_two] == [1, 2, 3, 4, 5]
    for r2, r1 in zip(rows_two, rows_one):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-4)
    assert rows_two[-1]["eval_loss"] == pytest.approx(rows_one[-1]["eval_loss"], rel=1e-5)
    summary = json.loads(open(os.path.join(two, "summary.json")).read())
    assert (summary["world_size"], summary["effective_batch"], summary["grad_accum"]) == (2, 4, 1)
    assert summary["tokens"] == json.loads(open(os.path.join(one, "summary.json")).read())["tokens"]

    # The 2-process checkpoint (effective batch 4) resumes in one process with batch 4 ...
    assert main(train_args(model_dir, data_file, two, batch_size=4, max_steps=6)) == 0
    assert [r["step"] for r in metrics(two)] == [1, 2, 3, 4, 5, 6]
    # ... but not with an effective batch of 2, whose data positions mean something else.
    capsys.readouterr()
    assert main(train_args(model_dir, data_file, two, batch_size=2, max_steps=7)) == 2
    assert "batch_size * grad_accum * processes: 4 -> 2" in capsys.readouterr().err


# ---------------------------------------------------------------------- helpers, one process
def test_helpers_are_no_ops_in_one_process():
    assert not distributed.init_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    distributed.barrier()
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert distributed.all_reduce_sum([3, 4.5]) == [3.0, 4.5]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    layer = nn.Linear(2, 2)
    layer(torch.ones(1, 2)).sum().backward()
    before = layer.weight.grad.clone()
    distributed.all_reduce_grads(layer.parameters())
    assert torch.equal(layer.weight.grad, before)
    with pytest.raises(KeyError):
        distributed.run_on_main(lambda: {}["missing"])


def test_shard_gives_contiguous_shares_covering_every_item():
    items = list(range(5))
    assert [distributed.shard(items, r, 2) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [distributed.shard(items[:1], r, 2) for r in range(2)] == [[0], []]
    assert sum((distributed.shard(items, r, 3) for r in range(3)), []) == items
    with pytest.raises(ValueError, match="rank 2 is outside a world of 2"):
        distributed.shard(items, 2, 2)


def test_init_refuses_a_half_set_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="RANK, MASTER_ADDR"):
        distributed.init_distributed()


# ---------------------------------------------------------------------- helpers, two processes
def _collectives(rank: int, port: int, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        assert distributed.init_distributed() and distributed.init_distributed()  # idempotent
        out = {"rank": distributed.rank(), "world": distributed.world_size()}
        out["sum"] = distributed.all_reduce_sum([rank + 1, 0.5])
        out["obj"] = distributed.broadcast_object({"from": rank})
        used, unused, absent = (nn.Parameter(torch.zeros(3)) for _ in range(3))
        used.grad = torch.full((3,), float(rank + 1))
        if rank == 1:
            unused.grad = torch.ones(3)  # a gradient on one rank only still counts
        distributed.all_reduce_grads([used, unused, absent])
        out["grads"] = [used.grad.tolist(), unused.grad.tolist(), absent.grad]
        weight = nn.Parameter(torch.full((2,), float(rank)))
        distributed.broadcast_params([weight])
        out["broadcast"] = weight.tolist()
        try:
            distributed.run_on_main(lambda: (_ for _ in ()).throw(FileExistsError("output_dir taken")))
        except FileExistsError as err:
            out["error"] = str(err)
        out["decided"] = distributed.run_on_main(lambda: f"decided by {distributed.rank()}")
        out["gathered"] = distributed.gather_objects({"from": rank})
        same = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}]
        distributed.refuse_different_rows(same, "training rows")  # the same rows: nothing said
        stale = same + [{"input_ids": [4, 5], "labels": [4, 5]}] if rank == 1 else same
        try:
            distributed.refuse_different_rows(stale, "training rows")
        except ValueError as err:
            out["different_rows"] = str(err)
        results[rank] = out
    finally:
        distributed.destroy()


def test_collectives_across_two_processes():
    results = mp.Manager().dict()
    mp.spawn(_collectives, args=(free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        out = results[rank]
        assert (out["rank"], out["world"]) == (rank, 2)
        assert out["sum"] == [3.0, 1.0]
        assert out["obj"] == {"from": 0}
        assert out["grads"] == [[3.0] * 3, [1.0] * 3, None]
        assert out["broadcast"] == [0.0, 0.0]
        assert out["error"] == "output_dir taken"
        assert out["decided"] == "decided by 0"
        assert out["gathered"] == [{"from": 0}, {"from": 1}]
        # A stale copy of the data on one node is an error on every rank, not a silent mismatch or a hang.
        assert out["different_rows"].startswith("the processes read different training rows (rank 0: 1 rows, "
                                                "rank 1: 2 rows, or the same number with other content)")


def test_a_resumed_two_process_run_draws_each_ranks_own_random_numbers(model_dir, tmp_path):
    """NEFTune's noise and dropout draw from each rank's generator, whose streams part ways (the ranks' rows differ
    in length); a checkpoint holding only rank 0's state resumed rank 1 on rank 0's stream."""
    import shutil

    # Unshuffled, each step's first two rows (rank 0's) are short and the last two (rank 1's) long.
    rows = [{"instruction": f"Say the word number {i}.",
             "output": " ".join([f"word {i % 5}"] * (1 if i % 4 < 2 else 12))} for i in range(24)]
    data = write_jsonl(tmp_path / "uneven.jsonl", rows)
    out = str(tmp_path / "run")
    args = train_args(model_dir, data, out, batch_size=2, max_steps=6) + [
        "--save_steps", "3", "--neftune_alpha", "5", "--lora_dropout", "0.1", "--shuffle", "false",
        "--eval_split", "0"]
    torchrun(args)
    uninterrupted = load_file(os.path.join(out, "adapter_model.safetensors"))
    losses = [r["loss"] for r in metrics(out)]
    shutil.rmtree(os.path.join(out, "checkpoint-6"))  # as if stopped after step 5: it resumes from step 3
    proc = torchrun(args)
    assert "resuming from" in proc.stdout + proc.stderr
    resumed = load_file(os.path.join(out, "adapter_model.safetensors"))
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    assert [r["loss"] for r in metrics(out)][-3:] == losses[-3:]


def _stop_on_rank_1(rank: int, port: int, model_dir: str, data: str, out: str, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import tsugiki

    def stop_at_2_on_rank_1(trainer, record):
        return not (rank == 1 and record["step"] == 2)

    try:
        result = tsugiki.train({"model": model_dir, "data": data, "output_dir": out, "max_steps": 5, "batch_size": 2,
                                "dtype": "fp32", "eval_split": 0, "save_steps": 0, "tensorboard": False},
                               progress=False, callbacks=[stop_at_2_on_rank_1])
        results[rank] = result.metrics["steps"]
    finally:
        distributed.destroy()


def test_a_callback_stopping_one_rank_stops_them_all(model_dir, data_file, tmp_path):
    """The other rank waited in the next step's collectives (for the 30-minute timeout)."""
    results = mp.Manager().dict()
    context = mp.spawn(_stop_on_rank_1, args=(free_port(), model_dir, data_file, str(tmp_path / "run"), results),
                       nprocs=2, join=False)
    deadline = time.monotonic() + 180
    joined = False
    while not joined and time.monotonic() < deadline:  # join() returns as each process ends
        joined = context.join(timeout=max(1.0, deadline - time.monotonic()))
    if not joined:
        for process in context.processes:
            process.terminate()
    assert joined, "a rank is still waiting"
    assert dict(results) == {0: 2, 1: 2}


def test_what_is_said_before_training_is_said_once_under_torchrun(model_dir, data_file, tmp_path):
    """Warnings given before the process group is joined were printed by every rank."""
    args = train_args(model_dir, data_file, str(tmp_path / "run"), batch_size=2, max_steps=1)
    proc = torchrun(args + ["--eval_data", data_file])  # train_args also sets eval_split: ignored, said once
    assert (proc.stdout + proc.stderr).count("eval_split=3.0 is ignored: eval_data is given") == 1
