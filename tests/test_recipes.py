"""The launch recipes: size configs with layouts that fit their GPU counts, the smoke test under torchrun and the
deepspeed launcher on the CPU (each run in a folder of its own), the XL script run from a shell and by the deepspeed
launcher, and the commands the slurm scripts build."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from megapixel.config import load
from megapixel.engine.build import deepspeed_config
from megapixel.engine.metrics import read_metrics
from megapixel.engine.signals import STOP_FILE
from megapixel.parallel import validate_layout

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
XL = RECIPES / "igpt_xl.sh"
# The GPUs each size's layout is written for (its comment does the memory arithmetic).
GPUS = {"s": 8, "m": 8, "l": 8, "xl": 32}


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without a launcher's rank variables, the venv's programs first on PATH."""
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, "PYTHON": sys.executable, **extra}


@pytest.mark.parametrize("size", GPUS)
def test_size_recipes_lay_out_validly_on_their_gpus(size):
    cfg = load(RECIPES / f"igpt_{size}.yaml")
    world = GPUS[size]
    validate_layout(cfg, world)
    data = world // (cfg.parallel.tensor * cfg.parallel.pipeline)
    ds = deepspeed_config(cfg, data, torch.device("cuda"))
    assert ds["train_batch_size"] == cfg.train.batch_size == (128 if size != "xl" else 64)
    assert ds["bf16"] == {"enabled": True} and ds["zero_optimization"]["stage"] == cfg.parallel.zero_stage


def test_xl_recipe_is_tensor4_by_pipeline2_with_zero1_and_checkpointing():
    cfg = load(RECIPES / "igpt_xl.yaml")
    assert cfg.model.n_layer == 60 and cfg.model.n_embd == 3072 and cfg.model.n_ctx == 4096
    p = cfg.parallel
    assert (p.tensor, p.pipeline, p.zero_stage, p.activation_checkpointing) == (4, 2, 1, True)


