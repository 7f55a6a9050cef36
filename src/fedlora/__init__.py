"""fedlora: private federated fine-tuning of transformers with LoRA and FFA-LoRA.

    import fedlora
    summary = fedlora.run(overrides=["privacy.epsilon=3", "method.name=ffa"], out="runs/demo")
"""

from fedlora.config import Config, load_config
from fedlora.errors import FedloraError

__version__ = "0.1.0"


def run(config=None, out=None, **kwargs):
    """Run one experiment; see `fedlora.api.run`."""
    from fedlora.api import run as _run

    return _run(config, out, **kwargs)


__all__ = ["Config", "FedloraError", "load_config", "run", "__version__"]
