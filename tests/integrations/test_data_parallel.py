"""Data parallelism, both modes, 2 gloo processes on 127.0.0.1 (DistributedDataParallel, accelerate,
Trainer under torchrun), tiny BERT, 3 optimizer steps (2 with topk_at="backward"):

* topk_at="step": every replica ends where one process on the concatenated batches does;
* topk_at="backward": each process keeps its own top-k and the optimizer exchanges only those entries;
  every replica ends where one process accumulating the processes' micro-batches does, with and
  without gradient accumulation on top, clips by the same norm, sends the bytes of the formula,
  resumes exactly; processes that disagree on k or basis refuse; a killed or stalled process ends the
  step on the other with a named error, not a hang."""

import io
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from parallel_setup import (
    ACCUMULATION,
    BACKWARD_METHODS,
    BACKWARD_STEPS,
    KIND,
    METHODS,
    OPTIMIZER,
    STEPS,
    WORLD,
    build,
    free_port,
    micro_batches,
    reference,
    reference_accumulating,
    shard,
    state,
    step_batches,
)
from torch.nn.parallel import DistributedDataParallel

import sparsegrad
from sparsegrad.data_parallel import backward_topk_layers, exchange_message_bytes

HERE = Path(__file__).resolve().parent


def _init(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a process that fails leaves the other one waiting in a collective: let it fail too, soon
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))


def _train(model, optimizer, rank: int, accumulation: int, steps, method: str = "", ddp: bool = True) -> dict:
    """Training under DDP (unless ``ddp=False``), the last micro-batch of a step synchronising."""
    wrapped = DistributedDataParallel(model) if ddp else model
    norms, sent, in_backward = [], [], []
    exchange = optimizer.exchange
    for step in steps:
        group = step_batches(step, accumulation, method)
        for i, batch in enumerate(group):
            with wrapped.no_sync() if ddp and i < len(group) - 1 else nullcontext():
                wrapped(**shard(batch, rank)).loss.backward()
        if exchange is not None:  # under DDP the entries were summed at the end of the last backward pass
            in_backward.append(not exchange.pending)
        optimizer.step()
        optimizer.zero_grad()
        norms.append(optimizer.last_grad_norm)
        if exchange is not None:
            sent.append([exchange.last_bytes_sent, *exchange.last_counts])
    return {"state": state(model), "norms": norms, "sent": sent, "in_backward": in_backward}


def _refusal(model, rank: int) -> str:
    """The error of the first exchange, at the end of the first backward pass under DDP."""
    optimizer = sparsegrad.build_optimizer(model, lr=1e-2, schedule="constant")
    try:
        DistributedDataParallel(model)(**shard(micro_batches()[0], rank)).loss.backward()
    except sparsegrad.SparseExchangeError as exc:
        return str(exc)
    return f"no refusal ({optimizer.exchange.steps} exchange)"


