"""codistill_ds: codistillation for large language models on DeepSpeed ZeRO and PyTorch FSDP2.

K groups of ranks each train one replica with ordinary sharding inside the group; across groups
only predictions (logits) or, rarely, weights cross, and each replica adds a distillation loss
toward its peers (Anil et al. 2018, arXiv 1804.03235; Sodhani et al., arXiv 2010.02838).

Importing this package imports neither DeepSpeed nor Accelerate: backends load lazily. The
layout of the package, folder by concept, is in docs/design.md ("Layout").
"""

from codistill_ds import logs as _logs

_logs.configure()

__version__ = "0.1.0"
