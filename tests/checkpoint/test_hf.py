"""HF transformers' ImageGPT: exports load there and give megapixel's logits, imports give HF's logits, round trips
are bit-exact, the exported clusters quantise images as megapixel does, and what cannot be read exactly is refused
with the tensor or file named."""

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from megapixel.checkpoint.consolidate import read_consolidated, write_consolidated
from megapixel.checkpoint.hf import HF_CONFIG, HF_PROCESSOR, HF_WEIGHTS, export_hf, hf_import_error, load_hf, read_hf
from megapixel.checkpoint.load import load_model
from megapixel.config import from_dict
from megapixel.data.palette import encode_pixels
from megapixel.errors import CheckpointError
from megapixel.model import IGPT

TOOL = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"
N_VOCAB, N_PX = 32, 6


pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(n_classes: int = 0, objective: str = "ar"):
    """A tiny IGPT with every weight drawn at random (the real init zeroes the heads, which would hide them)."""
    cfg = from_dict(
        {
            "model": {
                "n_layer": 2,
                "n_embd": 32,
                "n_head": 4,
                "n_vocab": N_VOCAB,
                "n_px": N_PX,
                "n_classes": n_classes,
                "objective": objective,
                "kernels": "torch",
            }
        }
    )
    model = IGPT(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.5)
    palette = np.random.uniform(-1, 1, (N_VOCAB, 3)).astype(np.float32)
    return model, cfg, palette


def hf_inputs(tokens: torch.Tensor) -> torch.Tensor:
    """HF's input for megapixel's AR tokens: the SOS row (index n_vocab) first, the sequence shifted right."""
    return torch.cat([torch.full((len(tokens), 1), N_VOCAB), tokens[:, :-1]], dim=1)


# Both sides compute the same fp32 network with other kernels (SDPA vs explicit softmax, F.rms_norm vs their
# norm): over 20 seeds the logits (up to ~7) differed by at most 5e-6; a wrong layout differs by O(1).
LOGITS = dict(rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("n_classes", [0, 3])
def test_exported_model_loads_in_transformers_and_gives_megapixels_logits(tmp_path, n_classes):
    model, cfg, palette = random_model(n_classes)
    export_hf(model.state_dict(), cfg, palette, tmp_path / "hf")
    tokens = torch.randint(0, N_VOCAB, (3, N_PX * N_PX))
    with torch.no_grad():
        ours = model(tokens)
        causal = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "hf").eval()
        theirs = causal(hf_inputs(tokens)).logits
        # lm_head has the n_vocab real colours only: SOS is never predicted.
        assert theirs.shape == ours.logits.shape
        torch.testing.assert_close(theirs, ours.logits, **LOGITS)
        if n_classes:
            assert json.loads((tmp_path / "hf" / HF_CONFIG).read_text())["architectures"] == [
                "ImageGPTForImageClassification"
            ]
            classifier = transformers.ImageGPTForImageClassification.from_pretrained(tmp_path / "hf").eval()
            torch.testing.assert_close(classifier(hf_inputs(tokens)).logits, ours.clf_logits, **LOGITS)


def random_hf_model(tmp_path: Path, classifier: bool = False) -> tuple[Path, torch.nn.Module, np.ndarray]:
    """An HF ImageGPT with random weights and zero biases, saved with an image processor as from_pretrained wants."""
    config = transformers.ImageGPTConfig(
        vocab_size=N_VOCAB + 1, n_positions=N_PX * N_PX, n_embd=32, n_layer=2, n_head=4, num_labels=5
    )
    cls = transformers.ImageGPTForImageClassification if classifier else transformers.ImageGPTForCausalImageModeling
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(std=0.5)
    clusters = np.random.uniform(-1, 1, (N_VOCAB, 3)).astype(np.float32)
    model.save_pretrained(tmp_path / "hf")
    processor = transformers.ImageGPTImageProcessorPil(clusters=clusters, size={"height": N_PX, "width": N_PX})
    processor.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model, clusters


def test_imported_hf_model_gives_hfs_logits(tmp_path):
    folder, hf_model, clusters = random_hf_model(tmp_path)
    model, cfg, palette = load_hf(folder)
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head) == (2, 32, 4)
    assert (cfg.model.n_vocab, cfg.model.n_px, cfg.model.n_classes) == (N_VOCAB, N_PX, 0)
    np.testing.assert_array_equal(palette, clusters)
    tokens = torch.randint(0, N_VOCAB, (3, N_PX * N_PX))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, hf_model(hf_inputs(tokens)).logits, **LOGITS)


def test_an_hf_classifier_without_lm_head_imports_with_a_zero_generative_head(tmp_path):
    folder, hf_model, _ = random_hf_model(tmp_path, classifier=True)
    model, cfg, _ = load_hf(folder)
    assert cfg.model.n_classes == 5
    assert not model.head.weight.any()
    assert "lm_head.weight" in read_hf(folder)[3]["note"]
    tokens = torch.randint(0, N_VOCAB, (3, N_PX * N_PX))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).clf_logits, hf_model(hf_inputs(tokens)).logits, **LOGITS)


