"""Per-completion multimodal inputs (a vision-language model's images) from a GRPO batch, for the likelihood pass.

`GRPOTrainer._generate_and_score_completions` returns the prompt's multimodal model inputs flattened over the batch:
`pixel_values` over image patches (Qwen2-VL style, with `image_grid_thw`), images (LLaVA style), tiles (InternVL,
LFM2-VL) or rows (Idefics / SmolVLM style), `image_sizes` / `image_position_ids` over images, and `token_type_ids` /
`mm_token_type_ids` over prompt + completion tokens. MIG scores each completion in rows of its own, so it needs each
completion's share of these: `split_multimodal_inputs` cuts them per row, with the same indexing as the policy forward.
"""

from __future__ import annotations

import torch

from .scoring import TOKEN_ALIGNED_FIELDS

# Batch keys that are multimodal model inputs (besides the bookkeeping `num_images` / `num_tiles`).
MULTIMODAL_INPUT_FIELDS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "image_position_ids",
    *TOKEN_ALIGNED_FIELDS,
)


def split_multimodal_inputs(batch: dict, prompt_mask: torch.Tensor) -> list[dict[str, torch.Tensor] | None]:
    """
    Cut the multimodal inputs of a GRPO batch into one dict per completion.

    Args:
        batch (`dict`): the output of `GRPOTrainer._generate_and_score_completions` (or any dict with its keys):
            `pixel_values`, `image_grid_thw`, `pixel_attention_mask`, `spatial_shapes`, `image_sizes`,
            `image_position_ids`, `token_type_ids` / `mm_token_type_ids` (B, P + C), and the counts `num_images`
            (list of B ints) and `num_tiles`.
        prompt_mask (`torch.Tensor`): (B, P), 1 on the prompt tokens (left padding is 0).

    Returns:
        B dicts (None where the batch has no multimodal input): row i's images along dim 0 of each field, and the
        token-aligned fields as (P_i,) tensors over row i's unpadded prompt tokens, on the CPU.
    """
    present = [name for name in MULTIMODAL_INPUT_FIELDS if batch.get(name) is not None]
    num_rows = prompt_mask.shape[0]
    if not present:
        return [None] * num_rows
    rows: list[dict[str, torch.Tensor]] = [{} for _ in range(num_rows)]
    per_image = _row_bounds(batch.get("num_images"), num_rows, "num_images")
    pixel_values = batch.get("pixel_values")
    if pixel_values is not None:
        if batch.get("image_grid_thw") is not None:  # flattened patches, image_grid_thw.prod(-1) rows per image
            grids = batch["image_grid_thw"]
            _check_bounds(per_image, grids.shape[0], "image_grid_thw")
            patch_ends = torch.cat([grids.new_zeros(1), grids.prod(dim=-1).cumsum(0)]).tolist()
            per_patch = [(patch_ends[start], patch_ends[end]) for start, end in per_image]
            _slice_into(rows, "pixel_values", pixel_values, per_patch)
            _slice_into(rows, "image_grid_thw", grids, per_image)
        elif batch.get("image_position_ids") is not None:
            _slice_into(rows, "pixel_values", pixel_values, per_image)
            _slice_into(rows, "image_position_ids", batch["image_position_ids"], per_image)
        elif batch.get("num_tiles") is not None:  # tile-indexed (InternVL; LFM2-VL with spatial_shapes)
            per_tile = _row_bounds(batch["num_tiles"], num_rows, "num_tiles")
            _slice_into(rows, "pixel_values", pixel_values, per_tile)
            for name in ("pixel_attention_mask", "spatial_shapes"):
                if batch.get(name) is not None and batch.get("spatial_shapes") is not None:
                    _slice_into(rows, name, batch[name], per_tile)
        elif per_image is not None and pixel_values.shape[0] == per_image[-1][1]:  # one entry per image
            _slice_into(rows, "pixel_values", pixel_values, per_image)
        else:  # one entry per row (images stacked per prompt)
            _slice_into(rows, "pixel_values", pixel_values, _one_per_row(pixel_values, num_rows, "pixel_values"))
    if batch.get("pixel_attention_mask") is not None and batch.get("spatial_shapes") is None:
        mask = batch["pixel_attention_mask"]
        _slice_into(rows, "pixel_attention_mask", mask, _one_per_row(mask, num_rows, "pixel_attention_mask"))
    if batch.get("image_sizes") is not None:
        _check_bounds(per_image, batch["image_sizes"].shape[0], "image_sizes")
        _slice_into(rows, "image_sizes", batch["image_sizes"], per_image)
    prompt_width = prompt_mask.shape[1]
    token_aligned = [name for name in TOKEN_ALIGNED_FIELDS if batch.get(name) is not None]
    if token_aligned:  # cut on the CPU, where scoring uses them: one copy per field, not one sync per row
        host_mask = prompt_mask.cpu().bool()
        for name in token_aligned:
            values = batch[name][:, :prompt_width].cpu()  # the prompt's columns; the completion's are zero
            for row, (row_values, mask) in enumerate(zip(values, host_mask)):
                rows[row][name] = row_values[mask]
    return rows


def _row_bounds(counts, num_rows: int, name: str) -> list[tuple[int, int]] | None:
    """[start, end) per row from per-row counts (of images or tiles), or None without counts."""
    if counts is None:
        return None
    counts = [int(count) for count in counts]
    if len(counts) != num_rows:
        raise ValueError(f"`{name}` has {len(counts)} entries for a batch of {num_rows} completions.")
    ends = torch.tensor([0, *counts]).cumsum(0).tolist()
    return list(zip(ends[:-1], ends[1:]))


def _check_bounds(bounds, size: int, name: str) -> None:
    if bounds is None:
        raise ValueError(f"The batch has `{name}` but no `num_images` to tell which images belong to which prompt.")
    if bounds[-1][1] != size:
        raise ValueError(f"`{name}` has {size} entries, but `num_images` counts {bounds[-1][1]} images.")


def _one_per_row(tensor: torch.Tensor, num_rows: int, name: str) -> list[tuple[int, int]]:
    if tensor.shape[0] != num_rows:
        raise ValueError(
            f"Cannot tell which entries of `{name}` (shape {tuple(tensor.shape)}) belong to which of the {num_rows} "
            "prompts: it has neither one entry per image (`num_images`) nor one per prompt."
        )
    return [(row, row + 1) for row in range(num_rows)]


def _slice_into(rows: list[dict], name: str, tensor: torch.Tensor, bounds: list[tuple[int, int]]) -> None:
    for row, (start, end) in zip(rows, bounds):
        row[name] = tensor[start:end]
