"""ZeRO-Offload: the optimizer state and step on the host, with DeepSpeed's CPU Adam, train as the engine does
without it (the layout the planner recommends for iGPT-XL on one GPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megapixel.config import ParallelConfig, TrainConfig
from megapixel.engine.build import make_optimizer
from megapixel.parallel import make_groups
from megapixel.parallel.distributed import init_distributed
from tests.harness.engine import engine_config, run_engine

pytestmark = pytest.mark.slow

MODEL = dict(n_layer=2, n_embd=32, n_head=4, n_vocab=16, n_px=4, kernels="torch", n_classes=3)
OFFLOAD = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}


def train_five_steps(zero_stage: int, offload: bool) -> dict:
    cfg = engine_config(MODEL, {"zero_stage": zero_stage}, seed=3, batch=8, lr=1e-2)
    cfg.deepspeed = OFFLOAD if offload else {}
    gen = torch.Generator().manual_seed(3)
    batches = [
        (torch.randint(0, 16, (8, 16), generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(5)
    ]
    info = init_distributed()
    return run_engine(cfg, make_groups(ParallelConfig(), info.world_size, info.rank), batches)


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_offloaded_optimizer_trains_as_the_resident_one(zero_stage):
    resident = train_five_steps(zero_stage, offload=False)
    offloaded = train_five_steps(zero_stage, offload=True)
    assert offloaded["optimizer"] == "DeepSpeedCPUAdam" and resident["optimizer"] == "AdamW"
    assert offloaded["losses"] == pytest.approx(resident["losses"], rel=1e-5)
    if zero_stage < 3:  # ZeRO-3's module holds only placeholders of the partitioned weights
        for name, weight in resident["final"].items():
            assert torch.allclose(offloaded["final"][name], weight, atol=1e-3), name


def test_a_cpu_adam_that_cannot_build_is_one_line_saying_what_to_do(tmp_path):
    # No compiled op to reuse (an empty extensions folder) and no working compiler.
    script = (
        "import torch\n"
        "from megapixel.config import TrainConfig\n"
        "from megapixel.errors import ConfigError\n"
        "from megapixel.engine.build import make_optimizer\n"
        "try:\n"
        f"    make_optimizer([torch.nn.Parameter(torch.zeros(3))], TrainConfig(), {OFFLOAD!r}, torch.device('cpu'))\n"
        "except ConfigError as error:\n"
        "    print(error)\n"
    )
    env = {**os.environ, "CXX": "false", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    message = result.stdout.strip().splitlines()[-1]  # after DeepSpeed's own log lines
    assert message.startswith("ZeRO-Offload steps with DeepSpeed's CPU Adam, whose C++ op did not build"), result
    assert message.endswith("or set deepspeed.zero_force_ds_cpu_optimizer=false to step with torch's AdamW on the host")


def test_the_config_can_ask_for_torchs_adamw_on_the_host():
    params = [torch.nn.Parameter(torch.zeros(3))]
    ds_config = {**OFFLOAD, "zero_force_ds_cpu_optimizer": False}
    chosen = make_optimizer(params, TrainConfig(), ds_config, torch.device("cpu"))
    assert type(chosen) is torch.optim.AdamW