@pytest.mark.parametrize("n_classes", [0, 3])
def test_round_trip_through_hf_is_bit_exact(tmp_path, n_classes):
    model, cfg, palette = random_model(n_classes)
    export_hf(model.state_dict(), cfg, palette, tmp_path / "hf")
    state, loaded_cfg, loaded_palette, _ = read_hf(tmp_path / "hf")
    original = model.state_dict()
    assert state.keys() == original.keys()
    for name, tensor in original.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    np.testing.assert_array_equal(loaded_palette, palette)
    loaded_cfg.model.kernels = cfg.model.kernels  # a runtime choice, not part of the model
    assert loaded_cfg.model == cfg.model


def test_tool_round_trips_a_consolidated_folder_through_hf(tmp_path):
    model, cfg, palette = random_model(n_classes=3)
    write_consolidated(model.state_dict(), cfg, palette, tmp_path / "ours")
    for command, source, out in (("to-hf", "ours", "hf"), ("from-hf", "hf", "back")):
        done = subprocess.run(
            [sys.executable, str(TOOL), command, str(tmp_path / source), str(tmp_path / out)],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        assert "2 blocks x 32 wide, 4 heads, 32 colours, 6x6, AR, 3-class head" in done.stdout
    state, _, back_palette, metadata = read_consolidated(tmp_path / "back")
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name
    np.testing.assert_array_equal(back_palette, palette)
    assert metadata["source"] == str((tmp_path / "hf").resolve())


def test_load_any_reads_a_consolidated_folder_and_a_hf_folder_alike(tmp_path):
    model, cfg, palette = random_model(n_classes=3)
    write_consolidated(model.state_dict(), cfg, palette, tmp_path / "ours")
    export_hf(model.state_dict(), cfg, palette, tmp_path / "hf")
    tokens = torch.randint(0, N_VOCAB, (2, N_PX * N_PX))
    with torch.no_grad():
        expected = model(tokens)
        for folder in ("ours", "hf"):
            loaded, loaded_cfg, loaded_palette = load_model(tmp_path / folder)
            out = loaded(tokens)
            assert not loaded.training and loaded_cfg.model.n_classes == 3
            np.testing.assert_array_equal(loaded_palette, palette)
            # The same fp32 weights through the same code: equal to the bit.
            assert torch.equal(out.logits, expected.logits) and torch.equal(out.clf_logits, expected.clf_logits)


def test_hf_image_processor_with_exported_clusters_gives_our_tokens(tmp_path):
    model, cfg, palette = random_model()
    export_hf(model.state_dict(), cfg, palette, tmp_path / "hf")
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    images = np.random.randint(0, 256, (16, N_PX, N_PX, 3), dtype=np.uint8)
    theirs = processor(list(images), return_tensors="np")["input_ids"]
    ours = encode_pixels(images, palette).reshape(len(images), -1)
    # HF takes squared distances as a^2 - 2ab + b^2 in float32 (terms up to ~6, error ~1e-6); megapixel in float64.
    # Where two centres are that close to equidistant either is nearest; everywhere else the tokens must agree.
    x = images.reshape(-1, 3).astype(np.float64) / 127.5 - 1
    d = ((x[:, None] - palette.astype(np.float64)[None]) ** 2).sum(-1)
    first, second = np.sort(d, axis=1)[:, :2].T
    clear = second - first > 1e-5
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(theirs.reshape(-1)[clear], ours.reshape(-1)[clear])
    theirs_d = d[np.arange(len(d)), theirs.reshape(-1)]
    assert (theirs_d - first < 1e-5).all()


@pytest.fixture()
def exported(tmp_path) -> Path:
    model, cfg, palette = random_model()
    return export_hf(model.state_dict(), cfg, palette, tmp_path / "hf")


def edit_weights(folder: Path, change) -> None:
    state = load_file(str(folder / HF_WEIGHTS))
    change(state)
    save_file(state, str(folder / HF_WEIGHTS), metadata={"format": "pt"})


def edit_config(folder: Path, **fields) -> None:
    config = json.loads((folder / HF_CONFIG).read_text())
    (folder / HF_CONFIG).write_text(json.dumps({**config, **fields}))


def test_nonzero_biases_are_refused_naming_the_tensor(exported):
    layer = random.randrange(2)
    edit_weights(exported, lambda s: s[f"transformer.h.{layer}.mlp.c_fc.bias"].add_(1e-3))
    with pytest.raises(CheckpointError, match=rf"transformer\.h\.{layer}\.mlp\.c_fc\.bias is nonzero"):
        read_hf(exported)


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"activation_function": "gelu_new"}, "activation_function = 'gelu_new'"),
        ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon = 1e-06"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx = True"),
        ({"n_inner": 64}, "n_inner = 64"),
        ({"architectures": ["ImageGPTModel"]}, "architecture ImageGPTModel"),
        ({"model_type": "gpt2"}, "model_type 'gpt2'"),
        ({"n_positions": 35, "n_embd": 32}, "n_positions = 35"),
    ],
)
def test_another_architecture_is_refused_naming_the_field(exported, fields, named):
    edit_config(exported, **fields)
    with pytest.raises(CheckpointError, match=named.replace("(", r"\(").replace(".", r"\.")):
        read_hf(exported)


