"""LDM: the ADM UNet (:class:`antdiff.models.adm.UNetModel`) configured for autoencoder latents.

The UNet itself lives in adm.py; this file holds only the latent-diffusion configurations.
"ldm-ffhq" is the paper's FFHQ / CelebA-HQ 256 model on VQ-f4 latents (64x64x3): 224 channels,
multipliers 1,2,3,4, 2 residual blocks, attention at 32/16/8 with 32 head channels, plain
(additive) timestep conditioning and conv resampling. "ldm-tiny" runs on the 4x4x4 latents of
:class:`antdiff.models.autoencoder.TinyAutoencoder` over 8x8 digits.
"""

from __future__ import annotations

from antdiff.models.adm import UNetModel

__all__ = ["LDM_SIZES", "UNetModel"]

LDM_SIZES: dict[str, dict] = {
    "ldm-ffhq": dict(
        image_size=64,
        in_channels=3,
        model_channels=224,
        num_res_blocks=2,
        attention_resolutions=(32, 16, 8),
        channel_mult=(1, 2, 3, 4),
        num_head_channels=32,
        use_scale_shift_norm=False,
        resblock_updown=False,
        learn_sigma=False,
    ),
    "ldm-tiny": dict(
        image_size=4,
        in_channels=4,
        model_channels=32,
        num_res_blocks=1,
        attention_resolutions=(2,),
        channel_mult=(1, 2),
        num_head_channels=16,
        use_scale_shift_norm=False,
        resblock_updown=False,
        learn_sigma=False,
    ),
}
