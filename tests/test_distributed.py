"""Data-parallel training on the CPU (gloo backend, 2 processes on the loopback interface), against one process on
the same global batch:

- DDP: the loss, the averaged gradients and the weights after a few SGD steps; also with gradient checkpointing
  (non-reentrant and reentrant) and with a PEFT LoRA adapter (with and without checkpointing);
- FSDP2 (torch.distributed.fsdp.fully_shard) under several sharding plans: the loss, the full gradients (gathered
  from the shards with DTensor.full_tensor) and the weights after a few SGD steps, then an eval forward and a greedy
  `generate`. FSDP2 unshards a unit's parameters in that unit's forward pre-hook only, so these plans also check
  that the model reads every weight inside the forward of a module that owns it;
- transformers' Trainer under torchrun against a one-process Trainer.

Every launch has a deadline (the workers also stop themselves through faulthandler), so a hang fails the test.
"""

import contextlib
import datetime
import faulthandler
import importlib
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
WORLD = 2
VOCAB = 97
ROWS, LENGTH = 4, 16  # the global batch of every step: each of the WORLD ranks takes ROWS // WORLD rows
STEPS = 3
LR = 0.5
LAUNCH_TIMEOUT = 150  # seconds for one launch of the workers (a few seconds normally); the collectives time out sooner
COLLECTIVE_TIMEOUT = 60
LORA_TARGETS = ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"]
# float32: the ranks sum the tokens in another order than one process does
GRAD_TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}
WEIGHT_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


# ---------------------------------------------------------------------------------------------------------------
# What workers and the reference share
# ---------------------------------------------------------------------------------------------------------------


def make_model(checkpointing=None, lora=False):
    """The tiny model every run starts from (the same weights in every process), in training mode.
    checkpointing: None, "non_reentrant" or "reentrant"; lora: a PEFT LoRA adapter with random (non-zero) weights on
    the projections, so that every adapter weight has a gradient from the first step on."""
    from helpers import tiny_model

    model = tiny_model(hidden=128, layers=2, head_dim=64, vocab=VOCAB, seed=7).train()
    if checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
        )
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(11)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
        model = get_peft_model(model, config)
        model.train()
    return model


def step_batch(step, rows=slice(None)):
    ids = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=torch.Generator().manual_seed(100 + step))[rows]
    return {"input_ids": ids, "labels": ids.clone()}


def eval_ids(rows=slice(None)):
    return torch.randint(0, VOCAB, (ROWS, 8), generator=torch.Generator().manual_seed(999))[rows]


def rank_rows(rank):
    per = ROWS // WORLD
    return slice(rank * per, (rank + 1) * per)


def train(forward, model, rows=slice(None), full=lambda t: t):
    """STEPS steps of SGD on `rows` of each step's batch through `forward` (the model or its wrapper); returns the
    losses, the gradients of the first step and the weights at the end (of `model`'s trainable parameters, by name;
    `full` turns a parameter or gradient into the whole tensor)."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([p for _, p in params], lr=LR)
    losses, grads = [], None
    for step in range(STEPS):
        loss = forward(**step_batch(step, rows)).loss
        loss.backward()
        losses.append(loss.detach().clone())
        if grads is None:
            grads = {name: full(p.grad).detach().clone() for name, p in params}
        optimizer.step()
        optimizer.zero_grad()
    weights = {name: full(p).detach().clone() for name, p in params}
    return {"losses": torch.stack(losses), "grads": grads, "weights": weights}


def generate(model, ids):
    # synced_gpus: under FSDP every rank must run as many forwards as the others, even after its rows are done
    import torch.distributed as dist

    synced = dist.is_available() and dist.is_initialized()
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                          pad_token_id=0, synced_gpus=synced)


# ---------------------------------------------------------------------------------------------------------------
# Launching workers
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def one_thread():
    """torch on one thread for the references this process computes: with the CPU cores busy (the workers, other
    test processes) a tiny model's steps on several OpenMP threads can take 100 times longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_environment():
    return {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo0" if sys.platform == "darwin" else "lo",
            "OMP_NUM_THREADS": "1"}