def test_unexpected_missing_and_misshapen_tensors_are_named(exported):
    edit_weights(exported, lambda s: s.update({"transformer.h.0.crossattention.c_attn.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"holds transformer\.h\.0\.crossattention\.c_attn\.weight"):
        read_hf(exported)
    edit_weights(exported, lambda s: [s.pop("transformer.h.0.crossattention.c_attn.weight"), s.pop("lm_head.weight")])
    with pytest.raises(CheckpointError, match=r"lacks lm_head\.weight"):
        read_hf(exported)
    edit_weights(exported, lambda s: s.update({"lm_head.weight": torch.zeros(N_VOCAB + 1, 32)}))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight has shape \(33, 32\); the config wants \(32, 32\)"):
        read_hf(exported)


def test_clusters_for_pixels_scaled_otherwise_are_refused(exported):
    processor = json.loads((exported / HF_PROCESSOR).read_text())
    (exported / HF_PROCESSOR).write_text(json.dumps({**processor, "image_mean": [0.0, 0.0, 0.0]}))
    with pytest.raises(CheckpointError, match=r"preprocessor_config\.json does not scale pixels to \[-1, 1\]"):
        read_hf(exported)


@pytest.mark.parametrize("missing", [HF_CONFIG, HF_WEIGHTS, HF_PROCESSOR])
def test_a_missing_file_is_named(exported, missing):
    (exported / missing).unlink()
    with pytest.raises(CheckpointError, match=f"lacks {missing}"):
        read_hf(exported)


def test_the_released_checkpoints_layout_reads_without_running_code(exported):
    """OpenAI's iGPT on the HF hub: pytorch_model.bin with each attention's causal-mask buffers, and a processor
    config of the older ImageGPTFeatureExtractor (no mean or std: it scaled to [-1, 1] itself)."""
    expected, _, palette, _ = read_hf(exported)
    state = load_file(str(exported / HF_WEIGHTS))
    (exported / HF_WEIGHTS).unlink()
    n = N_PX * N_PX
    for i in range(2):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, exported / "pytorch_model.bin")
    legacy = {"clusters": palette.tolist(), "do_normalize": True, "do_resize": True, "resample": 2, "size": N_PX}
    (exported / HF_PROCESSOR).write_text(json.dumps({**legacy, "feature_extractor_type": "ImageGPTFeatureExtractor"}))
    state, _, loaded_palette, _ = read_hf(exported)
    assert all(torch.equal(expected[name], t) for name, t in state.items())
    np.testing.assert_array_equal(loaded_palette, palette)
    # An object whose unpickling could run code is refused, not loaded.
    torch.save({**state, "extra": argparse.Namespace(x=1)}, exported / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot read .*pytorch_model.bin"):
        read_hf(exported)


def test_sharded_weights_are_read_through_their_index_and_a_missing_shard_is_named(exported):
    state = load_file(str(exported / HF_WEIGHTS))
    (exported / HF_WEIGHTS).unlink()
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: state[n] for n in part}, str(exported / file), metadata={"format": "pt"})
    index = {"weight_map": {n: file for file, part in halves.items() for n in part}}
    (exported / "model.safetensors.index.json").write_text(json.dumps(index))
    read_hf(exported)
    (exported / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors is missing"):
        read_hf(exported)


def test_bert_models_are_not_exported_and_nothing_is_written(tmp_path):
    model, cfg, palette = random_model(objective="bert")
    with pytest.raises(CheckpointError, match="causal only"):
        export_hf(model.state_dict(), cfg, palette, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_an_existing_folder(exported):
    before = {p.name: p.read_bytes() for p in exported.iterdir()}
    model, cfg, palette = random_model()
    with pytest.raises(CheckpointError, match="already exists"):
        export_hf(model.state_dict(), cfg, palette, exported)
    assert {p.name: p.read_bytes() for p in exported.iterdir()} == before


def test_a_failed_transformers_import_is_named_with_its_own_text():
    # What a shadowed `kernels` package made transformers raise on import.
    broken = ImportError("cannot import name 'CUDAProperties' from 'kernels' (/somewhere/kernels/__init__.py)")
    assert hf_import_error(broken) == (
        "exporting to HF needs transformers' ImageGPT, whose import failed (ImportError: cannot import name "
        "'CUDAProperties' from 'kernels' (/somewhere/kernels/__init__.py)): repair that installation "
        "(pip install -U 'transformers>=5')"
    )
    missing = ModuleNotFoundError("No module named 'transformers'", name="transformers")
    assert hf_import_error(missing) == (
        "exporting to HF needs transformers 5 or later, which is not installed: pip install 'transformers>=5'"
    )
