"""The engine's built-in components under their config-group names.

The engine (``streamkv.kv``) knows nothing of Hydra; this table is where the lab gives its classes the
names that ``conf/<group>/<name>.yaml`` and ``registry.create`` use. A component of your own registers
itself with ``@streamkv.register(group, name)`` in its own module instead.
"""

from ..kv.attention import AutoBackend, DenseBackend, FusedBackend, TritonBackend
from ..kv.outliers.ema_relative import EmaRelativeOutliers
from ..kv.outliers.none import NoOutliers
from ..kv.outliers.topk import TopKOutliers
from ..kv.quantizers.fp8 import Fp8Quantizer
from ..kv.quantizers.lloyd_max import LloydMaxQuantizer
from ..kv.quantizers.none import NoQuantizer
from ..kv.quantizers.nonuniform import NonUniformQuantizer
from ..kv.quantizers.per_token import IntPerTokenQuantizer
from ..kv.quantizers.turboquant import TurboQuantQuantizer
from ..kv.quantizers.uniform import UniformQuantizer
from ..kv.sinks.fixed import FixedSinks
from ..kv.sinks.none import NoSinks
from .registry import register

BUILTINS = {
    ("quantizer", "none"): NoQuantizer,
    ("quantizer", "uniform"): UniformQuantizer,
    ("quantizer", "nonuniform"): NonUniformQuantizer,
    ("quantizer", "int_per_token"): IntPerTokenQuantizer,
    ("quantizer", "lloyd_max"): LloydMaxQuantizer,
    ("quantizer", "turboquant"): TurboQuantQuantizer,
    ("quantizer", "fp8"): Fp8Quantizer,
    ("sink", "none"): NoSinks,
    ("sink", "fixed"): FixedSinks,
    ("outlier", "none"): NoOutliers,
    ("outlier", "ema_relative"): EmaRelativeOutliers,
    ("outlier", "topk"): TopKOutliers,
    ("attention", "auto"): AutoBackend,
    ("attention", "dense"): DenseBackend,
    ("attention", "fused"): FusedBackend,
    ("attention", "triton"): TritonBackend,
}

for (_group, _name), _cls in BUILTINS.items():
    register(_group, _name)(_cls)
