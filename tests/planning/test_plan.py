"""The planner: its byte counts equal what real DeepSpeed engines and autograd hold on the CPU, its search
only recommends layouts that fit, and `megapixel plan` prints a recommendation for each GPU count."""

import gc
import json
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from megapixel.cli import main
from megapixel.config import from_dict, load, preset
from megapixel.engine.build import checkpoint_blocks
from megapixel.errors import ConfigError
from megapixel.model.igpt import IGPT, Block
from megapixel.planning.counts import parameter_counts
from megapixel.planning.estimate import (
    GB,
    Cluster,
    Layout,
    block_activation_bytes,
    estimate,
    head_activation_bytes,
    parameter_shapes,
    stage_blocks,
    stage_tensors,
)
from megapixel.planning.search import config_layout, search
from tests.harness.engine import deepspeed_on_gloo

pytestmark = pytest.mark.usefixtures("one_thread")

# Wide enough that ZeRO-3 partitions the MLP, embedding and head (over 100,000 elements each) but keeps the
# attention projections (65,536) whole: both sides of DeepSpeed's persistence threshold.
ENGINE_MODEL = {"n_layer": 2, "n_embd": 256, "n_head": 4, "n_px": 8, "n_vocab": 512, "kernels": "torch"}
# DeepSpeed's buckets shrunk to a few elements, so that the counts are the model state's alone.
SMALL_BUCKETS = {"reduce_bucket_size": 1000, "allgather_bucket_size": 1000, "stage3_prefetch_bucket_size": 1000}


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage (and gradient) alive in this process, each storage counted once."""
    storages = {}
    with warnings.catch_warnings():
        # Walking every live object touches deprecated torch.distributed aliases, which warn on access.
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        # Only leaves hold gradients; asking a non-leaf for .grad warns and returns None.
        for t in (obj, obj.grad if obj.is_leaf else None):
            if t is not None and not t.is_meta:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def measure_engine_state(zero_stage: int, world_size: int) -> dict[str, int]:
    """Model-state bytes one rank of a bf16 DeepSpeed engine (megapixel's build_engine) holds between steps,
    at the end of backward and inside the optimizer step, over two steps (the moments exist from the first)."""
    from megapixel.engine.build import build_engine, deepspeed_config
    from megapixel.parallel.distributed import init_distributed

    info = init_distributed()
    cfg = from_dict(
        {
            "model": ENGINE_MODEL,
            "parallel": {"zero_stage": zero_stage},
            "train": {"batch_size": 2 * world_size, "precision": "bf16", "progress": False},
            # (megapixel's AdamW subclass is not on DeepSpeed's list of ZeRO-tested optimizers)
            "deepspeed": {"zero_optimization": SMALL_BUCKETS, "zero_allow_untested_optimizer": True},
        }
    )
    gc.collect()
    base = live_tensor_bytes()
    engine = build_engine(cfg, deepspeed_config(cfg, info.world_size, info.device), info)
    seen: dict[str, int] = {}

    def in_step(optimizer, args, kwargs) -> None:
        if "after_backward" in seen:
            seen["in_step"] = live_tensor_bytes() - base

    engine.basic_optimizer.register_step_pre_hook(in_step)
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(info.rank))
    for step in range(2):
        loss = engine(tokens)
        engine.backward(loss)
        del loss
        if step == 1:
            gc.collect()
            seen["after_backward"] = live_tensor_bytes() - base
        engine.step()
    gc.collect()
    seen["between_steps"] = live_tensor_bytes() - base
    del engine
    gc.collect()
    return seen


def engine_state_worker(rank: int, world_size: int, stages: list[int]) -> dict[int, dict[str, int]]:
    """measure_engine_state for each ZeRO stage, in one spawned process of `world_size`."""
    deepspeed_on_gloo(rank)
    return {stage: measure_engine_state(stage, world_size) for stage in stages}


def planned_state(zero_stage: int, data: int) -> dict[str, float]:
    cfg = from_dict({"model": ENGINE_MODEL})
    layout = Layout(data=data, zero_stage=zero_stage, reduce_bucket=SMALL_BUCKETS["reduce_bucket_size"])
    est = estimate(cfg, layout, Cluster())
    return {"between_steps": est.between_steps, "after_backward": est.after_backward, "in_step": est.in_step}


def assert_state_matches(measured: dict[str, int], planned: dict[str, float], what: str) -> None:
    # Besides the model state the process holds a batch, a loss and DeepSpeed's few-element buckets and
    # norms: under 1% of these 1.85M-weight models' state. Uneven ZeRO partitions move a rank by up to ~3%.
    for moment, value in planned.items():
        assert measured[moment] == pytest.approx(value, rel=0.035), f"{what}, {moment}"


def test_planner_weights_are_the_models_weights():
    cfg = preset("xl-64")
    planned = sorted(numel for _, numel, _ in parameter_shapes(cfg))
    assert sum(planned) == sum(parameter_counts(cfg).values())
    small = from_dict({"model": {**ENGINE_MODEL, "n_classes": 10}})
    assert sorted(p.numel() for p in IGPT(small.model).parameters()) == sorted(
        numel for _, numel, _ in parameter_shapes(small)
    )


def test_tensor_and_pipeline_ranks_share_out_every_weight():
    cfg = preset("xl-64")
    total = sum(parameter_counts(cfg).values())
    layout = Layout(tensor=4, pipeline=8)
    per_stage = [sum(stage_tensors(cfg, layout, s)) for s in range(8)]
    replicated = cfg.model.n_ctx * cfg.model.n_embd + cfg.model.n_embd * (2 * cfg.model.n_layer + 2)
    # Tensor ranks split everything but the positions, SOS vector and norm gains, which each holds whole.
    assert sum(per_stage) * 4 == pytest.approx(total + 3 * replicated)
    assert per_stage[0] > per_stage[3]  # the first stage also holds the embeddings


@pytest.mark.slow
def test_model_state_matches_deepspeed_engines_in_one_process():
    for stage in range(4):
        assert_state_matches(measure_engine_state(stage, 1), planned_state(stage, 1), f"ZeRO-{stage}, 1 rank")


@pytest.mark.slow
def test_model_state_matches_deepspeed_engines_on_two_ranks():
    from tests.harness.parallel import run_processes

    # ZeRO-0 partitions nothing, and ZeRO-2 holds what ZeRO-1 does between and in steps (DeepSpeed's one
    # stage_1_and_2 optimizer): both are checked on one rank above; here the partitioned stages, on two.
    ranks = run_processes(engine_state_worker, 2, [1, 3], timeout_s=240)
    for rank, measured in enumerate(ranks):
        for stage in (1, 3):
            assert_state_matches(measured[stage], planned_state(stage, 2), f"ZeRO-{stage}, rank {rank} of 2")


def composite_norm_bytes(norms: int, tokens: int, width: int) -> int:
    """What torch's unfused CPU rms_norm keeps beyond a fused norm's input and statistics: its normalised
    input before the gain, fp32, for each of `norms` norms (the Triton and CUDA norms keep no such copy)."""
    return norms * tokens * width * 4


def saved_activation_bytes(fn, params: set[int]) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `fn` runs, weights excluded."""
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("flash", [True, False], ids=["flash", "math-attention"])
def test_block_activations_match_what_autograd_saves(flash):
    cfg = from_dict({"model": {"n_layer": 1, "n_embd": 64, "n_head": 4, "n_px": 8, "n_vocab": 16, "kernels": "torch"}})
    block = Block(cfg.model)
    x = torch.randn(3, cfg.model.n_ctx, 64, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    backend = SDPBackend.FLASH_ATTENTION if flash else SDPBackend.MATH
    with sdpa_kernel(backend):
        measured = saved_activation_bytes(lambda: block(x), params)
    planned = block_activation_bytes(cfg, Layout(micro_batch=3, flash=flash, act_bytes=4))
    planned += composite_norm_bytes(2, x.shape[0] * x.shape[1], 64)
    # Exact for the flash path. The math path keeps each head's (seq x seq) softmax where flash keeps a
    # log-sum-exp, and a few small tensors besides (0.2% fewer bytes here).
    assert measured == pytest.approx(planned, rel=1e-9 if flash else 0.01)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["stored", "checkpointed"])
def test_model_activations_match_what_autograd_saves(checkpointing):
    cfg = from_dict({"model": {"n_layer": 3, "n_embd": 64, "n_head": 4, "n_px": 8, "n_vocab": 16, "kernels": "torch"}})
    model = IGPT(cfg.model)
    if checkpointing:
        checkpoint_blocks(model)  # the trainer's own wrapping
    tokens = torch.randint(0, 16, (2, cfg.model.n_ctx))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        measured = saved_activation_bytes(lambda: model.loss(tokens), params)
    layout = Layout(micro_batch=2, checkpointing=checkpointing, act_bytes=4)
    planned = estimate(cfg, layout, Cluster()).activations
    if checkpointing:
        planned -= block_activation_bytes(cfg, layout)  # the block being recomputed: not saved in the forward
    norms = 1 if checkpointing else 2 * cfg.model.n_layer + 1
    planned += composite_norm_bytes(norms, tokens.numel(), 64)
    # Autograd also keeps the token indices for the embedding and the loss (8 bytes a token, int64).
    assert measured == pytest.approx(planned + 2 * 8 * tokens.numel(), rel=0.01)


def test_xl_recommendations_fit_and_rejections_say_why():
    cluster = Cluster()
    cfg = preset("xl-64")
    usable = cluster.usable_fraction * cluster.gpu_memory_gb * GB
    for gpus in (8, 64, 256):
        result = search(cfg, gpus, cluster)
        best = result.best
        assert best is not None and best.layout.gpus == gpus
        assert all(e.peak <= usable for e in result.fits)
        assert best.tokens_per_s == max(e.tokens_per_s for e in result.fits)
        assert cfg.model.n_head % best.layout.tensor == 0
        reasons = {reason for _, reason in result.rejected}
        assert any(r.startswith("megapixel refuses ZeRO-2/3 with a pipeline") for r in reasons)
    eight = search(cfg, 8, cluster)
    plain = next(r for lay, r in eight.rejected if lay == Layout(data=8, micro_batch=1, grad_accum=8))
    assert plain.startswith("does not fit: 139")  # 6.8B x 20 bytes of ZeRO-0 state alone


def test_memory_and_time_grow_as_they_should():
    cfg, cluster = preset("xl-64"), Cluster()
    one = estimate(cfg, Layout(tensor=8, micro_batch=1, grad_accum=8), cluster)
    two = estimate(cfg, Layout(tensor=8, micro_batch=2, grad_accum=4), cluster)
    assert two.activations == pytest.approx(2 * one.activations, rel=0.01)
    ckpt_layout = Layout(tensor=8, micro_batch=1, grad_accum=8, checkpointing=True)
    ckpt = estimate(cfg, ckpt_layout, cluster)
    # Checkpointing keeps each block's bf16 input (not split over tensor ranks) and recomputes one block.
    # A block keeps 4 + 16/T bf16 values per token and unit of width (8 + 32/T bytes): 12 bytes at T = 8.
    block, head = block_activation_bytes(cfg, ckpt_layout), head_activation_bytes(cfg, ckpt_layout)
    assert block == pytest.approx(12 * 4096 * 3072, rel=0.01)
    assert one.activations == pytest.approx(60 * block + head)
    assert ckpt.activations == pytest.approx(60 * 4096 * 3072 * 2 + block + head)
    assert ckpt.times["compute"] == pytest.approx(one.times["compute"] * 4 / 3)
    no_flash = estimate(cfg, Layout(tensor=8, micro_batch=1, grad_accum=8, flash=False), cluster)
    # Softmax scores: 3 heads a rank x 4096^2 x 2 bytes a block.
    assert no_flash.activations - one.activations == pytest.approx(60 * 3 * 4096**2 * 2, rel=1e-6)
    piped = estimate(cfg, Layout(tensor=4, pipeline=2, micro_batch=1, grad_accum=16), cluster)
    assert piped.times["bubble"] == pytest.approx(piped.times["compute"] / 16)
    stages = [estimate(cfg, Layout(data=8, zero_stage=z, micro_batch=1, grad_accum=8), cluster) for z in range(4)]
    assert [e.in_step for e in stages] == sorted((e.in_step for e in stages), reverse=True)


def test_the_recipes_own_layout_is_read_from_the_config():
    cfg = load("recipes/igpt_xl.yaml")
    layout = config_layout(cfg, 32)
    assert (layout.tensor, layout.pipeline, layout.data, layout.zero_stage) == (4, 2, 4, 1)
    assert (layout.micro_batch, layout.grad_accum, layout.checkpointing) == (1, 16, True)
    with pytest.raises(ConfigError, match="cannot be split"):
        config_layout(cfg, 12)


def test_plan_command_prints_and_writes_a_recommendation_per_gpu_count(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "xl-64", "--gpus", "8", "64", "--explain", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "8 GPUs, global batch 64: recommended" in text and "64 GPUs, global batch 64: recommended" in text
    assert "989 TFLOP/s" in text and "rejected:" in text and "does not fit" in text
    plans = json.loads(out.read_text())["plans"]
    assert [p["gpus"] for p in plans] == [8, 64] and all(p["best"]["peak"] > 0 for p in plans)
    assert main(["plan", "xl-64", "--gpus", "0"]) == 2
    assert "at least one GPU" in capsys.readouterr().err


@pytest.mark.parametrize("n_layer, stages", [(4, 2), (5, 2), (10, 4), (36, 8), (60, 8)])
def test_stage_blocks_are_the_pipeline_modules_partition(n_layer, stages):
    from deepspeed.runtime.utils import partition_balanced

    cfg = from_dict({"model": {**ENGINE_MODEL, "n_layer": n_layer}})
    # megapixel.parallel.pipeline partitions with "type:BlockStage": weight one for each block, none for the
    # embedding and head layers around them.
    parts = partition_balanced(weights=[0] + [1] * n_layer + [0], num_parts=stages)
    for stage in range(stages):
        layers = range(max(parts[stage], 1), min(parts[stage + 1], n_layer + 1))
        assert stage_blocks(cfg, Layout(pipeline=stages), stage) == range(layers.start - 1, layers.stop - 1)
