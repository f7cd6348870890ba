"""Model loading: device/dtype branches, max_length, the Qwen3-Reranker prompt, load errors."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import sentence_transformers
import torch

from reranker import LimitExceededError, ModelLoadError, Reranker, devices, loading
from reranker.devices import resolve_device, resolve_dtype
from reranker.loading import load_model
from reranker.model import ScoringModel, check_vocabulary
from reranker.prompts import qwen3_reranker_prompt
from reranker.tokens import ChatTemplateEncoder
from tests.conftest import model_settings
from tests.tiny_models import build_qwen3_classifier_reranker


def test_auto_device_is_cuda_only_when_torch_sees_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "gpu_device_files", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"
    assert resolve_device("cpu") == "cpu"


def test_without_a_gpu_device_file_torch_is_not_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """No /dev/nvidia*, /dev/kfd or /dev/dxg: no CUDA, known without importing torch (a start from the conversion
    cache never imports it)."""
    assert devices.gpu_device_files() or not torch.cuda.is_available()  # where torch sees a GPU, so do we
    monkeypatch.setattr(devices, "gpu_device_files", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # would be wrong to ask
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ModelLoadError, match="torch sees no CUDA device"):
        resolve_device("cuda")


def test_asking_for_cuda_without_a_gpu_fails_with_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="RERANKER_DEVICE=cuda:0 but torch sees no CUDA device"):
        resolve_device("cuda:0")


@pytest.mark.parametrize(
    ("setting", "device", "amx", "avx512_bf16", "expected"),
    [
        ("auto", "cuda", False, False, torch.float16),
        ("auto", "cuda:0", True, True, torch.float16),
        ("auto", "cpu", True, False, torch.bfloat16),
        ("auto", "cpu", False, True, torch.bfloat16),  # AVX512-BF16 without AMX (Zen 4, Cooper Lake)
        ("auto", "cpu", False, False, torch.float32),  # AVX2 or AVX-512 without BF16: emulated, so float32
        ("float32", "cuda", False, False, torch.float32),
        ("float16", "cpu", False, False, torch.float16),
        ("bfloat16", "cpu", False, False, torch.bfloat16),
    ],
)
def test_dtype_resolution(monkeypatch: pytest.MonkeyPatch, setting: str, device: str, amx: bool,
                          avx512_bf16: bool, expected: torch.dtype) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert resolve_dtype(setting, device) == expected


def test_native_bf16_detection_agrees_with_the_cpu_flags() -> None:
    """torch's probes against the kernel's own list of this CPU's features, and the service's reading of that list
    (which a start from the conversion cache uses instead of importing torch) against both."""
    from reranker.backends.cpu import auto_precision, kernel_bf16_flags, torch_native_bf16

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo")
    flags = set(cpuinfo.read_text().split())
    expected = [name for name in ("amx_bf16", "avx512_bf16") if name in flags]
    assert sorted(torch_native_bf16()) == expected == kernel_bf16_flags()
    picked = auto_precision(torch_native_bf16())
    assert picked.dtype == ("bfloat16" if expected else "float32")
    assert all(name in picked.reason for name in expected)


@pytest.mark.parametrize(("flags", "expected"), [
    ("fpu avx2 fma", []),  # AVX2 only (Zen 3)
    ("avx2 avx512f avx512_vnni avx512_bf16", ["avx512_bf16"]),  # Zen 4, Cooper Lake
    ("avx2 avx512_bf16 amx_tile amx_bf16 amx_int8", ["amx_bf16", "avx512_bf16"]),  # Sapphire Rapids
    ("avx2 amx_tile", []),  # tiles without their bfloat16 products
])
def test_the_kernel_flags_name_native_bf16(monkeypatch: pytest.MonkeyPatch, flags: str, expected: list[str]) -> None:
    """The reading of /proc/cpuinfo a start from the conversion cache uses, on CPUs this one may not be."""
    from reranker.backends import cpu

    monkeypatch.setattr(cpu, "cpuinfo", lambda: [{"processor": "0", "flags": flags}, {"processor": "1"}])
    assert cpu.kernel_bf16_flags() == expected
    assert cpu.auto_precision(expected).dtype == ("bfloat16" if expected else "float32")


@pytest.mark.parametrize(
    ("setting", "device", "declared", "expected"),
    [
        ("auto", "cuda", "bfloat16", torch.bfloat16),  # Qwen3-Reranker: float16 can overflow
        ("auto", "cuda", "float32", torch.float16),
        ("auto", "cuda", "float16", torch.float16),
        ("auto", "cuda", None, torch.float16),
        ("float16", "cuda", "bfloat16", torch.float16),  # an explicit choice wins
    ],
)
def test_auto_dtype_on_cuda_follows_a_bfloat16_checkpoint(
    setting: str, device: str, declared: str | None, expected: torch.dtype
) -> None:
    assert resolve_dtype(setting, device, declared) == expected


def test_checkpoint_dtype_is_read_from_config(tmp_path: Path, bert_dir: Path) -> None:
    from transformers import AutoConfig

    from reranker.devices import checkpoint_dtype

    config = AutoConfig.from_pretrained(bert_dir)
    config.dtype = "bfloat16"
    config.save_pretrained(tmp_path / "bf16")
    assert checkpoint_dtype(str(tmp_path / "bf16")) == "bfloat16"
    assert checkpoint_dtype(str(bert_dir)) == "float32"
    assert checkpoint_dtype(str(tmp_path / "missing")) is None


def test_auto_dtype_on_cuda_loads_a_bfloat16_checkpoint_in_bfloat16(
    monkeypatch: pytest.MonkeyPatch, bert_dir: Path
) -> None:
    """The load path end to end, with CUDA faked up to the point where the model is placed."""
    seen: dict[str, object] = {}

    def fake_cross_encoder(*args: object, **kwargs: object) -> None:
        seen.update(kwargs)
        raise RuntimeError("stop before touching a device")

    monkeypatch.setattr(loading, "resolve_device", lambda setting: "cuda")
    monkeypatch.setattr(loading, "checkpoint_dtype", lambda model_id, trust: "bfloat16")
    monkeypatch.setattr(sentence_transformers, "CrossEncoder", fake_cross_encoder)  # imported where it loads
    with pytest.raises(ModelLoadError):
        load_model(model_settings(bert_dir, dtype="auto", device="auto"))
    assert seen["model_kwargs"] == {"dtype": torch.bfloat16} and seen["device"] == "cuda"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_is_loaded_in_the_asked_dtype_in_eval_mode(bert_dir: Path, dtype: str) -> None:
    model = load_model(model_settings(bert_dir, dtype=dtype))
    assert model.dtype == dtype and model.device == "cpu"
    assert next(model.cross_encoder.parameters()).dtype == getattr(torch, dtype)
    assert not model.cross_encoder.training
    assert model.load_seconds > 0


def test_max_length_is_capped_at_the_models_limit(tmp_path: Path) -> None:
    from tests.tiny_models import build_bert_reranker

    path = build_bert_reranker(tmp_path / "short", max_positions=128)
    assert load_model(model_settings(path, max_length=1024)).max_length == 128
    assert load_model(model_settings(path, max_length=64)).max_length == 64


def test_a_max_length_the_prompt_template_fills_stops_the_start(causal_dir: Path, causal_model: ScoringModel) -> None:
    """It started, reported ready, and refused every request, blaming a one-word query: the tiny Qwen3's template
    takes over 128 tokens."""
    overhead = causal_model.encoder.overhead("q", None)
    assert overhead == 153  # this tiny tokenizer's; the real Qwen3 one takes far fewer
    with pytest.raises(ModelLoadError, match=rf"template and specials take {overhead} tokens with a one-word query"
                                             rf".*set RERANKER_MAX_LENGTH to {overhead + 50} or more"):
        load_model(model_settings(causal_dir, max_length=128))
    load_model(model_settings(causal_dir, max_length=overhead + 50))  # a document gets 50: min(64, 203 // 4)
    with Reranker(causal_model, model_settings(causal_dir)) as reranker, \
            pytest.raises(LimitExceededError, match=r"^the query takes \(with the model's template\) \d+ of"):
        reranker.rerank("river " * 40, ["doc"])


def test_length_limit_from_tokenizer_or_positions() -> None:
    from types import SimpleNamespace

    from reranker.model import model_length_limit

    bert = SimpleNamespace(model_type="bert", max_position_embeddings=512, pad_token_id=0)
    xlmr = SimpleNamespace(model_type="xlm-roberta", max_position_embeddings=8194, pad_token_id=1)
    assert model_length_limit(8192, xlmr) == 8192
    assert model_length_limit(int(1e30), xlmr) == 8192  # no tokenizer limit: 8194 embeddings, 2 unusable
    assert model_length_limit(None, bert) == 512
    assert model_length_limit(None, SimpleNamespace()) is None
    assert model_length_limit(512, SimpleNamespace()) == 512
    qwen3 = SimpleNamespace(model_type="qwen3", max_position_embeddings=40960, pad_token_id=151643)
    assert model_length_limit(131072, qwen3) == 40960  # its tokenizer claims more than the model has positions for


def test_classic_cross_encoder_takes_no_instruction(bert_model: ScoringModel, causal_model: ScoringModel) -> None:
    assert not bert_model.is_causal and not bert_model.templated and not bert_model.accepts_instruction
    assert causal_model.is_causal and causal_model.templated and causal_model.accepts_instruction


@pytest.mark.parametrize("instruction", [None, "Find the passage about rivers"])
def test_qwen3_reranker_sees_the_model_card_prompt(causal_model: ScoringModel, instruction: str | None) -> None:
    [pair] = causal_model.encode([("which river is longest", "The Nile is long.")], instruction)
    text = causal_model.tokenizer.decode(pair.input_ids)
    assert text == qwen3_reranker_prompt("which river is longest", "The Nile is long.", instruction)
    assert pair.n_tokens == len(pair.input_ids)


def test_qwen3_prompt_text_is_pinned() -> None:
    assert qwen3_reranker_prompt("q?", "d.", None) == (
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
        'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
        "<Instruct>: Given a web search query, retrieve relevant passages that answer the query\n"
        "<Query>: q?\n<Document>: d.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_a_qwen3_reranker_converted_to_a_classifier_is_prompted_as_the_original(tmp_path: Path,
                                                                               backend: str) -> None:
    """The `-seq-cls` conversions (e.g. tomaarsen/Qwen3-Reranker-0.6B-seq-cls: one logit, the LM head's yes row less
    its no row) are given the model card's prompt too, and were half treated as such: an instruction, which the
    prompt has a place for, was refused 400; a max length under 305 refused to start (a classic cross-encoder's
    half-the-budget rule for the query, where the template cuts the document alone); and pairs were tokenized
    through preprocess, the slow path. Scores are CrossEncoder.predict's, with and without an instruction."""
    directory = build_qwen3_classifier_reranker(tmp_path / "tiny-Qwen3-Reranker-0.6B-seq-cls")
    settings = model_settings(directory, max_length=256, backend=backend, cache_size=0)
    model = load_model(settings)
    assert not model.is_causal and model.templated and model.accepts_instruction
    assert isinstance(model.encoder, ChatTemplateEncoder)
    [pair] = model.encode([("which river", "The Nile.")], "Find rivers")
    assert model.tokenizer.decode(pair.input_ids) == qwen3_reranker_prompt("which river", "The Nile.", "Find rivers")
    reference = load_model(model_settings(directory, max_length=256)).cross_encoder
    documents = ["The Nile is long.", "river " * 400, "Cheese.", ""]
    with Reranker(model, settings) as reranker:
        for instruction in (None, "Find the passage about rivers"):
            scores = {r.index: r.score for r in reranker.rerank("which river", documents, instruction=instruction)}
            expected = reference.predict([("which river", doc) for doc in documents], prompt=instruction,
                                         show_progress_bar=False)
            assert max(abs(scores[i] - expected[i]) for i in range(len(documents))) < 1e-4