def _start_worker(rank, port):
    """A worker's first steps: a deadline that ends a hung worker with its stack, one thread, the process group."""
    import torch.distributed as dist

    faulthandler.dump_traceback_later(LAUNCH_TIMEOUT - 10, exit=True)
    torch.set_num_threads(1)
    os.environ.update(loopback_environment(), MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT))


def spawn(worker_name, out_dir, *args):
    """Runs test_distributed.<worker_name>(rank, port, out_dir, *args) in WORLD new processes; fails the test when they
    fail or run past LAUNCH_TIMEOUT (then they are killed)."""
    import torch.multiprocessing as mp

    # by this module's importable name (pytest may have imported this file under another one), so the children
    # can unpickle it: spawn gives them this process's sys.path, which pytest.ini extends with tests/
    worker = getattr(importlib.import_module("test_distributed"), worker_name)
    context = mp.start_processes(worker, args=(free_port(), str(out_dir), *args), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join()
            pytest.fail(f"{worker_name} ran past {LAUNCH_TIMEOUT} s")


def rank_results(out_dir, name):
    return [torch.load(Path(out_dir) / f"{name}{rank}.pt", weights_only=False) for rank in range(WORLD)]


def spawned_results(tmp_path_factory, name):
    """What each rank of `{name}_worker`, spawned in a fresh folder, saved as `{name}{rank}.pt`."""
    out_dir = tmp_path_factory.mktemp(name)
    spawn(f"{name}_worker", out_dir)
    return rank_results(out_dir, name)


def assert_all_close(actual, expected, what, **tolerance):
    assert actual.keys() == expected.keys(), what
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **tolerance,
                                   msg=lambda m, name=name: f"{what} {name}: {m}")


def largest_relative_error(actual, expected):
    return max(((actual[n] - expected[n]).norm() / expected[n].norm()).item() for n in expected)


# ---------------------------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------------------------

DDP_VARIANTS = {
    "plain": {},
    "checkpointing": {"checkpointing": "non_reentrant"},
    "checkpointing_reentrant": {"checkpointing": "reentrant"},
    "lora": {"lora": True},
    "lora_checkpointing": {"lora": True, "checkpointing": "non_reentrant"},
}


def ddp_worker(rank, port, out_dir):
    from torch.nn.parallel import DistributedDataParallel

    _start_worker(rank, port)
    results = {}
    for variant, options in DDP_VARIANTS.items():
        model = make_model(**options)
        ddp = DistributedDataParallel(model)  # find_unused_parameters=False: an unused parameter is an error
        results[variant] = train(ddp, model, rank_rows(rank))
    torch.save(results, Path(out_dir) / f"ddp{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return spawned_results(tmp_path_factory, "ddp")


@pytest.fixture(scope="module")
def references():
    """One process on the whole global batch of every step, for each DDP variant (computed once)."""
    cache = {}

    def reference(variant):
        if variant not in cache:
            torch.manual_seed(0)
            with one_thread():
                model = make_model(**DDP_VARIANTS[variant])
                cache[variant] = train(model, model)
        return cache[variant]

    return reference


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(DDP_VARIANTS))
def test_ddp_equals_one_process_on_the_global_batch(variant, ddp_results, references):
    """After DDP's all-reduce each rank holds the gradient of the global batch (the mean of the ranks' halves); the
    mean of the ranks' losses is the global loss; the replicas stay identical and equal one process's weights."""
    expected = references(variant)
    ranks = [r[variant] for r in ddp_results]
    torch.testing.assert_close(torch.stack([r["losses"] for r in ranks]).mean(0), expected["losses"],
                               rtol=1e-5, atol=1e-6)
    for r in ranks:
        assert_all_close(r["grads"], expected["grads"], f"{variant}: gradient of", **GRAD_TOLERANCE)
        assert_all_close(r["weights"], expected["weights"], f"{variant}: weight after {STEPS} steps",
                         **WEIGHT_TOLERANCE)
    for name in ranks[0]["weights"]:
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), f"the replicas of {name} differ"
    if variant.startswith("lora"):
        assert ranks[0]["grads"] and all("lora_" in name for name in ranks[0]["grads"])


