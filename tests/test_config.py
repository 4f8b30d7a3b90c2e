import pytest

from tfvae import ConfigError, ModelConfig, TrainConfig


def test_defaults_are_the_papers_mlp():
  config = ModelConfig()
  assert config.hidden_sizes == (500,)
  assert config.likelihood == "bernoulli"
  assert config.objective == "elbo"


def test_dict_round_trip_is_equal():
  config = ModelConfig(image_shape=(28, 20, 1), latent_size=2, hidden_sizes=(200, 100),
                       likelihood="gaussian_fixed", observation_scale=0.1)
  assert ModelConfig.from_dict(config.to_dict()) == config
  conv = ModelConfig(image_shape=(32, 32, 3), architecture="conv", conv_channels=[8, 16],
                     likelihood="discretized_logistic", mixture_components=3,
                     coupled_channels=True)
  assert ModelConfig.from_dict(conv.to_dict()) == conv and conv.conv_channels == (8, 16)


@pytest.mark.parametrize("kwargs, phrase", [
    ({"latent_size": 0}, "latent_size=0"),
    ({"likelihood": "poisson"}, "likelihood='poisson' is not one of"),
    ({"likelihood": "gaussian_fixed"}, "positive --observation_scale"),
    ({"likelihood": "gaussian_fixed", "observation_scale": -1.0}, "positive --observation_scale"),
    ({"observation_scale": 0.1}, "only used by a likelihood with a fixed scale"),
    ({"likelihood": "gaussian_fixed", "observation_scale": 1e-4}, r"below 1/\(256 sqrt"),
    ({"objective": "iwae", "num_samples": 1}, "num_samples=K with K >= 2"),
    ({"objective": "iwae", "num_samples": 5, "beta": 0.5}, "no KL weight"),
    ({"beta": -1.0}, "beta=-1.0"),
    ({"kl_warmup_steps": -1}, "kl_warmup_steps=-1 must be >= 0"),
    ({"objective": "iwae", "num_samples": 5, "kl_warmup_steps": 100}, "no KL weight to warm up"),
    ({"hidden_sizes": ()}, "at least one positive width"),
    ({"architecture": "conv", "image_shape": (30,)}, "takes images, not vectors"),
    ({"standardize": True}, "standardized features need a likelihood of real values"),
    ({"conv_channels": (16, 0)}, "conv_channels=\\(16, 0\\) needs at least one positive"),
    ({"mixture_components": 0}, "mixture_components=0 must be at least 1"),
    ({"mixture_components": 5}, "is for a mixture likelihood .* not bernoulli"),
    ({"likelihood": "discretized_logistic", "image_shape": (30,)}, "8-bit pixels, not vectors"),
    ({"coupled_channels": True}, "coupled_channels is for discretized_logistic, not bernoulli"),
    ({"coupled_channels": True, "likelihood": "discretized_logistic"}, r"\(28, 28, 1\) have one"),
    ({"spatial_latent": True}, "pass --architecture=conv"),
    ({"spatial_latent": True, "architecture": "conv", "image_shape": (30, 30, 3),
      "latent_size": 100}, "on the 8x8 grid: pass a multiple of 64, e.g. --latent_size=128"),
])
def test_impossible_model_configs_fail_with_one_line(kwargs, phrase):
  with pytest.raises(ConfigError, match=phrase) as error:
    ModelConfig(**kwargs)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("kwargs, phrase", [
    ({"dataset": "cifar"}, "unknown dataset 'cifar'"),
    ({"dataset": "npz:"}, "needs a PATH"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"learning_rate": 0.0}, "learning_rate=0.0"),
    ({"learning_rate": float("nan")}, "learning_rate=nan"),
    ({"optimizer": "lbfgs"}, "optimizer='lbfgs'"),
    ({"max_examples": 0}, "max_examples=0"),
    ({"dataset": "mnist:extra"}, "mnist takes no argument"),
])
def test_impossible_train_configs_fail(kwargs, phrase):
  with pytest.raises(ConfigError, match=phrase):
    TrainConfig(**kwargs)
