"""tfvae: the Variational Auto-Encoder of Kingma & Welling (2013) on Keras 3 and TFP."""

from tfvae import optimizers  # registers FusedAdam and FusedAdamW for loading checkpoints
from tfvae.config import ConfigError, ModelConfig, TrainConfig
from tfvae.model import VAE, Decoder, Encoder

__version__ = "0.1.0"

__all__ = ["VAE", "ConfigError", "Decoder", "Encoder", "ModelConfig", "TrainConfig", "optimizers"]