@pytest.mark.slow
def test_ddp_gradients_are_not_one_ranks_own(ddp_results, references):
    """The comparison above can fail: one rank's gradient without the all-reduce (its half of the batch alone) is
    far outside the tolerance, and each rank's loss differs from the global one."""
    torch.manual_seed(0)
    with one_thread():
        model = make_model()
        half = train(model, model, rank_rows(0))
    expected = references("plain")
    assert largest_relative_error(half["grads"], expected["grads"]) > 100 * GRAD_TOLERANCE["rtol"]
    assert not torch.allclose(ddp_results[0]["plain"]["losses"], expected["losses"], rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# FSDP2
# ---------------------------------------------------------------------------------------------------------------


def _shard(model, plan, mesh):
    """Applies fully_shard to `model` (an RWKV7ForCausalLM) after `plan`, innermost units first, the root last."""
    from torch.distributed.fsdp import fully_shard

    from modeling_rwkv7 import RWKV7Block

    units = []
    if plan == "leaves":  # every module the forward calls that owns parameters, as its own unit
        units = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm))]
    elif plan == "group_norm":
        units = [block.attn.g_norm for block in model.model.layers]
    for module in units:
        fully_shard(module, mesh=mesh)
    if plan == "transformers":  # the layout of transformers' _fsdp_plan: the head and the final norm as one unit
        fully_shard(model.model.embeddings, mesh=mesh)
    for module in model.modules():
        if isinstance(module, RWKV7Block):
            fully_shard(module, mesh=mesh)
    if plan == "transformers":
        fully_shard([model.model.norm, model.lm_head], mesh=mesh, reshard_after_forward=False)
    if plan == "inner_model":
        fully_shard(model.model, mesh=mesh)
    fully_shard(model, mesh=mesh)


# plan -> (gradient checkpointing, eval forward and generate too)
FSDP_PLANS = {
    "blocks": (None, True),  # each RWKV7Block (_no_split_modules) and the root, as accelerate wraps transformer layers
    "blocks_checkpointing": ("non_reentrant", False),
    "transformers": (None, True),
    "leaves": (None, True),
    "inner_model": (None, True),  # RWKV7Model (model.model) as a unit too: RWKV7ForCausalLM must call it
    "group_norm": (None, False),  # RWKV7TimeMix.g_norm as its own unit
}


