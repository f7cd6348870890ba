"""Build random rerankers offline: BERT and XLM-RoBERTa cross-encoders and a Qwen3-style causal-LM reranker.

Tests use them tiny; bench/gpu.py builds the same architectures at real size (config overrides)."""

from __future__ import annotations

import random
import string
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# The ignores below are transformers' type hints lagging its runtime: BertTokenizerFast is exported lazily,
# configs take num_labels through **kwargs, and PreTrainedModel.to accepts a dtype.
from transformers import (  # type: ignore[attr-defined]
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3ForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

WORDS = (
    "the of and to in is for on that with as by this from it are be or an at which can not use "
    "file path data value list string number error time module function class object return call "
    "query document search rank model score token batch queue cache server request response python "
    "network socket thread process memory buffer stream parse json format date week month year city "
    "river mountain music guitar piano garden flower coffee tea bread cheese apple orange energy solar"
).split()


def random_text(rng: random.Random, n_words: int) -> str:
    """Seeded pseudo-English: mostly known words, some unseen ones to exercise subword splits."""
    out = []
    for _ in range(n_words):
        if rng.random() < 0.85:
            out.append(rng.choice(WORDS))
        else:
            out.append("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 11))))
    text = " ".join(out)
    return text[:1].upper() + text[1:] + "."


def build_bert_reranker(path: Path, *, seed: int = 0, max_positions: int = 512) -> Path:
    """A 2-layer BERT with a single-logit head and a WordPiece vocab that covers any ASCII text."""
    torch.manual_seed(seed)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars), *WORDS]
    path.mkdir(parents=True, exist_ok=True)
    ids = {token: i for i, token in enumerate(dict.fromkeys(vocab))}
    tokenizer = BertTokenizerFast(vocab=ids, model_max_length=max_positions)
    config = BertConfig(  # type: ignore[call-arg]
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
        num_labels=1,
        initializer_range=0.2,
    )
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: Path, dtype: torch.dtype | None) -> Path:
    if dtype is not None:
        model = model.to(dtype)  # type: ignore[arg-type]
    path.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_xlmr_reranker(path: Path, *, seed: int = 0, max_positions: int = 512, dtype: torch.dtype | None = None,
                        device: str = "cpu", **config: int) -> Path:
    """An XLM-RoBERTa cross-encoder (bge-reranker-v2-m3's architecture): a SentencePiece-style Unigram
    vocabulary, the `<s> A </s></s> B </s>` pair template and no token type ids."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R's ids: <s>=0, <pad>=1, </s>=2
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    corpus = [random_text(rng, 30) for _ in range(300)]
    tok.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=800, special_tokens=specials, unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        pad_token="<pad>", unk_token="<unk>", mask_token="<mask>", model_max_length=max_positions,
        model_input_names=["input_ids", "attention_mask"],
    )
    values: dict[str, Any] = {"vocab_size": len(tokenizer), "hidden_size": 32, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "intermediate_size": 64, **config}
    settings = XLMRobertaConfig(  # type: ignore[call-arg]
        max_position_embeddings=max_positions + 2, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        type_vocab_size=1, num_labels=1, initializer_range=0.2, **values,
    )
    with torch.device(device):
        model = XLMRobertaForSequenceClassification(settings)
    return _save(model, tokenizer, path, dtype)


def _qwen3_tokenizer(rng: random.Random) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer holding `yes`, `no` and chat tokens."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [random_text(rng, 30) for _ in range(300)] + ["yes no Judge Document Query Instruct"] * 50
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens(["yes", "no"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>", model_max_length=2048
    )


def _qwen3_config(tokenizer: PreTrainedTokenizerFast, **config: int) -> Qwen3Config:
    values: dict[str, Any] = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                              "head_dim": 16, **config}
    return Qwen3Config(
        max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2, **values,
    )


def build_causal_reranker(path: Path, *, seed: int = 0, dtype: torch.dtype | None = None, device: str = "cpu",
                          **config: int) -> Path:
    """A Qwen3 causal LM (2 layers unless `config` says otherwise) with a byte-level BPE tokenizer holding
    `yes`, `no` and chat tokens."""
    torch.manual_seed(seed)
    tokenizer = _qwen3_tokenizer(random.Random(seed))
    with torch.device(device):
        model = Qwen3ForCausalLM(_qwen3_config(tokenizer, **config))
    return _save(model, tokenizer, path, dtype)


def build_qwen3_classifier_reranker(path: Path, *, seed: int = 0) -> Path:
    """Qwen3-Reranker as a one-logit sequence classifier (the `-seq-cls` conversions, whose head is the `yes` row
    less the `no` row of the LM head), with build_causal_reranker's tokenizer."""
    torch.manual_seed(seed)
    tokenizer = _qwen3_tokenizer(random.Random(seed))
    model = Qwen3ForSequenceClassification(_qwen3_config(tokenizer, num_labels=1))
    return _save(model, tokenizer, path, None)
