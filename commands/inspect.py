"""`dsc inspect`: a readable summary of a checkpoint, a bare config.json, or a compiled engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dsc.engine_format import EP_MANIFEST, folder_engine, read_manifest
from dsc.errors import DscError
from dsc.placement import Placement


def _fmt_count(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


class _NotLoaded:
    """A weight known only by name and shape (config-only inspection never loads weights)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def load(self):
        raise DscError(f"{self.key}: config-only inspection has no weights")

    def describe(self) -> str:
        return f"<{self.key}>"


def _shape_only_provider(key, shape):
    from dsc.ir.types import DType

    return DType.F32, _NotLoaded(key)


def model_summary(cfg, graph) -> dict[str, Any]:
    from dsc.ir.analysis import active_params, kv_bytes_per_token

    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    sparse = cfg.sparse_attention
    indexer = cfg.num_hidden_layers * sparse.head_dim * 4 if sparse else 0  # DSA: the indexer's key cache
    absorbed = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 + indexer
    return {
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "dense_layers": [i for i in range(cfg.num_hidden_layers) if i not in moe_layers],
        "moe_layers": len(moe_layers),
        "experts": {
            "routed": cfg.n_routed_experts,
            "shared": cfg.n_shared_experts,
            "per_token": cfg.num_experts_per_tok,
            "groups": cfg.n_group,
            "topk_group": cfg.topk_group,
            "scoring": cfg.scoring_func,
            "method": cfg.topk_method,
        },
        "attention": {
            "heads": cfg.num_attention_heads,
            "q_lora_rank": cfg.q_lora_rank,
            "kv_lora_rank": cfg.kv_lora_rank,
            "qk_nope": cfg.qk_nope_head_dim,
            "qk_rope": cfg.qk_rope_head_dim,
            "v": cfg.v_head_dim,
            "softmax_scale": cfg.softmax_scale,
        },
        "sparse_attention": None
        if sparse is None
        else {
            "index_heads": sparse.heads,
            "index_head_dim": sparse.head_dim,
            "index_topk": sparse.topk,
            "indexer_cache_bytes_per_token_fp32": indexer,
        },
        "params": graph.param_count(),
        "active_params_per_token": active_params(graph),
        "fp32_bytes": graph.weight_bytes(),
        "kv_bytes_per_token_fp32": {"naive": kv_bytes_per_token(graph), "absorbed_latent": absorbed},
        "mtp_layers_skipped": cfg.num_nextn_predict_layers,
    }


def _model_text(path: Path, s: dict[str, Any]) -> str:
    e, a, kv = s["experts"], s["attention"], s["kv_bytes_per_token_fp32"]
    lines = [
        f"{path}: {s['model_type']}, {s['layers']} layers ({len(s['dense_layers'])} dense: {s['dense_layers']}, "
        f"{s['moe_layers']} MoE)",
        f"  params        {_fmt_count(s['params'])} total, {_fmt_count(s['active_params_per_token'])} active per token"
        f" ({s['fp32_bytes'] / 2**30:.2f} GiB at fp32)",
        f"  experts       {e['routed']} routed + {e['shared']} shared, top-{e['per_token']}, {e['groups']} groups "
        f"(keep {e['topk_group']}), {e['scoring']} / {e['method']}",
        f"  attention     MLA, {a['heads']} heads, q_lora {a['q_lora_rank']}, kv_lora {a['kv_lora_rank']}, "
        f"nope {a['qk_nope']} + rope {a['qk_rope']}, v {a['v']}, softmax scale {a['softmax_scale']:.7g}",
        f"  kv cache      {kv['naive']:,} B/token naive (per-head k, v) vs {kv['absorbed_latent']:,} B/token "
        f"latent ({kv['naive'] / kv['absorbed_latent']:.1f}x), fp32",
    ]
    if s.get("sparse_attention"):
        d = s["sparse_attention"]
        lines.insert(
            -1,
            f"  sparse attn   DSA: indexer {d['index_heads']} heads x {d['index_head_dim']} dims, "
            f"top-{d['index_topk']} keys per query; indexer cache "
            f"{d['indexer_cache_bytes_per_token_fp32']:,} B/token (in both figures below)",
        )
    if s["mtp_layers_skipped"]:
        lines.append(f"  mtp           {s['mtp_layers_skipped']} multi-token-prediction layer(s) present, not compiled")
    return "\n".join(lines)


