"""``-o DIR``: a model folder that onnxruntime-genai opens as it is (DESIGN.md §8).

    DIR/model.onnx (+ model.onnx.data)   the ONNX engine (genai's decoder I/O: ir/graph.py cache_layout)
    DIR/model.manifest.json              dsc's manifest (the runtime, inspect and verify read the folder by it)
    DIR/genai_config.json                "type": "decoder", the cache names and shape, bos/eos/pad ids, context length,
                                         the session options dsc's engines need
    DIR/tokenizer.json, tokenizer_config.json   copied from the checkpoint when it has them (chat template
                                         included); without them genai runs on token ids

The folder is written under a temporary name beside DIR and renamed into place: a failed compile leaves nothing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from dsc.errors import CompileError
from dsc.files import atomic_write_bytes

if TYPE_CHECKING:
    from dsc.engine_format import Manifest
    from dsc.ir.graph import Graph

ENGINE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
# genai 0.18's session_options take no onnxruntime config entries, so the two dsc sets in its own runtime
# (runtime/engine.py ort_session) are missing there: session.dynamic_block_base (a few % to +30% decode) and
# session.disable_quant_qdq, without which --quantize fp8 engines dequantize every weight every step (use the
# default float32 or int8/int4 engines in genai).
SESSION_OPTIONS = {"log_id": "onnxruntime-genai", "provider_options": [], "graph_optimization_level": "ORT_ENABLE_ALL"}


def check_genai_cache(graph: Graph, out: Path) -> tuple[int, int]:
    """(heads, head dim) of the cache: genai's decoder takes exactly one key and one value per layer, of one
    static shape for every layer. A model with another cache kind (say an indexer's keys) is refused."""
    entries = graph.cache_entries()
    inputs = {v.name: v for v in graph.inputs}
    layers = graph.meta["model_config"].num_hidden_layers
    roles = sorted({c.role for c in entries})
    if roles != ["key", "value"] or len(entries) != 2 * layers:
        raise CompileError(
            f"{out}: onnxruntime-genai's decoder takes one key and one value cache per layer; this model caches "
            f"{', '.join(roles)} ({len(entries)} tensors for {layers} layers): compile to x.onnx instead"
        )
    shapes = {tuple(inputs[c.past].type.shape) for c in entries}
    if len(shapes) != 1:
        raise CompileError(f"{out}: cache tensors differ in shape {sorted(map(str, shapes))}; genai needs one shape")
    (shape,) = shapes
    return int(shape[1]), int(shape[3])


def genai_config(manifest: Manifest, heads: int, head_dim: int, special: dict[str, int | None]) -> dict:
    """genai_config.json for a dsc engine: a plain decoder with genai's I/O names."""
    cfg = manifest.config
    eos = special.get("eos_token_id")
    pad = special.get("pad_token_id")
    # genai needs an eos id inside the vocabulary: a checkpoint without one gets its pad id, else 0 (generation then
    # ends at that token, where dsc run would run on to --max-new-tokens)
    eos = (pad if pad is not None else 0) if eos is None else eos
    pad = eos if pad is None else pad
    bos = special.get("bos_token_id")
    context = int(cfg["max_position_embeddings"])
    return {
        "model": {
            "bos_token_id": bos if bos is not None else pad,
            "context_length": context,
            "decoder": {
                "session_options": SESSION_OPTIONS,
                "filename": ENGINE,
                "head_size": head_dim,
                "hidden_size": int(cfg["hidden_size"]),
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": heads,
                "num_hidden_layers": int(cfg["num_hidden_layers"]),
                "num_key_value_heads": heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": "decoder",
            "vocab_size": int(cfg["vocab_size"]),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,  # the engine concatenates its cache; genai must not preallocate
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_folder(graph: Graph, out: Path, write_engine) -> Manifest:
    """Write the folder: ``write_engine(graph, path)`` writes the ONNX engine and its manifest at ``path``."""
    heads, head_dim = check_genai_cache(graph, out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / GENAI_CONFIG).is_file())):
        raise CompileError(f"{out}: exists and is not a model folder dsc wrote; choose another -o")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        tokenizer = graph.meta.get("tokenizer_path")
        fields = {}
        if tokenizer is not None:
            atomic_write_bytes(tmp / "tokenizer.json", Path(tokenizer).read_bytes())
            fields["tokenizer"] = "tokenizer.json"
            tok_config = Path(tokenizer).with_name("tokenizer_config.json")
            if tok_config.is_file():
                atomic_write_bytes(tmp / tok_config.name, tok_config.read_bytes())
        manifest = write_engine(graph, tmp / ENGINE, **fields)
        special = graph.meta.get("special_tokens", {})
        text = json.dumps(genai_config(manifest, heads, head_dim, special), indent=4) + "\n"
        atomic_write_bytes(tmp / GENAI_CONFIG, text.encode())
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
