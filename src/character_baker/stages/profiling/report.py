"""The profile's files and its terminal table.

    profile/profile.safetensors   tensors named by `backends.steering.PROFILE_KEYS` + metadata
    profile/summary.json          per-layer importance and push/pull counts, top layers, strongest dimensions
    profile/heatmap.png           z-scores: one row per layer (layer 0 at the top) x the dimensions with
                                  the largest |z| (columns in `summary.json` heatmap.dims); red = persona
                                  raises it, blue = lowers it, white = no change; clipped at heatmap.z_clip

The PNG is written by the small encoder below (zlib + struct): no plotting dependency.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from typing import Any

import torch

from character_baker.core.runs import RunDir, atomic_write_json

TENSORS_FILE, SUMMARY_FILE, HEATMAP_FILE = "profile/profile.safetensors", "profile/summary.json", "profile/heatmap.png"
ARTIFACTS = (TENSORS_FILE, SUMMARY_FILE, HEATMAP_FILE)
CELL_PX = 8
TOP_LAYERS, STRONGEST = 5, 20


# ----------------------------------------------------------------------------- PNG
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(width: int, height: int, rgb: bytes) -> bytes:
    """An 8-bit RGB PNG from `height` rows of `width` pixels (3 bytes each), no filtering."""
    if len(rgb) != width * height * 3:
        raise ValueError(f"expected {width * height * 3} bytes of RGB, got {len(rgb)}")
    stride = width * 3
    raw = b"".join(b"\x00" + rgb[row * stride:(row + 1) * stride] for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def diverging_rgb(values: torch.Tensor, clip: float) -> torch.Tensor:
    """[..., 3] uint8 colours: blue (-clip) .. white (0) .. red (+clip)."""
    share = (values / clip).clamp(-1, 1)
    fade = (255 * (1 - share.abs())).round().to(torch.uint8)
    full = torch.full_like(fade, 255)
    red = torch.where(share >= 0, full, fade)
    blue = torch.where(share <= 0, full, fade)
    return torch.stack([red, fade, blue], dim=-1)


def heatmap_png(z: torch.Tensor, clip: float, cell: int = CELL_PX) -> bytes:
    """PNG bytes of a [rows, columns] z matrix, each value a `cell` x `cell` square."""
    pixels = diverging_rgb(z.float(), clip).repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    return encode_png(pixels.shape[1], pixels.shape[0], pixels.contiguous().numpy().tobytes())


def strongest_dimensions(z: torch.Tensor, count: int) -> list[int]:
    """The `count` dimensions with the largest |z| in any layer, strongest first."""
    return z.abs().amax(0).topk(min(count, z.shape[1])).indices.tolist()


# ----------------------------------------------------------------------------- summary
def _per_layer(tensors: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    z = tensors["z"]
    return [{"layer": layer, "importance": round(float(tensors["importance"][layer]), 4),
             "push": int(tensors["push"][layer].sum()), "pull": int(tensors["pull"][layer].sum()),
             "max_z": round(float(z[layer].max()), 3), "min_z": round(float(z[layer].min()), 3),
             "mean_diff_norm": round(float(tensors["steer_mean_diff"][layer].norm()), 4),
             "pca_explained": round(float(tensors["pca_explained"][layer]), 4)} for layer in range(z.shape[0])]


def _strongest(z: torch.Tensor, count: int) -> list[dict[str, Any]]:
    flat = z.abs().flatten().topk(min(count, z.numel())).indices
    return [{"layer": int(i) // z.shape[1], "dim": int(i) % z.shape[1], "z": round(float(z.flatten()[i]), 3)}
            for i in flat]


def profile_summary(tensors: dict[str, torch.Tensor], metadata: dict[str, Any], heatmap_dims: list[int],
                    clip: float) -> dict[str, Any]:
    """Everything a reader needs without opening the tensors."""
    per_layer = _per_layer(tensors)
    ranked = sorted(per_layer, key=lambda entry: -entry["importance"])
    return {**metadata, "layers": int(tensors["z"].shape[0]), "hidden_size": int(tensors["z"].shape[1]),
            "push_dims": int(tensors["push"].sum()), "pull_dims": int(tensors["pull"].sum()),
            "top_layers": [entry["layer"] for entry in ranked[:TOP_LAYERS]], "per_layer": per_layer,
            "strongest": _strongest(tensors["z"], STRONGEST),
            "heatmap": {"file": HEATMAP_FILE, "dims": heatmap_dims, "z_clip": round(clip, 3), "cell_px": CELL_PX}}


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The few numbers shown in the stage table and the manifest."""
    keys = ("prompts", "layers", "push_dims", "pull_dims", "top_layers")
    fallback = {"push": len(summary["push_fallback_layers"]), "pull": len(summary["pull_fallback_layers"])}
    return {**{key: summary[key] for key in keys}, "fallback_layers": fallback}


# ----------------------------------------------------------------------------- writing
def _write_tensors(path: Any, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    temporary = path.with_name(f".{path.name}.tmp")
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(temporary),
              metadata={key: json.dumps(value) for key, value in metadata.items()})
    os.replace(temporary, path)


def _write_bytes(path: Any, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def write_profile(run: RunDir, tensors: dict[str, torch.Tensor], metadata: dict[str, Any],
                  heatmap_dims: int = 64) -> dict[str, Any]:
    """Write profile.safetensors, heatmap.png and summary.json (each atomically); return the summary."""
    run.path("profile").mkdir(parents=True, exist_ok=True)
    _write_tensors(run.path(TENSORS_FILE), tensors, metadata)
    dims = strongest_dimensions(tensors["z"], heatmap_dims)
    selected = tensors["z"][:, dims]
    clip = max(float(selected.abs().max()), float(metadata.get("z_threshold", 1.0)), 1e-6)
    _write_bytes(run.path(HEATMAP_FILE), heatmap_png(selected, clip))
    summary = profile_summary(tensors, metadata, dims, clip)
    atomic_write_json(run.path(SUMMARY_FILE), summary)
    return summary


def profile_table(summary: dict[str, Any]) -> Any:
    """A rich table: one row per layer, most important first, with its push/pull counts and extreme z."""
    from rich.table import Table

    table = Table(title=f"profile: {summary['prompts']} prompts, {summary['push_dims']} push / "
                        f"{summary['pull_dims']} pull dimensions (|z| > {summary['z_threshold']})")
    for column in ("layer", "importance", "push", "pull", "max z", "min z", "pca share"):
        table.add_column(column, justify="right")
    for entry in sorted(summary["per_layer"], key=lambda e: -e["importance"]):
        table.add_row(str(entry["layer"]), f"{entry['importance']:.3f}", str(entry["push"]), str(entry["pull"]),
                      f"{entry['max_z']:+.2f}", f"{entry['min_z']:+.2f}", f"{entry['pca_explained']:.2f}")
    return table