def run_smoke(out: Path, *args: str) -> str:
    done = subprocess.run(
        ["bash", str(RECIPES / "smoke.sh"), "--out", str(out), *args],
        env=clean_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    return done.stdout


@pytest.mark.slow
def test_smoke_trains_20_steps_with_tensor2_under_torchrun_and_pipeline2_under_deepspeed_each_in_a_new_folder(tmp_path):
    run_smoke(tmp_path, "--nproc", "2", "parallel.tensor=2")
    run_smoke(tmp_path, "--launcher", "deepspeed", "--nproc", "2", "parallel.pipeline=2")
    # The same launcher again, another layout: a fresh folder of its own, not the first run's checkpoints.
    again = run_smoke(tmp_path, "--nproc", "2", "parallel.pipeline=2")
    assert f"smoke.sh: training into {tmp_path}/run-torchrun-2\n" in again
    assert f"trained 20 steps: run in {tmp_path}/run-torchrun-2\n" in again
    logged = {}
    for run in ("run-torchrun-1", "run-deepspeed-1", "run-torchrun-2"):
        records = read_metrics(tmp_path / run)
        logged[run] = [r for r in records if "loss" in r]
        assert [r["step"] for r in logged[run]] == [5, 10, 15, 20]
        # From log 16 = 2.77 nats (zero head) down: the tiny model learns the digits.
        assert logged[run][-1]["loss"] < 2.5
        assert (tmp_path / run / "checkpoints" / "latest").read_text() == "step_0000020"
    # Three layouts of one model on the same data: the same losses, to fp32 rounding (see test_parallel_engine).
    for run in ("run-deepspeed-1", "run-torchrun-2"):
        expected = [r["loss"] for r in logged["run-torchrun-1"]]
        assert [r["loss"] for r in logged[run]] == pytest.approx(expected, rel=1e-5)
    # Each tensor rank wrote its shard of the model; each pipeline stage its layers.
    tensor_tag = tmp_path / "run-torchrun-1" / "checkpoints" / "step_0000020"
    assert (tensor_tag / "mp_rank_00_model_states.pt").is_file() and (
        tensor_tag / "mp_rank_01_model_states.pt"
    ).is_file()
    pipeline_tag = tmp_path / "run-deepspeed-1" / "checkpoints" / "step_0000020"
    assert len(list(pipeline_tag.glob("layer_*-model_00-model_states.pt"))) == 6  # embeddings, 4 blocks, heads


def test_smoke_refuses_an_unknown_launcher_before_making_anything(tmp_path):
    done = subprocess.run(
        ["bash", str(RECIPES / "smoke.sh"), "--out", str(tmp_path / "out"), "--launcher", "mpirun"],
        env=clean_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "--launcher must be torchrun or deepspeed, got mpirun" in done.stderr
    assert not (tmp_path / "out").exists()


def test_xl_script_from_a_shell_runs_the_deepspeed_launcher_on_itself_with_hostfile_and_options(tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("node1 slots=8\nnode2 slots=8\n")
    args = ["--hostfile", str(hosts), "--gpus", "8", "--resume", "--dry-run", "--config", "my.yaml", "train.lr=1e-4"]
    done = subprocess.run(["bash", str(XL), *args], capture_output=True, text=True, check=True)
    assert shlex.split(done.stdout) == [
        "deepspeed", "--hostfile", str(hosts), "--num_gpus", "8", str(XL), "--resume", "--config", "my.yaml",
        "train.lr=1e-4",
    ]  # fmt: skip
    missing = subprocess.run(["bash", str(XL), "--hostfile", str(tmp_path / "no")], text=True, capture_output=True)
    assert missing.returncode == 2 and "no hostfile at" in missing.stderr


@pytest.mark.parametrize("local_rank", [["--local_rank=3"], ["--local_rank", "3"], []])
def test_xl_script_on_a_rank_trains_with_the_same_options_and_overrides(local_rank):
    args = [*local_rank, "--resume", "--dry-run", "train.lr=1e-4", "--config", "my.yaml", "parallel.tensor=2"]
    done = subprocess.run([sys.executable, str(XL), *args], capture_output=True, text=True, check=True)
    assert shlex.split(done.stdout) == [
        "megapixel",
        "train",
        "my.yaml",
        "--resume",
        "train.lr=1e-4",
        "parallel.tensor=2",
    ]
    default = subprocess.run([sys.executable, str(XL), "--dry-run"], capture_output=True, text=True, check=True)
    assert shlex.split(default.stdout) == ["megapixel", "train", str(RECIPES / "igpt_xl.yaml")]


def test_xl_script_on_a_rank_refuses_the_launchers_options_in_one_line():
    done = subprocess.run([sys.executable, str(XL), "--gpus", "8"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == "igpt_xl.sh: --gpus belongs to the deepspeed launcher's line (--num_gpus, --hostfile)\n"


@pytest.mark.slow
def test_deepspeed_launcher_runs_the_xl_script_with_python_on_two_ranks(tmp_path):
    # What `deepspeed --num_gpus 2 recipes/igpt_xl.sh ...` does: python -u recipes/igpt_xl.sh --local_rank=N ...
    done = subprocess.run(
        ["deepspeed", "--num_gpus", "2", "recipes/igpt_xl.sh", "--dry-run", "--resume", "train.lr=1e-4"],
        env=clean_env(OMP_NUM_THREADS="1"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = f"megapixel train {RECIPES / 'igpt_xl.yaml'} --resume train.lr=1e-4"
    assert done.stdout.splitlines().count(line) == 2, done.stdout[-3000:]


@pytest.mark.slow
def test_xl_script_trains_a_small_config_on_two_cpu_processes_through_the_deepspeed_launcher(digits_shards, tmp_path):
    config = tmp_path / "small.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_px": 8, "n_vocab": 16},
                "data": {"shards": str(digits_shards), "shuffle_buffer": 100},
                "train": {"steps": 4, "batch_size": 16, "warmup_steps": 1, "log_every": 1, "eval_every": 4,
                          "eval_batches": 1, "save_every": 4, "progress": False},
            }
        )
    )  # fmt: skip
    run = tmp_path / "run"
    done = subprocess.run(
        ["bash", str(XL), "--gpus", "2", "--config", str(config), f"train.run_dir={run}", "train.lr=1e-3"],
        env=clean_env(OMP_NUM_THREADS="1"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"trained 4 steps: run in {run}\n" in done.stdout
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[0]["lr"] == pytest.approx(1e-3)
    assert (run / "checkpoints" / "latest").read_text() == "step_0000004"


@pytest.fixture
def slurm_env(tmp_path):
    """A pretend 4-node allocation: SLURM variables and an `scontrol` that expands the node list (and logs any
    other call to bin/scontrol.log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(
        '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && exec printf "gpu017\\ngpu018\\ngpu019\\ngpu020\\n"\n'
        f'echo "$*" >> {bin_dir / "scontrol.log"}\n'
    )
    scontrol.chmod(0o755)
    env = clean_env(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[017-020]", SLURM_NNODES="4", GPUS_PER_NODE="8",
                    RUN_DIR=str(tmp_path / "run"), DRY_RUN="1")  # fmt: skip
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def slurm_command(env: dict[str, str], *args: str) -> list[str]:
    done = subprocess.run(
        ["bash", str(RECIPES / "slurm" / "launch.sh"), "recipes/igpt_xl.yaml", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return shlex.split(done.stdout)


def test_slurm_launch_starts_one_torchrun_per_node_meeting_at_the_first_node(slurm_env):
    command = slurm_command(slurm_env, "train.lr=1e-4")
    assert command == [
        "srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1", sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "4", "--nproc_per_node", "8", "--rdzv_id", "4242", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "gpu017:29500", "-m", "megapixel.cli", "train", "recipes/igpt_xl.yaml",
        f"train.run_dir={slurm_env['RUN_DIR']}", "train.lr=1e-4",
    ]  # fmt: skip


def test_slurm_launch_resumes_a_run_that_has_a_checkpoint(slurm_env):
    checkpoints = Path(slurm_env["RUN_DIR"]) / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "latest").write_text("step_0000500")
    command = slurm_command(slurm_env)
    assert command[-1] == "--resume" and command[-2] == f"train.run_dir={slurm_env['RUN_DIR']}"


@pytest.mark.parametrize(("left", "resumes"), [("step_0000500", True), ("step_0000500.partial", False)])
def test_slurm_launch_resumes_a_tag_saved_before_latest_but_not_a_partial_one(slurm_env, left, resumes):
    # A run killed between renaming its first checkpoint into place and writing `latest` has only the tag.
    (Path(slurm_env["RUN_DIR"]) / "checkpoints" / left).mkdir(parents=True)
    assert (slurm_command(slurm_env)[-1] == "--resume") == resumes


def test_slurm_launch_outside_an_allocation_says_so(slurm_env):
    del slurm_env["SLURM_JOB_ID"]
    done = subprocess.run(
        ["bash", str(RECIPES / "slurm" / "launch.sh"), "recipes/igpt_xl.yaml"], env=slurm_env, capture_output=True,
        text=True,
    )  # fmt: skip
    assert done.returncode != 0 and "run inside a slurm allocation" in done.stderr


@pytest.mark.parametrize(("script", "config"), [("igpt_1node.sbatch", "igpt_l"), ("igpt_multinode.sbatch", "igpt_xl")])
def test_sbatch_scripts_ask_for_sigusr1_before_the_limit_requeue_and_launch(slurm_env, script, config):
    path = RECIPES / "slurm" / script
    text = path.read_text()
    assert "#SBATCH --signal=B:USR1@600" in text and "#SBATCH --requeue" in text
    del slurm_env["RUN_DIR"]
    done = subprocess.run(
        ["bash", str(path)], env={**slurm_env, "SLURM_SUBMIT_DIR": str(ROOT)}, capture_output=True, text=True
    )
    command = shlex.split(done.stdout)
    assert done.returncode == 0 and command[0] == "srun"
    assert command[command.index("train") + 1 :] == [f"recipes/{config}.yaml", f"train.run_dir=runs/{config}"]


# What slurm does at `--signal=B:USR1@...`: SIGUSR1 to the batch script (launch.sh, the job step's grandparent).
WARN_BATCH_SCRIPT = 'kill -USR1 "$(ps -o ppid= -p $PPID)"'


def fake_srun(env: dict[str, str], body: str) -> Path:
    """An `srun` that logs its arguments to bin/srun.log; as the job step (not `--overlap`) it runs `body`."""
    bin_dir = Path(env["PATH"].split(os.pathsep)[0])
    srun = bin_dir / "srun"
    srun.write_text(f'#!/bin/bash\necho "$*" >> {bin_dir / "srun.log"}\n[ "$1" = --overlap ] && exit 0\n{body}\n')
    srun.chmod(0o755)
    return bin_dir


def launch(env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in env.items() if k != "DRY_RUN"}
    command = ["bash", str(RECIPES / "slurm" / "launch.sh"), "recipes/igpt_xl.yaml"]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_slurm_launch_passes_the_warning_to_the_trainers_and_requeues_a_run_that_stopped_on_it(slurm_env):
    # The job step: slurm's warning reaches the batch script mid-run; the trainers then save, write the stop
    # file and exit 0 (what megapixel.engine.signals does).
    stop_file = Path(slurm_env["RUN_DIR"]) / STOP_FILE
    bin_dir = fake_srun(slurm_env, f"{WARN_BATCH_SCRIPT}\nmkdir -p {stop_file.parent}\necho {{}} > {stop_file}")
    done = launch(slurm_env)
    assert done.returncode == 0, done.stderr
    calls = (bin_dir / "srun.log").read_text().splitlines()
    # The trainer processes are signalled on every node, torchrun is not.
    assert "--overlap --ntasks-per-node=1 pkill -USR1 -f -- -u -m megapixel.cli train" in calls
    assert (bin_dir / "scontrol.log").read_text() == "requeue 4242\n"


@pytest.mark.parametrize(("body", "status"), [("exit 0", 0), (f"{WARN_BATCH_SCRIPT}; exit 1", 1)])
def test_slurm_launch_does_not_requeue_a_run_that_finished_or_failed(slurm_env, body, status):
    bin_dir = fake_srun(slurm_env, body)
    done = launch(slurm_env)
    assert done.returncode == status
    assert not (bin_dir / "scontrol.log").exists()
