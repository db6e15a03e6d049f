"""condiff: latent diffusion models with the improved conditioning mechanisms and pre-training
strategies of "On Improved Conditioning Mechanisms and Pre-training Strategies for Diffusion Models"
(NeurIPS 2024).

Import direction (never the reverse): ops <- models/conditioning/diffusion <- data <- train/eval <- cli.
"""

__version__ = "0.1.0"
