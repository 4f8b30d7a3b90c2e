"""tfvae: the Variational Auto-Encoder of Kingma & Welling (2013) on Keras 3 and TFP."""

from tfvae.config import ConfigError, ModelConfig, TrainConfig
from tfvae.model import VAE, Decoder, Encoder
from tfvae.runtime import Runtime

__version__ = "0.1.0"

__all__ = ["VAE", "ConfigError", "Decoder", "Encoder", "ModelConfig", "Runtime", "TrainConfig"]
