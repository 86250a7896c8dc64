"""A drop-in for LeetDecoding's ``causal_linear_decoder``.

LeetDecoding (``pip install leet-decoding``) exposes one entry point with its own
conventions; this module maps them onto :func:`leet_compile.decay_attn`.
"""
import torch

# LeetDecoding's attn_method names -> our methods. Its CUDA/Triton variants of one
# algorithm map to the same method; the backend is chosen by device ("auto").
LEETDECODING_METHODS = {
    "vanilla": "naive",
    "lightningAttention2": "chunked",
    "lightningAttention2_torch": "chunked",
    "block-based": "chunked",
    "FleetAttention": "fleet",
    "FleetAttention_torch": "fleet",
    "causal_dot_product": "recurrent",
    "causal_dot_product_torch": "recurrent",
    "recursion": "recursive",
}


def causal_linear_decoder(q, k, v, is_mask_weight=False, gamma=None, is_need_exp=True, attn_method=None):
    """LeetDecoding's ``causal_linear_decoder``, computed by :func:`leet_compile.decay_attn`.

    ``O = ((Q K^T) * D) V`` with ``D[i, j] = lambda_h ** (i - j)`` for ``j <= i``:

    Args:
        q, k: ``[batch, heads, seqlen, rank]``; v: ``[batch, heads, seqlen, dim]``.
        is_mask_weight: False is the plain causal mask (no decay; ``gamma`` must be None);
            True uses the decay ``gamma``.
        gamma: ``[heads]``. With ``is_need_exp=True`` the decay factor is
            ``lambda = exp(-gamma)``; with ``is_need_exp=False`` gamma *is* the factor
            (it must then be positive).
        attn_method: a LeetDecoding method name (see :data:`LEETDECODING_METHODS`) or
            None for the fastest ("auto").

    Returns:
        ``[batch, heads, seqlen, dim]`` in q's dtype. Unlike LeetDecoding, every method
        accumulates in float32 and runs on CPU too.
    """
    if gamma is not None and not is_mask_weight:
        raise ValueError("causal_linear_decoder: gamma was given but is_mask_weight=False; "
                         "pass is_mask_weight=True to use the decay")
    if is_mask_weight and gamma is None:
        raise ValueError("causal_linear_decoder: is_mask_weight=True needs gamma of shape [heads]")
    if attn_method is not None and attn_method not in LEETDECODING_METHODS:
        raise ValueError(f"causal_linear_decoder: unknown attn_method {attn_method!r}; "
                         f"expected None or one of {', '.join(LEETDECODING_METHODS)}")
    log_decay = None
    if gamma is not None:
        gamma = torch.as_tensor(gamma, device=q.device)
        if not torch.is_floating_point(gamma):
            gamma = gamma.float()
        heads = q.shape[1] if q.dim() == 4 else None
        if gamma.dim() != 1 or (heads is not None and gamma.shape[0] != heads):
            raise ValueError(f"causal_linear_decoder: gamma must have shape [heads] = [{heads}], "
                             f"got {list(gamma.shape)}")
        if is_need_exp:
            log_decay = -gamma
        else:
            if (gamma <= 0).any():
                raise ValueError("causal_linear_decoder: with is_need_exp=False, gamma is the decay "
                                 "factor and must be positive")
            log_decay = gamma.log()
    method = "auto" if attn_method is None else LEETDECODING_METHODS[attn_method]
    o, _ = torch.ops.leet.decay_attn(q, k, v, log_decay, 1.0, None, False, method, "auto")
    return o.to(q.dtype)