@pytest.mark.parametrize("kind", ["causal", "seq-cls"])
def test_a_qwen3_reranker_not_known_by_name_is_said_to_be_prompted_otherwise(
        causal_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    """A Qwen3-Reranker copied to /models/reranker is served without its model card's prompt (it is recognised by
    name), with other scores: the causal one through the template it ships, a -seq-cls conversion on the bare pair.
    That much is now said at start; under its own name, nothing is."""
    named = causal_dir if kind == "causal" else \
        build_qwen3_classifier_reranker(tmp_path / "tiny-Qwen3-Reranker-0.6B-seq-cls")
    generic = Path(shutil.copytree(named, tmp_path / "reranker"))
    said = "gets its model card's prompt only where RERANKER_MODEL's name contains 'Qwen3-Reranker'"
    with caplog.at_level("WARNING", "reranker.loading"):
        load_model(model_settings(generic))
    warnings = [r.getMessage() for r in caplog.records if r.name == "reranker.loading"]
    assert any(said in message for message in warnings), warnings
    assert any(("chat template it ships" if kind == "causal" else "bare query and document") in message
               for message in warnings), warnings
    caplog.clear()
    with caplog.at_level("WARNING", "reranker.loading"):
        load_model(model_settings(named))
    assert not any(said in r.getMessage() for r in caplog.records)


def test_causal_truncation_cuts_the_document_and_keeps_the_template_end(causal_model: ScoringModel) -> None:
    long_doc = "river " * 2000
    [pair] = causal_model.encode([("which river", long_doc)])
    text = causal_model.tokenizer.decode(pair.input_ids)
    assert pair.n_tokens == causal_model.max_length
    assert "<Query>: which river\n" in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_missing_directory_names_the_model_and_how_to_fix(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as info:
        load_model(model_settings(missing))
    message = str(info.value)
    assert str(missing) in message and "RERANKER_MODEL" in message and "local model directory" in message


def test_directory_without_a_model_says_what_it_needs(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="does not hold a loadable model"):
        load_model(model_settings(tmp_path / "empty"))


@pytest.mark.parametrize("kind", ["bert", "xlmr", "causal"])
def test_a_folder_without_its_tokenizer_files_stops_the_start(kind: str, request: pytest.FixtureRequest,
                                                              tmp_path: Path) -> None:
    """transformers builds an all but empty tokenizer for such a folder (BERT's knew 5 tokens): every word was
    [UNK], the service started and served wrong scores, and the conversion cache kept it."""
    source: Path = request.getfixturevalue(f"{kind}_dir")
    folder = tmp_path / source.name
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, folder / name)
    with pytest.raises(ModelLoadError, match="tokenizer files .* are missing or wrong; copy every file"):
        load_model(model_settings(folder, backend="auto"))


def test_the_vocabulary_check_passes_over_a_config_whose_text_model_it_cannot_tell() -> None:
    """transformers' get_text_config raises ValueError for a composite config with more than one text model: the
    check has nothing to compare then, and must not stop the start with a traceback."""
    class Composite:
        def get_text_config(self) -> None:
            raise ValueError("Multiple valid text configs were found in the model config")

    check_vocabulary("composite", 10, Composite())
    with pytest.raises(ModelLoadError, match="its tokenizer knows 10 tokens where the model has 30000"):
        check_vocabulary("bert", 10, SimpleNamespace(vocab_size=30000))


def test_a_model_file_this_user_cannot_read_is_named_not_called_missing(tmp_path: Path, bert_dir: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """save_pretrained leaves weights 0600: another user's service got FileNotFoundError and "does not hold a
    loadable model". The tests run as root, whom no mode stops: os.access answers as for another user."""
    import os

    model = tmp_path / "model"
    shutil.copytree(bert_dir, model)
    weights = model / "model.safetensors"
    weights.chmod(0o600)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(weights) and real_access(path, mode))
    weights.write_bytes(b"")  # and the load fails, as an unreadable file makes it fail for that user
    with pytest.raises(ModelLoadError, match=r"1 of its files cannot be read by this user \(uid \d+\), e\.g\. "
                                             r"'model\.safetensors': make them readable"):
        load_model(model_settings(model, backend="torch"))


def test_unreachable_hub_id_explains_offline_use() -> None:
    # HF_HUB_OFFLINE=1 (conftest) makes the hub unreachable at once, as on a machine with no network.
    with pytest.raises(ModelLoadError) as info:
        load_model(model_settings(Path("example-org/not-a-cached-reranker")))
    message = str(info.value)
    assert "'example-org/not-a-cached-reranker'" in message
    assert "hf download example-org/not-a-cached-reranker" in message
    assert "set RERANKER_MODEL to that local directory" in message