def fsdp_worker(rank, port, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    _start_worker(rank, port)
    mesh = init_device_mesh("cpu", (WORLD,))
    results = {}
    for plan, (checkpointing, evaluate) in FSDP_PLANS.items():
        model = make_model(checkpointing=checkpointing)
        try:
            _shard(model, plan, mesh)
            assert all(isinstance(p, DTensor) for p in model.parameters())
            result = train(model, model, rank_rows(rank), full=lambda t: t.full_tensor())
            if evaluate:
                model.eval()
                with torch.no_grad():
                    result["logits"] = model(input_ids=eval_ids(rank_rows(rank))).logits
                    result["generated"] = generate(model, eval_ids(rank_rows(rank)))
        except Exception as error:  # noqa: BLE001 (the same error on every rank, which run the same code: recorded)
            frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_tb(error.__traceback__)]
            result = {"error": f"{type(error).__name__}: {error}", "where": frames}
        results[plan] = result
        dist.barrier()
    torch.save(results, Path(out_dir) / f"fsdp{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    return spawned_results(tmp_path_factory, "fsdp")


@pytest.fixture(scope="module")
def fsdp_reference():
    """One process: the training run of make_model() (with checkpointing the gradients are those without it), the
    eval logits and the generated tokens."""
    torch.manual_seed(0)
    with one_thread():
        model = make_model()
        result = train(model, model)
        model.eval()
        with torch.no_grad():
            result["logits"] = model(input_ids=eval_ids()).logits
            result["generated"] = generate(model, eval_ids())
    return result


def check_fsdp_plan(plan, fsdp_results, expected):
    ranks = [r[plan] for r in fsdp_results]
    if "error" in ranks[0]:
        raise RuntimeError(f"FSDP2 plan {plan!r}: {ranks[0]['error']}\n  at " + "\n  at ".join(ranks[0]["where"]))
    torch.testing.assert_close(torch.stack([r["losses"] for r in ranks]).mean(0), expected["losses"],
                               rtol=1e-5, atol=1e-6)
    for r in ranks:  # full_tensor() gathers the same whole tensor on every rank
        assert_all_close(r["grads"], expected["grads"], f"FSDP2 {plan}: gradient of", **GRAD_TOLERANCE)
        assert_all_close(r["weights"], expected["weights"], f"FSDP2 {plan}: weight after {STEPS} steps",
                         **WEIGHT_TOLERANCE)
    if FSDP_PLANS[plan][1]:
        for rank, r in enumerate(ranks):
            rows = rank_rows(rank)
            torch.testing.assert_close(r["logits"], expected["logits"][rows], rtol=1e-4, atol=1e-4)
            assert torch.equal(r["generated"], expected["generated"][rows])


@pytest.mark.slow
@pytest.mark.parametrize("plan", ["blocks", "blocks_checkpointing", "transformers", "leaves", "inner_model"])
def test_fsdp2_equals_one_process_on_the_global_batch(plan, fsdp_results, fsdp_reference):
    """fully_shard on the CPU with gloo: the mean of the ranks' losses, the full gradients (gathered from the
    shards) and the weights after STEPS SGD steps equal one process's on the global batch; then, sharded still,
    an eval forward and a greedy generate (synced_gpus) give one process's logits and tokens for each rank's rows."""
    check_fsdp_plan(plan, fsdp_results, fsdp_reference)


def test_sharded_weights_never_decode_through_a_cuda_graph():
    """A replayed decoding graph would skip the hooks in which FSDP2 gathers a unit's weights: a model with a
    DTensor weight (FSDP2, tensor parallelism) is not one whose weights lie whole on one CUDA device."""
    from types import SimpleNamespace

    from torch.distributed.tensor import DTensor

    from modeling_rwkv7 import whole_on_one_cuda_device

    def weight(device, sharded=False):
        return SimpleNamespace(device=torch.device(device), **({"placements": ()} if sharded else {}))

    assert isinstance(DTensor.placements, property)  # what whole_on_one_cuda_device looks for
    assert whole_on_one_cuda_device([weight("cuda:0"), weight("cuda:0")])
    assert not whole_on_one_cuda_device([weight("cuda:0"), weight("cuda:0", sharded=True)])
    assert not whole_on_one_cuda_device([weight("cuda:0"), weight("cuda:1")])
    assert not whole_on_one_cuda_device([weight("cuda:0"), weight("cpu")])


@pytest.mark.slow
@pytest.mark.xfail(raises=RuntimeError, strict=True, reason=(
    "RWKV7TimeMix.params() hands g_norm.weight and g_norm.bias to the time mix's F.group_norm without calling g_norm, "
    "so FSDP2 never unshards a g_norm that is its own unit: 'aten.native_group_norm.default got mixed torch.Tensor "
    "and DTensor'"))
def test_fsdp2_group_norm_as_its_own_unit(fsdp_results, fsdp_reference):
    check_fsdp_plan("group_norm", fsdp_results, fsdp_reference)


# ---------------------------------------------------------------------------------------------------------------
# transformers' Trainer under torchrun
# ---------------------------------------------------------------------------------------------------------------

TRAINER_STEPS = 4


class TrainerExamples(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, VOCAB, (ROWS * TRAINER_STEPS, LENGTH), generator=torch.Generator().manual_seed(5))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def run_trainer(out_dir, per_device_batch, distributed):
    """TRAINER_STEPS steps of SGD (sequential batches, no shuffling); returns the logged losses and gradient norms and,
    on rank 0, the final weights."""
    from transformers import Trainer, TrainingArguments

    model = make_model()
    extra = {}
    if distributed:
        extra = {"ddp_backend": "gloo", "ddp_find_unused_parameters": False, "ddp_timeout": COLLECTIVE_TIMEOUT}
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=per_device_batch, max_steps=TRAINER_STEPS,
        learning_rate=LR, optim="sgd", lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        train_sampling_strategy="sequential", logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=0, **extra,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TrainerExamples())
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    result = {"world_size": args.world_size, "losses": torch.tensor([e["loss"] for e in logged]),
              "grad_norms": torch.tensor([e["grad_norm"] for e in logged])}
    if args.process_index == 0:
        result["weights"] = {name: p.detach().clone() for name, p in model.named_parameters()}
    return result


