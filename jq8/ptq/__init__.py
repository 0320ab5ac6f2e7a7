"""ZeroQuant post-training quantization.

Modules: ``schemes`` (rules, schemes, :func:`quantize_params`; re-exported here), ``norm_fold``
(norm affines folded into the next GEMM), ``lkd`` (layer-by-layer distillation), ``infer`` (running a
quantized model on the INT8 kernels), ``checkpoint`` (compact quantized checkpoints).
"""

from jq8.ptq.schemes import (  # noqa: F401
    ATTN_PATTERN,
    EMBED_PATTERN,
    EMBED_SPEC,
    HEAD_PATTERN,
    MLP_PATTERN,
    SCHEMES,
    ActMode,
    GroupAxis,
    QuantizedParams,
    QuantRule,
    RuleKind,
    assign_rules,
    bits_report,
    dense_paths,
    embedding_paths,
    fold_norm_affines,
    format_bits_report,
    head_weight_only,
    quantize_embedding,
    quantize_params,
    quantize_weight,
    restore_kernels,
    scheme,
    scheme_rules,
)
