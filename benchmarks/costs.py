"""The cost model behind the report's analysis: multiply-adds per step and bytes kept, per formulation.

Computed from :mod:`sparsegrad.kernels`' cost functions for the MLP matrices of each benchmarked model
shape; no measurement.
"""

from __future__ import annotations

import math

from benchmarks.shapes import FAMILY, MODEL_SHAPES


def mlp_shapes(model: str, layers: int | None) -> dict:
    """(in, out) of the up and down MLP matrices and how many of each are trained."""
    shape = dict(MODEL_SHAPES[model])
    model_type = shape.pop("model_type")
    defaults = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12}
    h = shape.get("hidden_size", defaults["hidden_size"])
    i = shape.get("intermediate_size", defaults["intermediate_size"])
    n = layers or shape.get("num_hidden_layers", defaults["num_hidden_layers"])
    fam = FAMILY["llama" if model_type == "llama" else model_type]
    nth = fam["every_nth_block"] or 1
    trained = len([b for b in range(n) if b % nth == 0])
    return {"up": (h, i), "down": (i, h), "matrices_per_group": trained, "family": fam}


def leading_block_dims(d_in: int, d_out: int, k: int, factor: float) -> tuple[int, int]:
    from sparsegrad.methods.leading_block.layer import leading_block_shape

    return leading_block_shape(d_out, d_in, math.ceil(factor * k))


def macs_table(model: str, layers: int | None, tokens: int, rows_nonzero: float, block_factor: float) -> list[dict]:
    """Multiply-adds per training step of one MLP matrix under each formulation (kernels' cost model)."""
    from sparsegrad.kernels import cheapest_rotation_sides, macs_auto, macs_dense, macs_lora, macs_regular
    from sparsegrad.methods.leading_block.layer import block_gradient_macs

    info = mlp_shapes(model, layers)
    fam = info["family"]
    out = []
    for group in ("up", "down"):
        d_in, d_out = info[group]
        k = max(1, round(fam["k"] * d_in * d_out))
        tb = max(1, round(rows_nonzero))
        r, c = leading_block_dims(d_in, d_out, k, block_factor)
        per_tok_in, per_tok_out = cheapest_rotation_sides(tb, d_in, d_out)
        full_refresh = d_out * d_in * (d_in + d_out)
        # incremental refresh after a k-sparse update, touched columns ~ all: k out + in min(in,out) out
        inc_refresh = min(k * d_in + d_out * min(d_out, k) * d_in, k * d_out + d_in * min(d_in, k) * d_out)
        lb_refresh = d_out * r * c + d_out * c * d_in if r <= c else r * c * d_in + d_out * r * d_in
        leading = (tokens * d_in * d_out + tb * d_in * d_out + min(block_gradient_macs(tb, d_in, d_out, r, c).values())
                   + lb_refresh)
        out.append({
            "group": group, "in": d_in, "out": d_out, "k": k, "tokens": tokens, "rows_nonzero": tb,
            "full": macs_dense(tokens, d_in, d_out),
            "lora": macs_lora(tokens, d_in, d_out, fam["lora_rank"]),
            "regular_dense_backward": macs_regular(tokens, d_in, d_out),
            "regular_sd": macs_regular(tokens, d_in, d_out, tb),
            "auto_full_refresh": macs_auto(tokens, d_in, d_out, tb, full_refresh),
            "auto_incremental_refresh": macs_auto(tokens, d_in, d_out, tb, min(inc_refresh, full_refresh)),
            "leading_block": leading, "block": f"{r}x{c}",
            "rotation_per_token": tb * (d_in * d_in + d_out * d_out),
            "rotation_once": d_out * d_in * (d_in + d_out),
            "auto_rotates": ("input per token" if per_tok_in else "input once/step") + ", "
                            + ("output per token" if per_tok_out else "output once/step"),
            "matrices": info["matrices_per_group"],
        })  # fmt: skip
    return out


def bytes_table(model: str, layers: int | None, block_factor: float, rank: int | None = None) -> list[dict]:
    """Bytes (float32) each method keeps for the trained MLP matrices beyond their weights, per group.

    Per matrix: full FT a gradient and two Adam moments; LoRA adapters + gradients + two moments;
    exact SparseGrad, storage "weight" (the library's default): W is the only weight (no W~, no cached
    copy), the updated-coordinates bit set (1 bit per entry), the k-sparse gradient (values + int64
    row/column indices: 20 bytes per entry) and 12 bytes of compact lazy-Adam state per touched
    coordinate (k after one step), plus one shared copy of u_in, u_out per group; storage "rotated":
    the same plus the cached W_eff (out·in floats); the leading block: B, its gradient, its compact
    state, and one shared copy of the basis columns per group. Transients (one layer's dense dL/dW~
    during its backward) are not counted.
    """
    info = mlp_shapes(model, layers)
    fam = info["family"]
    rank = rank or fam["lora_rank"]
    n_mat = info["matrices_per_group"]
    out = []
    for group in ("up", "down"):
        d_in, d_out = info[group]
        n = d_in * d_out
        k = max(1, round(fam["k"] * n))
        r, c = leading_block_dims(d_in, d_out, k, block_factor)
        basis = 4 * (d_in * d_in + d_out * d_out)
        out.append({
            "group": group, "in": d_in, "out": d_out, "matrices": n_mat,
            "full": n_mat * 4 * n * 3,
            "lora": n_mat * 4 * rank * (d_in + d_out) * 4,
            "sparsegrad": n_mat * (n // 8 + 20 * k + 12 * k) + basis,
            "sparsegrad_rotated": n_mat * (4 * n + n // 8 + 20 * k + 12 * k) + basis,
            "leading_block": n_mat * (4 * r * c * 2 + 12 * k) + 4 * (d_in * c + d_out * r),
            "block": f"{r}x{c}",
        })  # fmt: skip
    return out