def trainer_worker_main(out_dir):
    """The body of each torchrun worker (python -m test_distributed trainer OUT_DIR)."""
    faulthandler.dump_traceback_later(LAUNCH_TIMEOUT - 10, exit=True)
    (Path(out_dir) / f"pid{os.environ['RANK']}").write_text(str(os.getpid()))
    torch.set_num_threads(1)
    result = run_trainer(out_dir, ROWS // WORLD, distributed=True)
    torch.save(result, Path(out_dir) / f"trainer{os.environ['RANK']}.pt")
    # Trainer leaves its process group open; gloo's threads torn down at interpreter exit can abort the worker
    # ("terminate called without an active exception")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_with_deadline(argv, env, timeout, log):
    """Runs argv in a new session, its output to the file `log`; returns (rc, output). At the deadline it stops the
    session (torchrun stops its workers on SIGTERM, then SIGKILL) and the workers that wrote their pid beside `log`
    (torchrun starts each in a session of its own), and fails the test."""
    with open(log, "w") as out:
        process = subprocess.Popen(argv, cwd=str(REPO), env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            for pid_file in Path(log).parent.glob("pid*"):
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            pytest.fail(f"{argv} ran past {timeout} s:\n{Path(log).read_text()[-4000:]}")
    return process.returncode, Path(log).read_text()


@pytest.mark.slow
def test_trainer_ddp_under_torchrun_equals_one_process(tmp_path):
    """transformers' Trainer in 2 CPU processes under torchrun (DDP on gloo, 2 rows each) logs the losses and
    gradient norms of a one-process Trainer on 4 rows, and ends with its weights."""
    import transformers
    from helpers import _SAME_TRANSFORMERS

    pythonpath = [str(REPO), str(TESTS)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, **loopback_environment(), "PYTHONPATH": os.pathsep.join(pythonpath)}
    launcher = (
        _SAME_TRANSFORMERS.format(version=transformers.__version__)
        + "import sys\nfrom torch.distributed.run import main\nmain(sys.argv[1:])\n"
    )
    argv = [sys.executable, "-c", launcher, "--nnodes=1", f"--nproc-per-node={WORLD}", "--max-restarts=0",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}", "--module", "test_distributed", "trainer",
            str(tmp_path)]
    rc, output = run_with_deadline(argv, env, LAUNCH_TIMEOUT, tmp_path / "torchrun.log")
    assert rc == 0, output[-6000:]
    ranks = rank_results(tmp_path, "trainer")

    with one_thread():
        expected = run_trainer(tmp_path / "one", ROWS, distributed=False)
    assert expected["world_size"] == 1 and all(r["world_size"] == WORLD for r in ranks)
    for r in ranks:
        assert len(r["losses"]) == TRAINER_STEPS
        torch.testing.assert_close(r["losses"], expected["losses"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r["grad_norms"], expected["grad_norms"], rtol=1e-4, atol=1e-5)
    assert_all_close(ranks[0]["weights"], expected["weights"], "Trainer: weight", **WEIGHT_TOLERANCE)
    # the weights moved: the comparison is not of two untouched models
    assert largest_relative_error(make_model().state_dict(), expected["weights"]) > 1e-3


if __name__ == "__main__" and sys.argv[1:2] == ["trainer"]:
    trainer_worker_main(sys.argv[2])