def _ddp_worker(rank: int, port: int, out: str) -> None:
    """Every scenario in one pair of processes (one start-up): the trainings, the refusals, then the
    faults, which end with rank 1 killed and rank 0 leaving its broken process group behind."""
    _init(rank, port)
    results = {"step": {}, "backward": {}}
    for method in METHODS:  # topk_at="step"
        model = build(method)
        optimizer = sparsegrad.build_optimizer(model, **OPTIMIZER)
        results["step"][method] = _train(model, optimizer, rank, ACCUMULATION, range(STEPS))["state"]
    for method in BACKWARD_METHODS:
        for accumulation in (1, ACCUMULATION) if method not in KIND else (ACCUMULATION,):
            model = build(method)
            optimizer = sparsegrad.build_optimizer(model, **OPTIMIZER)
            results["backward"][f"{method}-{accumulation}"] = _train(
                model, optimizer, rank, accumulation, range(BACKWARD_STEPS), method, ddp=method not in KIND)  # fmt: skip
    # resume after the first step from a checkpoint, in a fresh model and optimizer
    model = build("sparsegrad_backward")
    optimizer = sparsegrad.build_optimizer(model, **OPTIMIZER)
    _train(model, optimizer, rank, ACCUMULATION, range(1))
    checkpoint = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint)
    checkpoint.seek(0)
    saved = torch.load(checkpoint, weights_only=False)
    model = build("sparsegrad_backward")
    model.load_state_dict(saved["model"])
    optimizer = sparsegrad.build_optimizer(model, **OPTIMIZER)
    optimizer.load_state_dict(saved["optimizer"])
    results["resumed"] = _train(model, optimizer, rank, ACCUMULATION, range(1, BACKWARD_STEPS))["state"]
    # processes that disagree refuse at the first step, every one of them
    results["refuse_k"] = _refusal(build("sparsegrad_backward", k=0.05 if rank == 0 else 0.1), rank)
    results["refuse_basis"] = _refusal(build("sparsegrad_backward", basis_seed=11 + rank), rank)
    # a layer left in DDP's buckets, or outside any build_optimizer optimizer, refuses at its forward
    refusals = []
    for prepared in (False, True):
        model = build("meprop_backward")
        if not prepared:
            for _, _, param in backward_topk_layers(model):
                del param._ddp_ignored
        try:
            model(**shard(micro_batches()[0], rank))
            refusals.append("")
        except RuntimeError as exc:
            refusals.append(str(exc))
    results["refuse_unprepared"], results["refuse_no_optimizer"] = refusals
    torch.save(results, Path(out) / f"rank{rank}.pt")
    _faults(rank, out)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The 2 processes of :func:`_ddp_worker`: each one's results, and rank 0's report of the faults."""
    out, port = tmp_path_factory.mktemp("ddp"), free_port()
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_ddp_worker, args=(r, port, str(out))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=900)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, -signal.SIGKILL], "a worker failed: see its traceback above"
    runs = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    faults = dict(line.split("\t", 1) for line in (out / "faults-rank0.txt").read_text().splitlines())
    return runs, faults


@pytest.fixture(scope="module")
def ddp_runs(launched):
    return launched[0]


@pytest.fixture(scope="module")
def faults(launched):
    return launched[1]


def assert_replicas_match_reference(states: list[dict], expected: dict, method: str) -> None:
    for key, value in expected.items():
        for other in states[1:]:
            assert torch.equal(other[key], states[0][key]), (method, key, "replicas differ")
        if value.is_floating_point():
            torch.testing.assert_close(states[0][key], value, rtol=0, atol=1e-5, msg=f"{method}: {key}")
        else:
            assert torch.equal(states[0][key], value), (method, key)


def test_ddp_leaves_the_sparse_weights_and_layer_buffers_alone_until_merge():
    """apply_method lists, for DDP to ignore, the sparse weights of topk_at="backward" layers and their
    buffers (the bias stays with DDP); topk_at="step" lists nothing; merge gives the names back."""
    model = build("sparsegrad_backward")
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    layer = "bert.encoder.layer.0.intermediate.dense"
    assert {f"{layer}.weight", f"{layer}.u_in", f"{layer}.u_out", f"{layer}.updated_mask"} <= ignored
    assert not any(name.endswith("bias") for name in ignored)
    assert not hasattr(build("sparsegrad"), "_ddp_params_and_buffers_to_ignore")
    assert not hasattr(sparsegrad.merge(model), "_ddp_params_and_buffers_to_ignore")


def test_step_mode_equals_one_process_on_the_whole_batch(ddp_runs):
    for method in METHODS:
        assert_replicas_match_reference([r["step"][method] for r in ddp_runs], reference(method), method)


@pytest.mark.parametrize(
    ("method", "accumulation"),
    [(m, a) for m in BACKWARD_METHODS for a in ((1, ACCUMULATION) if m not in KIND else (ACCUMULATION,))],
)
def test_backward_mode_equals_one_process_accumulating(ddp_runs, method, accumulation):
    runs = [r["backward"][f"{method}-{accumulation}"] for r in ddp_runs]
    expected, expected_norms = reference_accumulating(method, accumulation)
    assert_replicas_match_reference([run["state"] for run in runs], expected, method)
    # clipping (max_grad_norm=1) saw the summed sparse step: the same norm on every process
    assert runs[0]["norms"] == runs[1]["norms"]
    torch.testing.assert_close(torch.tensor(runs[0]["norms"]), torch.tensor(expected_norms), rtol=1e-5, atol=0)
    # under DDP the entries travel at the end of the synchronising backward pass, before any clipping;
    # unwrapped, at the optimizer step
    assert all(run["in_backward"] == [method not in KIND] * len(expected_norms) for run in runs)


def test_exchange_sends_k_entries_per_process(ddp_runs):
    """Per step and process: 8 bytes of count per sparse weight, then per weight k entries of an int32
    index and a float32 value (up to k per micro-batch with accumulation)."""
    layers = backward_topk_layers(build("sparsegrad_backward"))
    ks, numels = [layer.k for _, layer, _ in layers], [p.numel() for _, _, p in layers]
    for run in ddp_runs:
        for sent in run["backward"]["sparsegrad_backward-1"]["sent"]:
            assert sent == [8 * len(ks) + sum(8 * k for k in ks), *ks]
        for sent in run["backward"]["sparsegrad_backward-2"]["sent"]:
            counts = sent[1:]
            assert all(k < c <= ACCUMULATION * k for c, k in zip(counts, ks)), (counts, ks)
            assert sent[0] == 8 * len(ks) + 8 * sum(counts) == exchange_message_bytes(counts, numels)
    # the paper's LLaMA-2-7B setting: 22 matrices of 11008 x 4096, k = 100,000; bf16 values: 6 bytes
    assert exchange_message_bytes([100_000] * 22, [11008 * 4096] * 22) == 22 * 8 + 22 * 100_000 * 8
    assert exchange_message_bytes([100_000] * 22, [11008 * 4096] * 22, torch.bfloat16) == 22 * 8 + 22 * 100_000 * 6


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(ddp_runs):
    for run in ddp_runs:
        uninterrupted = run["backward"][f"sparsegrad_backward-{ACCUMULATION}"]["state"]
        assert run["resumed"].keys() == uninterrupted.keys()
        for key, value in uninterrupted.items():
            assert torch.equal(run["resumed"][key], value), key


def test_processes_that_disagree_refuse_at_the_first_step(ddp_runs):
    for run in ddp_runs:
        assert "keeps k=102 entries per backward pass on rank 0 and k=205 on rank 1" in run["refuse_k"]
        assert "different transition basis (u_in) on rank 0 and rank 1" in run["refuse_basis"]


def test_unprepared_layers_refuse_naming_both_modes(ddp_runs):
    for run in ddp_runs:
        message = run["refuse_unprepared"]
        assert "prepare_data_parallel(module)" in message
        assert "topk_at='backward'" in message and "topk_at='step'" in message
        assert "sparsegrad.build_optimizer(model, ...)" in run["refuse_no_optimizer"]


def _faults(rank: int, out: str) -> None:
    """Each phase: one step of both processes, then a backward pass, after which rank 1 stalls past the
    3 s exchange timeout (phase "stalled") or is SIGKILLed (phase "killed"); rank 0 steps and reports.
    Without DDP: the exchange runs in the optimizer step."""
    report = Path(out) / f"faults-rank{rank}.txt"
    model = build("sparsegrad_backward")
    batches = micro_batches()
    lines = []
    for phase in ("stalled", "killed"):
        optimizer = sparsegrad.build_optimizer(model, lr=1e-2, schedule="constant", exchange_timeout=3)
        model(**shard(batches[0], rank)).loss.backward()
        dist.barrier()  # the two processes start the step together: only the stall below is waited for
        optimizer.step()
        optimizer.zero_grad()
        model(**shard(batches[1], rank)).loss.backward()
        dist.barrier()
        if rank == 1 and phase == "stalled":
            time.sleep(4.5)
        elif rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            started = time.monotonic()
            try:
                optimizer.step()
                lines.append(f"{phase}\tno error")
            except sparsegrad.SparseExchangeError as exc:
                lines.append(f"{phase}\t{time.monotonic() - started:.2f}\t{exc}")
            optimizer.zero_grad()
        report.write_text("\n".join(lines))
        if phase == "stalled":
            dist.barrier()
    os._exit(0)  # the process group is broken: skip its teardown


def test_a_killed_or_stalled_process_ends_the_step_with_a_named_error(faults):
    waited, message = faults["stalled"].split("\t")
    assert 2.9 < float(waited) < 5.5, waited
    assert "all_gather of the entry counts" in message and "collective timeout 3 s" in message
    assert "exchange_timeout=seconds" in message
    waited, message = faults["killed"].split("\t")
    assert float(waited) < 2.9, waited  # a closed connection, noticed before the timeout
    assert "sparse gradient exchange" in message and "died, stalled" in message


def test_accelerate_both_modes(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (torchrun underneath; the script asks for
    Accelerator(cpu=True): 2 CPU processes on gloo). `--cpu` alone would start one process."""
    step_methods = ["sparsegrad", "meprop", "leading_block"]
    backward_methods = ["sparsegrad_backward", "leading_block_backward"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(HERE / "accelerate_train.py"), str(tmp_path),
           *step_methods, *backward_methods]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1])}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for method in step_methods + backward_methods:
        states = [torch.load(tmp_path / f"{method}-rank{r}.pt", weights_only=True) for r in range(WORLD)]
        expected = reference(method) if method in METHODS else reference_accumulating(method, ACCUMULATION)[0]
        assert_replicas_match_reference(states, expected, method)


def test_trainer_under_torchrun(tmp_path):
    """transformers.Trainer launched by torchrun on 2 gloo processes, as it is and with prepare_trainer,
    trains a topk_at="backward" SparseGrad model as one process accumulating the micro-batches both
    processes saw (Trainer scales each process's loss by the number of processes here, DDP averages),
    clipping and logging the same norm on both."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
           str(free_port()), str(HERE / "torchrun_trainer.py"), str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1])}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    from torchrun_trainer import replay

    for name in ("plain", "prepared"):
        runs = [torch.load(tmp_path / f"trainer-{name}-rank{r}.pt", weights_only=True) for r in range(WORLD)]
        expected, expected_norms = replay([run["batches"] for run in runs])
        assert_replicas_match_reference([run["state"] for run in runs], expected, f"trainer {name}")
        assert runs[0]["norms"] == runs[1]["norms"] and max(expected_norms) > 1  # clipping was active
        torch.testing.assert_close(torch.tensor(runs[0]["norms"]), torch.tensor(expected_norms), rtol=1e-5, atol=0)
