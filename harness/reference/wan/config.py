"""Wan2.1 model sizes (wan-blocks.md section 1) as frozen, validated dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "WanConfig",
    "WAN_1_3B",
    "WAN_14B",
    "TINY",
    "WAN_PRESETS",
    "TOKENS_480P",
    "TOKENS_720P",
    "GRID_480P",
    "GRID_720P",
    "VARIANTS",
    "MTV_EVERY",
]

# 81 frames: VAE stride (4, 8, 8), patch (1, 2, 2)
GRID_480P = (21, 30, 52)
GRID_720P = (21, 45, 80)
TOKENS_480P = 21 * 30 * 52  # 32760
TOKENS_720P = 21 * 45 * 80  # 75600

# "t2v"/"i2v": plain models; "mtv": I2V + MTV-Crafter motion attention every MTV_EVERY blocks;
# "humo": T2V + HuMo audio cross-attention in every block; "multitalk": I2V + MultiTalk audio.
VARIANTS = ("t2v", "i2v", "mtv", "humo", "multitalk")
MTV_EVERY = 4


@dataclass(frozen=True)
class WanConfig:
    """Sizes of a Wan2.1 transformer. ``dim == heads * head_dim`` is enforced.

    ``text_dim``/``clip_dim`` are the widths of the T5 and CLIP features before their
    projections; the blocks themselves see width ``dim`` contexts. Audio/motion widths are
    those of the HuMo (1536), MultiTalk (768) and MTV-Crafter (3072 codes) inputs.
    """

    dim: int
    ffn_dim: int
    heads: int
    head_dim: int
    layers: int
    eps: float = 1e-6
    text_len: int = 512
    text_dim: int = 4096
    image_tokens: int = 257
    clip_dim: int = 1280
    freq_dim: int = 256
    humo_audio_dim: int = 1536
    humo_audio_tokens: int = 16
    multitalk_audio_dim: int = 768
    multitalk_audio_tokens: int = 32
    motion_dim: int = 3072
    motion_joints: int = 24

    def __post_init__(self) -> None:
        for name in (
            "dim",
            "ffn_dim",
            "heads",
            "head_dim",
            "layers",
            "text_len",
            "text_dim",
            "image_tokens",
            "clip_dim",
            "freq_dim",
            "humo_audio_dim",
            "humo_audio_tokens",
            "multitalk_audio_dim",
            "multitalk_audio_tokens",
            "motion_dim",
            "motion_joints",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"WanConfig.{name}={v!r} must be a positive int")
        if self.dim != self.heads * self.head_dim:
            raise ValueError(
                f"WanConfig: dim={self.dim} != heads*head_dim = {self.heads}*{self.head_dim}; "
                "pick heads = dim // head_dim"
            )
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"WanConfig.head_dim={self.head_dim} must be even and >= 6 for 3D RoPE")
        if self.freq_dim % 2:
            raise ValueError(f"WanConfig.freq_dim={self.freq_dim} must be even (cos | sin halves)")
        if not (0 < self.eps < 1):
            raise ValueError(f"WanConfig.eps={self.eps} must be in (0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WanConfig":
        """Build from a dict (e.g. JSON), rejecting unknown fields by name."""
        if not isinstance(d, dict):
            raise TypeError(f"WanConfig.from_dict needs a dict, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown WanConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


WAN_1_3B = WanConfig(dim=1536, ffn_dim=8960, heads=12, head_dim=128, layers=30)
WAN_14B = WanConfig(dim=5120, ffn_dim=13824, heads=40, head_dim=128, layers=40)
# CPU-test size: head_dim stays 128 so RoPE splits and kernel head-dim limits are the real ones.
TINY = WanConfig(
    dim=256,
    ffn_dim=512,
    heads=2,
    head_dim=128,
    layers=2,
    text_len=16,
    text_dim=64,
    image_tokens=9,
    clip_dim=64,
    freq_dim=256,
    humo_audio_dim=96,
    multitalk_audio_dim=48,
    motion_dim=96,
)
#: The released model sizes by their names (bench shape tables and CLI choices use these keys).
WAN_PRESETS: dict[str, WanConfig] = {"1.3B": WAN_1_3B, "14B": WAN_14B}