def placement_lines(p: Placement) -> list[str]:
    """Per layer: rank loads before/after balancing and the max/mean balance figure."""
    lines = [f"  placement     {p.slots} slots on {p.ranks} ranks"]
    for layer, row in enumerate(p.phy2log):
        replicas = len(row) - len(set(row))
        text = f"    layer {layer}: {replicas} redundant slots"
        if p.balance:
            text += f", max/mean rank load {p.unbalanced[layer]:.3f} -> {p.balance[layer]:.3f}"
            text += f" (bound {p.lower_bound[layer]:.3f})"
        lines.append(text)
        if p.rank_load:
            lines.append("      rank load " + " ".join(f"{x:.0f}" for x in p.rank_load[layer]))
    return lines


def inspect_path(path: Path) -> tuple[dict[str, Any], str]:
    path = folder_engine(path)  # a model folder: its engine
    if path.suffix.lower() in (".onnx", ".plan", ".engine"):
        return _inspect_engine(path)
    if (path / EP_MANIFEST).is_file():
        from dsc.runtime.ep import read_ep_manifest

        m = read_ep_manifest(path)
        ep = m.expert_parallel
        size = sum(f.stat().st_size for f in path.iterdir())
        lines = [
            f"{path}: dsc expert-parallel engine for {ep.ranks} ranks, {size / 2**20:.1f} MB, "
            f"{len(ep.segments)} dense segments, {len(ep.moe_layers)} MoE layers",
            *placement_lines(ep.placement),
        ]
        return m.to_json(), "\n".join(lines)
    if path.suffix == ".json" and path.name != "config.json":
        import json

        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DscError(f"{path}: cannot read JSON: {exc}") from exc
        if isinstance(data, dict) and "phy2log" in data:
            placement = Placement.from_json(data, str(path))
            return data, "\n".join([f"{path}: expert placement", *placement_lines(placement)])
        if isinstance(data, dict) and "model_type" in data:  # a config.json under another name
            from dsc.frontends.config import config_from_dict
            from dsc.frontends.trace import trace_model

            cfg = config_from_dict(data, str(path))
            info = model_summary(cfg, trace_model(cfg, _shape_only_provider))
            return info, _model_text(path, info)
    from dsc.frontends.trace import trace_model

    if path.name == "config.json" or (path.is_dir() and not any(path.glob("*.safetensors*"))):
        from dsc.frontends.config import load_config

        cfg = load_config(path if path.name == "config.json" else path / "config.json")
        graph = trace_model(cfg, _shape_only_provider)
    else:
        from dsc.frontends.loader import load_graph

        checkpoint, graph = load_graph(path)
        cfg = checkpoint.config
    info = model_summary(cfg, graph)
    return info, _model_text(path, info)


def _weight_lines(m) -> list[str]:
    if not m.weights:
        return []
    rows = [f"  weights       {'group':<16} {'format':<18} {'tensors':>7} {'params':>9} {'MB':>9}"]
    for w in m.weights:
        rows.append(
            f"                {w.group:<16} {w.format:<18} {w.tensors:>7} {_fmt_count(w.params):>9} "
            f"{w.bytes / 2**20:>9.2f}"
        )
    return rows


def _inspect_engine(path: Path) -> tuple[dict[str, Any], str]:
    m = read_manifest(path)
    cfg, kv = m.config, m.kv_cache
    files = [path.with_name(f) for f in m.files]
    size = sum(f.stat().st_size for f in files if f.exists())
    missing = [f.name for f in files if not f.exists()]
    lines = [
        f"{path}: dsc {m.backend} engine (dsc {m.dsc_version}), {size / 2**20:.1f} MB"
        + (f", MISSING {missing}" if missing else ""),
        f"  model         {cfg['model_type']}, {cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']}, "
        f"{_fmt_count(m.params)} params, {_fmt_count(m.active_params_per_token)} active",
        f"  kv cache      {kv.form}: {kv.bytes_per_token:,} bytes per token, {len(kv.tensors)} tensors, {kv.layout}",
        "  inputs        "
        + ", ".join(f"{i.name}{list(i.shape)}" for i in m.inputs[:4])
        + (" ..." if len(m.inputs) > 4 else ""),
        "  passes        " + (", ".join(p.name for p in m.passes if p.modified) or "none changed the IR"),
        f"  quantized     {m.quantized or 'no (weights as stored)'}",
        *_weight_lines(m),
        f"  checksum      sha256 {m.checksum[:16]}...",
    ]
    if m.mtp_layers:
        lines.append(
            f"  skipped       {m.mtp_layers} multi-token-prediction layer(s) ({m.skipped_tensors} tensors): not "
            "compiled; transformers and DeepSeek's converter skip them too"
        )
    return m.to_json(), "\n".join(lines)
