"""dreamtune: teach a Stable Diffusion model your subject (DreamBooth, Custom Diffusion, Textual Inversion, LoRA)."""

__version__ = "0.1.0"
